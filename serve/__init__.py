"""The feedback page: a local web app where people give an instance every kind of feedback.

:class:`FeedbackPage` is the page without HTTP (one instance, its journal);
:func:`create_app` serves it with Starlette; ``layerfed instance serve`` runs it
on uvicorn. See ``docs/page.md``.

Names load on first use (:func:`__getattr__`), so importing one submodule does not
import the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfed._lazy import lazy_getattr

if TYPE_CHECKING:
    from layerfed.serve.app import create_app
    from layerfed.serve.errors import PageError, RequestError
    from layerfed.serve.page import FeedbackPage, Given, PanelView
    from layerfed.serve.security import Access

__all__ = [
    "Access",
    "FeedbackPage",
    "Given",
    "PageError",
    "PanelView",
    "RequestError",
    "create_app",
]

_HOMES: dict[str, str] = {
    "Access": "layerfed.serve.security",
    "FeedbackPage": "layerfed.serve.page",
    "Given": "layerfed.serve.page",
    "PageError": "layerfed.serve.errors",
    "PanelView": "layerfed.serve.page",
    "RequestError": "layerfed.serve.errors",
    "create_app": "layerfed.serve.app",
}
"""Where each public name lives."""


__getattr__ = lazy_getattr("layerfed.serve", _HOMES, globals())
