"""The feedback page's layout and live state in headless Chromium (Debian's), on uvicorn.

Journal statuses sit on their own entry and say what the events wait for; the policy
explain table stays inside the panel and scrolls; the candidate tooltip never covers a
button (desktop and a 390 px phone); a position whose token has no text of its own can
be clicked for an alternative or a re-do; errors name the form's labels; a committed
version the node saves shows on the page without a reload.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from layerfed.clients.generation import Generation
from layerfed.clients.instance import Instance
from layerfed.clients.journal import FeedbackJournal
from layerfed.governance.keys import public_key_string
from layerfed.governance.loader import load_policy
from layerfed.layers.slots import SlotId
from layerfed.layers.store import SlotStore
from layerfed.serve import FeedbackPage, create_app
from layerfed.serve.server import PageServer

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
PROMPT = "please tell cake"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1360, "height": 900}


@dataclass
class Served:
    page: FeedbackPage
    url: str
    synced: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("layout")
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
    synced = folder / "state" / "synced"
    page = FeedbackPage(instance, synced=synced)
    with PageServer(create_app(page, poll_ms=200)) as server:
        yield Served(page, server.url, synced)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


def open_tab(browser: Browser, url: str, viewport: dict[str, int]) -> Page:
    tab = browser.new_page(viewport=viewport)  # type: ignore[arg-type]
    tab.goto(url)
    expect(tab.locator("body")).to_have_attribute("data-ready", "true")
    return tab


def rect(tab: Page, selector: str, index: int = 0) -> dict[str, float]:
    box: dict[str, float] = tab.evaluate(
        """([sel, i]) => { const r = document.querySelectorAll(sel)[i].getBoundingClientRect();
             return {left: r.left, right: r.right, top: r.top, bottom: r.bottom}; }""",
        [selector, index],
    )
    return box


def overlaps(a: dict[str, float], b: dict[str, float]) -> bool:
    return (
        a["left"] < b["right"]
        and b["left"] < a["right"]
        and a["top"] < b["bottom"]
        and b["top"] < a["bottom"]
    )


def test_journal_statuses_sit_on_their_own_entry(browser: Browser, served: Served) -> None:
    """Each status label lies inside its own entry's box, and batched events say they were
    sent and await the acknowledgement (not a bare, stuck-looking status) until consumed."""
    page = served.page
    long = "a long answer that wraps over several lines of the narrow panel " * 2
    for i in range(4):
        page.give({"kind": "thumbs", "prompt": PROMPT, "response": f"{long}{i}", "up": i % 2 == 0})
    journal = page.journal  # what a round does to the journal: take the events, sign the update
    batch = journal.open_batch("layout-run", 1, str(page.instance.slot_for()), limit=4)
    journal.sign_batch(batch.id, "ab" * 32)
    page.give({"kind": "thumbs", "prompt": PROMPT, "response": long + "after", "up": True})
    for viewport in (DESKTOP, PHONE):
        tab = open_tab(browser, served.url, viewport)
        entries = tab.locator("#journal-entries .entry")
        count = entries.count()
        assert count == 5
        for i in range(count):
            entry, status = (
                rect(tab, "#journal-entries .entry", i),
                rect(tab, "#journal-entries .entry .status", i),
            )
            assert entry["top"] <= status["top"] and status["bottom"] <= entry["bottom"], (
                i,
                entry,
                status,
            )
            assert entry["left"] <= status["left"] and status["right"] <= entry["right"] + 0.5
        labels = [entries.nth(i).locator(".status").inner_text() for i in range(count)]
        assert labels[0] == "pending: trains in the next round"
        assert labels[1:] == ["sent in round 1, awaiting acknowledgement"] * 4
        tab.close()
    journal.consume(batch.id)  # the server's acknowledgement, with the next run's message
    tab = open_tab(browser, served.url, DESKTOP)
    expect(tab.locator("#journal-entries .entry .status-consumed")).to_have_count(4)
    expect(tab.locator("#journal-entries .entry .status-consumed").first).to_have_text(
        "consumed (round 1)"
    )
    tab.close()


def test_policy_explain_stays_in_the_panel_and_scrolls(browser: Browser, served: Served) -> None:
    """The opened "policy explain" table ends at the panel's edge and scrolls sideways to
    its last column; the full-width link serves the same text."""
    for viewport in (DESKTOP, PHONE):
        tab = open_tab(browser, served.url, viewport)
        tab.locator(".explain summary").click()
        pre = tab.locator(".explain pre")
        expect(pre).to_be_visible()
        box, panel = rect(tab, ".explain pre"), rect(tab, "aside#panel")
        assert panel["left"] <= box["left"] and box["right"] <= panel["right"], (box, panel)
        sizes = pre.evaluate("p => [p.scrollWidth, p.clientWidth, getComputedStyle(p).overflowX]")
        assert sizes[0] > sizes[1] and sizes[2] == "scroll", sizes  # scrollbars always drawn
        expect(tab.locator('.explain a[href="/explain"]')).to_be_visible()
        pre.evaluate("p => { p.scrollLeft = p.scrollWidth; }")
        assert pre.evaluate("p => p.scrollLeft + p.clientWidth") == sizes[0]
        tab.close()
    tab = open_tab(browser, served.url, DESKTOP)
    text = tab.evaluate("() => fetch('/explain').then(r => r.text())")
    assert text == served.page.panel().explain
    assert "layer creator" in text
    tab.close()


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_tooltip_never_covers_a_button(
    browser: Browser, served: Served, viewport: dict[str, int]
) -> None:
    """Hovering any word of an answer shows its candidates clear of every visible button
    and inside the window."""
    tab = open_tab(browser, served.url, viewport)
    turns = tab.locator(".turn").count()
    tab.fill("#prompt", PROMPT)
    tab.click("#ask")
    expect(tab.locator(".turn")).to_have_count(turns + 1)
    turn = tab.locator(".turn").last
    expect(turn.locator(".tok").first).to_be_visible()
    turn.scroll_into_view_if_needed()
    tokens = turn.locator(".tok")
    assert tokens.count() >= 2
    for i in range(tokens.count()):
        tokens.nth(i).hover()
        tip = tab.locator("#hover-tip")
        expect(tip).to_be_visible()
        box = rect(tab, "#hover-tip")
        assert box["left"] >= 0 and box["right"] <= viewport["width"], box
        buttons: list[dict[str, Any]] = tab.evaluate(
            """() => [...document.querySelectorAll('button')].filter(b => b.offsetParent)
                 .map(b => { const r = b.getBoundingClientRect();
                   return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, text: b.textContent}; })"""
        )
        covered = [b["text"] for b in buttons if overlaps(box, b)]
        assert not covered, (i, covered)
    tab.close()


def test_empty_piece_can_be_clicked(browser: Browser, served: Served) -> None:
    """A token that decodes to no text (here an <unk> inside a real answer) shows as a
    clickable mark outside the answer's text; an alternative and a re-do are saved there."""
    page = served.page
    tokenizer = page.tokenizer
    unk = int(tokenizer.unk_token_id)
    real = page.instance.generate(PROMPT, 4, 3)
    tokens = (real.tokens[0], unk, *real.tokens[1:])
    own = ((unk, math.log(0.5)), (real.tokens[1], math.log(0.3)), (real.tokens[0], math.log(0.2)))
    alternatives = (real.alternatives[0], own, *real.alternatives[1:])
    text = str(tokenizer.decode(list(tokens), skip_special_tokens=True))
    turn = page.show(Generation(PROMPT, text, tokens, alternatives))
    assert turn.tokens[1].text == "" and turn.text == real.text
    before = len(page.journal.entries())
    tab = open_tab(browser, served.url, DESKTOP)
    box_turn = tab.locator(f'.turn[data-turn="{turn.id}"]')
    assert box_turn.locator(".answer").inner_text() == turn.text
    empty = box_turn.locator('.tok[data-pos="1"]')
    assert empty.evaluate(
        "e => e.classList.contains('empty') && e.getBoundingClientRect().width > 0"
    )
    empty.click()
    box = box_turn.locator(".token-box")
    expect(box).to_contain_text("no text of its own")
    box.locator(f'.candidate[data-token="{real.tokens[1]}"]').click()
    expect(box.locator(".ok")).to_contain_text("saved #", timeout=15_000)
    box.locator(".redo-start").click()
    box.locator(".continuation").fill("dog")
    box.locator(".send-redo").click()
    expect(box.locator(".ok")).to_contain_text("saved #", timeout=15_000)
    added = [e.event for e in page.journal.entries()[before:]]
    assert [e.kind for e in added] == ["alternative", "redo"]
    alternative, redo = added
    assert alternative.position == 1 and alternative.chosen_token == real.tokens[1]  # type: ignore[union-attr]
    assert redo.first_wrong_token == 1  # type: ignore[union-attr]
    tab.close()


