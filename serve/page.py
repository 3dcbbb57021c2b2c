"""The feedback page's model: one :class:`~layerfed.clients.instance.Instance`, its journal.

:class:`FeedbackPage` is everything the web app does, without HTTP: generate an
answer with its per-position candidates, sample two answers to compare, record
one feedback event (validated by the SDK's own checks, journalled durably before
it returns) and describe the instance for the side panel. The instance is not
thread-safe, so every call that touches it holds one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from layerfed.clients.events import FeedbackEvent, parse_event
from layerfed.clients.generation import Generation
from layerfed.clients.instance import Instance, InstanceError
from layerfed.clients.journal import FeedbackJournal
from layerfed.clients.synced import SyncedSlot, SyncedSlots
from layerfed.layers.protect_check import verify_stored_slots
from layerfed.layers.slots import SlotId
from layerfed.serve.errors import PageError
from layerfed.serve.panel import (
    GuardView,
    JournalView,
    LayerView,
    entry_status,
    explain_text,
    guard_view,
    journal_view,
    layer_views,
)
from layerfed.serve.views import Turn, render_turn, summarize

__all__ = ["EntryView", "FeedbackPage", "Given", "PageError", "PanelView"]

log = logging.getLogger("layerfed")


@dataclass(frozen=True)
class Given:
    """A recorded event: its journal seq, kind and one-line summary."""

    seq: int
    kind: str
    summary: str


@dataclass(frozen=True)
class EntryView:
    """One journal entry as the page lists it."""

    seq: int
    kind: str
    summary: str
    status: str
    label: str
    """The status in a person's words (``sent in round 3, awaiting acknowledgement``)."""
    round: int | None
    recorded_at: str
    layer: str | None = None
    """The layer the event trains (None for events journalled before routing)."""


@dataclass(frozen=True)
class PanelView:
    """Everything the side panel shows."""

    instance_id: str
    policy: str
    layers: tuple[LayerView, ...]
    journal: JournalView
    guard: GuardView
    explain: str


