"""Secure aggregation on a real Flower simulation: the server learns sums only, dropouts behave.

Two gym runs of one in_group slot with six members: a plain one (the reference
weighted mean of round 1) and a secure one whose ClientApp carries a Flower mod
that makes members fail mid-protocol (round 2: one member, below the dropout
threshold; round 3: three of six, above it) and that saves each member's
encoded, unmasked vector to disk so the test can compare it with the wire.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp

from layerfed.clients.client_app import handle_query, handle_train
from layerfed.clients.secagg_client import VECTOR, handle_secagg
from layerfed.federation.server_state import ServerState
from layerfed.layers.slots import SlotId
from layerfed.simulation.client import GymSource
from layerfed.simulation.runner import SettingsGrid
from layerfed.simulation.server import run_gym_server
from layerfed.simulation.settings import SimSettings
from layerfed.simulation.simulate import simulate
from layerfed.wire.protocol import TASK
from layerfed.wire.secagg import SECAGG
from tests.policy_helpers import default_data, write_yaml

pytestmark = pytest.mark.slow
SLOT = SlotId("in_group", "g1")
SCENARIO = {
    "name": "secagg",
    "seed": 0,
    "rounds": 3,
    "populations": [
        {
            "count": 6,
            "id_prefix": "m-",
            "jurisdictions": ["eu"],
            "groups": [["g1"]],
            "styles": ["great", "thanks", "ok"],
            "layers": ["in_group"],
            "user": {"kind": "stylist", "examples": 8},
        }
    ],
    "sample_per_layer": {"in_group": 6},
}
SECAGG_PARAMS = {"threshold": 0.6, "clip_range": 0.5, "quantization_bits": 20}
DROPS = {2: {"m-1"}, 3: {"m-1", "m-2", "m-3"}}
"""Round -> members that fail at the collect stage (after sharing their keys)."""


def _policy(tmp: Path, secure: bool) -> Path:
    data = default_data()
    group = next(layer for layer in data["layers"] if layer["name"] == "in_group")
    group.update(aggregator={"kind": "fedavg"}, min_clients=3)
    group.pop("norm_cap", None)
    if secure:
        group["privacy"] = {
            "mode": "secure_aggregation",
            "secagg": {**SECAGG_PARAMS, "max_dropout_fraction": 0.4},
        }
    for veto in data["vetoes"]:
        if veto["name"] == "government_norm":
            veto["action"] = "reject"
        if veto["condition"]["kind"] == "probe_regression":
            veto["condition"]["max_regression"] = 1.0
    return write_yaml(tmp, data, "secure.yaml" if secure else "plain.yaml")


def _settings(tmp: Path, secure: bool, rounds: int) -> SimSettings:
    (tmp / "scenario.yaml").write_text(yaml.safe_dump(SCENARIO), encoding="utf-8")
    return SimSettings(
        policy=str(_policy(tmp, secure)),
        scenario=str(tmp / "scenario.yaml"),
        out=str(tmp / ("secure" if secure else "plain")),
        rounds=rounds,
        verify=False,
        run_id="secure" if secure else "plain",
    )


class Recorder(SettingsGrid):
    """The gym's grid, keeping every message the server receives."""

    received: list[Message]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.received.extend(replies)
        return replies


def _server(settings: SimSettings, received: list[Message]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        recorder = Recorder(grid, settings.resolved())
        recorder.received = received
        run_gym_server(recorder, context, settings)

    return app


def member_round(msg: Message) -> tuple[str, str, int] | None:
    """(run, instance, round) a message is for: its task, or a later stage's round key."""
    task = msg.content.config_records.get(TASK)
    if task is not None:
        return str(task["run_id"]), str(task["instance_id"]), int(task["round"])  # type: ignore[call-overload]
    record = msg.content.config_records.get(SECAGG)
    if record is None:
        return None
    run, round_, _, instance = str(record["key"]).split("|")
    return run, instance, int(round_)


def _client(settings: SimSettings, stash: Path) -> ClientApp:
    source = GymSource(settings)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        who = member_round(msg)
        stage = (
            msg.content.config_records[SECAGG]["stage"]
            if SECAGG in msg.content.config_records
            else ""
        )
        if who is not None and stage == "collect" and who[1] in DROPS.get(who[2], ()):
            raise RuntimeError("node lost mid-protocol")
        reply = call_next(msg, context)
        if who is not None and stage == "setup" and VECTOR in context.state.array_records:
            name = f"{who[1]}-{who[2]}.npy"
            np.save(stash / name, context.state.array_records[VECTOR]["q"].numpy())
        return reply

    app = ClientApp(mods=[mod])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, source)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, source)

    @app.train("secagg")
    def secagg(msg: Message, context: Context) -> Message:
        return handle_secagg(msg, context, source)

    return app


