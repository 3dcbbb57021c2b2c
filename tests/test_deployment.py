"""Deployment without the gym: real Flower processes serving instances of a deployer's own model.

The end-to-end run starts a TLS SuperLink with SuperNode authentication and two
SuperNodes on 127.0.0.1; each node's instance is a local Hugging Face Llama folder
described by an instance TOML (or the same fields flat in the node config); people's
feedback is recorded into each instance's journal before the run; `flwr run` trains
from exactly those events. No scenario file exists anywhere in it.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from deploy_helpers import EXAMPLE, Fleet, make_fleet, people_feedback
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args
from hypothesis import given
from hypothesis import strategies as st
from journal_crash_child import train_message
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import layerfed
from layerfed.clients.client_app import handle_train
from layerfed.clients.config import InstanceConfig
from layerfed.clients.events import FeedbackEvent
from layerfed.clients.instance import Instance
from layerfed.clients.journal import FeedbackJournal
from layerfed.clients.node import NodeSource
from layerfed.deploy import (
    DeployError,
    LocalDeployment,
    NodeSpec,
    make_supernode_key,
    make_tls_files,
    pid_running,
    run_config_string,
)
from layerfed.federation.run_config import RunConfigError, RunSettings
from layerfed.federation.server_app import refuse_finished_run
from layerfed.governance.audit import verify_audit
from layerfed.governance.canonical import policy_hash
from layerfed.governance.signing import PolicyTrustError, read_policy
from layerfed.layers.params import param_rows, read_model_params
from layerfed.layers.probes import load_suite
from layerfed.layers.slots import SlotId
from layerfed.wire.protocol import MessageError, Task

REPO = Path(layerfed.__file__).resolve().parent
ROUNDS = 2
RUN_ID = "deploy-e2e"

_text = st.text(
    alphabet=st.characters(blacklist_characters='"\\', blacklist_categories=("Cc", "Cs")),
    max_size=30,
)
_values = st.one_of(st.booleans(), st.integers(-(2**40), 2**40), _text)


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True), _values))
def test_run_config_string_parses_back_in_flower(values: dict[str, Any]) -> None:
    """What run_config_string writes, Flower's own --run-config parser reads back unchanged."""
    assert parse_config_args([run_config_string(values)]) == values


@pytest.mark.parametrize("bad", ['say "hi"', "a\\b", "line\nbreak"])
def test_run_config_string_refuses_unquotable_strings(bad: str) -> None:
    """A string Flower's parser cannot carry is refused with the key named, not mangled."""
    with pytest.raises(DeployError, match="layerfed-out"):
        run_config_string({"layerfed-out": bad})


def test_pyproject_run_config_defaults_give_run_settings() -> None:
    """The [tool.flwr.app.config] defaults are exactly RunSettings' (no scenario key)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    flwr = config["tool"]["flwr"]["app"]
    assert flwr["components"]["serverapp"] == "layerfed.federation.server_app:server_app"
    assert flwr["components"]["clientapp"] == "layerfed.clients.client_app:client_app"
    assert set(flwr["config"]) == set(RunSettings().to_config())
    assert not any("scenario" in key for key in flwr["config"])
    assert RunSettings.from_config(flwr["config"]) == RunSettings()


def test_example_run_config_reads_as_run_settings() -> None:
    """examples/deployment/run-config.toml holds only RunSettings keys, sampling per layer."""
    config = tomllib.loads((EXAMPLE / "run-config.toml").read_text(encoding="utf-8"))
    assert set(config) <= set(RunSettings().to_config())
    settings = RunSettings.from_config(config)
    assert settings.sampling() == {"creator": 1}
    assert settings.run_id and settings.rounds >= 1


def test_example_policy_and_probes_check() -> None:
    """The example policy loads, its JSONL suite parses, and no scenario file is left."""
    policy = read_policy(EXAMPLE / "policy.yaml")
    suite = load_suite(policy, "refusals")
    assert {p.expect for p in suite.prompts} == {"refuse", "comply"}
    assert not list(EXAMPLE.glob("scenario*"))
    assert InstanceConfig.load(EXAMPLE / "instance.toml").instance.id == "alice"


def test_node_auth_without_tls_is_refused(tmp_path: Path) -> None:
    """Asking for SuperNode authentication without TLS fails before any process starts."""
    with pytest.raises(DeployError, match="TLS"):
        LocalDeployment(tmp_path, node_auth=True)


def test_finished_output_folder_is_refused(tmp_path: Path) -> None:
    """A run into a folder holding a finished run is refused unless it resumes."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text("{}")
    with pytest.raises(RunConfigError, match="earlier run"):
        refuse_finished_run(RunSettings(out=str(tmp_path)))
    refuse_finished_run(RunSettings(out=str(tmp_path), resume=True))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Two instances of a local Llama under one signed policy."""
    tmp = tmp_path_factory.mktemp("fleet")
    return make_fleet(tmp, {"alice": ("creator", "individual"), "bob": ("community", "individual")})


def test_node_config_names_the_instance_toml(fleet: Fleet) -> None:
    """A node spec from an instance TOML passes only its path; the ClientApp reads the same config."""
    files = fleet.instances["alice"]
    node = NodeSpec.from_instance_config(files.config)
    assert node.instance_id == "alice"
    parsed = parse_config_args([node.node_config()])
    assert InstanceConfig.from_node_config(parsed) == InstanceConfig.load(files.config)


def test_flat_node_config_gives_the_same_instance(fleet: Fleet) -> None:
    """The flat node-config keys describe the same instance as its TOML (paths made absolute)."""
    files = fleet.instances["bob"]
    node = _flat(fleet, "bob")
    parsed = parse_config_args([node.node_config()])
    assert "scenario" not in parsed
    assert InstanceConfig.from_node_config(parsed) == InstanceConfig.load(files.config)


def test_policy_scopes_name_the_llama_parameters(fleet: Fleet) -> None:
    """Each layer's scope covers LoRA targets of the Llama; red lines only untrained weights."""
    policy = read_policy(fleet.policy)
    rows = param_rows(read_model_params(str(fleet.model)), policy=policy)
    for layer in policy.layers:
        assert any(layer.name in r.scopes and r.lora for r in rows), layer.name
    assert not any(r.conflict for r in rows)
    red = {r.name for r in rows if r.red_lines}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= red
    assert policy.base_model.path == "model"


