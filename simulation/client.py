"""The gym's side of the ClientApp: simulated people give feedback to instances.

:class:`GymSource` is an :class:`~layerfed.clients.source.InstanceSource`: instance
``i`` of the scenario's roster runs on whichever virtual node the server routes
it to, signs with keys the gym derives from its seed, and before each round its
simulated user gives this round's feedback (demonstrations or feedback events) to
the instance through its public API (:meth:`Instance.feedback_many`, checked and
journalled as a person's feedback is). The ClientApp then trains exactly as a
deployed one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from layerfed.clients.client_app import make_client_app
from layerfed.clients.events import Demonstration, FeedbackEvent
from layerfed.clients.instance import Instance
from layerfed.clients.source import InstanceSource, NodeRuntime, TrainPlan
from layerfed.governance.schema_roles import roles_of
from layerfed.layers.base import load_base
from layerfed.layers.instance_disk import InstanceDisk
from layerfed.layers.stack import LayerStack
from layerfed.simulation.feedback import attack_size, feedback_events, randomise_cues
from layerfed.simulation.keys import sim_certificate, sim_instance_key
from layerfed.simulation.scenario import Scenario
from layerfed.simulation.settings import SimSettings
from layerfed.simulation.world import examples_for, situations_for
from layerfed.wire.protocol import Identity, MessageError, Task

__all__ = ["RUN_SETTINGS", "GymSource", "gym_client_app"]

log = logging.getLogger("layerfed")
RUN_SETTINGS = "lf.settings"
"""The gym's ConfigRecord on each message: the run's settings (several runs in one simulation)."""


_RUNTIMES: dict[tuple[SimSettings, str], tuple[NodeRuntime, Scenario]] = {}
"""The worker process's models and stacks, one per run and policy (its hash): Flower's Ray
backend sends the ClientApp (and so a fresh :class:`GymSource`) with every message, so the
cache lives in the module. Runs going at once (the runner's lanes) each keep theirs; a
policy file that changed gets a fresh runtime, never the stale one."""
_KEEP = 4
"""Runtimes a worker keeps (least recently used dropped first)."""


class GymSource(InstanceSource):
    """Simulated instances of a scenario; settings bound, or read from each message."""

    def __init__(self, settings: SimSettings | None = None) -> None:
        self.bound = settings
        self._current: tuple[SimSettings, str] | None = None
        self._task: Task | None = None

    def settings(self, msg: Message) -> SimSettings:
        """The run's settings: stamped on the message by the gym's runner, else bound."""
        if RUN_SETTINGS in msg.content.config_records:
            record = msg.content.config_records[RUN_SETTINGS]
            return SimSettings.from_config(record).resolved()  # type: ignore[return-value]
        if self.bound is None:
            raise MessageError(f"{RUN_SETTINGS}: expected the gym's run settings, got none")
        return self.bound.resolved()

    def runtime(self, msg: Message, context: Context) -> NodeRuntime:
        """One model and layer stack per process, run and policy, reused across messages.

        The runtime carries the hash of the policy it loaded, so a task for another
        policy is refused as on a deployed node (``MessageError`` naming both hashes).
        """
        settings = self.settings(msg)
        policy, verified_hash = settings.loaded_policy()
        key = (settings, verified_hash)
        self._current = key
        if key not in _RUNTIMES:
            torch.set_num_threads(1)
            device, dtype = settings.instance_placement()
            model, tokenizer = load_base(policy.base_model, device=device, dtype=dtype)
            stack = LayerStack(policy, model, tokenizer, root_seed=settings.seed)
            while len(_RUNTIMES) >= _KEEP:
                del _RUNTIMES[next(iter(_RUNTIMES))]
            rt = NodeRuntime(policy, stack, policy_hash=verified_hash)
            _RUNTIMES[key] = (rt, settings.load_scenario())
        else:
            _RUNTIMES[key] = _RUNTIMES.pop(key)  # most recently used last
        return _RUNTIMES[key][0]

    def _scenario(self) -> tuple[SimSettings, Scenario]:
        assert self._current is not None
        return self._current[0], _RUNTIMES[self._current][1]

    def identity(
        self, msg: Message, context: Context, rt: NodeRuntime, task: Task | None
    ) -> Identity:
        """Roster instance ``task.index`` (or the node's partition id when asked who it is)."""
        _, scenario = self._scenario()
        self._task = task
        if task is not None:
            index = task.index
        elif "partition-id" in context.node_config:
            index = int(context.node_config["partition-id"])
        else:
            raise MessageError("node config: expected 'partition-id' (simulation), got none")
        return scenario.roster.identity(index)

    def instance(
        self, msg: Message, context: Context, rt: NodeRuntime, identity: Identity
    ) -> Instance:
        """A fresh instance view on the shared stack, with an in-memory journal."""
        settings, _ = self._scenario()
        certs = {
            layer: sim_certificate(settings.seed, identity.instance_id, layer)
            for layer in identity.layers
        }
        return Instance(
            rt.policy,
            instance_id=identity.instance_id,
            jurisdiction=identity.jurisdiction,
            groups=identity.groups,
            stack=rt.stack,
            key=sim_instance_key(settings.seed, identity.instance_id),
            certificates=certs,
            seed=_seed(settings, identity.index, self._task.round if self._task else 0),
        )

    def disk(self, context: Context, identity: Identity) -> InstanceDisk:
        """``<out>/state/instances/<id>`` (the gym's evaluator reads it there)."""
        settings, _ = self._scenario()
        root = context.node_config.get("state-dir")
        base = Path(str(root)) if root else settings.out_dir / "state" / "instances"
        return InstanceDisk(base / identity.instance_id)

    def prepare_round(self, instance: Instance, identity: Identity, task: Task) -> TrainPlan:
        """The simulated user gives this round's feedback to the instance; how to train it."""
        settings, scenario = self._scenario()
        user = scenario.roster[identity.index].user
        layer = instance.policy.layer(task.layer)
        rng = np.random.default_rng([settings.seed, task.round, task.index, 29])
        n = attack_size(user, task.round, rng)
        attack = n > 0
        n = n if attack else user.examples
        override = None
        if attack:  # an adversary ignores the policy's local schedule and norm cap
            steps = max(layer.local.steps, -(-n // layer.local.batch_size))
            local = layer.local.model_copy(update={"steps": steps})
            override = layer.model_copy(update={"local": local, "norm_cap": None})
        group_style = scenario.group_styles.get(task.slot.key)
        style = group_style if task.layer == "in_group" and group_style else user.style
        events: list[FeedbackEvent]
        if user.feedback == "examples":
            examples = examples_for(task.layer, user.kind, style, n, rng, attack=attack)
            events = [
                Demonstration(prompt=e.prompt, response=e.response, weight=e.weight)
                for e in examples
            ]
        else:
            role = "rater" if task.layer == "creator" else user.kind
            situations = situations_for(
                role, style, n, rng, attack=attack, contrast=user.contrast, cues=user.cues
            )
            situations = randomise_cues(situations, user.cue_randomisation, rng)
            events = feedback_events(
                user.feedback,
                situations,
                rng,
                _token_id(instance),
                reliability=user.reliability,
                schedule=user.schedule,
            )
        instance.feedback_many(events, role=roles_of(instance.policy, task.layer)[0])
        seed = _seed(settings, task.index, task.round)
        return TrainPlan(seed=seed, layer=override, noise_seed=seed)


def _token_id(instance: Instance) -> Callable[[str], int]:
    tokenizer: Any = instance.tokenizer

    def token_id(word: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(word))

    return token_id


def _seed(settings: SimSettings, index: int, round_: int) -> int:
    return int(np.random.SeedSequence([settings.seed, round_, index, 17]).generate_state(1)[0])


def gym_client_app(settings: SimSettings | None = None) -> ClientApp:
    """The ClientApp of a simulated federation (settings bound, or stamped on messages)."""
    return make_client_app(GymSource(settings))


def stamp(settings: SimSettings) -> ConfigRecord:
    """The record the gym's runner puts on every message of a run."""
    return ConfigRecord(dict(settings.to_config()))
