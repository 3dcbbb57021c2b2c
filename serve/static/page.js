// layerfed feedback page: turns the page's controls into the SDK's feedback events.
// Every POST carries the CSRF token; an event shows as saved only after the server
// answered, and the server answers only after the journal holds it.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;

// What the page calls each field the server may name in an error (the form's words).
const LABELS = {
  prompt: "Your prompt",
  response: "The answer",
  up: "Thumbs",
  chosen: "The answer you preferred",
  rejected: "The other answer",
  spans: "Marked words",
  original: "The answer",
  corrected: "Your continuation",
  first_wrong_token: "The word you clicked",
  position: "The word you clicked",
  chosen_token: "The candidate you chose",
  candidates: "The candidates",
  response_ids: "The answer's tokens",
  top_k: "Candidates per word",
  max_new_tokens: "Answer length",
};
for (const [field, input] of [
  ["positive_prompt", "contrast-positive"],
  ["negative_prompt", "contrast-negative"],
  ["behaviour", "contrast-behaviour"],
]) {
  const label = document.querySelector(`label[for="${input}"]`);
  if (label) LABELS[field] = label.textContent.trim();
}

// The server's message with the field's API name replaced by the form's label.
function labelled(message, field) {
  let text = message;
  const name = field ? String(field).split(/[.[]/)[0] : "";
  const label = LABELS[name];
  if (label) {
    const at = text.indexOf(`${field}:`);
    text = at < 0 ? `${label}: ${text}` : text.slice(0, at) + `${label}:` + text.slice(at + String(field).length + 1);
  }
  // other API names inside the message ("different from positive_prompt") too
  for (const [api, words] of Object.entries(LABELS)) {
    if (api.includes("_")) text = text.replace(new RegExp(`\\b${api}\\b`, "g"), `“${words}”`);
  }
  return text;
}

class PageError extends Error {
  constructor(error) {
    const message = error && error.message ? error.message : "the server refused the request";
    super(labelled(message, error && error.field));
    this.field = error && error.field;
  }
}

async function post(url, body) {
  const response = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(body),
  });
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = { error: { message: `HTTP ${response.status}` } };
  }
  if (!response.ok) throw new PageError(data.error);
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function say(okNode, errorNode, message, isError) {
  if (okNode) okNode.textContent = isError ? "" : message;
  if (errorNode) errorNode.textContent = isError ? message : "";
}

async function refreshPanel() {
  const response = await fetch("/panel", { credentials: "same-origin" });
  if (response.ok) document.getElementById("panel").innerHTML = await response.text();
}

// Sends one event; shows "saved #seq" or the server's message beside the control.
async function give(event, okNode, errorNode) {
  try {
    const saved = await post("/api/feedback", event);
    say(okNode, errorNode, `saved #${saved.seq}: ${saved.summary}`, false);
    await refreshPanel();
    return true;
  } catch (e) {
    say(okNode, errorNode, e.message, true);
    return false;
  }
}

const percent = (p) => `${(100 * p).toFixed(p >= 0.1 ? 1 : 2)}%`;

// -- one answer, token by token ------------------------------------------------------------

function renderAnswer(turn, onToken) {
  const answer = el("div", { class: "answer", dataset: { turn: String(turn.id) } });
  for (const token of turn.tokens) {
    // a token may decode to no text of its own (a partial character, a special token):
    // it still gets a visible, clickable mark (CSS ::after, outside the answer's text)
    const span = el("span", {
      class: token.text ? "tok" : "tok empty",
      text: token.text,
      dataset: { pos: String(token.position), start: String(token.start), end: String(token.end) },
    });
    const hints = token.candidates.map((c) => `${JSON.stringify(c.text)} ${percent(c.prob)}`);
    if (hints.length) {
      span.title = `position ${token.position}: ${hints.join(" · ")}`;
      span.addEventListener("mouseenter", () => showTip(span, token));
      span.addEventListener("mouseleave", hideTip);
    }
    if (onToken) span.addEventListener("click", () => onToken(token, span));
    answer.append(span);
  }
  if (!turn.tokens.length) answer.textContent = turn.text;
  return answer;
}

