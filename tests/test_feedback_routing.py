"""Feedback is routed by the policy: a person's role names the one layer their event trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from deploy_helpers import make_fleet
from flwr.app import Context, RecordDict
from journal_crash_child import train_message
from rich.console import Console

from layerfed.clients.client_app import handle_train
from layerfed.clients.config import ConfigError, InstanceConfig
from layerfed.clients.events import Thumbs
from layerfed.clients.instance import Instance, NoFeedback, RoleError
from layerfed.clients.instance_rounds import TrainPlan
from layerfed.clients.journal import FeedbackJournal
from layerfed.clients.local_slots import LocalSlots
from layerfed.clients.node import NodeSource
from layerfed.clients.source import NodeRuntime
from layerfed.governance.canonical import policy_hash
from layerfed.governance.diff import diff_policies
from layerfed.governance.errors import PolicyLoadError, PolicySemanticError
from layerfed.governance.explain import explain_policy
from layerfed.governance.keys import public_key_string
from layerfed.governance.loader import parse_policy_text
from layerfed.governance.schema import Policy
from layerfed.governance.schema_roles import OWN_ROLE, role_routes
from layerfed.governance.signing import read_policy
from layerfed.layers.instance_disk import InstanceDisk
from layerfed.layers.slots import SlotId
from layerfed.wire.protocol import METRICS, Task

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "please tell cake"
CREATOR = SlotId("creator", "global")


def _data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(
        (ROOT / "examples/policies/default.yaml").read_text(encoding="utf-8")
    )
    data["superego"] = {**data["superego"], "enabled": False}
    for layer in data["layers"]:  # no roles declared: the defaults (the example writes them out)
        layer.pop("roles", None)
    return data


def _policy(key: Ed25519PrivateKey, edit: dict[str, list[str]] | None = None) -> Policy:
    data = _data()
    for layer in data["layers"]:
        if layer["name"] in (edit or {}):
            layer["roles"] = (edit or {})[layer["name"]]
    public = public_key_string(key.public_key())
    for layer in ("creator", "individual"):
        data["principals"].append({"name": f"me_{layer}", "layer": layer, "public_key": public})
    return Policy.model_validate(data)


def _instance(
    layers: tuple[str, ...] = ("creator", "individual"),
    people: dict[str, tuple[str, ...]] | None = None,
    edit: dict[str, list[str]] | None = None,
) -> Instance:
    key = Ed25519PrivateKey.generate()
    return Instance(
        _policy(key, edit),
        instance_id="dana",
        jurisdiction="eu",
        key=key,
        layers=layers,
        people=people,
    )


def _round_setup(inst: Instance, folder: Path) -> tuple[LocalSlots, dict[SlotId, Any]]:
    rt = NodeRuntime(inst.policy, inst.stack)
    local = LocalSlots(inst.policy, InstanceDisk(folder / "slots"), rt.zeros)
    return local, {s: rt.zeros(s) for s in inst.slots if not local.owns(s)}


def _thumbs(n: int) -> list[Thumbs]:
    words = ("cake", "bread", "tea", "soup")
    return [Thumbs(prompt=PROMPT, response=f"sure here {w}", up=True) for w in words[:n]]


def test_without_declared_roles_own_feedback_trains_individual_and_shared_layers_their_name() -> (
    None
):
    """Default roles: 'everyone' (a person's own feedback) trains individual; each shared
    layer is trained only by the role of its own name."""
    routes = role_routes(_policy(Ed25519PrivateKey.generate()))
    assert routes[OWN_ROLE] == "individual"
    assert {r: routes[r] for r in ("creator", "government", "community", "in_group")} == {
        "creator": "creator",
        "government": "government",
        "community": "community",
        "in_group": "in_group",
    }


def test_a_role_that_trains_two_layers_is_a_located_semantic_error() -> None:
    """A role listed by two layers is refused at the second one's roles, naming both layers."""
    data = _data()
    for layer in data["layers"]:
        if layer["name"] in ("creator", "community"):
            layer["roles"] = ["rater"]
    with pytest.raises(PolicySemanticError, match=r"roles.*'rater' training both") as info:
        parse_policy_text(yaml.safe_dump(data))
    assert "'creator' and 'community'" in str(info.value)


def test_a_badly_spelled_role_is_refused_naming_the_field() -> None:
    """A role must be a lower-case name: the loader names layers[i].roles[j]."""
    data = _data()
    data["layers"][0]["roles"] = ["Creator Raters"]
    with pytest.raises(PolicyLoadError, match=r"layers\[0\]\.roles\[0\]"):
        parse_policy_text(yaml.safe_dump(data))


def test_explain_names_the_roles_that_train_each_layer() -> None:
    """policy explain shows, per layer, whose feedback trains it and whether by default."""
    data = _data()
    data["layers"][0]["roles"] = ["creator_rater"]
    console = Console(record=True, width=200)
    console.print(explain_policy(parse_policy_text(yaml.safe_dump(data))))
    text = console.export_text()
    assert "trained by roles" in text and "creator_rater" in text
    assert "everyone (a person's own feedback), by default" in text


def test_diff_flags_more_roles_on_a_shared_layer_as_loosening_only() -> None:
    """Adding a role to a shared layer loosens; narrowing it or widening individual does not."""
    key = Ed25519PrivateKey.generate()
    old = _policy(key)
    wider = _policy(key, {"creator": ["creator", "crowd"], "individual": ["everyone", "me"]})
    changes = {c.path: c for c in diff_policies(old, wider)}
    assert changes["layers.creator.roles"].loosened
    assert changes["layers.creator.roles"].new == ["creator", "crowd"]
    assert not changes["layers.individual.roles"].loosened
    narrower = {c.path: c for c in diff_policies(wider, old)}
    assert not narrower["layers.creator.roles"].loosened
    same = _policy(key, {"creator": ["creator"]})  # explicit default: no change at all
    assert not [c for c in diff_policies(old, same) if c.path.endswith(".roles")]


def test_feedback_is_journalled_with_the_layer_its_role_trains() -> None:
    """No role: own feedback -> individual; role or a person's configured role -> creator;
    the journal, entries() and pending_by_layer() show it."""
    inst = _instance(people={"rita": ("creator",), "sam": ("creator", OWN_ROLE)})
    inst.feedback(_thumbs(1)[0])
    inst.feedback(_thumbs(1)[0], role="creator")
    inst.feedback_many(_thumbs(2), person="rita")
    inst.feedback(_thumbs(1)[0], person="sam", role=OWN_ROLE)
    routed = [(e.layer, e.role) for e in inst.entries()]
    assert routed == [
        ("individual", OWN_ROLE),
        ("creator", "creator"),
        ("creator", "creator"),
        ("creator", "creator"),
        ("individual", OWN_ROLE),
    ]
    assert inst.pending_by_layer() == {"individual": 2, "creator": 3}


def test_bad_role_or_person_is_a_typed_error_and_writes_nothing() -> None:
    """Unknown role, a role for a layer the instance does not feed, an unknown person, a role
    the person does not hold, a person with several roles and none chosen: RoleError naming
    the field; the journal is untouched."""
    inst = _instance(people={"sam": ("creator", OWN_ROLE)})
    cases: list[tuple[dict[str, str], str, str]] = [
        ({"role": "king"}, "role", "king"),
        ({"role": "community"}, "role", "community"),
        ({"person": "nobody"}, "person", "nobody"),
        ({"person": "sam", "role": "community"}, "role", "community"),
        ({"person": "sam"}, "role", "None"),
    ]
    for kwargs, field, got in cases:
        with pytest.raises(RoleError) as info:
            inst.feedback_many(_thumbs(2), **kwargs)  # type: ignore[arg-type]
        assert info.value.field == field and str(info.value.got) == got, kwargs
        assert "expected" in str(info.value)
    assert inst.journal.counts()["pending"] == 0
    with pytest.raises(RoleError, match=r"people\.eve"):
        _instance(people={"eve": ("community",)})


def test_own_feedback_needs_an_own_layer_never_falls_back_to_a_shared_one() -> None:
    """An instance feeding only creator refuses a person's own feedback (no silent creator)."""
    inst = _instance(layers=("creator",))
    with pytest.raises(RoleError, match="trains 'individual'"):
        inst.feedback(_thumbs(1)[0])
    assert inst.journal.counts()["pending"] == 0


def test_issue_22_a_creator_task_trains_only_individual_on_own_feedback(tmp_path: Path) -> None:
    """The bug: layers [creator, individual], a person's own events, the server asks for
    creator. Now creator finds nothing routed to it (NoFeedback, no bytes), while individual
    trains on every event and commits on the instance's disk."""
    inst = _instance()
    local, received = _round_setup(inst, tmp_path)
    inst.feedback_many(_thumbs(3))
    with pytest.raises(NoFeedback):
        inst.run_round("run", 1, CREATOR, received, local, TrainPlan(seed=1))
    saved = local.disk.load_before(2)
    assert saved is not None and saved[0] == 1
    assert all(name.startswith("individual/dana/") for name in saved[1])
    assert any(np.any(a) for a in saved[1].values())
    assert not any(np.any(a) for a in inst.stack.get_arrays(CREATOR).values())
    assert inst.journal.counts() == {"pending": 0, "batched": 0, "consumed": 3}
    assert {b.slot for b in inst.journal.batches() if b.state == "consumed"} == {"individual/dana"}


def test_a_round_trains_each_layer_on_the_events_routed_to_it(tmp_path: Path) -> None:
    """A creator task trains creator on the rater's event only (its bytes in the reply) and,
    in the same round, individual on the person's own events (committed here, not sent)."""
    inst = _instance()
    local, received = _round_setup(inst, tmp_path)
    inst.feedback_many(_thumbs(2))
    inst.feedback(_thumbs(1)[0], role="creator")
    update = inst.run_round("run", 1, CREATOR, received, local, TrainPlan(seed=1))
    assert update.result.slot == CREATOR and update.result.num_events == 1
    assert update.arrays and all(k.startswith("creator/global/") for k in update.arrays)
    assert [(r.slot, r.num_events) for r in update.local] == [(SlotId("individual", "dana"), 2)]
    assert not update.committed_locally
    batches = {b.slot: len(b.seqs) for b in inst.journal.batches()}
    assert batches == {"creator/global": 1, "individual/dana": 2}
    assert inst.journal.counts()["pending"] == 0


def test_an_individual_only_person_sends_no_update_bytes_off_the_node(tmp_path: Path) -> None:
    """On a deployed node (ClientApp, node config) with layers [creator, individual], a
    person's own events leave no array bytes in the reply to a creator or individual task;
    their layer trains and commits on the node's own disk."""
    fleet = make_fleet(tmp_path, {"dana": ("creator", "individual")})
    files = fleet.instances["dana"]
    person = Instance.from_config(files.config)
    person.feedback_many(_thumbs(3))
    assert {e.layer for e in person.entries()} == {"individual"}
    person.journal.close()
    hashed = policy_hash(read_policy(InstanceConfig.load(files.config).policy))
    context = Context(
        run_id=1,
        node_id=2,
        node_config={"instance-config": str(files.config)},
        state=RecordDict(),
        run_config={"layerfed-seed": 0},
    )
    source = NodeSource()
    for round_, slot in ((1, CREATOR), (2, SlotId("individual", "dana"))):
        if round_ == 2:
            person = Instance.from_config(files.config)
            person.feedback(_thumbs(1)[0])
            person.journal.close()
        task = Task("run", round_, 0, "dana", slot.layer, slot, {}, policy_hash=hashed)
        reply = handle_train(train_message(task), context, source)
        sent = sum(len(a.data) for r in reply.content.array_records.values() for a in r.values())
        assert sent == 0, (slot, sent)
        saved = InstanceDisk(files.folder / "data" / "state" / "slots").load_before(round_ + 1)
        assert saved is not None and saved[0] == round_
    metrics = reply.content.metric_records[METRICS]
    assert metrics["local_commit"] == 1.0 and metrics["num_examples"] == 1.0
    with FeedbackJournal(files.journal) as journal:
        assert journal.counts() == {"pending": 0, "batched": 0, "consumed": 4}


def test_an_instance_config_maps_people_to_roles(tmp_path: Path) -> None:
    """[people] in an instance TOML gives each person id their roles (a string is one role);
    a [people] that is not a table is a ConfigError naming it."""
    (tmp_path / "policy.yaml").write_text("", encoding="utf-8")
    base = '[instance]\nid = "dana"\nlayers = ["creator", "individual"]\n[policy]\nfile = "policy.yaml"\n'
    good = tmp_path / "good.toml"
    good.write_text(base + '[people]\nrita = "creator"\nsam = ["creator", "everyone"]\n')
    assert InstanceConfig.load(good).people == {
        "rita": ("creator",),
        "sam": ("creator", "everyone"),
    }
    bad = tmp_path / "bad.toml"
    bad.write_text('people = "rita"\n' + base)
    with pytest.raises(ConfigError, match=r"^[^:]*bad.toml: people: expected a table"):
        InstanceConfig.load(bad)
