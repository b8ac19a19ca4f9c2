// An incremental Server-Sent Events parser (WHATWG HTML §9.2.6 "Interpreting an event
// stream") for a fetch() body: feed it decoded text as it arrives, get whole events back.
// Lines end in CRLF, LF or CR; a CR at the end of one chunk and an LF at the start of the
// next are one line end; comments (": keep-alive") are skipped; an event is dispatched at a
// blank line only if it has data.

export class SSEParser {
  constructor() {
    this.buffer = "";
    this.data = [];
    this.event = "";
    this.id = null;
    this.lastEventId = "";
    this.skipLF = false;
  }

  /** Parse `text` (the next decoded piece of the body); returns the events it completed,
   * each `{id, event, data}` where `id` is the last event id seen (WHATWG keeps it). */
  feed(text) {
    if (this.skipLF && text.startsWith("\n")) text = text.slice(1);
    this.skipLF = false;
    this.buffer += text;
    const events = [];
    let start = 0;
    for (let i = 0; i < this.buffer.length; i++) {
      const ch = this.buffer[i];
      if (ch !== "\n" && ch !== "\r") continue;
      const line = this.buffer.slice(start, i);
      if (ch === "\r") {
        if (i + 1 < this.buffer.length) {
          if (this.buffer[i + 1] === "\n") i++;
        } else {
          this.skipLF = true;
        }
      }
      start = i + 1;
      const event = this.line(line);
      if (event) events.push(event);
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    return null;
  }

  dispatch() {
    const data = this.data;
    const event = this.event || "message";
    this.data = [];
    this.event = "";
    if (data.length === 0) return null;
    return { id: this.lastEventId, event, data: data.join("\n") };
  }
}

/** The seq of an event id `gs_…:<seq>` (DESIGN §4 Reconnection), or null. */
export function seqOf(eventId) {
  const colon = eventId ? eventId.lastIndexOf(":") : -1;
  if (colon < 0) return null;
  const seq = Number(eventId.slice(colon + 1));
  return Number.isInteger(seq) && seq > 0 ? seq : null;
}

/** The stream id of an event id `gs_…:<seq>`, or null. */
export function streamIdOf(eventId) {
  const colon = eventId ? eventId.lastIndexOf(":") : -1;
  return colon > 0 ? eventId.slice(0, colon) : null;
}