def test_errors_name_the_form_labels(browser: Browser, served: Served) -> None:
    """A refused contrast pair or candidate names the field as the form labels it, never
    the API's field name."""
    tab = open_tab(browser, served.url, DESKTOP)
    tab.fill("#contrast-positive", "please tell bomb")
    tab.fill("#contrast-negative", "please tell bomb")
    tab.click("#contrast-send")
    error = tab.locator("#contrast-error")
    expect(error).to_contain_text("Near miss that must not: expected")
    assert "negative_prompt" not in error.inner_text()
    assert "positive_prompt" not in error.inner_text()  # the message's own mention too
    tab.fill("#contrast-behaviour", "")
    tab.fill("#contrast-negative", "please tell cake")
    tab.click("#contrast-send")
    expect(error).to_contain_text("Behaviour (the answer's start): expected")
    turns = tab.locator(".turn").count()
    tab.fill("#prompt", PROMPT)
    tab.click("#ask")
    expect(tab.locator(".turn")).to_have_count(turns + 1)
    turn = tab.locator(".turn").last
    turn.locator('.tok[data-pos="0"]').click()
    box = turn.locator(".token-box")
    box.locator(".candidate.sampled").click()
    expect(box.locator(".error")).to_contain_text(
        "The candidate you chose: expected a token other than"
    )
    assert "chosen_token" not in box.locator(".error").inner_text()
    tab.close()


