"""The Flower ClientApp: one model instance that trains its own slot and signs its update.

The same handlers serve simulation (identity from the scenario by partition id)
and deployment (identity from ``--node-config``). Slots whose updates never leave
the instance are committed to the instance's own disk (:class:`InstanceDisk`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from layerfed.clients.local_train import train_on_events
from layerfed.clients.superego import Superego
from layerfed.federation.instance_disk import InstanceDisk
from layerfed.federation.protocol import (
    ENVELOPE,
    IDENTITY,
    METRICS,
    UPDATE,
    Identity,
    MessageError,
    Task,
    arrays_from_record,
    arrays_to_record,
    slot_record_name,
)
from layerfed.federation.settings import (
    RunSettings,
    layer_principal,
    sim_instance_key,
    sim_layer_key,
)
from layerfed.federation.trainer import train_slot
from layerfed.governance.envelope import (
    InstanceCertificate,
    certify_instance,
    envelope_to_dict,
    sign_update,
)
from layerfed.governance.keys import load_private_key
from layerfed.governance.schema import LayerPolicy, Policy
from layerfed.layers.base import load_base
from layerfed.layers.memory import apply_update, decay_arrays
from layerfed.layers.slots import SlotId, slots_for_instance
from layerfed.layers.stack import LayerStack
from layerfed.simulation.feedback import attack_size, feedback_events, randomise_cues
from layerfed.simulation.scenario import Scenario
from layerfed.simulation.world import examples_for, situations_for

__all__ = ["RUN_SETTINGS", "client_app", "handle_query", "handle_train", "make_client_app"]

log = logging.getLogger("layerfed")
VERSIONS = "lf.versions"
RUN = "lf.run"
RUN_SETTINGS = "lf.settings"
"""Optional ConfigRecord of a message: the run's settings (several runs in one simulation)."""


@dataclass
class _Runtime:
    settings: RunSettings
    policy: Policy
    scenario: Scenario | None
    stack: LayerStack
    tokenizer: Any
    shapes: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)


_RUNTIMES: dict[RunSettings, _Runtime] = {}


def _runtime(settings: RunSettings) -> _Runtime:
    """One model and layer stack per process and run, reused across messages."""
    if settings not in _RUNTIMES:
        torch.set_num_threads(1)
        policy = settings.load_policy()
        scenario = settings.load_scenario() if settings.scenario else None
        model, tokenizer = load_base(policy.base_model)
        stack = LayerStack(policy, model, tokenizer, root_seed=settings.seed)
        _RUNTIMES.clear()
        _RUNTIMES[settings] = _Runtime(settings, policy, scenario, stack, tokenizer)
    return _RUNTIMES[settings]


def _split(value: object) -> tuple[str, ...]:
    return tuple(part for part in str(value).split(",") if part)


def _identity(context: Context, rt: _Runtime, task: Task | None = None) -> Identity:
    config = context.node_config
    if "instance-id" in config:
        return Identity(
            index=int(config.get("index", 0)),
            instance_id=str(config["instance-id"]),
            jurisdiction=str(config.get("jurisdiction", "none")),
            groups=_split(config.get("groups", "")),
            layers=_split(config.get("layers", "")),
        )
    if rt.scenario is None:
        raise MessageError("node config: expected 'instance-id' (deployment), got none")
    if task is not None:  # simulation: the server names the roster instance this node runs
        index = task.index
    elif "partition-id" in config:
        index = int(config["partition-id"])
    else:
        raise MessageError("node config: expected 'instance-id' or 'partition-id', got neither")
    spec = rt.scenario.roster[index]
    return Identity(index, spec.id, spec.jurisdiction, tuple(spec.groups), tuple(spec.layers))


def handle_query(msg: Message, context: Context, settings: RunSettings) -> Message:
    """Tell the server who this node is."""
    rt = _runtime(settings)
    identity = _identity(context, rt)
    return Message(RecordDict({IDENTITY: identity.to_record()}), reply_to=msg)


def _disk(settings: RunSettings, context: Context, instance_id: str) -> InstanceDisk:
    root = context.node_config.get("state-dir")
    base = Path(str(root)) if root else settings.out_dir / "state" / "instances"
    return InstanceDisk(base / instance_id)


def _keys(
    settings: RunSettings, context: Context, instance_id: str, layer: str
) -> tuple[Ed25519PrivateKey, InstanceCertificate]:
    if settings.simulated_keys:
        key = sim_instance_key(settings.seed, instance_id)
        cert = certify_instance(
            instance_id,
            key.public_key(),
            layer,
            layer_principal(layer),
            sim_layer_key(settings.seed, layer),
        )
        return key, cert
    key = load_private_key(Path(str(context.node_config["key-file"])))
    folder = Path(str(context.node_config["certificate-dir"]))
    cert_file = folder / f"{layer}.json"
    return key, InstanceCertificate.model_validate_json(cert_file.read_text(encoding="utf-8"))


