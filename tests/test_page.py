"""The feedback page over HTTP (Starlette's TestClient): events, access rules, bad requests."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from typer.testing import CliRunner

from layerfed.cli import app as cli_app
from layerfed.clients.config import InstanceConfig
from layerfed.clients.events import FeedbackEvent, parse_event
from layerfed.clients.guard import OutputGuard
from layerfed.clients.instance import Instance
from layerfed.clients.journal import FeedbackJournal
from layerfed.governance.keys import generate_keypair, load_private_key
from layerfed.governance.loader import load_policy
from layerfed.governance.signing import sign_policy_file
from layerfed.serve import Access, FeedbackPage, PageError, create_app
from layerfed.serve.server import check_bind, check_demo_keys
from layerfed.serve.views import render_turn

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "examples" / "policies" / "default.yaml"
LOCAL = "http://127.0.0.1:8765"
TOKEN = "s3cret-token-for-tests"
WORDS = ["please", "tell", "cake", "bomb", "dog", "sun", "bread", "help", "me", "the"]


def build_instance(journal: Path, **kwargs: Any) -> Instance:
    policy = load_policy(POLICY)
    return Instance(
        policy,
        instance_id="alice",
        jurisdiction="eu",
        groups=["g1"],
        seed=3,
        journal=FeedbackJournal(journal),
        **kwargs,
    )


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> FeedbackPage:
    return FeedbackPage(build_instance(tmp_path_factory.mktemp("page") / "journal.sqlite"))


def local_client(page: FeedbackPage, **kwargs: Any) -> TestClient:
    app = create_app(page, **kwargs)
    return TestClient(app, base_url=LOCAL, client=("127.0.0.1", 50000))


@pytest.fixture
def client(page: FeedbackPage) -> Iterator[TestClient]:
    with local_client(page) as c:
        assert c.get("/").status_code == 200
        c.headers["X-CSRF-Token"] = c.cookies["layerfed_csrf"]
        yield c


def ask(client: TestClient, prompt: str = "please tell cake") -> dict[str, Any]:
    response = client.post("/api/generate", json={"prompt": prompt})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def events_after(page: FeedbackPage, seq: int) -> list[FeedbackEvent]:
    return [e.event for e in page.journal.entries() if e.seq > seq]


def last_seq(page: FeedbackPage) -> int:
    entries = page.journal.entries()
    return entries[-1].seq if entries else 0


def every_kind(turn: dict[str, Any], other: dict[str, Any]) -> list[dict[str, Any]]:
    """One event of each kind, built from answers the way the page's controls build them."""
    prompt, text, tokens = turn["prompt"], turn["text"], turn["tokens"]
    pick = next(c for c in tokens[0]["candidates"] if c["id"] != tokens[0]["id"])
    last = tokens[-1]
    return [
        {"kind": "thumbs", "prompt": prompt, "response": text, "up": False},
        {"kind": "preference", "prompt": prompt, "chosen": other["text"], "rejected": text},
        {
            "kind": "marks",
            "prompt": prompt,
            "response": text,
            "spans": [{"start": last["start"], "end": last["end"], "valence": -1}],
        },
        {
            "kind": "redo",
            "prompt": prompt,
            "original": text,
            "corrected": text[: last["start"]] + " dog",
            "first_wrong_token": last["position"],
        },
        {
            "kind": "alternative",
            "prompt": prompt,
            "response": text,
            "position": 0,
            "chosen_token": pick["id"],
            "candidates": [c["id"] for c in tokens[0]["candidates"]],
            "response_ids": turn["response_ids"],
        },
        {
            "kind": "contrast",
            "positive_prompt": "please tell bomb",
            "negative_prompt": "please tell cake",
            "behaviour": "sorry",
        },
    ]


def test_every_kind_is_journalled_in_order(client: TestClient, page: FeedbackPage) -> None:
    """Each feedback kind given over HTTP is in the journal, as the SDK's event, in order."""
    turn, other = ask(client), ask(client, "please tell dog")
    start = last_seq(page)
    sent = every_kind(turn, other)
    seqs = []
    for event in sent:
        response = client.post("/api/feedback", json=event)
        assert response.status_code == 200, response.text
        seqs.append(response.json()["seq"])
    assert seqs == sorted(seqs) and len(set(seqs)) == len(sent)
    assert events_after(page, start) == [parse_event(e) for e in sent]
    listed = client.get("/api/journal").json()["entries"]
    assert [e["kind"] for e in listed if e["seq"] > start] == [e["kind"] for e in sent]


