"""Hostile clients through the server's whole per-round path (``process_replies``).

Each test builds genuine signed replies the way ``client_app.handle_train`` does
(an instance key certified by the simulated layer principal), corrupts one, and
checks that the corrupt reply is refused or neutralised, that the reason is in
the audit log, and that the committed state and the red-line probe rate equal
those of the same round without the hostile reply.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, Message
from round_helpers import (
    COMMUNITY,
    CREATOR,
    Arrays,
    Harness,
    assert_neutralised,
    hostile_round,
    policy,
    refusal,
)

from layerfed.layers.slots import SlotId
from layerfed.wire.protocol import UPDATE


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"layer": "creator", "cert_layer": "community"}, "forged_claim"),
        ({"cert_layer": "community", "issuer_layer": "community"}, "bad_certificate"),
        ({"cert_layer": "creator", "issuer_layer": "community"}, "forged_layer"),
    ],
)
def test_forged_layer_claim_refused(tmp_path: Path, claims: dict[str, str], reason: str) -> None:
    """Community credentials never pass for the creator layer, however the claim is forged."""

    def make(h: Harness, node: int) -> list[Message]:
        if claims.get("layer") == "creator":
            h.task(node, COMMUNITY)
        return [h.reply(node, h.arrays(CREATOR, scale=1.0, seed=99), **claims)]

    h, node = hostile_round(tmp_path, CREATOR, make)
    assert refusal(h, node)["reason"] == reason
    assert_neutralised(tmp_path, h, CREATOR, [1, 2])


def test_replay_of_earlier_round_refused(tmp_path: Path) -> None:
    """A genuine round-1 reply sent again in round 2 is refused as stale."""
    first = Harness(tmp_path / "first")
    first.task(9, CREATOR)
    old = first.reply(9, first.arrays(CREATOR, scale=1.0, seed=99))
    h = Harness(tmp_path / "hostile", round_=2)
    for node in (1, 2, 9):
        h.task(node, CREATOR)
    replayed = Message(old.content, reply_to=h.instructions[9])
    h.run([h.reply(1, h.arrays(CREATOR, seed=1)), h.reply(2, h.arrays(CREATOR, seed=2)), replayed])
    assert refusal(h, 9)["reason"] == "stale_round"
    clean = Harness(tmp_path / "clean", round_=2)
    for node in (1, 2):
        clean.task(node, CREATOR)
    clean.run([clean.reply(n, clean.arrays(CREATOR, seed=n)) for n in (1, 2)])
    assert h.state.digest() == clean.state.digest()
    assert h.redline_rate() == clean.redline_rate()


def test_duplicate_reply_in_one_round_refused(tmp_path: Path) -> None:
    """A second reply from the same instance in one round is refused as a replay."""

    def make(h: Harness, node: int) -> list[Message]:
        del h.pending[node]
        return [h.reply(1, h.arrays(CREATOR, scale=1.0, seed=99))]

    h, _ = hostile_round(tmp_path, CREATOR, make)
    assert refusal(h, 1)["reason"] == "replay"
    assert_neutralised(tmp_path, h, CREATOR, [1, 2])


def test_wrong_run_id_refused(tmp_path: Path) -> None:
    """An update signed for another run is refused."""

    def make(h: Harness, node: int) -> list[Message]:
        return [h.reply(node, h.arrays(CREATOR, scale=1.0), run_id="another-run")]

    h, node = hostile_round(tmp_path, CREATOR, make)
    assert refusal(h, node)["reason"] == "wrong_run"
    assert_neutralised(tmp_path, h, CREATOR, [1, 2])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda a: a[:, :-1].copy(), "wrong_shape"),
        (lambda a: a.T.copy(), "wrong_shape"),
        (lambda a: a.astype(np.float64), "wrong_dtype"),
        (lambda a: a.astype(np.float16), "wrong_dtype"),
        (lambda a: a.astype(np.int32), "wrong_dtype"),
    ],
)
def test_wrong_shapes_or_dtypes_refused(
    tmp_path: Path, change: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]], reason: str
) -> None:
    """Arrays of the wrong shape or dtype are refused with the array named."""

    def make(h: Harness, node: int) -> list[Message]:
        arrays = h.arrays(CREATOR, seed=node)
        first = sorted(arrays)[0]
        arrays[first] = change(arrays[first])
        return [h.reply(node, arrays)]

    h, node = hostile_round(tmp_path, CREATOR, make)
    record = refusal(h, node)
    assert record["reason"] == reason
    assert "creator/global/" in record["detail"]
    assert_neutralised(tmp_path, h, CREATOR, [1, 2])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_refused(tmp_path: Path, bad: float) -> None:
    """One non-finite value anywhere refuses the whole reply."""

    def make(h: Harness, node: int) -> list[Message]:
        arrays = h.arrays(CREATOR, seed=node)
        arrays[sorted(arrays)[-1]][3, 1] = bad
        return [h.reply(node, arrays)]

    h, node = hostile_round(tmp_path, CREATOR, make)
    assert refusal(h, node)["reason"] == "not_finite"
    assert_neutralised(tmp_path, h, CREATOR, [1, 2])


def _extra(h: Harness, slot: SlotId, module: str) -> Arrays:
    arrays = h.arrays(slot, seed=9)
    arrays[f"{slot}/main/{module}.lora_B"] = np.ones((256, 4), dtype=np.float32)
    return arrays


def test_keys_outside_scope_refused(tmp_path: Path) -> None:
    """An array for a parameter outside the layer's scope is refused."""

    def make(h: Harness, node: int) -> list[Message]:
        return [h.reply(node, _extra(h, COMMUNITY, "transformer.h.0.attn.c_attn"))]

    h, node = hostile_round(tmp_path, COMMUNITY, make)
    record = refusal(h, node)
    assert record["reason"] == "out_of_scope"
    assert "transformer.h.0.attn.c_attn" in record["detail"]
    assert_neutralised(tmp_path, h, COMMUNITY, [1, 2])