def _slot_arrays(
    msg: Message, context: Context, rt: _Runtime, task: Task, slot: SlotId, disk: InstanceDisk
) -> dict[str, np.ndarray[Any, Any]]:
    """A slot's arrays for this round: from the message, the node's cache, its disk, or zero."""
    layer = rt.policy.layer(slot.layer)
    name = slot_record_name(slot)
    if not layer.updates_leave_instance:
        saved = disk.load_before(task.round)
        if saved is None:
            return _zeros(rt, slot)
        saved_round, arrays = saved
        own = {k: v for k, v in arrays.items() if k.startswith(f"{slot}/")}
        return (
            decay_arrays(own, layer, rounds=task.round - saved_round) if own else _zeros(rt, slot)
        )
    versions = context.state.config_records.get(VERSIONS, ConfigRecord())
    if name in msg.content.array_records:
        record = msg.content.array_records[name]
        context.state.array_records[name] = record
        versions[str(slot)] = task.versions.get(str(slot), 0)
        context.state.config_records[VERSIONS] = versions
        return arrays_from_record(record, where=name)
    if name in context.state.array_records and versions.get(str(slot)) == task.versions.get(
        str(slot)
    ):
        return arrays_from_record(context.state.array_records[name], where=name)
    return _zeros(rt, slot)


def _zeros(rt: _Runtime, slot: SlotId) -> dict[str, np.ndarray[Any, Any]]:
    """Zero arrays of a slot; shapes are the same for every slot of a layer (cached)."""
    if slot.layer not in rt.shapes:
        shapes = rt.stack.spec(slot).shapes()
        prefix = f"{slot}/"
        rt.shapes[slot.layer] = {n.removeprefix(prefix): s for n, s in shapes.items()}
    prefix = f"{slot}/"
    return {prefix + n: np.zeros(s, dtype=np.float32) for n, s in rt.shapes[slot.layer].items()}


def _clip(
    delta: dict[str, np.ndarray[Any, Any]], layer: LayerPolicy
) -> tuple[dict[str, np.ndarray[Any, Any]], float]:
    norm = float(
        np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in delta.values()))
    )
    if layer.norm_cap is not None and norm > layer.norm_cap:
        factor = layer.norm_cap / norm
        return {k: (v * factor).astype(np.float32) for k, v in delta.items()}, norm
    return delta, norm


def handle_train(msg: Message, context: Context, settings: RunSettings) -> Message:
    """Train the task's slot on this instance's feedback and reply with a signed update."""
    rt = _runtime(settings)
    task = Task.from_content(msg.content)
    identity = _identity(context, rt, task)
    if task.instance_id != identity.instance_id:
        raise MessageError(f"{task.instance_id}: expected a task for {identity.instance_id}")
    layer = rt.policy.layer(task.layer)
    slots = slots_for_instance(
        rt.policy, identity.instance_id, identity.jurisdiction, list(identity.groups)
    )
    _forget_other_runs(context, task.run_id)
    disk = _disk(settings, context, identity.instance_id)
    current = {slot: _slot_arrays(msg, context, rt, task, slot, disk) for slot in slots}
    # A slot whose B is all zero adds nothing to the forward pass: compose only the others.
    composed = [s for s in slots if s == task.slot or any(a.any() for a in current[s].values())]
    rt.stack.activate(composed)
    for slot in composed:
        rt.stack.set_arrays(slot, current[slot])
    trained = _train(rt, identity, task, layer)
    delta, norm = _clip(trained.delta, trained.layer)
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num_examples": float(trained.num_examples),
        "loss_before": trained.loss_before,
        "loss_after": trained.loss_after,
        "norm": norm,
        "superego_interventions": float(trained.superego_interventions),
        "local_commit": 0.0 if layer.updates_leave_instance else 1.0,
    }
    if layer.updates_leave_instance:
        sent = delta
    else:
        own = {
            s: a for s, a in current.items() if not rt.policy.layer(s.layer).updates_leave_instance
        }
        own[task.slot] = apply_update(own[task.slot], delta, layer.server_lr)
        disk.save(task.round, {k: v for arrays in own.values() for k, v in arrays.items()})
        sent = {}
    key, cert = _keys(settings, context, identity.instance_id, task.layer)
    envelope = sign_update(
        sent,
        run_id=task.run_id,
        round=task.round,
        layer=task.layer,
        slot_key=task.slot.key,
        instance_id=identity.instance_id,
        num_examples=trained.num_examples,
        principal_name=cert.issuer,
        private_key=key,
        certificate=cert,
    )
    _release(rt, composed)
    content = RecordDict(
        {
            UPDATE: arrays_to_record(sent),
            ENVELOPE: ConfigRecord(dict(envelope_to_dict(envelope).items())),
            METRICS: MetricRecord(metrics),
        }
    )
    return Message(content, reply_to=msg)