def test_answer_pieces_carry_candidates(client: TestClient) -> None:
    """An answer comes token by token: pieces concatenate to the text, each with top-k probs."""
    turn = ask(client)
    assert "".join(t["text"] for t in turn["tokens"]) == turn["text"]
    for token in turn["tokens"]:
        assert turn["text"][token["start"] : token["end"]] == token["text"]
        probs = [c["prob"] for c in token["candidates"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-6
    assert client.get("/api/turns").json()["turns"][-1]["id"] == turn["id"]


def test_pair_gives_two_answers(client: TestClient) -> None:
    """'Compare two answers' samples two answers of the same prompt."""
    data = client.post("/api/pair", json={"prompt": "please tell cake"}).json()
    assert data["a"]["prompt"] == data["b"]["prompt"] == "please tell cake"
    assert data["a"]["id"] != data["b"]["id"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {"spans": [{"start": 0, "end": 3, "valence": 1}, {"start": 2, "end": 4, "valence": 1}]},
            "spans[1].start",
        ),
        ({"kind": "marks", "spans": [{"start": 0, "end": 999, "valence": 1}]}, "spans[0].end"),
        ({"kind": "redo", "corrected": None}, "corrected"),
        ({"kind": "alternative", "chosen_token": "sampled"}, "chosen_token"),
        ({"kind": "contrast", "negative_prompt": "please tell bomb"}, "negative_prompt"),
        ({"kind": "thumbs", "up": "maybe"}, "up"),
        ({"kind": "preference", "chosen": "same", "rejected": "same"}, "rejected"),
    ],
)
def test_invalid_event_names_field_and_writes_nothing(
    client: TestClient, page: FeedbackPage, change: dict[str, Any], field: str
) -> None:
    """An invalid event is refused with 400 naming the field; the journal is unchanged."""
    turn = ask(client)
    events = {e["kind"]: e for e in every_kind(turn, ask(client, "please tell dog"))}
    event = dict(events[change.get("kind", "marks")])
    event.update({k: v for k, v in change.items() if k != "kind"})
    if event.get("chosen_token") == "sampled":
        event["chosen_token"] = turn["response_ids"][0]
    if event.get("corrected", "") is None:
        event["corrected"] = turn["text"]
    before = page.journal.entries()
    response = client.post("/api/feedback", json=event)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["message"].startswith(field)
    assert page.journal.entries() == before