def test_node_refuses_what_it_cannot_trust(fleet: Fleet, tmp_path: Path) -> None:
    """A deployed node refuses a task for another instance or under another policy, and a
    policy its root key did not sign, before it trains anything or touches the journal."""
    files = fleet.instances["alice"]
    context = Context(1, 2, {"instance-config": str(files.config)}, RecordDict(), {})
    source = NodeSource()
    good = policy_hash(read_policy(fleet.policy))
    slot = SlotId("creator", "global")
    for task, message in [
        (Task(RUN_ID, 1, 0, "bob", "creator", slot, {}, policy_hash=good), "for alice"),
        (Task(RUN_ID, 1, 0, "alice", "creator", slot, {}, policy_hash="0" * 64), "policy_hash"),
    ]:
        with pytest.raises(MessageError, match=message):
            handle_train(train_message(task), context, source)
    if files.journal.exists():
        with FeedbackJournal(files.journal) as journal:
            assert journal.batches() == []

    tampered = tmp_path / "policy.yaml"
    tampered.write_text(fleet.policy.read_text().replace("\nversion: 1\n", "\nversion: 2\n"))
    shutil.copy(fleet.policy.with_name("policy.yaml.sig.json"), tmp_path / "policy.yaml.sig.json")
    shutil.copy(fleet.policy.with_name("probes.jsonl"), tmp_path / "probes.jsonl")
    node = replace(_flat(fleet, "alice"), policy=tampered)
    hostile = Context(1, 2, parse_config_args([node.node_config()]), RecordDict(), {})
    with pytest.raises(PolicyTrustError, match="under_threshold"):
        NodeSource().runtime(train_message(task), hostile)


def _flat(fleet: Fleet, iid: str, auth_key: Path | None = None) -> NodeSpec:
    files = fleet.instances[iid]
    return NodeSpec(
        iid,
        policy=fleet.policy,
        root_key=fleet.root_pub,
        model=str(files.folder / "model"),
        jurisdiction="eu",
        groups=("clinic",),
        layers=files.layers,
        key_file=files.folder / "keys" / "instance.pem",
        certificate_dir=files.folder / "certs",
        journal=files.journal,
        state_dir=files.state,
        auth_key=auth_key,
    )


# -- the end-to-end run ----------------------------------------------------------------


def _record(fleet: Fleet, iid: str, events: list[FeedbackEvent]) -> list[int]:
    """Record people's feedback through the instance, as an app would, then close it.

    Alice rates for the creator, bob for the community (their roles route it there)."""
    role = {"alice": "creator", "bob": "community"}[iid]
    instance = Instance.from_config(fleet.instances[iid].config)
    try:
        seqs = [instance.feedback(event, role=role) for event in events]
        if iid == "bob":
            gen = instance.generate("hello world", max_new_tokens=3, top_k=3)
            alternative = gen.alternative(0, gen.alternatives[0][1][0])
            seqs.append(instance.feedback(alternative, role=role))
    finally:
        instance.journal.close()
    return seqs


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LocalDeployment]:
    """A TLS SuperLink with SuperNode auth; every process it starts is stopped by PID."""
    tls = make_tls_files(tmp_path / "tls")
    with LocalDeployment(tmp_path / "deploy", tls=tls, node_auth=True) as dep:
        yield dep