// A floating list of a position's candidates while the pointer is over its token.
function showTip(span, token) {
  let tip = document.getElementById("hover-tip");
  if (!tip) {
    tip = el("div", { id: "hover-tip", role: "tooltip" });
    document.body.append(tip);
  }
  const rows = token.candidates.map((c) =>
    el(
      "div",
      { class: c.id === token.id ? "tip-row chosen" : "tip-row" },
      el("span", { text: JSON.stringify(c.text) }),
      el("span", { text: percent(c.prob) }),
    ),
  );
  tip.replaceChildren(el("div", { class: "tip-head", text: `position ${token.position}` }), ...rows);
  tip.removeAttribute("hidden");
  // above the word when it fits in the window, else below the answer's buttons: never over them
  const box = span.getBoundingClientRect();
  const size = tip.getBoundingClientRect();
  let top = box.top - size.height - 6;
  if (top < 0) {
    const article = span.closest(".turn") || span.closest(".answer") || span;
    const controls = article.querySelector(".controls") || article;
    top = controls.getBoundingClientRect().bottom + 6;
  }
  const left = Math.max(4, Math.min(box.left, document.documentElement.clientWidth - size.width - 4));
  tip.style.left = `${window.scrollX + left}px`;
  tip.style.top = `${window.scrollY + top}px`;
}

function hideTip() {
  const tip = document.getElementById("hover-tip");
  if (tip) tip.setAttribute("hidden", "");
}

// Character offsets of the current selection inside `answer` (its text is the response).
function selectionIn(answer) {
  const selection = window.getSelection();
  if (!selection || !selection.rangeCount || selection.isCollapsed) return null;
  const range = selection.getRangeAt(0);
  if (!answer.contains(range.startContainer) || !answer.contains(range.endContainer)) return null;
  const before = document.createRange();
  before.selectNodeContents(answer);
  before.setEnd(range.startContainer, range.startOffset);
  const start = before.toString().length;
  const end = start + range.toString().length;
  return end > start ? { start, end } : null;
}

function renderTurn(turn) {
  const article = el("article", { class: "turn card", dataset: { turn: String(turn.id) } });
  const ok = el("span", { class: "ok" });
  const error = el("span", { class: "error", role: "alert" });
  const tokenBox = el("div", { class: "token-box", hidden: "" });
  const answer = renderAnswer(turn, (token, span) => {
    if (window.getSelection() && !window.getSelection().isCollapsed) return;
    openToken(turn, token, span, tokenBox, answer);
  });
  article.append(el("div", { class: "prompt", text: turn.prompt }), answer);
  if (turn.guarded) {
    article.append(el("p", { class: "guarded", text: "The output guard changed this answer." }));
  }

  // thumbs
  const up = el("button", { type: "button", class: "thumb-up", title: "Good answer", text: "▲ Thumbs up" });
  const down = el("button", { type: "button", class: "thumb-down", title: "Bad answer", text: "▼ Thumbs down" });
  const thumbs = (isUp) => give({ kind: "thumbs", prompt: turn.prompt, response: turn.text, up: isUp }, ok, error);
  up.addEventListener("click", () => thumbs(true));
  down.addEventListener("click", () => thumbs(false));

  // marks: select text in the answer, mark it good or bad, send all marks at once
  const spans = [];
  const spanList = el("span", { class: "span-list" });
  const sendMarks = el("button", { type: "button", class: "send-marks", text: "Send marks", disabled: "" });
  let lastSelection = null;
  const remember = () => {
    lastSelection = selectionIn(answer) || lastSelection;
  };
  answer.addEventListener("mouseup", remember);
  answer.addEventListener("keyup", remember);
  const mark = (valence) => {
    const picked = selectionIn(answer) || lastSelection;
    lastSelection = null;
    if (!picked) {
      say(ok, error, "select part of the answer first", true);
      return;
    }
    spans.push({ start: picked.start, end: picked.end, valence });
    spanList.append(
      el("span", {
        class: valence > 0 ? "chip good" : "chip bad",
        text: `${valence > 0 ? "good" : "bad"}: “${turn.text.slice(picked.start, picked.end)}”`,
      }),
    );
    sendMarks.removeAttribute("disabled");
    say(ok, error, "", false);
  };
  const good = el("button", { type: "button", class: "mark-good", text: "Mark selection good" });
  const bad = el("button", { type: "button", class: "mark-bad", text: "Mark selection bad" });
  good.addEventListener("click", () => mark(1));
  bad.addEventListener("click", () => mark(-1));
  sendMarks.addEventListener("click", async () => {
    const sent = await give({ kind: "marks", prompt: turn.prompt, response: turn.text, spans: spans.slice() }, ok, error);
    if (sent) {
      spans.length = 0;
      spanList.replaceChildren();
      sendMarks.setAttribute("disabled", "");
    }
  });

  article.append(
    el("div", { class: "controls" }, up, down, good, bad, spanList, sendMarks),
    el("p", { class: "hint muted", text: "Hover a word for the model's other candidates; click it to pick one or re-do from there." }),
    tokenBox,
    el("p", { class: "feedback-status" }, ok, error),
  );
  return article;
}