def _release(rt: _Runtime, slots: list[SlotId]) -> None:
    """Keep shared slots in RAM; drop instance-keyed ones so instances do not pile up."""
    shared = [s for s in slots if rt.policy.layer(s.layer).slot_key != "instance"]
    top = rt.policy.layers_by_rank()[0]
    rt.stack.activate(
        shared or [SlotId(top.name, "global" if top.slot_key == "global" else "idle")]
    )
    for slot in slots:
        if slot not in shared:
            rt.stack.evict(slot, recycle=True)


def _seed(settings: RunSettings, task: Task) -> int:
    return int(
        np.random.SeedSequence([settings.seed, task.round, task.index, 17]).generate_state(1)[0]
    )


@dataclass(frozen=True)
class _Trained:
    """One round's local training: the delta and the layer policy it was trained under."""

    delta: dict[str, np.ndarray[Any, Any]]
    layer: LayerPolicy
    num_examples: int
    loss_before: float
    loss_after: float
    superego_interventions: int = 0


def _forget_other_runs(context: Context, run_id: str) -> None:
    """Drop slot arrays a node cached for an earlier run (several runs share one simulation)."""
    runs = context.state.config_records.get(RUN, ConfigRecord())
    if runs.get("run_id") == run_id:
        return
    for name in list(context.state.array_records.keys()):
        del context.state.array_records[name]
    context.state.config_records[VERSIONS] = ConfigRecord()
    context.state.config_records[RUN] = ConfigRecord({"run_id": run_id})


def _train(rt: _Runtime, identity: Identity, task: Task, layer: LayerPolicy) -> _Trained:
    """Train the task's slot on the scenario user's feedback: examples or feedback events."""
    if rt.scenario is None:
        raise MessageError("no scenario: deployed instances train through the client SDK")
    user = rt.scenario.roster[identity.index].user
    rng = np.random.default_rng([rt.settings.seed, task.round, task.index, 29])
    n = attack_size(user, task.round, rng)
    attack = n > 0
    n = n if attack else user.examples
    if attack:  # an adversary ignores the policy's local schedule and norm cap
        steps = max(layer.local.steps, -(-n // layer.local.batch_size))
        local = layer.local.model_copy(update={"steps": steps})
        layer = layer.model_copy(update={"local": local, "norm_cap": None})
    group_style = rt.scenario.group_styles.get(task.slot.key)
    style = group_style if task.layer == "in_group" and group_style else user.style
    seed = _seed(rt.settings, task)
    if user.feedback == "examples":
        examples = examples_for(task.layer, user.kind, style, n, rng, attack=attack)
        result = train_slot(rt.stack, task.slot, layer, rt.tokenizer, examples, seed=seed)
        return _Trained(
            result.delta, layer, result.num_examples, result.loss_before, result.loss_after
        )
    role = "rater" if task.layer == "creator" else user.kind
    situations = situations_for(
        role, style, n, rng, attack=attack, contrast=user.contrast, cues=user.cues
    )
    situations = randomise_cues(situations, user.cue_randomisation, rng)
    token_id = rt.tokenizer.convert_tokens_to_ids
    events = feedback_events(
        user.feedback,
        situations,
        rng,
        token_id,
        reliability=user.reliability,
        schedule=user.schedule,
    )
    superego = Superego.from_policy(rt.policy, rt.stack, rt.tokenizer, seed=seed)
    out = train_on_events(
        rt.stack, task.slot, layer, rt.tokenizer, events, seed=seed, superego=superego
    )
    return _Trained(
        out.delta, layer, out.num_events, out.loss_first, out.loss_last, out.superego_interventions
    )


def make_client_app(settings: RunSettings | None = None) -> ClientApp:
    """A ClientApp bound to ``settings``, or reading them from the run config when None."""
    app = ClientApp()

    def _settings(msg: Message, context: Context) -> RunSettings:
        if RUN_SETTINGS in msg.content.config_records:
            return RunSettings.from_config(msg.content.config_records[RUN_SETTINGS]).resolved()
        return (
            settings
            if settings is not None
            else RunSettings.from_config(context.run_config).resolved()
        )

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, _settings(msg, context))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, _settings(msg, context))

    return app


client_app = make_client_app()
"""The ClientApp `flwr run` loads (``[tool.flwr.app.components]`` in pyproject.toml)."""
