"""The client SDK: an :class:`Instance`, its feedback kinds and journal, and the ClientApp.

Names load on first use (:func:`__getattr__`), so importing one submodule does not
import the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfed._lazy import lazy_getattr

if TYPE_CHECKING:
    from layerfed.clients.client_app import client_app, make_client_app
    from layerfed.clients.config import ConfigError, InstanceConfig
    from layerfed.clients.events import (
        Alternative,
        Contrast,
        Demonstration,
        FeedbackEvent,
        InvalidFeedback,
        Marks,
        Preference,
        Redo,
        Span,
        Thumbs,
        parse_event,
    )
    from layerfed.clients.generation import Generation, generate
    from layerfed.clients.guard import OutputGuard
    from layerfed.clients.instance import Instance, InstanceError, RoundUpdate
    from layerfed.clients.instance_rounds import TrainPlan
    from layerfed.clients.journal import FeedbackJournal, JournalError
    from layerfed.clients.local_slots import LocalSlots
    from layerfed.clients.local_train import TrainResult, train_on_events
    from layerfed.clients.node import NodeSource
    from layerfed.clients.routing import RoleError, Route
    from layerfed.clients.source import InstanceSource, NodeRuntime
    from layerfed.clients.superego import Superego

__all__ = [
    "Alternative",
    "ConfigError",
    "Contrast",
    "Demonstration",
    "FeedbackEvent",
    "FeedbackJournal",
    "Generation",
    "Instance",
    "InstanceConfig",
    "InstanceError",
    "InstanceSource",
    "InvalidFeedback",
    "JournalError",
    "LocalSlots",
    "Marks",
    "NodeRuntime",
    "NodeSource",
    "OutputGuard",
    "Preference",
    "Redo",
    "RoleError",
    "RoundUpdate",
    "Route",
    "Span",
    "Superego",
    "Thumbs",
    "TrainPlan",
    "TrainResult",
    "client_app",
    "generate",
    "make_client_app",
    "parse_event",
    "train_on_events",
]

_HOMES: dict[str, str] = {
    "Alternative": "layerfed.clients.events",
    "ConfigError": "layerfed.clients.config",
    "Contrast": "layerfed.clients.events",
    "Demonstration": "layerfed.clients.events",
    "FeedbackEvent": "layerfed.clients.events",
    "FeedbackJournal": "layerfed.clients.journal",
    "Generation": "layerfed.clients.generation",
    "Instance": "layerfed.clients.instance",
    "InstanceConfig": "layerfed.clients.config",
    "InstanceError": "layerfed.clients.instance",
    "InstanceSource": "layerfed.clients.source",
    "InvalidFeedback": "layerfed.clients.events",
    "JournalError": "layerfed.clients.journal",
    "LocalSlots": "layerfed.clients.local_slots",
    "Marks": "layerfed.clients.events",
    "NodeRuntime": "layerfed.clients.source",
    "NodeSource": "layerfed.clients.node",
    "OutputGuard": "layerfed.clients.guard",
    "Preference": "layerfed.clients.events",
    "Redo": "layerfed.clients.events",
    "RoleError": "layerfed.clients.routing",
    "RoundUpdate": "layerfed.clients.instance",
    "Route": "layerfed.clients.routing",
    "Span": "layerfed.clients.events",
    "Superego": "layerfed.clients.superego",
    "Thumbs": "layerfed.clients.events",
    "TrainPlan": "layerfed.clients.instance_rounds",
    "TrainResult": "layerfed.clients.local_train",
    "client_app": "layerfed.clients.client_app",
    "generate": "layerfed.clients.generation",
    "make_client_app": "layerfed.clients.client_app",
    "parse_event": "layerfed.clients.events",
    "train_on_events": "layerfed.clients.local_train",
}
"""Where each public name lives."""


__getattr__ = lazy_getattr("layerfed.clients", _HOMES, globals())