class FeedbackPage:
    """A person's view of one instance: answers with candidates, feedback into the journal.

    Events go through :meth:`Instance.feedback <layerfed.clients.instance.Instance.feedback>`,
    which checks them and appends them to the instance's journal. Limits keep one
    request cheap: prompts of at most ``max_prompt_chars`` characters, at most
    ``max_new_tokens`` tokens and ``max_top_k`` candidates per position.

    ``synced`` is the instance's synced slot store (``<state>/synced``, written by its
    node after each run): :meth:`refresh_synced` composes newer committed versions
    found there, so the page shows and uses them without a restart.
    """

    def __init__(
        self,
        instance: Instance,
        *,
        top_k: int = 5,
        max_new_tokens: int = 8,
        max_top_k: int = 20,
        max_tokens_limit: int = 64,
        max_prompt_chars: int = 2000,
        max_turns: int = 50,
        pair_temperature: float = 1.0,
        synced: Path | None = None,
    ) -> None:
        if instance.tokenizer is None:
            raise PageError("instance", "an instance with a tokenizer", None)
        self.instance = instance
        self.tokenizer: PreTrainedTokenizerBase = instance.tokenizer
        self.journal: FeedbackJournal = instance.journal
        self.top_k, self.max_new_tokens = top_k, max_new_tokens
        self.max_top_k, self.max_tokens_limit = max_top_k, max_tokens_limit
        self.max_prompt_chars = max_prompt_chars
        self.pair_temperature = pair_temperature
        self._lock = threading.Lock()
        self._turns: deque[Turn] = deque(maxlen=max_turns)
        self._next_turn = 1
        self._seen = dict(instance.versions)
        self._changed_at: dict[str, float] = {}
        self._explain: str | None = None
        self.synced = synced

    # -- answers ------------------------------------------------------------------------------

    def _prompt(self, prompt: object) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PageError("prompt", "a non-empty text", prompt)
        if len(prompt) > self.max_prompt_chars:
            expected = f"at most {self.max_prompt_chars} characters"
            raise PageError("prompt", expected, f"{len(prompt)} characters")
        return prompt

    def _bounded(self, field: str, value: object, default: int, upper: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
            raise PageError(field, f"an integer from 1 to {upper}", value)
        return value

    def _generate(self, prompt: str, top_k: int, max_new: int, temperature: float) -> Turn:
        with self._lock:
            generation = self.instance.generate(prompt, max_new, top_k, temperature)
            turn_id, self._next_turn = self._next_turn, self._next_turn + 1
        return render_turn(generation, self.tokenizer, turn_id, temperature)

    def ask(self, prompt: object, *, top_k: object = None, max_new_tokens: object = None) -> Turn:
        """Answer ``prompt`` greedily; the turn joins the conversation the page shows."""
        text = self._prompt(prompt)
        k = self._bounded("top_k", top_k, self.top_k, self.max_top_k)
        n = self._bounded(
            "max_new_tokens", max_new_tokens, self.max_new_tokens, self.max_tokens_limit
        )
        turn = self._generate(text, k, n, 0.0)
        with self._lock:
            self._turns.append(turn)
        return turn

    def pair(self, prompt: object, tries: int = 6) -> tuple[Turn, Turn]:
        """Two sampled answers to compare; up to ``tries`` draws to make them differ."""
        text = self._prompt(prompt)
        first = self._generate(text, self.top_k, self.max_new_tokens, self.pair_temperature)
        second = first
        for _ in range(tries):
            second = self._generate(text, self.top_k, self.max_new_tokens, self.pair_temperature)
            if second.text != first.text:
                break
        return first, second

    def show(self, generation: Generation) -> Turn:
        """Add an answer the instance generated elsewhere (an app's SDK call) to the page."""
        with self._lock:
            turn_id, self._next_turn = self._next_turn, self._next_turn + 1
        turn = render_turn(generation, self.tokenizer, turn_id)
        with self._lock:
            self._turns.append(turn)
        return turn

    @property
    def turns(self) -> tuple[Turn, ...]:
        """The conversation so far (the latest ``max_turns`` answers), oldest first."""
        with self._lock:
            return tuple(self._turns)

    # -- feedback -----------------------------------------------------------------------------

    def give(self, data: FeedbackEvent | Mapping[str, Any]) -> Given:
        """Validate one event with the SDK's checks and journal it durably; return its seq.

        Raises :class:`~layerfed.clients.events.InvalidFeedback` naming the field; nothing
        is written then, and everything given before stays in the journal.
        """
        event = parse_event(data) if isinstance(data, Mapping) else data
        with self._lock:
            seq = self.instance.feedback(event)
        log.debug("page: journalled %s event as seq %s", event.kind, seq)
        return Given(seq, event.kind, summarize(event, self.tokenizer))

    def history(self, limit: int = 100) -> tuple[list[EntryView], int]:
        """The latest ``limit`` journal entries, newest first, and how many there are."""
        entries = self.journal.entries()
        states = {b.id: b.state for b in self.journal.batches()}
        tokenizer = self.tokenizer
        views = [
            EntryView(
                seq=e.seq,
                kind=e.event.kind,
                summary=summarize(e.event, tokenizer),
                status=e.status,
                label=entry_status(e.status, e.round, states.get(e.batch or "")),
                round=e.round,
                recorded_at=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.recorded_at)),
                layer=getattr(e, "layer", None),
            )
            for e in reversed(entries[-limit:] if limit else entries)
        ]
        return views, len(entries)

    # -- committed versions -------------------------------------------------------------------

    def synced_status(self) -> dict[str, SyncedSlot]:
        """The newest saved version of each synced slot, by slot name (empty without a store)."""
        if self.synced is None:
            return {}
        return {row.slot: row for row in SyncedSlots(self.synced, None).status()}

    def refresh_synced(self) -> list[str]:
        """Compose the committed versions the node saved since the page started; the slots
        updated. A saved version's A is checked against the seed and red-line basis first."""
        if self.synced is None or not SyncedSlots.exists(self.synced):
            return []
        store = SyncedSlots(self.synced, None).store()
        with self._lock:
            current = dict(self.instance.versions)
        newer = {
            name: row.version
            for name, row in self.synced_status().items()
            if name in current and row.version > current[name]
        }
        if not newer:
            return []
        latest = {name: {"version": store.versions(SlotId.parse(name))[-1]} for name in newer}
        verify_stored_slots(store, latest, self.instance.stack.spec)
        arrays = {name: store.load(SlotId.parse(name)) for name in newer}
        with self._lock:
            self.instance.sync(arrays, newer)
        log.info("page: composed committed versions %s", newer)
        return sorted(newer)

    def versions(self) -> dict[str, int]:
        """Each slot's version the instance composes now (after :meth:`refresh_synced`)."""
        self.refresh_synced()
        with self._lock:
            return dict(self.instance.versions)

    # -- side panel ---------------------------------------------------------------------------

    def panel(self) -> PanelView:
        """The layers composing the instance, the journal's state and the output guard."""
        self.refresh_synced()
        instance = self.instance
        with self._lock:
            versions = dict(instance.versions)
            now = time.time()
            for name, version in versions.items():
                if self._seen.get(name) != version:
                    self._changed_at[name] = now
            self._seen = versions
            blocks = instance.guard_blocks
        try:
            own: str | None = instance.slot_for().layer
        except InstanceError:
            own = None
        if self._explain is None:
            self._explain = explain_text(instance.policy)
        layers = layer_views(
            instance.policy, instance.slots, versions, self._changed_at, own, self.synced_status()
        )
        return PanelView(
            instance_id=instance.instance_id,
            policy=f"{instance.policy.name} v{instance.policy.version}",
            layers=tuple(layers),
            journal=journal_view(self.journal),
            guard=guard_view(instance.guard, instance.policy, blocks),
            explain=self._explain,
        )
