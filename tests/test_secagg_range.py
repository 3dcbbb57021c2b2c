"""SecAgg+ range check: a member's offset inside its masked vector cannot move the committed slot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from layerfed.federation.secagg_server import SecAggServer
from layerfed.federation.secure_sum import SecureSum
from layerfed.governance.envelope import certify_instance, sign_update
from layerfed.governance.loader import load_policy
from layerfed.governance.schema import Policy
from layerfed.layers.slots import SlotId
from layerfed.simulation.keys import layer_principal, sim_instance_key, sim_layer_key, sim_policy
from layerfed.wire.secagg import MASKED, encode_update, mask_vector
from layerfed.wire.secagg_crypto import agree_seed, new_key_pair
from layerfed.wire.secagg_shamir import split_secret
from tests.policy_helpers import default_data, write_yaml
from tests.round_helpers import RUN, SEED, Harness

SLOT = SlotId("in_group", "g1")
CLIP_RANGE = 0.5


def secure_policy(tmp: Path) -> Policy:
    """The default policy with ``in_group`` under SecAgg+ (clip range 0.5, 16 bits)."""
    data = default_data()
    group = next(layer for layer in data["layers"] if layer["name"] == "in_group")
    group.update(aggregator={"kind": "fedavg"}, min_clients=3)
    group.pop("norm_cap", None)
    group["privacy"] = {
        "mode": "secure_aggregation",
        "secagg": {
            "threshold": 0.6,
            "clip_range": CLIP_RANGE,
            "quantization_bits": 16,
            "max_dropout_fraction": 0.4,
        },
    }
    for veto in data["vetoes"]:
        if veto["name"] == "government_norm":
            veto["action"] = "reject"
    return sim_policy(load_policy(write_yaml(tmp, data, "secure.yaml")), SEED)


def secure_sum(
    h: Harness,
    policy: Policy,
    deltas: list[dict[str, np.ndarray]],  # type: ignore[type-arg]
    examples: list[int],
    offset: tuple[int, int] = (0, 0),
    lost: str = "",
) -> SecureSum:
    """Run the server's unmasking on members' real masked vectors (``offset``: member 1 adds
    ``offset[1]`` to coordinate ``offset[0]`` inside its masked vector). ``lost``: one more
    member shared keys and then dropped; the others masked with it and reveal shares of its
    mask key ("right") or of another key ("wrong")."""
    server = SecAggServer(policy, h.stack, RUN, 1.0)
    n = len(deltas) + (1 if lost else 0)
    messages = [h.task(node, SLOT) for node in range(1, n + 1)]
    server.setup(messages, {node: h.pending[node] for node in range(1, n + 1)})
    cohort = server.cohorts[SLOT]
    rng = np.random.default_rng(0)
    keys = [new_key_pair() for _ in range(n)]
    if lost:
        cohort.keys[n] = (keys[n - 1][1], b"")
        cohort.shared.add(n)
        revealed = keys[n - 1][0] if lost == "right" else new_key_pair()[0]
        for x, share in enumerate(split_secret(revealed, cohort.t, cohort.n), start=1):
            if x <= cohort.t:
                cohort.shares[("key", n)].append((x, share))
    for i, (delta, count) in enumerate(zip(deltas, examples, strict=True), start=1):
        setup = cohort.setup(i)
        seed = os.urandom(32)
        pairs = [(n, agree_seed(keys[i - 1][0], keys[n - 1][1]))] if lost else []
        vector = mask_vector(encode_update(delta, count, setup, rng), seed, pairs, i)
        if i == 1 and offset[1]:
            vector[1 + offset[0] : 2 + offset[0]] += np.uint32(offset[1])
        task = cohort.tasks[i]
        key = sim_instance_key(SEED, task.instance_id)
        issuer = layer_principal(SLOT.layer)
        cert = certify_instance(
            task.instance_id, key.public_key(), SLOT.layer, issuer, sim_layer_key(SEED, SLOT.layer)
        )
        envelope = sign_update(
            {MASKED: vector},
            principal_name=issuer,
            private_key=key,
            certificate=cert,
            run_id=RUN,
            round=1,
            layer=SLOT.layer,
            slot_key=SLOT.key,
            instance_id=task.instance_id,
            num_examples=count,
        )
        cohort.keys[i] = (keys[i - 1][1], b"")
        cohort.shared.add(i)
        cohort.masked[i] = (vector, envelope)
        for x, share in enumerate(split_secret(seed, cohort.t, cohort.n), start=1):
            if x <= cohort.t:
                cohort.shares[("seed", i)].append((x, share))
    return server._finish(cohort, 1)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Harness:
    """A server harness (stack of the default policy's tiny base)."""
    return Harness(tmp_path_factory.mktemp("range"))


def _deltas(h: Harness, scale: float) -> list[dict[str, np.ndarray]]:  # type: ignore[type-arg]
    return [h.arrays(SLOT, scale=scale, seed=s) for s in range(4)]


def test_honest_members_beyond_the_clip_range_still_unmask(
    harness: Harness, tmp_path: Path
) -> None:
    """Honest members with coordinates past clip_range and weights below 1 stay inside the bound."""
    policy = secure_policy(tmp_path)
    result = secure_sum(harness, policy, _deltas(harness, 2.0), [8, 3, 1, 8])
    assert result.reason == ""
    assert result.mean is not None


def test_a_member_offset_inside_its_mask_refuses_the_slot(harness: Harness, tmp_path: Path) -> None:
    """A member adding 22.5x its range to one coordinate inside its masked vector: slot refused."""
    policy = secure_policy(tmp_path)
    deltas = _deltas(harness, 1e-3)
    levels = 2**16 - 1
    # one member's range on a coordinate is weight x clip_range = levels/2 quantisation levels;
    # 22.5x that moves the mean far past what docs/privacy.md promises
    result = secure_sum(harness, policy, deltas, [8, 8, 8, 8], offset=(3, int(22.5 * levels / 2)))
    assert result.mean is None
    assert result.reason.startswith("out_of_range:"), result.reason
    assert "coordinate 3 " in result.reason
    wrapped = secure_sum(harness, policy, deltas, [8, 8, 8, 8], offset=(5, 2**32 - 3 * levels))
    assert wrapped.mean is None and wrapped.reason.startswith("out_of_range:")


def test_an_in_range_lie_moves_the_mean_by_at_most_weight_x_clip_range(
    harness: Harness, tmp_path: Path
) -> None:
    """The most one member can move a coordinate of the mean: w_i x clip_range / sum(w) (+1 step)."""
    policy = secure_policy(tmp_path)
    deltas = _deltas(harness, 1e-3)
    honest = secure_sum(harness, policy, deltas, [8, 8, 8, 8])
    levels = 2**16 - 1
    lie = secure_sum(harness, policy, deltas, [8, 8, 8, 8], offset=(3, levels // 2 - 2))
    assert honest.mean is not None and lie.mean is not None
    name = sorted(honest.mean)[0]
    moved = float(np.max(np.abs(lie.mean[name] - honest.mean[name])))
    assert moved <= CLIP_RANGE / lie.weight + 4 * 2 * CLIP_RANGE / levels


def test_a_dropped_members_mask_key_must_rebuild_to_its_signed_pk1(
    harness: Harness, tmp_path: Path
) -> None:
    """Shares of a dropped member's mask key unmask the sum; shares of another key: unmask_failed."""
    policy = secure_policy(tmp_path)
    deltas = _deltas(harness, 1e-3)
    honest = secure_sum(harness, policy, deltas, [8, 8, 8, 8])
    recovered = secure_sum(harness, policy, deltas, [8, 8, 8, 8], lost="right")
    assert recovered.reason == "" and recovered.mean is not None and honest.mean is not None
    for name, value in honest.mean.items():
        assert np.max(np.abs(recovered.mean[name] - value)) <= 4 * 2 * CLIP_RANGE / (2**16 - 1)
    wrong = secure_sum(harness, policy, deltas, [8, 8, 8, 8], lost="wrong")
    assert wrong.mean is None
    assert wrong.reason.startswith("unmask_failed:") and "pk1" in wrong.reason, wrong.reason
