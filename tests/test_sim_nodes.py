"""Simulated instances on a pool of virtual nodes: as many nodes as one round has tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfed.federation.host import Placement
from layerfed.federation.server_state import ServerState
from layerfed.federation.strategy import LayeredStrategy
from layerfed.governance.audit import AuditLog
from layerfed.governance.loader import load_policy
from layerfed.layers.base import load_base
from layerfed.layers.stack import LayerStack
from layerfed.simulation.keys import sim_policy
from layerfed.simulation.scenario import Scenario
from layerfed.simulation.server import sim_node_count
from layerfed.simulation.settings import SimSettings
from layerfed.wire.protocol import MessageError

POLICY = sim_policy(load_policy(SimSettings().policy), 0)
MODEL, TOKENIZER = load_base(POLICY.base_model)
SAMPLE = {"creator": 4, "government": 24, "community": 24, "in_group": 24, "individual": 24}


def _scenario(n: int) -> Scenario:
    return Scenario.model_validate(
        {
            "name": f"pool-{n}",
            "populations": [
                {"count": 4, "id_prefix": "rater-", "layers": ["creator"]},
                {
                    "count": n - 4,
                    "id_prefix": "i-",
                    "jurisdictions": ["eu", "us"],
                    "groups": [["g1"], ["g2"]],
                    "layers": ["government", "community", "in_group", "individual"],
                },
            ],
            "sample_per_layer": SAMPLE,
        }
    )


def _strategy(tmp: Path, scenario: Scenario, nodes: int) -> LayeredStrategy:
    strategy = LayeredStrategy(
        policy=POLICY,
        placement=Placement(scenario.roster, nodes),
        sample_per_layer=dict(scenario.sample_per_layer),
        state=ServerState(tmp, POLICY, "run"),
        stack=LayerStack(POLICY, MODEL, TOKENIZER),
        tokenizer=TOKENIZER,
        audit=AuditLog(tmp / "audit.jsonl"),
        run_id="run",
        seed=0,
        noise_seed=0,
    )
    strategy.nodes = [5000 + i for i in range(nodes)]
    return strategy


def test_node_count_follows_the_sample_not_the_roster() -> None:
    """100,000 instances with 100 sampled per round need 100 nodes; a small roster caps it."""
    assert sim_node_count(POLICY, _scenario(100_000).roster, SAMPLE) == 100
    assert sim_node_count(POLICY, _scenario(60).roster, SAMPLE) == 60
    unsampled = {"creator": 4}  # other layers: every eligible instance, so the whole roster
    assert sim_node_count(POLICY, _scenario(500).roster, unsampled) == 500


@settings(
    max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(round_=st.integers(1, 10_000))
def test_a_pool_samples_the_same_instances_on_distinct_nodes(tmp_path: Path, round_: int) -> None:
    """With 100 pooled nodes a round samples the same instances as with one node each, no node twice."""
    scenario = _scenario(2_000)
    pooled = _strategy(tmp_path / f"a{round_}", scenario, 100)
    one_each = _strategy(tmp_path / f"b{round_}", scenario, 2_000)
    got, want = pooled.sample(round_), one_each.sample(round_)
    nodes = [node for node, _ in got]
    assert len(nodes) == len(set(nodes)) == 100
    instances = [(pooled.identities[n].index, layer) for n, layer in got]
    assert instances == [(one_each.identities[n].index, layer) for n, layer in want]
    assert [n - 5000 for n, _ in want] == [i for i, _ in instances]  # node i for instance i


def test_too_few_nodes_for_a_round_is_a_typed_error(tmp_path: Path) -> None:
    """Fewer nodes than tasks in a round raises MessageError instead of double-booking a node."""
    strategy = _strategy(tmp_path, _scenario(2_000), 99)
    with pytest.raises(MessageError, match="free virtual node"):
        strategy.sample(1)