@pytest.mark.parametrize("module", ["transformer.wte", "lm_head", "transformer.h.0.ln_1"])
def test_keys_on_red_line_parameters_refused(tmp_path: Path, module: str) -> None:
    """An array touching a red-line parameter is refused, even from the creator."""

    def make(h: Harness, node: int) -> list[Message]:
        return [h.reply(node, _extra(h, CREATOR, module))]

    h, node = hostile_round(tmp_path, CREATOR, make)
    assert refusal(h, node)["reason"] == "red_line"
    assert_neutralised(tmp_path, h, CREATOR, [1, 2])


def test_huge_norm_refused_without_clip_veto(tmp_path: Path) -> None:
    """Above the creator's norm cap (no clip veto applies) an update is refused."""

    def make(h: Harness, node: int) -> list[Message]:
        return [h.reply(node, h.arrays(CREATOR, scale=1e6, seed=node))]

    h, node = hostile_round(tmp_path, CREATOR, make)
    assert refusal(h, node)["reason"] == "norm_exceeded"
    assert_neutralised(tmp_path, h, CREATOR, [1, 2])


def test_huge_norm_clipped_under_clip_veto(tmp_path: Path) -> None:
    """Under the government's clip veto a huge community update is scaled to the cap, audited."""
    layer = policy().layer("community")
    assert layer.norm_cap is not None
    h = Harness(tmp_path)
    before = h.redline_rate()
    for node in (1, 2, 9):
        h.task(node, COMMUNITY)
    huge = h.arrays(COMMUNITY, scale=1e6, seed=9)
    h.run([h.reply(n, h.arrays(COMMUNITY, seed=n)) for n in (1, 2)] + [h.reply(9, huge)])
    clipped = [r for r in h.records("update_clipped") if r["instance"] == "inst-9"]
    assert len(clipped) == 1 and "clipped" in clipped[0]["detail"]
    committed = h.committed(COMMUNITY)
    norm = float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in committed.values())))
    assert norm <= layer.server_lr * layer.norm_cap + 1e-6
    assert h.redline_rate() <= before


