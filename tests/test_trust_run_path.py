"""Trust on the path a real run takes: no computable keys outside the gym, one verified
policy whose hash travels in audit, checkpoints and tasks, pinned trust across resume,
unique run ids, and hostile node identities refused per node (issue 13).

Servers start through ``run_server`` itself (with ``rounds`` already reached, so it
stops after its trust decisions, its ``policy_load`` record and its checkpoint, before
it needs a Grid); deployed clients through ``NodeSource`` + ``handle_query`` /
``handle_train``; rounds through the hostile-round harness or the strategy's own
discovery and ``configure_train``/``aggregate_train`` over a loopback Grid that hands
each message to the real ClientApp handlers.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import pytest
import round_helpers
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from deploy_helpers import Fleet, make_fleet, write_private_key, write_public_key
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from round_helpers import CREATOR, Harness, refusal

from layerfed.clients.client_app import handle_query, handle_train
from layerfed.clients.config import ConfigError, InstanceConfig, verified_instance_policy
from layerfed.clients.node import NodeSource
from layerfed.clients.source import NodeRuntime
from layerfed.federation.host import DEPLOYED_HOST
from layerfed.federation.run_config import RunConfigError, RunSettings
from layerfed.federation.server_app import run_server
from layerfed.federation.server_state import ServerState
from layerfed.federation.strategy import LayeredStrategy
from layerfed.governance.audit import AuditLog
from layerfed.governance.canonical import policy_hash
from layerfed.governance.keys import public_key_string
from layerfed.governance.signing import PolicyTrustError, read_policy, sign_policy_file
from layerfed.layers.base import load_base
from layerfed.layers.stack import LayerStack
from layerfed.simulation.client import RUN_SETTINGS, GymSource
from layerfed.simulation.keys import sim_policy
from layerfed.simulation.server import gym_host
from layerfed.simulation.settings import DEFAULT_POLICY, DEFAULT_ROOT_KEY, SimSettings
from layerfed.wire.protocol import IDENTITY, TASK, Identity, MessageError, Task

DEMO_KEY = "ed25519:2OrEWzArwiwLQ4yrOatANcwIQ/HZLPg2h6RER+JsxSM="
"""The demo root's public key as default.yaml names it (creator_root, the policy signer)."""


def serve(settings: RunSettings, *, gym: bool = False) -> ServerState:
    """``run_server`` as the ServerApp calls it (the gym: with the host it injects);
    these settings never reach round 1."""
    host = gym_host(settings) if gym else DEPLOYED_HOST
    return run_server(cast(Grid, None), cast(Context, None), settings, host=host)


def records(out: Path, kind: str) -> list[dict[str, Any]]:
    """The ``fields`` of every audit record of ``kind``."""
    lines = (out / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["fields"] for r in map(json.loads, lines) if r["kind"] == kind]


def gym(out: Path, **kw: Any) -> RunSettings:
    """The gym's trust settings (demo root, per-run server key) without a scenario."""
    base = {"policy": str(DEFAULT_POLICY), "root_key": str(DEFAULT_ROOT_KEY), "out": str(out)}
    return RunSettings(**{**base, "rounds": 0, "run_id": "gym-0", **kw})


@dataclasses.dataclass
class Keys:
    """A deployment's own root and server keys, as files."""

    root: Ed25519PrivateKey
    root_pub: Path
    server: Path


def own_keys(tmp: Path) -> Keys:
    """Fresh root and server keys under ``tmp/keys``."""
    root = Ed25519PrivateKey.generate()
    server = write_private_key(Ed25519PrivateKey.generate(), tmp / "keys" / "server.pem")
    return Keys(root, write_public_key(root, tmp / "keys" / "root.pub.pem"), server)


