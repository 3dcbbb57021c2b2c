"""The node-config schema (wire/node_config.py) that the deploy harness writes and nodes read."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.common.config import parse_config_args
from hypothesis import given
from hypothesis import strategies as st

from layerfed.clients.config import ConfigError, InstanceConfig
from layerfed.deploy import NodeSpec
from layerfed.wire.node_config import NODE_CONFIG_KEYS, NodeConfig, NodeConfigError

_name = st.from_regex(r"[a-z][a-z0-9_.-]{0,10}", fullmatch=True)


@given(
    st.builds(
        NodeConfig,
        instance_id=_name,
        jurisdiction=_name,
        groups=st.lists(_name, max_size=3).map(tuple),
        layers=st.lists(_name, min_size=1, max_size=3).map(tuple),
        policy=_name.map(lambda n: f"/p/{n}.yaml"),
        root_key=st.none() | _name.map(lambda n: f"/k/{n}.pem"),
        trusted=st.none() | _name.map(lambda n: f"/p/{n}.yaml"),
        model=st.none() | _name.map(lambda n: f"builtin:{n}"),
        server_key=st.none() | _name.map(lambda n: f"/k/{n}.pub.pem"),
        sync_keep=st.none() | st.integers(1, 10**6),
    )
)
def test_written_node_config_parses_back_unchanged(config: NodeConfig) -> None:
    """What NodeConfig.items writes, Flower's --node-config parser and NodeConfig.parse
    read back as the same NodeConfig."""
    text = " ".join(f'{k}="{v}"' for k, v in config.items().items())
    assert NodeConfig.parse(parse_config_args([text])) == config


def test_a_value_of_the_wrong_type_names_the_key() -> None:
    """A non-string value is a NodeConfigError naming the key; the node raises ConfigError."""
    with pytest.raises(NodeConfigError, match="node config groups: expected a string, got 3"):
        NodeConfig.parse({"instance-id": "a", "groups": 3})
    with pytest.raises(ConfigError, match="groups"):
        InstanceConfig.from_node_config({"instance-id": "a", "policy": "p.yaml", "groups": 3})


def test_node_spec_writes_the_schema_keys(tmp_path: Path) -> None:
    """NodeSpec's --node-config uses only schema keys, with absolute paths, and reads back."""
    spec = NodeSpec("alice", policy=tmp_path / "p.yaml", root_key=tmp_path / "r.pem")
    parsed = parse_config_args([spec.node_config()])
    assert set(parsed) <= set(NODE_CONFIG_KEYS.values())
    node = NodeConfig.parse(parsed)
    assert node.instance_id == "alice" and node.root_key == str((tmp_path / "r.pem").resolve())


def test_sync_keys_reach_the_instance_config(tmp_path: Path) -> None:
    """Flat server-key and sync-keep give the instance's [sync] server_key and keep;
    a keep that is not a positive integer is refused naming the key."""
    spec = NodeSpec(
        "alice", policy=tmp_path / "p.yaml", server_key=tmp_path / "server.pub.pem", sync_keep=5
    )
    parsed = parse_config_args([spec.node_config()])
    assert parsed["server-key"] == str((tmp_path / "server.pub.pem").resolve())
    assert parsed["sync-keep"] == "5"
    config = InstanceConfig.from_node_config(parsed)
    assert config.server_key == (tmp_path / "server.pub.pem").resolve()
    assert config.sync_keep == 5
    assert InstanceConfig.from_node_config({"instance-id": "a", "policy": "p.yaml"}).sync_keep == 3
    for bad in ("0", "-1", "three", "²"):
        with pytest.raises(NodeConfigError, match="node config sync-keep: expected a positive"):
            NodeConfig.parse({"instance-id": "a", "sync-keep": bad})