def test_sign_flipping_byzantine_minority_neutralised_by_median(tmp_path: Path) -> None:
    """3 of 10 clients sending -3x the honest direction barely move the median aggregate."""
    layer = policy().layer("community")
    assert layer.aggregator.kind == "median"
    h = Harness(tmp_path)
    before = h.redline_rate()
    direction = h.arrays(COMMUNITY, scale=2e-3, seed=1000)
    replies = []
    for node in range(10):
        h.task(node, COMMUNITY)
        noise = h.arrays(COMMUNITY, scale=2e-4, seed=node)
        sign = -3.0 if node < 3 else 1.0
        replies.append(h.reply(node, {n: sign * direction[n] + noise[n] for n in direction}))
    report = h.run(replies)
    assert report.committed == [str(COMMUNITY)]
    [commit] = h.records("commit")
    assert commit["aggregator"] == "median" and commit["replies"] == 10
    got = np.concatenate([a.ravel() for _, a in sorted(h.committed(COMMUNITY).items())])
    want = layer.server_lr * np.concatenate([a.ravel() for _, a in sorted(direction.items())])
    plain_mean = want * (7 - 9) / 10
    assert np.linalg.norm(got - want) < 0.25 * np.linalg.norm(want)
    assert np.linalg.norm(plain_mean - want) > 1.0 * np.linalg.norm(want)
    assert h.redline_rate() <= before


def test_oversized_payload_refused_before_decoding(tmp_path: Path) -> None:
    """A payload far larger than the slot is refused as oversized, not decoded."""

    def make(h: Harness, node: int) -> list[Message]:
        arrays = h.arrays(CREATOR, seed=node)
        first = sorted(arrays)[0]
        arrays[first] = np.zeros((256, 4 * 1024), dtype=np.float32)
        return [h.reply(node, arrays)]

    h, node = hostile_round(tmp_path, CREATOR, make)
    record = refusal(h, node)
    assert record["reason"] == "oversized"
    assert "bytes" in record["detail"]
    assert_neutralised(tmp_path, h, CREATOR, [1, 2])


def test_undecodable_payload_refused(tmp_path: Path) -> None:
    """Array bytes that are not a numpy array are refused as malformed."""

    def make(h: Harness, node: int) -> list[Message]:
        message = h.reply(node, h.arrays(CREATOR, seed=node))
        record = message.content.array_records[UPDATE]
        name = sorted(record)[0]
        record[name] = Array(dtype="float32", shape=(256, 4), stype="numpy.ndarray", data=b"x")
        return [message]

    h, node = hostile_round(tmp_path, CREATOR, make)
    assert refusal(h, node)["reason"] == "malformed"
    assert_neutralised(tmp_path, h, CREATOR, [1, 2])


def test_inflated_num_examples_capped(tmp_path: Path) -> None:
    """A reply claiming a billion examples weighs no more than the policy's local budget."""
    layer = policy().layer("creator")
    assert layer.aggregator.kind == "fedavg"
    budget = layer.local.steps * layer.local.batch_size
    h = Harness(tmp_path)
    for node in (1, 2, 3, 9):
        h.task(node, CREATOR)
    honest = [h.arrays(CREATOR, seed=n) for n in (1, 2, 3)]
    raw = h.arrays(CREATOR, seed=9)
    factor = -0.9 * layer.norm_cap / np.sqrt(sum(float(np.sum(np.square(a))) for a in raw.values()))
    attack = {k: (factor * v).astype(np.float32) for k, v in raw.items()}
    replies = [h.reply(n, a, num_examples=budget) for n, a in zip((1, 2, 3), honest, strict=True)]
    h.run([*replies, h.reply(9, attack, num_examples=10**9)])
    [capped] = h.records("weight_capped")
    assert capped == {
        "round": 1,
        "instance": "inst-9",
        "slot": str(CREATOR),
        "claimed": 10**9,
        "cap": budget,
    }
    committed = h.committed(CREATOR)
    for name, got in committed.items():
        mean = sum(a[name].astype(np.float64) for a in [*honest, attack]) / 4
        np.testing.assert_allclose(got, layer.server_lr * mean, rtol=1e-4, atol=1e-7)


def test_unsolicited_reply_ignored(tmp_path: Path) -> None:
    """A reply from a node that was given no task is audited and ignored."""

    def make(h: Harness, node: int) -> list[Message]:
        stray = h.reply(node, h.arrays(CREATOR, scale=1.0, seed=node))
        del h.pending[node]
        return [stray]

    h, node = hostile_round(tmp_path, CREATOR, make)
    assert h.records("reply_unexpected") == [{"round": 1, "node": str(node)}]
    assert_neutralised(tmp_path, h, CREATOR, [1, 2])