def test_bad_requests_are_refused_with_a_message(client: TestClient, page: FeedbackPage) -> None:
    """Malformed JSON, non-objects, unknown kinds, wrong content types: 4xx, nothing written."""
    before = len(page.journal.entries())
    raw = {"content-type": "application/json"}
    cases: list[tuple[Any, int, str]] = [
        (client.post("/api/feedback", content=b"{not json", headers=raw), 400, "malformed JSON"),
        (client.post("/api/feedback", content=b"\xff\xfe", headers=raw), 400, "malformed JSON"),
        (client.post("/api/feedback", json=[1, 2]), 400, "expected a JSON object"),
        (client.post("/api/feedback", json={"kind": "hug"}), 400, "kind: expected one of"),
        (client.post("/api/feedback", json={"prompt": "x"}), 400, "kind: expected one of"),
        (client.post("/api/feedback", data={"kind": "thumbs"}), 415, "expected a JSON body"),
        (client.post("/api/generate", json={"prompt": ""}), 400, "prompt: expected"),
        (client.post("/api/generate", json={"prompt": "x" * 3000}), 400, "prompt: expected"),
        (client.post("/api/generate", json={"prompt": "hi", "top_k": 0}), 400, "top_k"),
        (client.get("/api/feedback"), 405, ""),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        if message:
            assert message in response.json()["error"]["message"]
    assert len(page.journal.entries()) == before


def test_oversized_bodies_are_refused(page: FeedbackPage) -> None:
    """Bodies over the limit get 413, declared or streamed without a length."""
    with local_client(page, max_body=2048) as c:
        c.get("/")
        headers = {"X-CSRF-Token": c.cookies["layerfed_csrf"], "content-type": "application/json"}
        big = json.dumps({"kind": "thumbs", "prompt": "x" * 5000, "response": "y", "up": True})
        assert c.post("/api/feedback", content=big, headers=headers).status_code == 413

        def chunks() -> Iterator[bytes]:
            for _ in range(10):
                yield b" " * 1000

        assert c.post("/api/feedback", content=chunks(), headers=headers).status_code == 413
        assert c.get("/healthz").json() == {"ok": True}


def test_csrf_token_is_required_on_every_post(page: FeedbackPage) -> None:
    """Posts without the signed CSRF token, with a forged one or a foreign Origin get 403."""
    event = {"kind": "thumbs", "prompt": "hi", "response": "sure", "up": True}
    with local_client(page) as c:
        assert c.post("/api/feedback", json=event).status_code == 403  # no cookie yet
        c.get("/")
        token = c.cookies["layerfed_csrf"]
        forged = "0" * 32 + "." + "0" * 64
        for headers in ({}, {"X-CSRF-Token": "nope"}, {"X-CSRF-Token": token + "x"}):
            assert c.post("/api/feedback", json=event, headers=headers).status_code == 403
        c.cookies.set("layerfed_csrf", forged)
        assert (
            c.post("/api/feedback", json=event, headers={"X-CSRF-Token": forged}).status_code == 403
        )
        c.cookies.set("layerfed_csrf", token)
        foreign = {"X-CSRF-Token": token, "Origin": "http://evil.example"}
        assert c.post("/api/feedback", json=event, headers=foreign).status_code == 403
        good = {"X-CSRF-Token": token, "Origin": LOCAL}
        assert c.post("/api/feedback", json=event, headers=good).status_code == 200


def test_without_token_only_loopback_is_served(page: FeedbackPage) -> None:
    """No token: a remote client, or a foreign Host (DNS rebinding), gets 403."""
    remote = TestClient(create_app(page), base_url=LOCAL, client=("10.1.2.3", 4000))
    assert remote.get("/").status_code == 403
    rebound = TestClient(
        create_app(page), base_url="http://evil.example:8765", client=("127.0.0.1", 1)
    )
    assert rebound.get("/").status_code == 403
    local = TestClient(create_app(page), base_url=LOCAL, client=("::1", 1))
    for host in ("localhost:8765", "[::1]:8765", "127.0.0.1"):
        assert local.get("/", headers={"host": host}).status_code == 200
    assert local.get("/", headers={"host": "127.0.0.1.evil.example"}).status_code == 403


def test_token_gates_every_request(page: FeedbackPage) -> None:
    """With a token, requests need it (bearer or the cookie /?token= sets); CSRF still applies."""
    app = create_app(page, token=TOKEN)
    with TestClient(app, base_url="http://10.0.0.1:8765", client=("10.0.0.9", 1)) as c:
        assert c.get("/").status_code == 401
        assert c.get("/?token=wrong").status_code == 401
        assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert (
            c.get("/api/journal", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        )
        response = c.get(f"/?token={TOKEN}", follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/"
        assert TOKEN not in response.headers["set-cookie"]
        assert c.get("/").status_code == 200
        event = {"kind": "thumbs", "prompt": "hi", "response": "sure", "up": True}
        assert c.post("/api/feedback", json=event).status_code == 403
        ok = c.post(
            "/api/feedback", json=event, headers={"X-CSRF-Token": c.cookies["layerfed_csrf"]}
        )
        assert ok.status_code == 200


def test_bind_rules() -> None:
    """Loopback needs no token; any other host needs one of at least 16 characters."""
    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", TOKEN)
    with pytest.raises(PageError, match="host"):
        check_bind("0.0.0.0", None)
    with pytest.raises(PageError, match="token"):
        check_bind("0.0.0.0", "short")
    with pytest.raises(PageError):
        Access("short")


def test_thousand_rapid_submissions_among_bad_requests(
    client: TestClient, page: FeedbackPage
) -> None:
    """1,000 events from 8 threads among oversized and malformed requests: none lost, no crash."""
    start = last_seq(page)
    csrf = client.headers["X-CSRF-Token"]

    def submit(i: int) -> tuple[int, int]:
        event = {
            "kind": "thumbs",
            "prompt": f"please tell {i}",
            "response": "sure",
            "up": i % 2 == 0,
        }
        ok = client.post("/api/feedback", json=event)
        if i % 10 == 0:
            big = client.post(
                "/api/feedback",
                content=b"[" * 200_000,
                headers={"content-type": "application/json", "X-CSRF-Token": csrf},
            )
            bad = client.post(
                "/api/feedback",
                content=b'{"kind": "thumbs",',
                headers={"content-type": "application/json", "X-CSRF-Token": csrf},
            )
            assert (big.status_code, bad.status_code) == (413, 400)
        assert ok.status_code == 200, ok.text
        return i, int(ok.json()["seq"])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(submit, range(1000)))
    seqs = [seq for _, seq in results]
    assert len(set(seqs)) == 1000
    events = {e.seq: e.event for e in page.journal.entries() if e.seq > start}
    assert sorted(events) == sorted(seqs)
    for i, seq in results:
        assert events[seq].prompt == f"please tell {i}"  # type: ignore[union-attr]
    assert client.get("/healthz").status_code == 200


def test_page_renders_panel_and_persisted_feedback(client: TestClient, page: FeedbackPage) -> None:
    """The page lists journalled feedback, every slot with its version, and the guard state."""
    turn = ask(client)
    client.post(
        "/api/feedback",
        json={"kind": "thumbs", "prompt": turn["prompt"], "response": turn["text"], "up": True},
    )
    html = client.get("/").text
    seq = last_seq(page)
    assert f'data-seq="{seq}" data-kind="thumbs" data-status="pending"' in html
    for slot in page.instance.slots:
        assert f'data-slot="{slot}"' in html
    assert 'id="guard-state" data-enabled="false"' in html
    assert "your feedback trains this" in html
    assert "red lines (no training may lift them)" in html  # policy explain
    assert client.get("/panel").text.count('class="layer"') == len(page.instance.slots)
    headers = client.get("/").headers
    assert "script-src 'self'" in headers["content-security-policy"]


def test_panel_follows_versions_and_guard(tmp_path: Path) -> None:
    """A synced slot shows its new version and when it changed; an output guard shows as on."""
    instance = build_instance(tmp_path / "j.sqlite")
    instance.guard = OutputGuard(instance.tokenizer, banned=["bomb"], refusal="sorry cannot")
    page = FeedbackPage(instance)
    slot = instance.slot_for("community")
    instance.sync({str(slot): instance.stack.get_arrays(slot)}, {str(slot): 4})
    view = page.panel()
    community = next(v for v in view.layers if v.slot == str(slot))
    assert community.version == 4 and community.changed != "at start"
    assert view.guard.enabled and view.guard.banned == ("bomb",)
    turn = page.ask("please tell bomb")
    assert "bomb" not in turn.text
    assert [v.rank for v in view.layers] == sorted((v.rank for v in view.layers), reverse=True)


@settings(max_examples=25, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=6))
def test_pieces_always_concatenate_to_the_answer(page: FeedbackPage, words: list[str]) -> None:
    """For any prompt, the answer's pieces tile its text, so page selections are Marks spans."""
    generation = page.instance.generate(" ".join(words), max_new_tokens=6)
    turn = render_turn(generation, page.tokenizer, 1)
    assert "".join(t.text for t in turn.tokens) == turn.text
    assert all(a.end == b.start for a, b in zip(turn.tokens, turn.tokens[1:], strict=False))


def write_instance_config(folder: Path) -> Path:
    """A signed copy of the default policy and an instance config naming it, as deployed."""
    root = generate_keypair("creator", folder / "keys")
    data = yaml.safe_load(POLICY.read_text())
    for principal in data["principals"]:
        if principal["name"] == "creator_root":
            principal["public_key"] = root.public_key
    (folder / "policy.yaml").write_text(yaml.safe_dump(data))
    sign_policy_file(folder / "policy.yaml", load_private_key(root.private_path))
    config = folder / "instance.toml"
    config.write_text(
        '[instance]\nid = "bob"\njurisdiction = "eu"\ngroups = ["g1"]\n\n'
        '[policy]\nfile = "policy.yaml"\nroot_key = "keys/creator.pub.pem"\n\n'
        '[storage]\njournal = "data/journal.sqlite"\n'
    )
    return config


def test_cli_refuses_open_bind_without_token(tmp_path: Path) -> None:
    """`layerfed instance serve --host 0.0.0.0` without a token stops before loading anything."""
    runner = CliRunner()
    args = ["instance", "serve", "--config", str(tmp_path / "missing.toml"), "--host", "0.0.0.0"]
    result = runner.invoke(cli_app, args, env={"LAYERFED_PAGE_TOKEN": ""})
    assert result.exit_code != 0
    assert "host: expected 127.0.0.1" in str(result.exception)


@pytest.mark.slow
def test_cli_serves_an_instance_from_its_config(tmp_path: Path) -> None:
    """`layerfed instance serve --config` builds the instance from its TOML and journals to disk."""
    config = write_instance_config(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "layerfed.cli", "instance", "serve", "--config", str(config)]
    env = {**os.environ, "LAYERFED_PAGE_TOKEN": ""}
    env.pop("LAYERFED_PAGE_TOKEN")
    server = subprocess.Popen(
        [*command, "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the page did not come up"
            time.sleep(0.5)
        with httpx.Client(base_url=url) as client:
            assert 'id="instance-id">bob<' in client.get("/").text
            headers = {"X-CSRF-Token": client.cookies["layerfed_csrf"]}
            event = {"kind": "thumbs", "prompt": "please tell cake", "response": "sure", "up": True}
            assert client.post("/api/feedback", json=event, headers=headers).status_code == 200
        with FeedbackJournal(tmp_path / "data" / "journal.sqlite") as journal:
            assert [e.event for e in journal.entries()] == [parse_event(event)]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    assert server.returncode in (0, 130, -signal.SIGINT)  # a clean shutdown on Ctrl-C
    errors = server.stderr.read() if server.stderr else ""
    assert "WARNING" not in errors and "Warning" not in errors, errors  # start line, libraries


TINY = ROOT / "examples" / "instances" / "tiny.toml"


def test_demo_keys_warned_on_loopback_refused_elsewhere(tmp_path: Path) -> None:
    """The ready tiny example trusts the demo root key: loud lines on 127.0.0.1, refused on
    any other address naming the setting; an own root key gets neither."""
    config = InstanceConfig.load(TINY)
    lines = check_demo_keys(config, "127.0.0.1")
    assert any(line.startswith("!! DEMO KEY policy.root_key") for line in lines), lines
    with pytest.raises(PageError, match=r"policy\.root_key: expected your own key"):
        check_demo_keys(config, "0.0.0.0")
    own = write_instance_config(tmp_path)
    assert check_demo_keys(InstanceConfig.load(own), "0.0.0.0") == []


def test_tiny_example_loads_without_library_warnings(tmp_path: Path) -> None:
    """examples/instances/tiny.toml builds an instance of the built-in tiny model, and no
    library warns while it loads (PEFT's read of a property transformers 5 deprecated)."""
    update = {"journal": tmp_path / "journal.sqlite", "state": tmp_path / "state"}
    config = InstanceConfig.load(TINY).model_copy(update=update)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        instance = Instance.from_config(config)
    assert instance.instance_id == "alice"
    assert instance.policy.base_model.builtin == "tiny"
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_docs_example_runs() -> None:
    """The Python example in docs/page.md runs as written."""
    text = (ROOT / "docs" / "page.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert blocks
    exec(compile("\n".join(blocks), "docs/page.md", "exec"), {"__name__": "docs_page"})


@pytest.mark.parametrize(
    "host",
    [
        "[::1].evil.example",
        "127.0.0.1:80@evil.example",
        "localhost.evil.example",
        "evil.example",
        "127.0.0.1:8765:1",
        "localhost:99999",
        "localhost:",
        "127.0.0.2",
        " localhost",
        "",
    ],
)
def test_the_host_allow_list_is_exact(page: FeedbackPage, host: str) -> None:
    """No token: only ``127.0.0.1``, ``localhost`` or ``[::1]``, with an optional port."""
    local = TestClient(create_app(page), base_url=LOCAL, client=("127.0.0.1", 1))
    assert local.get("/healthz", headers={"host": host}).status_code == 403
    for good in ("LOCALHOST:8765", "[::1]", "127.0.0.1:1"):
        assert local.get("/healthz", headers={"host": good}).status_code == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"//evil.example/",
        b"/\\evil.example/",
        b"/%2F/evil.example",
        b"/%09/evil.example",
        b"/%5C%5Cevil.example",
        b"/%0d%0aLocation:%20http://evil.example",
    ],
)
def test_the_token_login_redirects_only_to_same_site_paths(page: FeedbackPage, raw: bytes) -> None:
    """``/?token=`` on a path a browser would read as another site redirects to ``/``."""
    app = create_app(page, token=TOKEN)
    with TestClient(app, base_url="http://10.0.0.1:8765", client=("10.0.0.9", 1)) as c:
        url = c.base_url.copy_with(raw_path=raw + f"?token={TOKEN}&a=1".encode())
        response = c.get(url, follow_redirects=False)
        assert response.status_code == 303
        assert response.headers["location"] == "/?a=1"
        kept = c.get(f"/panel?token={TOKEN}&a=1", follow_redirects=False)
        assert kept.headers["location"] == "/panel?a=1"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"[" * 30000 + b"]" * 30000, "nested deeper than"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "nested deeper than"),
        (b'{"kind":"thumbs","prompt":"hi","response":"sure","up":true,"w":NaN}', "NaN"),
        (b'{"prompt":"hi","top_k":Infinity}', "Infinity"),
        (b'{"prompt":"hi","top_k":1e999}', "out of range"),
        (b'{"kind":"thumbs","prompt":"hi \\ud800","response":"sure","up":true}', "surrogate"),
        (b'{"prompt":"hi \\udfff"}', "surrogate"),
        (b'{"\\ud800":1,"kind":"thumbs","prompt":"hi","response":"sure","up":true}', "surrogate"),
        ('{"prompt":"hi"}'.encode("utf-16"), "UTF-8"),
    ],
)
def test_malformed_bodies_under_the_limit_get_400_naming_the_problem(
    page: FeedbackPage, body: bytes, problem: str
) -> None:
    """Deep nesting, NaN/Infinity, out-of-range numbers, lone surrogates, non-UTF-8: 400."""
    app = create_app(page)
    with TestClient(
        app, base_url=LOCAL, client=("127.0.0.1", 1), raise_server_exceptions=False
    ) as c:
        c.get("/")
        assert len(body) < 64 * 1024
        headers = {"X-CSRF-Token": c.cookies["layerfed_csrf"], "content-type": "application/json"}
        before = len(page.journal.entries())
        for path in ("/api/feedback", "/api/generate"):
            response = c.post(path, content=body, headers=headers)
            assert response.status_code == 400, (path, response.text)
            message = response.json()["error"]["message"]
            assert message.startswith("malformed JSON") and problem in message
        assert len(page.journal.entries()) == before


def test_the_journal_api_lists_quarantined_rows(tmp_path: Path) -> None:
    """A journal row that no longer parses is listed with its reason; the rest still shows."""
    path = tmp_path / "journal.sqlite"
    page = FeedbackPage(build_instance(path))
    for i in range(2):
        page.journal.append(
            parse_event({"kind": "thumbs", "prompt": "hi", "response": f"r{i}", "up": True})
        )
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE events SET body = '{\"kind\": 1}' WHERE seq = 1")
    db.close()
    with local_client(page) as c:
        data = c.get("/api/journal").json()
    assert [e["seq"] for e in data["entries"]] == [2]
    assert [q["seq"] for q in data["quarantined"]] == [1] and "seq 1" in data["quarantined"][0][
        "reason"
    ]