@pytest.mark.slow
def test_llama_instances_learn_from_their_people_on_real_flower(
    tmp_path: Path, deployment: LocalDeployment
) -> None:
    """`flwr run` on a SuperLink + 2 SuperNodes trains each Llama instance on exactly the
    feedback its people recorded: every event ends in a batch of the run, the audit's
    example counts add up to the events given, and the committed slots load in plain PEFT."""
    fleet = make_fleet(
        tmp_path / "fleet", {"alice": ("creator", "individual"), "bob": ("community", "individual")}
    )
    recorded = {iid: _record(fleet, iid, events) for iid, events in people_feedback().items()}
    assert {iid: len(s) for iid, s in recorded.items()} == {"alice": 6, "bob": 5}

    deployment.start_superlink()
    registered = []
    nodes = [
        NodeSpec.from_instance_config(fleet.instances["alice"].config),
        _flat(fleet, "bob"),
    ]
    for node in nodes:
        private, public = make_supernode_key(tmp_path / "node-keys", node.instance_id)
        registered.append(deployment.register(public))
        deployment.start_supernode(replace(node, auth_key=private))
    out = tmp_path / "out"
    settings = RunSettings(
        policy=str(fleet.policy),
        root_key=str(fleet.root_pub),
        server_key=str(fleet.server_key),
        out=str(out),
        rounds=ROUNDS,
        run_id=RUN_ID,
        sample="creator=1",
    )
    run = deployment.run(REPO, settings.to_config())
    status = deployment.wait_finished(run, timeout=600)
    tree = deployment.process_tree()
    assert status == "finished:completed", deployment.run_log(run) + _logs(deployment)
    assert len(set(registered)) == 2

    state = json.loads((out / "state" / "state.json").read_text())
    assert state["round"] == ROUNDS, _logs(deployment)
    report = verify_audit(out / "audit.jsonl", anchor=state["audit_head"])
    assert report.ok, report.reason
    records = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "policy_load" and kinds[-1] == "run_end"
    assert "update_refused" not in kinds, _logs(deployment)
    received = [r["fields"] for r in records if r["kind"] == "update_received"]
    assert sorted((u["instance"], u["round"], u["slot"]) for u in received) == [
        ("alice", 1, "creator/global"),
        ("alice", 2, "creator/global"),
        ("bob", 1, "community/global"),
        ("bob", 2, "community/global"),
    ]
    for iid, seqs in recorded.items():
        mine = {u["round"]: u for u in received if u["instance"] == iid}
        assert sum(u["num_examples"] for u in mine.values()) == len(seqs)
        _check_journal(fleet, iid, seqs, mine)
    _check_peft(fleet, out, {"creator/global", "community/global"})

    deployment.stop()
    assert len(tree) >= 3
    assert [pid for pid in tree if pid_running(pid)] == []


def _check_journal(
    fleet: Fleet, iid: str, seqs: list[int], received: dict[int, dict[str, Any]]
) -> None:
    """Exactly the recorded events, each in one batch of the run whose digest the server got;
    round 1's batch consumed (the server acknowledged it in round 2), round 2's signed."""
    with FeedbackJournal(fleet.instances[iid].journal) as journal:
        entries = journal.entries()
        batches = {b.round: b for b in journal.batches()}
    assert [e.seq for e in entries] == seqs
    assert {e.run_id for e in entries} == {RUN_ID}
    assert sorted(batches) == [1, 2]
    assert batches[1].state == "consumed" and batches[2].state == "signed"
    for rnd, batch in batches.items():
        assert batch.digest.rsplit("/", 1)[-1] == received[rnd]["digest"]  # the ack id ends in it
        assert len(batch.seqs) == received[rnd]["num_examples"]
    assert sorted(batches[1].seqs + batches[2].seqs) == seqs
    by_seq = {e.seq: e for e in entries}
    assert all(by_seq[s].status == "consumed" for s in batches[1].seqs)
    assert all(by_seq[s].status == "batched" for s in batches[2].seqs)


def _check_peft(fleet: Fleet, out: Path, slots: set[str]) -> None:
    """The newest version of each committed slot loads with PeftModel and changes the logits."""
    tokenizer = AutoTokenizer.from_pretrained(str(fleet.model), local_files_only=True)
    ids = tokenizer("tell me how to make a cake", return_tensors="pt")["input_ids"]
    found = set()
    for slot in slots:
        versions = sorted((out / "state" / "slots" / "slots" / slot).glob("v*"))
        assert versions, f"no committed version of {slot}"
        base = AutoModelForCausalLM.from_pretrained(str(fleet.model), local_files_only=True)
        with torch.no_grad():
            before = base(ids).logits
            adapted = PeftModel.from_pretrained(base, str(versions[-1]))
            after = adapted(ids).logits
        assert float((after - before).abs().max()) > 1e-6, slot
        found.add(slot)
    assert found == slots


def _logs(dep: LocalDeployment) -> str:
    return "\n".join(
        f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((dep.workdir / "logs").glob("*.log"))
    )
