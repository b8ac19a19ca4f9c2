// One streamed chat answer over SSE (fetch + ReadableStream) or the native WebSocket
// protocol (/v1/ws), surviving dropped connections: after a drop the answer is resumed from
// the last seq received (SSE: GET /v1/streams/{id}?starting_after=N; WS: a new socket and a
// `resume` frame), and every seq is checked — the page can show that nothing was lost or
// repeated. DESIGN §4 "Reconnection" and "WebSocket" are the contracts used here.

import { ApiError, authHeaders, errorOf, getKey } from "./common.js";
import { SSEParser, seqOf, streamIdOf } from "./sse.js";

/** Pause between a drop and the resume, so the page shows the gap (generation goes on). */
export const RESUME_DELAY_MS = 600;
/** Drops the page recovers from by itself (a cut asked for with the button is not counted). */
export const MAX_UNPLANNED_DROPS = 5;

/** The transport went away: resumable once the stream id is known. */
class DropError extends Error {}

/** Seq bookkeeping: every seq should arrive once, in order, with no hole. */
export class SeqTracker {
  constructor() {
    this.last = 0;
    this.received = 0;
    this.gaps = 0;
    this.duplicates = 0;
    this.segments = [];
  }

  /** A transport attempt starts; `resumed`: it continues after `this.last`. */
  startSegment(resumed, transport) {
    this.segments.push({ afterSeq: this.last, first: null, last: null, count: 0, resumed, transport });
  }

  /** Record `seq`; returns false for a duplicate (a seq at or below the last one). */
  accept(seq) {
    const segment = this.segments[this.segments.length - 1];
    if (!Number.isInteger(seq)) return true; // no id: nothing to check
    segment.count += 1;
    if (seq <= this.last) {
      this.duplicates += 1;
      return false;
    }
    if (seq > this.last + 1) this.gaps += seq - this.last - 1;
    this.last = seq;
    this.received += 1;
    segment.first ??= seq;
    segment.last = seq;
    return true;
  }

  get ok() {
    return this.gaps === 0 && this.duplicates === 0;
  }

  get resumes() {
    return this.segments.filter((s) => s.resumed);
  }
}

