"""Instance-only slots fade on the node by the clock their half-lives are written in."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from deploy_helpers import EXAMPLE, make_fleet
from flwr.app import Context, RecordDict
from journal_crash_child import train_message

from layerfed.clients.config import InstanceConfig
from layerfed.clients.local_slots import LocalSlots
from layerfed.clients.node import NodeSource
from layerfed.governance.canonical import policy_hash
from layerfed.governance.signing import read_policy
from layerfed.layers.errors import SlotStoreError
from layerfed.layers.instance_disk import InstanceDisk
from layerfed.layers.slots import SlotId, parse_array_name
from layerfed.wire.protocol import Task


def _layers_with_individual(memories: list[dict[str, object]]) -> list[dict[str, object]]:
    data = yaml.safe_load((EXAMPLE / "policy.yaml").read_text(encoding="utf-8"))
    for layer in data["layers"]:
        if layer["name"] == "individual":
            layer["memories"] = memories
    return list(data["layers"])


def test_a_duration_half_life_fades_an_instance_only_slot_by_wall_clock_time(
    tmp_path: Path,
) -> None:
    """A node reading its individual slot 2 h after the commit two rounds ago: the memory
    with half-life "1h" is at 2**-2 of its B, the one with half-life 300 rounds at
    2**(-2/300); the time comes from the commit file's metadata, not from the rounds."""
    layers = _layers_with_individual(
        [
            {"name": "stm", "lr_multiplier": 1.0, "half_life": "1h"},
            {"name": "ltm", "lr_multiplier": 0.05, "half_life": 300},
        ]
    )
    fleet = make_fleet(tmp_path, {"dana": ("individual",)}, edit={"layers": layers})
    files = fleet.instances["dana"]
    slot = SlotId("individual", "dana")
    policy = read_policy(InstanceConfig.load(files.config).policy)
    task = Task("run-decay", 3, 0, "dana", "individual", slot, {}, policy_hash=policy_hash(policy))
    msg = train_message(task)
    context = Context(
        run_id=1,
        node_id=2,
        node_config={"instance-config": str(files.config)},
        state=RecordDict(),
        run_config={"layerfed-seed": 0},
    )
    source = NodeSource()
    rt = source.runtime(msg, context)
    disk = source.disk(context, source.identity(msg, context, rt, task))
    ones = {k: np.ones_like(v) for k, v in rt.zeros(slot).items()}
    disk.save(1, ones, saved_at=time.time() - 2 * 3600.0)

    local = LocalSlots(rt.policy, disk, rt.zeros)
    got = local.load(slot, task.round)

    expected = {"stm": 0.25, "ltm": 2.0 ** (-2 / 300)}
    assert set(got) == set(ones)
    for name, value in got.items():
        factor = expected[parse_array_name(name).memory]
        np.testing.assert_allclose(value, factor, rtol=1e-3)  # 1e-3: seconds pass during the test

    disk.save(1, ones, saved_at=time.time())  # committed just now: the duration memory holds
    fresh = local.load(slot, task.round)
    for name, value in fresh.items():
        if parse_array_name(name).memory == "stm":
            np.testing.assert_allclose(value, 1.0, rtol=1e-3)


def test_commit_files_record_their_time_and_bad_metadata_is_named(tmp_path: Path) -> None:
    """InstanceDisk keeps the commit time in the file; an unreadable time is a typed error
    naming the file, and files written before times were kept read as None (no decay)."""
    from safetensors.numpy import save_file

    disk = InstanceDisk(tmp_path)
    disk.save(4, {"x": np.zeros(2, np.float32)}, saved_at=1234.5)
    assert disk.saved_at(4) == 1234.5
    before = time.time()
    disk.save(5, {"x": np.zeros(2, np.float32)})
    when = disk.saved_at(5)
    assert when is not None and before <= when <= time.time()
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "r00000006.safetensors"))
    assert disk.saved_at(6) is None
    save_file(
        {"x": np.zeros(2, np.float32)},
        str(tmp_path / "r00000007.safetensors"),
        metadata={"saved_at": "yesterday"},
    )
    with pytest.raises(SlotStoreError, match=r"r00000007\.safetensors.*saved_at"):
        disk.saved_at(7)
