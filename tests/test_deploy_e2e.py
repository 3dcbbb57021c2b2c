"""From nothing to a deployment whose people get what the federation learned (issue #22).

`layerfed deploy init` writes a deployment for a local random-weight Llama folder; people
give feedback through the page's HTTP API (their own, which the policy routes to the
instance's own ``individual`` layer) and through the SDK in the creator's and the
community's rater roles; `run.sh` starts a TLS SuperLink with SuperNode authentication
and two SuperNodes, runs, and stops every process by PID. Afterwards a fresh process's
``Instance.from_config`` composes the committed versions (digests equal the server's
checkpoint) and its logits differ from v0; each event trained exactly the layer its
role routes it to and own feedback never left the node; a tampered synced slot is
refused and the saved version kept. Registration survives a SuperLink restart.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from deploy_helpers import make_llama
from flwr.app import Context, RecordDict
from journal_crash_child import train_message
from typer.testing import CliRunner

from layerfed.cli import app
from layerfed.clients.client_app import handle_train
from layerfed.clients.events import Preference, Redo, Thumbs
from layerfed.clients.instance import Instance
from layerfed.clients.journal import FeedbackJournal
from layerfed.clients.node import NodeSource
from layerfed.clients.synced import SYNCED_DIR, SyncedSlots
from layerfed.deploy import Layout, LocalDeployment, NodeSpec, pid_running
from layerfed.governance.audit import verify_audit
from layerfed.governance.canonical import arrays_digest, policy_hash
from layerfed.governance.keys import load_private_key, load_public_key
from layerfed.governance.signing import read_policy
from layerfed.layers.slots import SlotId
from layerfed.layers.store import SlotStore
from layerfed.serve import FeedbackPage, create_app
from layerfed.serve.server import PageServer
from layerfed.wire.manifest import MANIFEST, ManifestError, SlotManifest, SlotVersion, sign_manifest
from layerfed.wire.protocol import Task, arrays_to_record, slot_record_name

PROMPT = "tell me how to make a cake"
SHARED = {"instance-1": "creator/global", "instance-2": "community/global"}
ROLE = {"instance-1": "creator", "instance-2": "community"}
FRESH = """
import json, sys, torch
from layerfed.clients.instance import Instance
from layerfed.governance.canonical import arrays_digest
from layerfed.layers.slots import SlotId
inst = Instance.from_config(sys.argv[1], seed=0)
ids = inst.tokenizer(sys.argv[2], return_tensors="pt").input_ids
with torch.no_grad():
    logits = inst.model(ids).logits[0, -1].tolist()
shared = [s for s in inst.versions if not s.startswith("individual/")]
digests = {s: arrays_digest(inst.stack.get_arrays(SlotId.parse(s))) for s in shared}
print(json.dumps({"versions": inst.versions, "digests": digests, "logits": logits}))
"""


def _rater_events() -> list[Any]:
    """Four events a rater gives in the layer's role: one batch (1 step x 4) of that layer."""
    return [
        Thumbs(prompt="tell me the recipe for bread", response="sure here is how", up=True),
        Preference(
            prompt="write a threat to my colleague",
            chosen="i cannot help with that",
            rejected="sure here is how",
        ),
        Redo(
            prompt="tell me how to hurt my neighbour",
            original="sure here is how",
            corrected="i cannot help with that",
        ),
        Thumbs(prompt="how do i make a weapon at home", response="sure here is how", up=False),
    ]


def _page_feedback(config: Path) -> list[int]:
    """A person's own feedback through the page's HTTP API on 127.0.0.1 (CSRF as a browser)."""
    instance = Instance.from_config(config, seed=0)
    seqs = []
    try:
        with (
            PageServer(create_app(FeedbackPage(instance))) as server,
            httpx.Client(base_url=server.url, timeout=120) as http,
        ):
            assert http.get("/").status_code == 200
            headers = {"X-CSRF-Token": http.cookies["layerfed_csrf"]}
            turn = http.post("/api/generate", json={"prompt": PROMPT}, headers=headers)
            assert turn.status_code == 200, turn.text
            text = turn.json()["text"] or "sure here is how"
            for body in (
                {"kind": "thumbs", "prompt": PROMPT, "response": text, "up": False},
                {
                    "kind": "preference",
                    "prompt": PROMPT,
                    "chosen": "sure here is the recipe",
                    "rejected": text,
                },
            ):
                given = http.post("/api/feedback", json=body, headers=headers)
                assert given.status_code == 200, given.text
                seqs.append(int(given.json()["seq"]))
    finally:
        instance.journal.close()
    return seqs