def policy_file(
    tmp: Path,
    name: str,
    version: int,
    signer: Ed25519PrivateKey | None,
    *,
    owner: str = "",
    note: str = "",
) -> Path:
    """default.yaml at ``version``, its policy signer's key replaced by ``owner`` (a key
    string), signed by ``signer`` (None: unsigned); ``note`` changes its meaning."""
    text = DEFAULT_POLICY.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^version: 1$", f"version: {version}", text)
    text = text.replace(DEMO_KEY, owner)
    if note:
        text = text.replace("name: default", f"name: {note}", 1)
    path = tmp / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    if signer is not None:
        sign_policy_file(path, signer)
    return path


def deployed(out: Path, keys: Keys, policy: Path, **kw: Any) -> RunSettings:
    """Deployment settings: own root key, own server key, no simulation."""
    base = {"policy": str(policy), "root_key": str(keys.root_pub), "server_key": str(keys.server)}
    return RunSettings(**{**base, "out": str(out), "rounds": 0, "run_id": "deploy-1", **kw})


# -- 1. no computable keys or demo roots outside simulation ------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"root_key": ""}, "layerfed-root-key: expected the creator's root public key"),
        ({"root_key": str(DEFAULT_ROOT_KEY)}, "demo root"),
        ({"verify": False}, "layerfed-verify: expected true outside simulation"),
        ({"server_key": ""}, "layerfed-server-key"),
    ],
)
def test_deployment_refuses_computable_or_missing_trust(
    tmp_path: Path, change: dict[str, Any], match: str
) -> None:
    """A deployed server refuses, before round 1 and before writing anything, to run
    without its own root key, with the demo root, unverified, or without a server key."""
    keys = own_keys(tmp_path)
    policy = policy_file(
        tmp_path, "policy", 1, keys.root, owner=public_key_string(keys.root.public_key())
    )
    out = tmp_path / "out"
    with pytest.raises(RunConfigError, match=match):
        serve(deployed(out, keys, policy, **change))
    assert not (out / "audit.jsonl").exists()


def test_gym_audits_demo_root_and_simulated_principals(tmp_path: Path) -> None:
    """The gym may use the demo root, seed-derived principals and a per-run server key,
    and its policy_load record says so; a deployment's says none of that."""
    out = tmp_path / "gym"
    serve(gym(out), gym=True)
    (load,) = records(out, "policy_load")
    assert load["demo_root"] is True
    assert load["simulated_principals"] and all(
        name.startswith("sim_") for name in load["simulated_principals"]
    )
    assert load["server_key_source"].startswith("gym: generated")
    assert (out / "server-key.pem").exists()

    keys = own_keys(tmp_path)
    policy = policy_file(
        tmp_path, "policy", 1, keys.root, owner=public_key_string(keys.root.public_key())
    )
    serve(deployed(tmp_path / "deploy", keys, policy))
    (load,) = records(tmp_path / "deploy", "policy_load")
    assert load["demo_root"] is False and load["simulated_principals"] == []
    assert load["server_key_source"] == "configured"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """One deployed instance (alice) of a local Llama under a policy signed by its own root."""
    return make_fleet(tmp_path_factory.mktemp("fleet"), {"alice": ("creator", "individual")})


def _node_context(fleet: Fleet) -> Context:
    config = {"instance-config": str(fleet.instances["alice"].config)}
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def _to_node(content: RecordDict, kind: str, node: int = 7) -> Message:
    """A message as a node receives it from the SuperLink."""
    metadata = Metadata(
        run_id=1,
        message_id=f"m-{time.monotonic_ns()}",
        src_node_id=1,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=metadata)


