// A relay-dialect client (/v1/ws/stream) on Node's `ws` package, as existing relay clients
// are written: session.start with the key, two chat.message turns, one one-shot
// chat.completion. Prints one JSON line: what each answer's frames said.
// Usage: node relay_client.mjs <ws://host:port/v1/ws/stream> <api key> <model>
import WebSocket from "ws";

const [url, apiKey, model] = process.argv.slice(2);
const ws = new WebSocket(url);
const answers = [];
let current = null;
const pending = [
  { type: "chat.message", role: "user", content: "hello there" },
  { type: "chat.message", role: "user", content: "and again" },
  { type: "chat.completion", model, messages: [{ role: "user", content: "one shot" }],
    stream: true, config: { max_tokens: 3 } },
];
const timer = setTimeout(() => { console.error("timed out"); process.exit(2); }, 15000);

function next() {
  const frame = pending.shift();
  if (frame === undefined) {
    ws.close(1000, "done");
    return;
  }
  current = { started: false, text: "", usage: null, error: null };
  ws.send(JSON.stringify(frame));
}

ws.on("open", () => {
  ws.send(JSON.stringify({ type: "session.start", model, auth: { api_key: apiKey },
                           config: { max_tokens: 4, temperature: 0.2, stream: true } }));
});
ws.on("message", (data) => {
  const frame = JSON.parse(data.toString());
  if (frame.type === "session_established") {
    next();
  } else if (frame.type === "content_block_start") {
    current.started = true;
  } else if (frame.type === "content_delta") {
    current.text += frame.delta.content;
  } else if (frame.type === "message_done" || frame.type === "error") {
    current.usage = frame.usage ?? null;
    current.error = frame.type === "error" ? frame.code : null;
    answers.push(current);
    next();
  }
});
ws.on("close", (code) => {
  clearTimeout(timer);
  console.log(JSON.stringify({ close_code: code, answers }));
});
ws.on("error", (err) => { console.error(String(err)); process.exit(1); });