def _audit(out: Path, kind: str) -> list[dict[str, Any]]:
    lines = (out / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["fields"] for r in map(json.loads, lines) if r["kind"] == kind]


def _arrays(message: Message) -> list[np.ndarray[Any, Any]]:
    if not message.has_content():  # a node that failed: an error, no content
        return []
    return [a.numpy() for record in message.content.array_records.values() for a in record.values()]


def _decoded(stash: Path, members: list[str], round_: int) -> tuple[np.ndarray[Any, Any], float]:
    levels, c = 2**20 - 1, SECAGG_PARAMS["clip_range"]
    vectors = [np.load(stash / f"{m}-{round_}.npy").astype(np.float64) for m in members]
    weight = sum(v[0] for v in vectors) / levels
    total = sum(v[1:] * (2 * c / levels) - c for v in vectors)
    return total / weight, weight


def test_secure_aggregation_on_a_real_simulation(tmp_path: Path) -> None:
    """The server receives no individual update, commits the weighted mean, recovers or skips dropouts."""
    plain_received: list[Message] = []
    plain = _settings(tmp_path, secure=False, rounds=1)
    simulate(plain, server_app=_server(plain, plain_received))
    settings = _settings(tmp_path, secure=True, rounds=3)
    received: list[Message] = []
    stash = tmp_path / "stash"
    stash.mkdir()
    state = simulate(
        settings, server_app=_server(settings, received), client_app=_client(settings, stash)
    )

    # Nothing the server received is an individual update, raw or encoded.
    raw = [a for m in plain_received for a in _arrays(m) if a.dtype == np.float32]
    assert len(raw) >= 6
    encoded = [np.load(p) for p in stash.glob("*.npy")]
    for message in received:
        for array in _arrays(message):
            assert array.dtype == np.uint32
            assert not any(np.array_equal(array, e) for e in encoded)
            assert not any(array.size == r.size for r in raw)

    # Round 1: the committed step is the plain weighted mean's, within the quantisation error.
    plain_state = ServerState(Path(plain.out), plain.load_policy(), "x")
    reference = plain_state.store.load(SLOT, 1)
    secure_v1 = state.store.load(SLOT, 1)
    lr, levels = 0.3, 2**20 - 1
    _, weight = _decoded(stash, [f"m-{i}" for i in range(6)], 1)
    bound = lr * 6 * (2 * SECAGG_PARAMS["clip_range"] / levels) / weight + 1e-6
    for name in reference:
        assert np.max(np.abs(secure_v1[name] - reference[name])) <= bound

    # Round 2: one of six dropped after sharing keys (below the threshold): recovered exactly.
    secagg = {r["round"]: r for r in _audit(Path(settings.out), "secagg")}
    assert secagg[2]["outcome"] == "unmasked" and secagg[2]["masked"] == 5
    survivors = [f"m-{i}" for i in range(6) if f"m-{i}" not in DROPS[2]]
    mean, _ = _decoded(stash, survivors, 2)
    v2 = state.store.load(SLOT, 2)
    step = np.concatenate([(v2[n] - secure_v1[n]).astype(np.float64).ravel() for n in sorted(v2)])
    np.testing.assert_allclose(step, lr * mean, atol=1e-6)

    # Round 3: half the cohort dropped (above max_dropout_fraction 0.4): skipped, audited.
    assert secagg[3]["outcome"].startswith("too_many_dropouts")
    skipped = [r for r in _audit(Path(settings.out), "slot_skipped") if r["round"] == 3]
    assert skipped and skipped[0]["reason"].startswith("too_many_dropouts")
    assert state.store.versions(SLOT) == [1, 2]