// The box under an answer for one clicked position: its candidates and "re-do from here".
function openToken(turn, token, span, box, answer) {
  hideTip();
  answer.querySelectorAll(".tok.active").forEach((node) => node.classList.remove("active"));
  span.classList.add("active");
  const ok = el("span", { class: "ok" });
  const error = el("span", { class: "error", role: "alert" });
  const list = el("ul", { class: "candidates" });
  for (const candidate of token.candidates) {
    const sampled = candidate.id === token.id;
    const bar = el("span", { class: "bar" });
    bar.style.width = `${Math.max(1, Math.round(100 * candidate.prob))}%`;
    const button = el(
      "button",
      { type: "button", class: sampled ? "candidate sampled" : "candidate", dataset: { token: String(candidate.id) } },
      el("span", { class: "cand-text", text: JSON.stringify(candidate.text) }),
      el("span", { class: "cand-prob", text: percent(candidate.prob) }),
      bar,
    );
    button.title = sampled ? "the model's own choice" : "choose this candidate instead";
    button.addEventListener("click", () =>
      give(
        {
          kind: "alternative",
          prompt: turn.prompt,
          response: turn.text,
          position: token.position,
          chosen_token: candidate.id,
          candidates: token.candidates.map((c) => c.id),
          response_ids: turn.response_ids,
        },
        ok,
        error,
      ),
    );
    list.append(el("li", {}, button));
  }
  const prefix = turn.text.slice(0, token.start);
  const input = el("input", { type: "text", class: "continuation", maxlength: "2000", placeholder: "type the continuation" });
  const redoForm = el(
    "form",
    { class: "redo-form", hidden: "" },
    el("span", { class: "prefix", text: prefix || "(from the start)" }),
    input,
    el("button", { type: "submit", class: "send-redo", text: "Send re-do" }),
  );
  redoForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    let rest = input.value;
    // the original piece says how tokens join here (a leading space or not)
    if (prefix && /^\s/.test(token.text) && rest && !/^\s/.test(rest)) rest = ` ${rest}`;
    const event = {
      kind: "redo",
      prompt: turn.prompt,
      original: turn.text,
      corrected: prefix + rest,
      first_wrong_token: token.position,
    };
    await give(event, ok, error);
  });
  const redo = el("button", { type: "button", class: "redo-start", text: "Re-do from here" });
  redo.addEventListener("click", () => {
    redoForm.removeAttribute("hidden");
    input.focus();
  });
  const own = token.candidates.find((c) => c.id === token.id);
  const piece = token.text.trim()
    ? `“${token.text.trim()}”`
    : `a piece with no text of its own (token ${own ? JSON.stringify(own.text) : token.id})`;
  const heading = token.candidates.length
    ? `Position ${token.position}: the model chose ${piece}. Its candidates:`
    : `Position ${token.position}: no candidates were recorded (the output guard changed this answer).`;
  box.replaceChildren(el("p", { text: heading }), list, redo, redoForm, el("p", {}, ok, error));
  box.removeAttribute("hidden");
}

