"""The feedback page in a real headless Chromium (Debian's), against uvicorn on 127.0.0.1.

A person gives every feedback kind through the page's controls, sees invalid input
refused beside the control, reloads and finds it all; the journal holds exactly
those events in order, and a training round consumes them. Screenshots of each
kind go to a temporary folder, or to docs/page/ (referenced from docs/page.md) when
``LAYERFED_SHOTS=1`` (to refresh them; a plain test run leaves the tree clean).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from layerfed.clients.events import (
    Alternative,
    Contrast,
    FeedbackEvent,
    Marks,
    Preference,
    Redo,
    Span,
    Thumbs,
)
from layerfed.clients.instance import Instance
from layerfed.clients.journal import FeedbackJournal
from layerfed.governance.keys import public_key_string
from layerfed.governance.loader import load_policy
from layerfed.serve import FeedbackPage, create_app
from layerfed.serve.server import PageServer

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHOTS = (
    ROOT / "docs" / "page"
    if os.environ.get("LAYERFED_SHOTS") == "1"
    else Path(tempfile.mkdtemp(prefix="layerfed-shots-"))
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PROMPT = "please tell cake"


@pytest.fixture(scope="module")
def page_and_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FeedbackPage, str]]:
    folder = tmp_path_factory.mktemp("browser")
    key = Ed25519PrivateKey.generate()
    data = yaml.safe_load((ROOT / "examples" / "policies" / "default.yaml").read_text())
    data["principals"].append(
        {
            "name": "alice_key",
            "layer": "individual",
            "public_key": public_key_string(key.public_key()),
        }
    )
    (folder / "policy.yaml").write_text(yaml.safe_dump(data))
    instance = Instance(
        load_policy(folder / "policy.yaml"),
        instance_id="alice",
        jurisdiction="eu",
        groups=["g1"],
        seed=5,
        key=key,
        journal=FeedbackJournal(folder / "journal.sqlite"),
    )
    page = FeedbackPage(instance)
    with PageServer(create_app(page)) as server:
        yield page, server.url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


def shot(tab: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False)


def select_text(tab: Page, position: int, skip_space: bool = True) -> tuple[int, int]:
    """Select the text of one token in the first answer, as a person's drag would."""
    offsets: list[int] = tab.evaluate(
        """([position, skip]) => {
            const answer = document.querySelector('.turn .answer');
            const token = answer.querySelector(`.tok[data-pos="${position}"]`);
            const text = token.firstChild;
            const lead = skip ? text.data.length - text.data.trimStart().length : 0;
            const range = document.createRange();
            range.setStart(text, lead);
            range.setEnd(text, text.data.length);
            const selection = window.getSelection();
            selection.removeAllRanges();
            selection.addRange(range);
            answer.dispatchEvent(new MouseEvent('mouseup', {bubbles: true}));
            return [Number(token.dataset.start) + lead, Number(token.dataset.end)];
        }""",
        [position, skip_space],
    )
    return offsets[0], offsets[1]


def saved(locator: Any) -> None:
    expect(locator).to_contain_text("saved #", timeout=15_000)