def test_new_committed_version_shows_without_reload(browser: Browser, served: Served) -> None:
    """The page shows each slot's committed version; when the node saves a newer one under
    <state>/synced, the open page notices it, the panel shows it with its round and digest,
    and the instance composes it."""
    page = served.page
    instance = page.instance
    slot = SlotId("creator", "global")
    tab = open_tab(browser, served.url, DESKTOP)
    layer = tab.locator('#panel .layer[data-slot="creator/global"]')
    expect(layer).to_have_attribute("data-version", "0")
    spec = instance.stack.spec(slot)
    arrays = {
        k: np.asarray(v) + np.float32(0.01) for k, v in instance.stack.get_arrays(slot).items()
    }
    store = SlotStore(served.synced)
    store.save(slot, arrays, spec, {"run_id": "r1", "round": 3, "version": 2, "digest": "ab" * 32})
    expect(layer).to_have_attribute("data-version", "2", timeout=15_000)
    expect(tab.locator("#version-notice")).to_contain_text("creator/global v2")
    expect(layer.locator(".committed")).to_contain_text("committed in round 3 · abababababab")
    assert instance.versions["creator/global"] == 2
    composed = instance.stack.get_arrays(slot)
    assert all(np.array_equal(composed[k], arrays[k]) for k in arrays)
    tab.close()