def test_deployed_client_ignores_settings_records_and_refuses_demo_root(
    tmp_path: Path, fleet: Fleet
) -> None:
    """A deployed ClientApp takes its policy from its node config, verified, whatever an
    ``lf.settings`` record says; it refuses an unverified policy and the demo root."""
    hostile = SimSettings(policy=str(DEFAULT_POLICY), verify=False, out=str(tmp_path / "x"))
    msg = _to_node(RecordDict({RUN_SETTINGS: ConfigRecord(dict(hostile.to_config()))}), "query")
    source = NodeSource()
    reply = handle_query(msg, _node_context(fleet), source)
    assert reply.content.config_records[IDENTITY]["instance_id"] == "alice"
    rt = source.runtime(msg, _node_context(fleet))
    assert rt.policy_hash == policy_hash(read_policy(fleet.policy))
    assert rt.policy.name == read_policy(fleet.policy).name != "default"

    config = InstanceConfig.load(fleet.instances["alice"].config)
    with pytest.raises(ConfigError, match="verify"):
        verified_instance_policy(config.model_copy(update={"verify": False}), deployed=True)
    with pytest.raises(ConfigError, match="demo root"):
        verified_instance_policy(
            config.model_copy(update={"root_key": DEFAULT_ROOT_KEY}), deployed=True
        )


# -- 2. one verified policy, its hash everywhere -------------------------------------------


def test_policy_hash_in_audit_and_checkpoint(tmp_path: Path) -> None:
    """The canonical hash of the verified policy is in policy_load and in the checkpoint."""
    out = tmp_path / "gym"
    state = serve(gym(out), gym=True)
    want = policy_hash(read_policy(DEFAULT_POLICY))
    assert records(out, "policy_load")[0]["policy_hash"] == want
    saved = json.loads((out / "state" / "state.json").read_text())
    assert saved["policy"] == {"hash": want, "version": 1} and state.policy_hash == want
    assert saved["run_id"] == "gym-0" and "signature" in saved


def test_deployed_client_refuses_task_for_another_policy(tmp_path: Path, fleet: Fleet) -> None:
    """A task whose policy_hash is not the node's verified policy's is refused with a
    MessageError; the error reply Flower then delivers is audited by the server as a dropout."""
    task = Task("deploy-1", 1, 0, "alice", "creator", CREATOR, {}, policy_hash="0" * 64)
    msg = _to_node(RecordDict({TASK: task.to_record()}), "train")
    with pytest.raises(MessageError, match="policy_hash: expected this node's verified policy"):
        handle_train(msg, _node_context(fleet), NodeSource())

    h = Harness(tmp_path / "server")
    h.task(1, CREATOR)
    h.run([h.error_reply(1, "MessageError: lf.task.policy_hash: expected ...")])
    (dropped,) = h.records("update_dropped")
    assert dropped["instance"] == "inst-1" and "policy_hash" in dropped["error"]


# -- 3. pinned trust across resume ---------------------------------------------------------


def _pinned_run(tmp: Path) -> tuple[Keys, Path, str]:
    keys = own_keys(tmp)
    owner = public_key_string(keys.root.public_key())
    v2 = policy_file(tmp, "v2", 2, keys.root, owner=owner)
    out = tmp / "out"
    serve(deployed(out, keys, v2))
    return keys, out, owner


@pytest.mark.parametrize(
    ("version", "note", "reason"),
    [(1, "", "rollback"), (2, "other", "same_version_other_content")],
)
def test_resume_refuses_older_or_other_policy_signed_by_the_root(
    tmp_path: Path, version: int, note: str, reason: str
) -> None:
    """On resume the checkpoint's policy is the anchor: an older policy, or another one of
    the same version, is refused even though the root key signed it."""
    keys, out, owner = _pinned_run(tmp_path)
    other = policy_file(tmp_path, f"v{version}{note}", version, keys.root, owner=owner, note=note)
    with pytest.raises(PolicyTrustError) as caught:
        serve(deployed(out, keys, other, resume=True))
    assert caught.value.reason == reason


def test_resume_accepts_signed_successor_and_pins_it(tmp_path: Path) -> None:
    """A successor signed by the pinned policy's signers is accepted on resume, audited
    with the hash it replaces, and pinned by the next checkpoint."""
    keys, out, owner = _pinned_run(tmp_path)
    v2 = policy_hash(read_policy(tmp_path / "v2.yaml"))
    v3 = policy_file(tmp_path, "v3", 3, keys.root, owner=owner)
    serve(deployed(out, keys, v3, resume=True, root_key=""))
    load = records(out, "policy_load")[-1]
    assert load["pinned_hash"] == v2 and load["policy_hash"] == policy_hash(read_policy(v3))
    saved = json.loads((out / "state" / "state.json").read_text())
    assert saved["policy"]["version"] == 3


