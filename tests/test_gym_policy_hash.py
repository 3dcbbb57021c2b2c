"""The gym's clients check ``Task.policy_hash`` as a deployed node does (issue #24).

A gym client's runtime carries the canonical hash of the policy it actually loaded;
a task stamped with another policy's hash is refused with a ``MessageError``, and a
policy file that changed in the same process is read again, never served stale.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import cast

import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.serverapp import Grid

from layerfed.clients.client_app import handle_train
from layerfed.federation.run_config import RunSettings
from layerfed.federation.server_app import run_server
from layerfed.governance.canonical import policy_hash
from layerfed.governance.signing import read_policy
from layerfed.layers.slots import SlotId
from layerfed.simulation.client import GymSource
from layerfed.simulation.server import gym_host
from layerfed.simulation.settings import DEFAULT_POLICY, DEFAULT_ROOT_KEY, SimSettings
from layerfed.wire.protocol import TASK, MessageError, Task

CREATOR = SlotId("creator", "global")


def _settings(out: Path, policy: Path = DEFAULT_POLICY) -> SimSettings:
    """Gym settings for one run of the demo scenario under ``policy``."""
    return SimSettings(policy=str(policy), out=str(out), rounds=1, seed=0, run_id="gym-0")


def _context() -> Context:
    """The virtual node of roster instance 0."""
    return Context(1, 100, {"partition-id": 0}, RecordDict(), {})


def _train(settings: SimSettings, verified_hash: str) -> Message:
    """A train message for roster instance 0 (a rater on the creator layer)."""
    who = settings.resolved().load_scenario().roster.identity(0)
    task = Task("gym-0", 1, 0, who.instance_id, "creator", CREATOR, {}, policy_hash=verified_hash)
    metadata = Metadata(
        run_id=1,
        message_id=f"m-{time.monotonic_ns()}",
        src_node_id=1,
        dst_node_id=100,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return Message(content=RecordDict({TASK: task.to_record()}), metadata=metadata)


def test_gym_client_runs_the_servers_policy_and_refuses_another(tmp_path: Path) -> None:
    """The gym client's runtime hash is the hash the gym server stamps on its tasks; a task
    stamped with another policy's hash is refused with a MessageError naming both."""
    settings = _settings(tmp_path / "run")
    server = RunSettings(  # the gym server's trust settings, stopping before round 1
        policy=settings.policy, root_key=str(DEFAULT_ROOT_KEY), out=str(tmp_path / "s"), rounds=0
    )
    state = run_server(cast(Grid, None), cast(Context, None), server, host=gym_host(server))
    source = GymSource(settings)
    rt = source.runtime(_train(settings, state.policy_hash), _context())
    assert rt.policy_hash == state.policy_hash == policy_hash(read_policy(DEFAULT_POLICY))

    other = "0" * 64
    with pytest.raises(MessageError, match=f"policy_hash: expected .*{rt.policy_hash}.*{other}"):
        handle_train(_train(settings, other), _context(), GymSource(settings))


def test_a_changed_policy_file_is_read_again_and_the_old_hash_refused(tmp_path: Path) -> None:
    """Editing the policy file between two runs in one process gives the gym the new policy
    (and a fresh runtime with its hash); a task for the old policy is then refused."""
    path = tmp_path / "policy.yaml"
    text = DEFAULT_POLICY.read_text(encoding="utf-8")
    path.write_text(text, encoding="utf-8")
    settings = _settings(tmp_path / "run", path)
    before = settings.load_policy()
    old_hash = GymSource(settings).runtime(_train(settings, ""), _context()).policy_hash
    assert old_hash == policy_hash(read_policy(path))

    path.write_text(text.replace("name: default", "name: edited", 1), encoding="utf-8")
    assert before.name == "default" and settings.load_policy().name == "edited"
    new_hash = GymSource(settings).runtime(_train(settings, ""), _context()).policy_hash
    assert new_hash == policy_hash(read_policy(path)) != old_hash
    with pytest.raises(MessageError, match="policy_hash"):
        handle_train(_train(settings, old_hash), _context(), GymSource(settings))
