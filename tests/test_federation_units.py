"""Federation pieces without Flower's engine: protocol, sampling, lazy decay, instance disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.federation.host import Placement
from layerfed.federation.run_config import RunSettings
from layerfed.federation.server_state import ServerState
from layerfed.federation.strategy import LayeredStrategy
from layerfed.governance.audit import AuditLog
from layerfed.governance.loader import load_policy
from layerfed.layers.base import load_base
from layerfed.layers.instance_disk import InstanceDisk
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack
from layerfed.simulation.keys import sim_policy
from layerfed.simulation.scenario import load_scenario
from layerfed.simulation.settings import SimSettings
from layerfed.wire.protocol import MessageError, Task

SETTINGS = SimSettings()


def _policy():  # type: ignore[no-untyped-def]
    return load_policy(SETTINGS.policy)


def test_task_round_trips_through_a_config_record() -> None:
    """A task survives encoding into a Flower ConfigRecord and back."""
    from flwr.app import RecordDict

    task = Task(
        "run", 4, 7, "inst-7", "government", SlotId("government", "eu"), {"creator/global": 3}
    )
    assert Task.from_content(RecordDict({"lf.task": task.to_record()})) == task


def test_malformed_task_is_a_typed_error() -> None:
    """A train message without a task record raises MessageError."""
    from flwr.app import RecordDict

    with pytest.raises(MessageError, match=r"lf\.task"):
        Task.from_content(RecordDict())


def test_roster_expands_populations_lazily() -> None:
    """Population members are computed by index, cycling jurisdictions, groups and styles."""
    roster = load_scenario(SETTINGS.scenario).roster
    assert len(roster) == 12
    assert roster[0].id == "rater-1" and roster[2].id == "inst-0"
    assert roster[3].jurisdiction == "us" and roster[4].groups == ["g1", "g2"]
    assert roster[2].user.style == "great" and roster[7].user.style == "great"
    assert list(roster.eligible("creator")) == [0, 1]


def _strategy(tmp_path: Path) -> LayeredStrategy:
    policy = sim_policy(_policy(), 0)
    scenario = load_scenario(SETTINGS.scenario)
    model, tokenizer = load_base(policy.base_model)
    strategy = LayeredStrategy(
        policy=policy,
        placement=Placement(scenario.roster, nodes=len(scenario.roster)),
        sample_per_layer=dict(scenario.sample_per_layer),
        state=ServerState(tmp_path, policy, "run"),
        stack=LayerStack(policy, model, tokenizer),
        tokenizer=tokenizer,
        audit=AuditLog(tmp_path / "audit.jsonl"),
        run_id="run",
        seed=0,
        noise_seed=0,
    )
    strategy.nodes = [1000 + index for index in range(len(scenario.roster))]
    return strategy


def test_sampling_is_per_layer_seeded_and_never_repeats_a_node(tmp_path: Path) -> None:
    """Each layer gets its quota from eligible instances, no node twice, same seed same sample."""
    strategy = _strategy(tmp_path)
    first = strategy.sample(3)
    assert first == strategy.sample(3) and first != strategy.sample(4)
    nodes = [node for node, _ in first]
    assert len(nodes) == len(set(nodes))
    per_layer = {layer: sum(1 for _, x in first if x == layer) for _, layer in first}
    assert per_layer == {
        "creator": 2,
        "government": 2,
        "community": 2,
        "in_group": 2,
        "individual": 2,
    }
    assert all(
        strategy.identities[node].instance_id.startswith("rater")
        for node, layer in first
        if layer == "creator"
    )


def test_committed_slot_decays_lazily_by_rounds(tmp_path: Path) -> None:
    """A committed individual slot read k rounds later equals its arrays times 2^(-k/half-life) per memory."""
    policy = sim_policy(_policy(), 0)
    model, _ = load_base(policy.base_model)
    stack = LayerStack(policy, model)
    state = ServerState(tmp_path, policy, "run")
    slot = SlotId("individual", "i1")
    spec = stack.spec(slot)
    arrays = {n: np.ones(s, dtype=np.float32) for n, s in spec.shapes().items()}
    state.commit(slot, arrays, spec, 2)
    later = state.current(slot, spec, 5)
    for name, value in later.items():
        half_life = 3.0 if "/stm/" in name else 300.0
        np.testing.assert_allclose(value, 2 ** (-3 / half_life), rtol=1e-6)
    assert state.current(
        SlotId("individual", "never"), stack.spec(SlotId("individual", "never")), 5
    )


def test_checkpoint_round_trips_and_refuses_other_runs(tmp_path: Path) -> None:
    """state.json restores round, versions and metrics; another run id is refused."""
    from layerfed.federation.server_state import StateError

    policy = _policy()
    state = ServerState(tmp_path, policy, "run")
    state.committed = {"creator/global": {"version": 2, "round": 1}}
    state.checkpoint(1, "head", {"round": 1, "layers": {}})
    again = ServerState(tmp_path, policy, "run")
    assert again.load() and again.round == 1 and again.committed == state.committed
    assert again.metrics == [{"round": 1, "layers": {}}]
    with pytest.raises(StateError, match="expected a checkpoint of run 'other'"):
        ServerState(tmp_path, policy, "other").load()


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=8, unique=True),
    st.integers(1, 60),
)
def test_instance_disk_trains_from_the_newest_round_before(rounds: list[int], asked: int) -> None:
    """load_before(r) returns the newest kept version from a round before r, never r itself."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        disk = InstanceDisk(Path(tmp), keep=3)
        for r in sorted(rounds):
            disk.save(r, {"x": np.full(2, r, dtype=np.float32)})
        kept = sorted(rounds)[-3:]
        got = disk.load_before(asked)
        earlier = [r for r in kept if r < asked]
        if not earlier:
            assert got is None
        else:
            assert got is not None and got[0] == earlier[-1] and got[1]["x"][0] == earlier[-1]


def test_corrupt_instance_file_names_the_file(tmp_path: Path) -> None:
    """A corrupt instance slot file raises a typed error naming the file."""
    from layerfed.layers.errors import SlotStoreError

    disk = InstanceDisk(tmp_path)
    path = disk.save(1, {"x": np.zeros(2, dtype=np.float32)})
    path.write_bytes(b"garbage")
    with pytest.raises(SlotStoreError, match=str(path)):
        disk.load_before(2)


def test_settings_round_trip_through_a_run_config() -> None:
    """RunSettings survive Flower's flat run config."""
    settings = SimSettings(out="x", rounds=5, seed=3, resume=True)
    assert SimSettings.from_config(settings.to_config()) == settings
    assert RunSettings.from_config(settings.to_config()).rounds == 5


def test_a_deployment_refuses_a_folder_holding_a_finished_run(tmp_path: Path) -> None:
    """run_server's guard: an output folder with a checkpoint needs resume (clear error)."""
    from layerfed.federation.run_config import RunConfigError
    from layerfed.federation.server_app import refuse_finished_run
    from layerfed.federation.server_state import STATE_FILE

    settings = RunSettings(out=str(tmp_path), policy="p.yaml")
    refuse_finished_run(settings)  # empty folder: fine
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / STATE_FILE).write_text("{}", encoding="utf-8")
    with pytest.raises(RunConfigError, match="earlier run"):
        refuse_finished_run(settings)
    refuse_finished_run(RunSettings(out=str(tmp_path), policy="p.yaml", resume=True))