def test_trusted_previous_policy_must_itself_verify(tmp_path: Path) -> None:
    """An unsigned "previous" policy naming an attacker's key cannot make the attacker's
    policy trusted: the --trusted file must verify against the root keys (or the pin)."""
    keys = own_keys(tmp_path)
    attacker = Ed25519PrivateKey.generate()
    evil = public_key_string(attacker.public_key())
    previous = policy_file(tmp_path, "previous", 1, None, owner=evil)
    policy = policy_file(tmp_path, "evil", 2, attacker, owner=evil)
    with pytest.raises(PolicyTrustError) as caught:
        serve(deployed(tmp_path / "out", keys, policy, trusted=str(previous)))
    assert caught.value.reason in ("under_threshold", "unreadable")
    assert str(previous) in str(caught.value)


# -- 5. run ids unique per run ----------------------------------------------------------------


def test_run_ids_are_unique_per_run_kept_on_resume_and_bound_in_envelopes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two fresh gym runs of one scenario and seed get different run ids; a resume keeps
    the checkpoint's; a reply signed for run A is refused in run B."""
    a = SimSettings(out=str(tmp_path / "a")).resolved()
    b = SimSettings(out=str(tmp_path / "b")).resolved()
    assert a.run_id != b.run_id and a.run_id.startswith("demo-0-")
    ServerState(a.out_dir, a.load_policy(), a.run_id).checkpoint(1, "", {"round": 1})
    assert SimSettings(out=a.out, resume=True).resolved().run_id == a.run_id

    monkeypatch.setattr(round_helpers, "RUN", b.run_id)
    h = Harness(tmp_path / "round")
    for node in (1, 2, 9):
        h.task(node, CREATOR)
    honest = [h.reply(n, h.arrays(CREATOR, seed=n)) for n in (1, 2)]
    h.run([*honest, h.reply(9, h.arrays(CREATOR, seed=9), run_id=a.run_id)])
    assert refusal(h, 9)["reason"] == "wrong_run"
    assert h.records("commit")


# -- 6. hostile identities refused per node ---------------------------------------------------

HOSTILE = [
    {"jurisdiction": "../../x"},
    {"groups": ("../g",)},
    {"instance_id": "a/b"},
    {"groups": ("g" * 200,)},
]


@pytest.mark.parametrize("change", HOSTILE)
def test_identity_rule_refuses_hostile_names(change: dict[str, Any]) -> None:
    """One rule (Identity.validate) refuses path-like, separator and over-long names."""
    good = Identity(0, "inst-0", "eu", ("g1",), ("community",))
    bad = dataclasses.replace(good, **change)
    reply = Message(
        RecordDict({IDENTITY: bad.to_record()}), reply_to=_to_node(RecordDict(), "query")
    )
    with pytest.raises(MessageError, match=IDENTITY):
        Identity.from_message(reply)
    ok = Message(RecordDict({IDENTITY: good.to_record()}), reply_to=_to_node(RecordDict(), "query"))
    assert Identity.from_message(ok) == good


class HostileGymSource(GymSource):
    """The gym's instances, except that nodes 3-6 declare the HOSTILE names when asked
    who they are, and every node checks task policy hashes as a deployed node does."""

    def __init__(self, settings: SimSettings, verified: str) -> None:
        super().__init__(settings)
        self.verified = verified

    def runtime(self, msg: Message, context: Context) -> NodeRuntime:
        """The gym's runtime, with the policy hash a deployed node would verify."""
        rt = super().runtime(msg, context)
        rt.policy_hash = self.verified
        return rt

    def identity(
        self, msg: Message, context: Context, rt: NodeRuntime, task: Task | None
    ) -> Identity:
        """The roster's identity, hostile for nodes 3-6 at discovery."""
        ident = super().identity(msg, context, rt, task)
        if task is None and 3 <= ident.index < 3 + len(HOSTILE):
            return dataclasses.replace(ident, **HOSTILE[ident.index - 3])
        return ident


