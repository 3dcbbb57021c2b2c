"""The feedback page: a local web app where people give an instance every kind of feedback.

:class:`FeedbackPage` is the page without HTTP (one instance, its journal);
:func:`create_app` serves it with Starlette; ``layerfed instance serve`` runs it
on uvicorn. See ``docs/page.md``.
"""

from __future__ import annotations

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
