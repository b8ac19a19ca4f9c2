// The playground: list the key's models, chat with streaming over SSE or WebSocket, show
// time to first token and tokens/s, cut the connection mid-answer and show the resume's
// seq continuity. Streaming and resuming live in stream.js; this module is the page.

import { ApiError, el, fmtClock, fmtMs, fmtNumber, getJSON, getKey, mountKeyBar, setChildren } from "./common.js";
import { ChatStream } from "./stream.js";

const MODEL_ITEM = "shepherd.model";

const $ = (id) => document.getElementById(id);

const ui = {
  model: $("model"),
  modelsNote: $("models-note"),
  maxTokens: $("max-tokens"),
  messages: $("messages"),
  emptyChat: $("empty-chat"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  cut: $("cut"),
  stop: $("stop"),
  clear: $("clear"),
  answerState: $("answer-state"),
  continuity: $("continuity"),
  log: $("log"),
  stat: {
    ttft: $("stat-ttft"), rate: $("stat-rate"), tokens: $("stat-tokens"), transport: $("stat-transport"),
    stream: $("stat-stream"), seq: $("stat-seq"), total: $("stat-total"),
  },
};

/** The conversation so far (what is sent as `messages`), and the answer streaming now. */
const history = [];
let current = null;

function transport() {
  return document.querySelector('input[name="transport"]:checked').value;
}

// ---- models -----------------------------------------------------------------

async function loadModels() {
  ui.model.disabled = true;
  ui.modelsNote.textContent = "";
  if (!getKey()) {
    setChildren(ui.model, el("option", { value: "" }, "enter a key to list models"));
    updateButtons();
    return;
  }
  setChildren(ui.model, el("option", { value: "" }, "loading models…"));
  try {
    const body = await getJSON("/v1/models");
    const ids = (body.data || []).map((model) => model.id).sort();
    if (ids.length === 0) throw new ApiError(200, { message: "this key may use no model" });
    const saved = sessionStorage.getItem(MODEL_ITEM);
    const preferred = ids.includes(saved) ? saved : ids.find((id) => !/embed/i.test(id)) || ids[0];
    setChildren(ui.model, ids.map((id) => el("option", { value: id, selected: id === preferred }, id)));
    ui.model.disabled = false;
    ui.modelsNote.textContent = `${ids.length} model${ids.length === 1 ? "" : "s"} this key may use.`;
  } catch (error) {
    setChildren(ui.model, el("option", { value: "" }, "no models"));
    ui.modelsNote.textContent = error.status === 401 ? "The gateway did not accept this key." : `Could not list models: ${error.message}`;
  }
  updateButtons();
}

// ---- conversation -------------------------------------------------------------

function bubble(role, text) {
  ui.emptyChat.classList.add("hidden");
  const body = el("div", { class: "body" }, text);
  const meta = el("div", { class: "meta" });
  const node = el("div", { class: `msg ${role}` }, el("div", { class: "who" }, role === "user" ? "You" : "Assistant"), body, meta);
  ui.messages.append(node);
  ui.messages.scrollTop = ui.messages.scrollHeight;
  return { node, body, meta };
}

function clearConversation() {
  if (current) return;
  history.length = 0;
  setChildren(ui.messages, ui.emptyChat);
  ui.emptyChat.classList.remove("hidden");
  setChildren(ui.log);
  resetStats();
}

async function send() {
  const text = ui.prompt.value.trim();
  if (!text || current || !ui.model.value) return;
  ui.prompt.value = "";
  sessionStorage.setItem(MODEL_ITEM, ui.model.value);
  bubble("user", text);
  const messages = [...history, { role: "user", content: text }];
  const answer = bubble("assistant", "");
  answer.node.classList.add("streaming");
  const maxTokens = Number(ui.maxTokens.value) || undefined;
  const stream = new ChatStream({
    transport: transport(),
    body: { model: ui.model.value, messages, max_tokens: maxTokens },
    hooks: {
      onText: (delta) => {
        answer.body.append(delta);
        ui.messages.scrollTop = ui.messages.scrollHeight;
      },
      onProgress: () => scheduleStats(),
      onLog: (message) => log(message),
      onState: (state) => setState(state),
    },
  });
  current = stream;
  resetStats();
  setState("connecting");
  log(`POST chat.completions over ${stream.transport === "ws" ? "WebSocket /v1/ws" : "SSE"} (${ui.model.value})`);
  updateButtons();
  try {
    await stream.run();
    history.push({ role: "user", content: text }, { role: "assistant", content: answer.body.textContent });
    setState("done");
  } catch (error) {
    answer.node.classList.add("failed");
    if (error.code !== "stopped_by_user") answer.body.append(el("div", { class: "notice bad" }, errorText(error)));
    setState(error.code === "stopped_by_user" ? "stopped" : "failed");
    log(`ended: ${error.message}`);
  } finally {
    answer.node.classList.remove("streaming");
    current = null;
    stream.tEnd ??= performance.now();
    renderStats(stream);
    answer.meta.textContent = answerMeta(stream);
    updateButtons();
  }
}

function errorText(error) {
  const code = error.code ? ` (${error.code})` : "";
  const status = error.status ? `HTTP ${error.status}: ` : "";
  return `${status}${error.message}${code}`;
}

function answerMeta(stream) {
  const parts = [stream.body.model, stream.transport === "ws" ? "WebSocket" : "SSE", `${stream.tokens} tokens`];
  if (stream.ttftMs !== null) parts.push(`first token ${fmtMs(stream.ttftMs)}`);
  if (stream.tokensPerSecond !== null) parts.push(`${fmtNumber(stream.tokensPerSecond)} tokens/s`);
  const resumes = stream.tracker.resumes.length;
  if (resumes) parts.push(`resumed ${resumes}×`);
  return parts.join(" · ");
}

// ---- stats, continuity, log -----------------------------------------------------

let statsScheduled = false;

function scheduleStats() {
  if (statsScheduled) return;
  statsScheduled = true;
  requestAnimationFrame(() => {
    statsScheduled = false;
    if (current) renderStats(current);
  });
}

function resetStats() {
  for (const node of Object.values(ui.stat)) node.textContent = "—";
  ui.continuity.className = "continuity";
  ui.continuity.dataset.state = "idle";
  ui.continuity.textContent = "Press “Cut the connection” while an answer streams: the page drops the transport, resumes the same stream and checks every seq.";
}

function renderStats(stream) {
  const end = stream.tEnd ?? performance.now();
  ui.stat.ttft.textContent = fmtMs(stream.ttftMs);
  ui.stat.rate.textContent = fmtNumber(stream.tokensPerSecond);
  ui.stat.tokens.textContent = String(stream.tokens);
  ui.stat.transport.textContent = stream.transport === "ws" ? "WebSocket" : "SSE";
  ui.stat.stream.textContent = stream.streamId || "—";
  ui.stat.stream.title = stream.streamId || "";
  ui.stat.seq.textContent = stream.tracker.last ? String(stream.tracker.last) : "—";
  ui.stat.total.textContent = end ? fmtMs(end - stream.t0) : "—";
  renderContinuity(stream);
  updateButtons();
}

function segmentLine(segment) {
  const expectedFirst = segment.afterSeq + 1;
  if (segment.first === null) return `resumed after seq ${segment.afterSeq}: nothing was left`;
  const inOrder = segment.first === expectedFirst && segment.count === segment.last - segment.first + 1;
  const range = segment.first === segment.last ? `seq ${segment.first}` : `seq ${segment.first}…${segment.last}`;
  const verdict = inOrder ? "no gaps, no duplicates" : `expected seq ${expectedFirst} first: NOT continuous`;
  return `resumed after seq ${segment.afterSeq} (${segment.transport === "ws" ? "WebSocket resume frame" : "GET /v1/streams"}), received ${range}, ${verdict}`;
}

function renderContinuity(stream) {
  const tracker = stream.tracker;
  const resumes = tracker.resumes;
  if (!stream.finished && (stream.phase === "cut" || stream.phase === "resuming")) {
    setContinuity("pending", `Connection cut after seq ${tracker.last}. Resuming…`, []);
    return;
  }
  if (resumes.length === 0 && stream.cuts.length === 0) {
    const text = tracker.last ? `seq 1…${tracker.last} received in order${stream.finished ? "" : " so far"}; no cut yet.` : "Waiting for the first event…";
    setContinuity(tracker.ok ? (stream.finished ? "ok" : "idle") : "bad", text, []);
    return;
  }
  const lines = [
    ...stream.cuts.map((seq) => `connection cut after seq ${seq}`),
    ...resumes.map(segmentLine),
  ];
  let headline;
  if (!tracker.ok) headline = `✗ ${tracker.gaps} seq missing, ${tracker.duplicates} duplicate${tracker.duplicates === 1 ? "" : "s"}`;
  else if (stream.finished) headline = `✓ Nothing lost or repeated: seq 1…${tracker.last} each received once, no gaps, no duplicates.`;
  else headline = `Resumed: seq 1…${tracker.last} so far, no gaps, no duplicates.`;
  setContinuity(tracker.ok ? (stream.finished ? "ok" : "pending") : "bad", headline, lines);
}

function setContinuity(state, headline, lines) {
  ui.continuity.className = `continuity ${state}`;
  ui.continuity.dataset.state = state;
  setChildren(ui.continuity, el("strong", {}, headline), lines.length ? el("ul", {}, lines.map((line) => el("li", {}, line))) : null);
}

function setState(state) {
  ui.answerState.textContent = state;
  ui.answerState.dataset.state = state;
  if (current) renderStats(current);
}

function log(message) {
  ui.log.append(el("li", {}, el("span", { class: "t" }, fmtClock()), message));
  ui.log.scrollTop = ui.log.scrollHeight;
}

function updateButtons() {
  ui.send.disabled = Boolean(current) || !getKey() || !ui.model.value;
  ui.stop.disabled = !current;
  ui.cut.disabled = !current || !current.cuttable;
  ui.clear.disabled = Boolean(current);
}

// ---- wiring ---------------------------------------------------------------------

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.cut.addEventListener("click", () => current?.cut());
ui.stop.addEventListener("click", () => current?.stop());
ui.clear.addEventListener("click", clearConversation);
ui.model.addEventListener("change", () => {
  sessionStorage.setItem(MODEL_ITEM, ui.model.value);
  updateButtons();
});
mountKeyBar(() => loadModels());
if (!getKey()) loadModels();