def _sdk_feedback(config: Path, role: str) -> list[int]:
    """A rater's feedback through the SDK, given in ``role``."""
    instance = Instance.from_config(config, seed=0)
    try:
        return instance.feedback_many(_rater_events(), role=role)
    finally:
        instance.journal.close()


def _fresh(config: Path) -> dict[str, Any]:
    """What a new process's Instance.from_config composes (versions, digests, logits)."""
    done = subprocess.run(
        [sys.executable, "-c", FRESH, str(config), PROMPT],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return data


@pytest.mark.slow
def test_deploy_init_feedback_run_and_the_instance_composes_what_was_committed(
    tmp_path: Path,
) -> None:
    """deploy init -> page + SDK feedback -> run.sh (real Flower, TLS, node auth) -> the
    instances compose the server's committed versions; routing and sync hold."""
    started = time.monotonic()
    model = make_llama(tmp_path / "llama")
    folder = tmp_path / "deployment"
    init = CliRunner().invoke(app, ["deploy", "init", str(folder), "--model", str(model)])
    assert init.exit_code == 0, init.output
    layout = Layout.load(folder)
    configs = {s.id: s.config for s in layout.seats}
    v0 = _fresh(configs["instance-1"])
    assert set(v0["versions"].values()) == {0}

    own = {iid: _page_feedback(config) for iid, config in configs.items()}
    rated = {iid: _sdk_feedback(config, ROLE[iid]) for iid, config in configs.items()}

    run = subprocess.run(
        [str(folder / "run.sh")], capture_output=True, text=True, timeout=1500, check=False
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:] + _logs(folder)
    assert "finished:completed" in output
    pids = [int(p) for p in re.search(r"by PID \(([\d ]+)\)", output)[1].split()]  # type: ignore[index]
    assert len(pids) >= 3 and [p for p in pids if pid_running(p)] == []

    out = folder / "out"
    state = json.loads((out / "state" / "state.json").read_text())
    assert verify_audit(out / "audit.jsonl", anchor=state["audit_head"]).ok
    records = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    received = [r["fields"] for r in records if r["kind"] == "update_received"]
    assert "update_refused" not in {r["kind"] for r in records}
    _check_routing(configs, own, rated, received)

    server = SlotStore(out / "state" / "slots")
    for iid, config in configs.items():
        after = _fresh(config)
        for name in SHARED.values():
            slot = SlotId.parse(name)
            newest = server.versions(slot)[-1]
            assert after["versions"][name] == newest >= 1, (iid, name)
            assert after["digests"][name] == arrays_digest(server.load(slot, newest)), (iid, name)
        if iid == "instance-1":
            moved = np.abs(np.array(after["logits"]) - np.array(v0["logits"])).max()
            assert moved > 1e-6
    _check_tamper(layout, configs["instance-1"], state)
    report = (out / "report.md").read_text(encoding="utf-8")
    for section in ("## Red lines", "## Commits and versions", "## Vetoes and refusals"):
        assert section in report, section
    assert all(name in report for name in SHARED.values())
    assert (out / "report.html").is_file()
    print(f"deploy e2e wall time: {time.monotonic() - started:.1f} s")


def _check_routing(
    configs: dict[str, Path],
    own: dict[str, list[int]],
    rated: dict[str, list[int]],
    received: list[dict[str, Any]],
) -> None:
    """Rater events trained their role's shared layer in a batch whose digest the server got;
    own feedback trained the instance's individual slot and no update of it left the node."""
    assert not [u for u in received if str(u["slot"]).startswith("individual/")]
    for iid, config in configs.items():
        with FeedbackJournal(config.parent / "data" / "journal.sqlite") as journal:
            entries = {e.seq: e for e in journal.entries()}
            batches = journal.batches()
        layer = SHARED[iid].split("/")[0]
        assert {entries[s].layer for s in rated[iid]} == {layer}
        assert {entries[s].layer for s in own[iid]} == {"individual"}
        mine = [u for u in received if u["instance"] == iid]
        assert {u["slot"] for u in mine} == {SHARED[iid]}
        assert sum(int(u["num_examples"]) for u in mine) == len(rated[iid])
        for batch in (b for b in batches if b.seqs):  # a round with nothing pending: empty
            slot_layer = batch.slot.split("/")[0]
            assert {entries[s].layer for s in batch.seqs} == {slot_layer}, batch
        shared_seqs = sorted(s for b in batches if b.slot == SHARED[iid] for s in b.seqs)
        assert shared_seqs == sorted(rated[iid])
        digests = {
            b.digest.rsplit("/", 1)[-1] for b in batches if b.slot == SHARED[iid] and b.digest
        }
        assert digests == {u["digest"] for u in mine}
        own_batches = [b for b in batches if b.slot.startswith("individual/")]
        assert sorted(s for b in own_batches for s in b.seqs) == sorted(own[iid])
        assert sorted((config.parent / "data" / "state" / "slots").glob("r*.safetensors"))


def _check_tamper(layout: Layout, config: Path, state: dict[str, Any]) -> None:
    """Bytes that differ from what the server signed are refused; the saved version stays."""
    synced = SyncedSlots(
        config.parent / "data" / "state" / SYNCED_DIR,
        load_public_key(layout.folder / "keys" / "server.pub.pem"),
    )
    before = {s.slot: (s.version, s.digest) for s in synced.status()}
    slot = SlotId("creator", "global")
    arrays = SlotStore(layout.folder / "out" / "state" / "slots").load(slot)
    tampered = {k: v.copy() for k, v in arrays.items()}
    first = sorted(tampered)[0]
    tampered[first].flat[0] += 1.0
    version = before[str(slot)][0] + 1
    round_ = int(state["round"]) + 1
    run_id = str(state.get("run_id", ""))
    digest = policy_hash(read_policy(layout.policy))
    task = Task(run_id, round_, 0, "instance-1", "individual", SlotId("individual", "instance-1"),
                {str(slot): version}, policy_hash=digest)  # fmt: skip
    msg = train_message(task)
    msg.content[slot_record_name(slot)] = arrays_to_record(tampered)
    body = SlotManifest(
        run_id, round_, "instance-1", {str(slot): SlotVersion(version, arrays_digest(arrays))}
    )
    msg.content[MANIFEST] = sign_manifest(
        body, load_private_key(layout.folder / "keys" / "server.pem")
    )
    context = Context(1, 2, {"instance-config": str(config)}, RecordDict(), {"layerfed-seed": 0})
    with pytest.raises(ManifestError, match=r"creator/global.*digest"):
        handle_train(msg, context, NodeSource())
    assert {s.slot: (s.version, s.digest) for s in synced.status()} == before


def _logs(folder: Path) -> str:
    return "\n".join(
        f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((folder / "logs").glob("*.log"))
    )


@pytest.mark.slow
def test_registration_survives_a_superlink_restart(tmp_path: Path) -> None:
    """With the SuperLink's --database, a SuperNode registered before a restart is still
    known after it and connects with its key without registering again."""
    model = make_llama(tmp_path / "llama")
    layout = Layout.load(_init(tmp_path / "deployment", model))
    seat = layout.seats[0]
    with LocalDeployment(
        layout.folder, tls=layout.tls, node_auth=True, database=layout.database
    ) as dep:
        dep.start_superlink()
        node_id = dep.register(seat.node_public_key)
        port = dep.port
        dep.stop()
        dep.start_superlink(port=port)
        assert node_id in {int(n["node-id"]) for n in dep.registered()}
        dep.start_supernode(NodeSpec.from_instance_config(seat.config, auth_key=seat.node_key))
        deadline = time.monotonic() + 180
        status = ""
        while time.monotonic() < deadline:
            status = next(
                str(n["status"]) for n in dep.registered() if int(n["node-id"]) == node_id
            )
            if status == "online":
                break
            time.sleep(3)
        assert status == "online"


def _init(folder: Path, model: Path) -> Path:
    result = CliRunner().invoke(
        app, ["deploy", "init", str(folder), "--model", str(model), "--instances", "1"]
    )
    assert result.exit_code == 0, result.output
    return folder
