"""The client SDK: an :class:`Instance`, its feedback kinds and journal, and the ClientApp."""

from __future__ import annotations

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
from layerfed.clients.journal import FeedbackJournal, JournalError
from layerfed.clients.local_train import TrainResult, train_on_events
from layerfed.clients.node import NodeSource
from layerfed.clients.source import InstanceSource, NodeRuntime, TrainPlan
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
    "Marks",
    "NodeRuntime",
    "NodeSource",
    "OutputGuard",
    "Preference",
    "Redo",
    "RoundUpdate",
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