def test_every_kind_from_the_browser(
    browser: Browser, page_and_url: tuple[FeedbackPage, str]
) -> None:
    """Every kind through the page; errors shown; persisted on reload; journal exact; trained."""
    page, url = page_and_url
    tab = browser.new_page(viewport={"width": 1360, "height": 900})
    tab.goto(url)
    expect(tab.locator("body")).to_have_attribute("data-ready", "true")
    expected: list[FeedbackEvent] = []

    # conversation: the answer token by token, candidates on hover
    tab.fill("#prompt", PROMPT)
    tab.click("#ask")
    turn_box = tab.locator(".turn").first
    expect(turn_box.locator(".tok").first).to_be_visible()
    turn = page.turns[-1]
    assert turn_box.locator(".answer").inner_text() == turn.text
    first = turn_box.locator('.tok[data-pos="0"]')
    assert "%" in (first.get_attribute("title") or "")
    first.hover()
    shot(tab, "conversation")

    # thumbs
    turn_box.locator(".thumb-down").click()
    saved(turn_box.locator(".feedback-status .ok"))
    expected.append(Thumbs(prompt=PROMPT, response=turn.text, up=False))
    shot(tab, "thumbs")

    # preference: two sampled answers, pick B
    tab.click("#ask-pair")
    expect(tab.locator("#pair")).to_be_visible()
    a, b = tab.locator("#pair-a").inner_text(), tab.locator("#pair-b").inner_text()
    assert a != b
    tab.click("#prefer-b")
    saved(tab.locator("#pair-ok"))
    expected.append(Preference(prompt=PROMPT, chosen=b, rejected=a))
    shot(tab, "preference")

    # marks: select the last word -> bad, the first word -> good, send both
    last = len(turn.tokens) - 1
    bad = select_text(tab, last)
    turn_box.locator(".mark-bad").click()
    good = select_text(tab, 0)
    turn_box.locator(".mark-good").click()
    expect(turn_box.locator(".chip")).to_have_count(2)
    shot(tab, "marks")
    turn_box.locator(".send-marks").click()
    saved(turn_box.locator(".feedback-status .ok"))
    spans = [
        Span(start=bad[0], end=bad[1], valence=-1),
        Span(start=good[0], end=good[1], valence=1),
    ]
    expected.append(Marks(prompt=PROMPT, response=turn.text, spans=tuple(spans)))

    # alternative: click position 1, choose the model's second candidate
    turn_box.locator('.tok[data-pos="1"]').click()
    box = turn_box.locator(".token-box")
    expect(box).to_be_visible()
    pick = next(c for c in turn.tokens[1].candidates if c.id != turn.tokens[1].id)
    box.locator(f'.candidate[data-token="{pick.id}"]').click()
    saved(box.locator(".ok"))
    expected.append(
        Alternative(
            prompt=PROMPT,
            response=turn.text,
            position=1,
            chosen_token=pick.id,
            candidates=tuple(c.id for c in turn.tokens[1].candidates),
            response_ids=tuple(t.id for t in turn.tokens),
        )
    )
    shot(tab, "alternative")

    # invalid: choosing the token the model already chose is refused beside the control
    box.locator(".candidate.sampled").click()
    expect(box.locator(".error")).to_contain_text(
        "The candidate you chose: expected a token other than"
    )
    shot(tab, "invalid")

    # re-do: click the last token, rewrite from there
    turn_box.locator(f'.tok[data-pos="{last}"]').click()
    box.locator(".redo-start").click()
    box.locator(".continuation").fill("dog")
    box.locator(".send-redo").click()
    saved(box.locator(".ok"))
    prefix = turn.text[: turn.tokens[last].start]
    expected.append(
        Redo(prompt=PROMPT, original=turn.text, corrected=f"{prefix} dog", first_wrong_token=last)
    )
    shot(tab, "redo")

    # contrast: an invalid pair first (same prompts), then a good one
    tab.fill("#contrast-positive", "please tell bomb")
    tab.fill("#contrast-negative", "please tell bomb")
    tab.click("#contrast-send")
    expect(tab.locator("#contrast-error")).to_contain_text("Near miss that must not: expected")
    tab.fill("#contrast-negative", "please tell cake")
    tab.click("#contrast-send")
    saved(tab.locator("#contrast-ok"))
    expected.append(
        Contrast(
            positive_prompt="please tell bomb",
            negative_prompt="please tell cake",
            behaviour="sorry",
        )
    )
    tab.locator("#contrast-form").scroll_into_view_if_needed()
    shot(tab, "contrast")

    # reload: the conversation and every event are still there, in order
    tab.reload()
    expect(tab.locator("body")).to_have_attribute("data-ready", "true")
    expect(tab.locator(".turn")).to_have_count(len(page.turns))
    listed = tab.locator("#journal-entries .entry")
    expect(listed).to_have_count(len(expected))
    kinds = [listed.nth(i).get_attribute("data-kind") for i in range(len(expected))]
    assert kinds[::-1] == [e.kind for e in expected]
    assert [e.event for e in page.journal.entries()] == expected
    expect(tab.locator("#journal-counts")).to_have_attribute("data-pending", str(len(expected)))
    shot(tab, "journal")

    # a training round of the instance's own slot takes them; the acknowledgement consumes them
    instance = page.instance
    update = instance.train_round("page-run", 1, instance.slot_for(), seed=1)
    assert update.result.num_events == len(expected)
    assert {e.status for e in page.journal.entries()} == {"batched"}
    instance.acknowledge("page-run", [update.envelope.ack_id], 2)
    assert page.journal.counts() == {"pending": 0, "batched": 0, "consumed": len(expected)}
    tab.reload()
    expect(tab.locator("#journal-counts")).to_have_attribute("data-consumed", str(len(expected)))
    expect(tab.locator(".entry.status-consumed, .entry .status-consumed")).to_have_count(
        len(expected)
    )
    expect(tab.locator(".rounds tbody tr")).to_have_count(1)
    tab.locator("#panel").scroll_into_view_if_needed()
    shot(tab, "consumed")
    tab.close()