// -- the page --------------------------------------------------------------------------------

function addTurn(turn) {
  document.getElementById("conversation").append(renderTurn(turn));
}

function promptValue() {
  return document.getElementById("prompt").value;
}

document.getElementById("ask-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const error = document.getElementById("ask-error");
  try {
    addTurn(await post("/api/generate", { prompt: promptValue() }));
    error.textContent = "";
  } catch (err) {
    error.textContent = err.message;
  }
});

let pairTurns = null;
document.getElementById("ask-pair").addEventListener("click", async () => {
  const error = document.getElementById("ask-error");
  try {
    const pair = await post("/api/pair", { prompt: promptValue() });
    pairTurns = pair;
    document.getElementById("pair-prompt").textContent = pair.a.prompt;
    document.getElementById("pair-a").replaceChildren(renderAnswer(pair.a, null));
    document.getElementById("pair-b").replaceChildren(renderAnswer(pair.b, null));
    say(document.getElementById("pair-ok"), document.getElementById("pair-error"), "", false);
    document.getElementById("pair").removeAttribute("hidden");
    error.textContent = "";
  } catch (err) {
    error.textContent = err.message;
  }
});

for (const [id, first] of [["prefer-a", "a"], ["prefer-b", "b"]]) {
  document.getElementById(id).addEventListener("click", () => {
    if (!pairTurns) return;
    const chosen = pairTurns[first];
    const rejected = pairTurns[first === "a" ? "b" : "a"];
    give(
      { kind: "preference", prompt: chosen.prompt, chosen: chosen.text, rejected: rejected.text },
      document.getElementById("pair-ok"),
      document.getElementById("pair-error"),
    );
  });
}

document.getElementById("contrast-form").addEventListener("submit", (e) => {
  e.preventDefault();
  give(
    {
      kind: "contrast",
      positive_prompt: document.getElementById("contrast-positive").value,
      negative_prompt: document.getElementById("contrast-negative").value,
      behaviour: document.getElementById("contrast-behaviour").value,
    },
    document.getElementById("contrast-ok"),
    document.getElementById("contrast-error"),
  );
});

// -- committed versions: the node saves new ones after a run; the page notices them --------

async function checkVersions() {
  let data = null;
  try {
    const response = await fetch("/api/versions", { credentials: "same-origin" });
    if (!response.ok) return;
    data = await response.json();
  } catch (e) {
    return;
  }
  const changed = [];
  for (const item of document.querySelectorAll("#panel .layer[data-slot]")) {
    const now = data.versions[item.dataset.slot];
    if (now !== undefined && String(now) !== item.dataset.version) changed.push(`${item.dataset.slot} v${now}`);
  }
  if (!changed.length) return;
  await refreshPanel();
  const at = new Date().toLocaleTimeString();
  document.getElementById("version-notice").textContent =
    `New committed version${changed.length > 1 ? "s" : ""}: ${changed.join(", ")} (${at}); answers from now on use ${changed.length > 1 ? "them" : "it"}.`;
}

const pollMs = Number(document.body.dataset.pollMs || 5000);
if (pollMs > 0) setInterval(checkVersions, pollMs);

for (const turn of JSON.parse(document.getElementById("state").textContent)) addTurn(turn);
document.body.dataset.ready = "true";