class LoopbackGrid(Grid):
    """Hands each message to the real ClientApp handlers, one node per roster instance."""

    def __init__(self, source: GymSource, nodes: int) -> None:
        self.source = source
        self.contexts = {
            100 + i: Context(1, 100 + i, {"partition-id": i}, RecordDict(), {})
            for i in range(nodes)
        }

    def set_run(self, run: Any) -> None:
        """Unused."""

    @property
    def run(self) -> Any:
        """Unused."""
        return None

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A message to one node."""
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        """Every node."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Unused (the strategy sends and receives)."""
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Unused (the strategy sends and receives)."""
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Each message through handle_query/handle_train; a typed error becomes an error reply."""
        replies = []
        for message in messages:
            kind = message.metadata.message_type
            msg = _to_node(message.content, kind, message.metadata.dst_node_id)
            handler = handle_query if kind == "query" else handle_train
            try:
                replies.append(handler(msg, self.contexts[msg.metadata.dst_node_id], self.source))
            except MessageError as e:
                replies.append(Message(Error(code=0, reason=str(e)), reply_to=msg))
        return replies


SAMPLE = "creator=2,government=0,community=0,in_group=0,individual=0"


def _discovering_round(out: Path, round_: int) -> LayeredStrategy:
    """One deployment-style round of the demo scenario's 12 instances over a loopback Grid:
    discovery, sampling (the creator layer only), training, aggregation, checkpoint."""
    settings = SimSettings(out=str(out), run_id="hostile-ids", sample=SAMPLE).resolved()
    verified = read_policy(DEFAULT_POLICY)
    policy = sim_policy(verified, settings.seed)
    model, tokenizer = load_base(policy.base_model)
    state = ServerState(out, policy, settings.run_id)
    state.load()
    grid = LoopbackGrid(HostileGymSource(settings, policy_hash(verified)), 12)
    with AuditLog(out / "audit.jsonl") as audit:
        strategy = LayeredStrategy(
            policy=policy,
            sample_per_layer=settings.sampling(),
            state=state,
            stack=LayerStack(policy, model, tokenizer, root_seed=settings.seed),
            tokenizer=tokenizer,
            audit=audit,
            run_id=settings.run_id,
            seed=settings.seed,
            round_offset=round_ - 1,
            policy_hash=policy_hash(verified),
        )
        messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
        strategy.aggregate_train(1, grid.send_and_receive(messages))
    return strategy


def test_hostile_identities_refused_at_discovery_round_goes_on_also_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes declaring ``../../x``, ``../g``, ``a/b`` or a 200-character group are refused
    at discovery and audited; the others train (their tasks carry the verified policy's
    hash, which they check) and the round ends; a resumed run refuses them again."""
    for name in ("_task_id", "_run_id", "_node_id"):  # as Flower's ServerApp runtime sets them
        monkeypatch.setattr(TaskIdentity, name, 1)
    out = tmp_path / "out"
    hostile = {str(103 + i) for i in range(len(HOSTILE))}
    for round_ in (1, 2):
        strategy = _discovering_round(out, round_)
        assert {str(n) for n in strategy.refused} == hostile
        assert len(strategy.identities) == 12 - len(HOSTILE)
        refused = records(out, "node_refused")
        assert len(refused) == round_ * len(HOSTILE)
        assert {r["node"] for r in refused} == hostile and all(
            IDENTITY in r["reason"] for r in refused
        )
        received = [r for r in records(out, "update_received") if r["round"] == round_]
        assert len(received) == 2 and {r["slot"] for r in received} == {"creator/global"}
        assert [r["round"] for r in records(out, "round_end")] == list(range(1, round_ + 1))
        assert not records(out, "update_dropped")