/** The WebSocket URL of `/v1/ws` on this origin. */
export function wsURL() {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

let requestCounter = 0;

/**
 * A streamed chat completion. `hooks`: onText(delta), onProgress(), onLog(message),
 * onState(state) with state "streaming" | "cut" | "resuming". `run()` resolves when the
 * stream ended normally; it rejects with ApiError when the gateway refused or failed it.
 */
export class ChatStream {
  constructor({ transport, body, hooks }) {
    this.transport = transport; // "sse" | "ws"
    this.body = { ...body, stream: true, stream_options: { include_usage: true } };
    this.hooks = hooks;
    this.requestId = `ui-${Date.now().toString(36)}-${++requestCounter}`;
    this.streamId = null;
    this.tracker = new SeqTracker();
    this.generation = 0;
    this.dropTransport = () => {};
    this.cutRequested = false;
    this.phase = "connecting"; // "connecting" | "streaming" | "cut" | "resuming"
    this.stopped = false;
    this.finished = false;
    this.usage = null;
    this.chunks = 0;
    this.t0 = 0;
    this.tFirst = null;
    this.tLast = null;
    this.tEnd = null;
    this.cuts = [];
  }

  /** Time to first token, ms (null before it). */
  get ttftMs() {
    return this.tFirst === null ? null : this.tFirst - this.t0;
  }

  /** Output tokens: the usage the gateway reported, else the content chunks so far. */
  get tokens() {
    return this.usage?.completion_tokens ?? this.chunks;
  }

  /** Decode speed, tokens per second after the first token (null until two tokens). */
  get tokensPerSecond() {
    if (this.tFirst === null || this.tLast === null || this.tLast <= this.tFirst || this.tokens < 2) return null;
    return (this.tokens - 1) / ((this.tLast - this.tFirst) / 1000);
  }

  /** Whether there is a transport to cut (the stream id is known and it is still going). */
  get cuttable() {
    return Boolean(this.streamId) && !this.finished && !this.stopped && !this.cutRequested;
  }

  async run() {
    this.t0 = performance.now();
    let resumed = false;
    let unplanned = 0;
    for (;;) {
      this.tracker.startSegment(resumed, this.transport);
      try {
        if (this.transport === "ws") await this.wsAttempt(resumed);
        else await this.sseAttempt(resumed);
      } catch (error) {
        if (error instanceof ApiError || !this.streamId || this.stopped) throw this.stopped ? stoppedError() : error;
        if (!this.cutRequested && ++unplanned > MAX_UNPLANNED_DROPS) throw error;
        if (!this.cutRequested) this.log(`connection lost (${error.message})`);
      }
      if (this.finished) return;
      if (this.stopped) throw stoppedError();
      this.cutRequested = false;
      this.setPhase("resuming");
      await sleep(RESUME_DELAY_MS);
      if (this.stopped) throw stoppedError();
      this.log(`resuming ${this.streamId} after seq ${this.tracker.last}`);
      resumed = true;
    }
  }

  /** Drop the transport now, mid-answer; `run()` resumes the stream after a short pause. */
  cut() {
    if (!this.cuttable) return;
    this.cutRequested = true;
    this.cuts.push(this.tracker.last);
    this.generation += 1; // whatever the old transport still delivers is ignored
    this.log(`connection cut by the user after seq ${this.tracker.last}`);
    this.setPhase("cut");
    this.dropTransport();
  }

  /** Stop the answer: drop the transport and cancel the generation upstream. */
  async stop() {
    if (this.finished || this.stopped) return;
    this.stopped = true;
    this.generation += 1;
    this.dropTransport();
    if (this.streamId) {
      await fetch(`/v1/streams/${encodeURIComponent(this.streamId)}/cancel`, {
        method: "POST", headers: authHeaders(),
      }).catch(() => {});
    }
  }

  log(message) {
    this.hooks.onLog(message);
  }

  setPhase(phase) {
    this.phase = phase;
    this.hooks.onState(phase);
  }

  finish() {
    this.finished = true;
    this.tEnd = performance.now();
  }

  onChunk(seq, data) {
    this.tracker.accept(seq);
    if (data?.usage) this.usage = data.usage;
    const choice = data?.choices?.[0];
    const text = choice?.delta?.content ?? choice?.text ?? "";
    if (text) {
      const now = performance.now();
      this.tFirst ??= now;
      this.tLast = now;
      this.chunks += 1;
      this.hooks.onText(text);
    }
    this.hooks.onProgress();
  }

  // ---- SSE ----------------------------------------------------------------

  async sseAttempt(resumed) {
    const generation = ++this.generation;
    const controller = new AbortController();
    this.dropTransport = () => controller.abort();
    const response = await fetch(resumed ? this.resumeURL() : "/v1/chat/completions", resumed
      ? { headers: authHeaders({ Accept: "text/event-stream" }), cache: "no-store", signal: controller.signal }
      : {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(this.body),
        signal: controller.signal,
      });
    if (response.status === 204) { // the stream ended and we had all of it
      this.log("resume: nothing was left (204)");
      this.finish();
      return;
    }
    if (!response.ok) throw await errorOf(response);
    this.streamId ??= response.headers.get("X-Stream-Id");
    this.log(resumed ? `resumed over SSE (${response.status})` : `SSE stream ${this.streamId} started`);
    this.setPhase("streaming");
    await this.readSSE(response, generation);
  }

  resumeURL() {
    return `/v1/streams/${encodeURIComponent(this.streamId)}?starting_after=${this.tracker.last}`;
  }

  async readSSE(response, generation) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SSEParser();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (generation !== this.generation) return; // cut or stopped meanwhile
        if (done) break;
        for (const event of parser.feed(value)) {
          this.onSSEEvent(event);
          if (this.finished) return;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
    throw new DropError("the stream ended without [DONE]");
  }

  onSSEEvent(event) {
    this.streamId ??= streamIdOf(event.id);
    const seq = seqOf(event.id);
    if (event.data === "[DONE]") {
      this.tracker.accept(seq);
      this.log(`[DONE] at seq ${seq ?? "?"}`);
      this.finish();
      return;
    }
    const data = JSON.parse(event.data);
    if (data?.error) throw new ApiError(200, data.error);
    this.onChunk(seq, data);
  }

  // ---- WebSocket ------------------------------------------------------------

  wsAttempt(resumed) {
    return new Promise((resolve, reject) => {
      const generation = ++this.generation;
      let socket;
      try {
        socket = new WebSocket(wsURL(), ["shepherd.v1", `openai-insecure-api-key.${getKey()}`]);
      } catch (error) {
        reject(new ApiError(0, { message: `cannot open a WebSocket: ${error.message}` }));
        return;
      }
      this.dropTransport = () => {
        socket.close(4000, "cut by the playground");
        resolve();
      };
      socket.addEventListener("open", () => {
        socket.send(JSON.stringify(resumed
          ? { type: "resume", id: this.requestId, stream_id: this.streamId, last_seq: this.tracker.last }
          : { type: "request", id: this.requestId, endpoint: "chat.completions", body: this.body }));
        this.log(resumed ? `socket opened, resume after seq ${this.tracker.last} sent` : "socket opened, request sent");
        this.setPhase("streaming");
      });
      socket.addEventListener("message", (message) => {
        if (generation !== this.generation) return;
        try {
          if (this.onFrame(JSON.parse(message.data))) {
            socket.close(1000);
            resolve();
          }
        } catch (error) {
          socket.close(1000);
          reject(error);
        }
      });
      socket.addEventListener("close", (event) => {
        if (generation !== this.generation || this.finished) return;
        reject(this.streamId
          ? new DropError(`socket closed (${event.code})`)
          : new ApiError(0, { message: `the WebSocket closed before the answer began (code ${event.code}): check the key and the model` }));
      });
    });
  }

  /** One server frame of /v1/ws; true when the answer is complete. Throws ApiError. */
  onFrame(frame) {
    if (frame.id !== undefined && frame.id !== this.requestId) return false;
    if (frame.type === "chunk") {
      this.streamId ??= frame.stream_id;
      this.onChunk(frame.seq, frame.data);
      return false;
    }
    if (frame.type === "done") {
      this.usage = frame.usage ?? this.usage;
      this.log("done frame");
      this.finish();
      return true;
    }
    if (frame.type === "error") throw new ApiError(0, frame.error);
    return false;
  }
}

function stoppedError() {
  return new ApiError(0, { message: "stopped", code: "stopped_by_user" });
}
