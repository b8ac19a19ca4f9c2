// Shared by the playground and the status page: the API key (sessionStorage only), the
// key bar in the header, API calls with the key, and a tiny DOM builder (text nodes only,
// so nothing the server or the user sends is ever parsed as markup).

const KEY_ITEM = "shepherd.apiKey";

/** The key typed in this tab, or "" (kept in sessionStorage: gone when the tab closes). */
export function getKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

/** "sk-…a1b2": enough to recognise a key, not to use it. */
export function maskKey(key) {
  if (!key) return "";
  return key.length <= 8 ? "…" : `${key.slice(0, 3)}…${key.slice(-4)}`;
}

/** `el("td", {class: "num"}, "12")`: an element with attributes and children (strings
 * become text nodes). `on*` attributes given a function become event listeners. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replace every child of `node` with `children`. */
export function setChildren(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
}

/** Headers for an API call: `Authorization: Bearer <key>` when a key is set. */
export function authHeaders(extra = {}) {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

/** An error answered by the gateway: `status` (HTTP) and the OpenAI error object. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code || null;
    this.type = error?.type || null;
  }
}

/** The OpenAI error of a failed response (or a generic one when the body is not JSON). */
export async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return new ApiError(response.status, body?.error || { message: `HTTP ${response.status} ${response.statusText}` });
}

/** GET `path` with the key; resolves to the parsed JSON, rejects with `ApiError`.
 * `okStatuses`: statuses whose JSON body is still wanted (`/readyz` answers 503 with one). */
export async function getJSON(path, { okStatuses = [], signal } = {}) {
  const response = await fetch(path, { headers: authHeaders({ Accept: "application/json" }), cache: "no-store", signal });
  if (!response.ok && !okStatuses.includes(response.status)) throw await errorOf(response);
  return response.json();
}

/** Wire the key bar of the header: a password field, Save and Forget. `onChange(key)` runs
 * after the key changes (and once at start when a key is already set). */
export function mountKeyBar(onChange) {
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  const state = document.getElementById("key-state");
  const forget = document.getElementById("key-forget");
  const show = () => {
    const key = getKey();
    state.textContent = key ? `key ${maskKey(key)}` : "no key set";
    state.classList.toggle("set", Boolean(key));
    forget.disabled = !key;
    input.value = "";
    input.placeholder = key ? "replace the API key" : "paste an API key";
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    setKey(key);
    show();
    onChange(key);
  });
  forget.addEventListener("click", () => {
    setKey("");
    show();
    onChange("");
  });
  show();
  if (getKey()) onChange(getKey());
}

/** "12.3", "1.23k": a compact number for tiles and tables. */
export function fmtNumber(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (Math.abs(value) >= 10000) return `${(value / 1000).toFixed(1)}k`;
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}

/** "850 ms", "1.24 s". */
export function fmtMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "—";
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

/** "14:03:27" in the browser's time zone. */
export function fmtClock(date = new Date()) {
  return date.toLocaleTimeString([], { hour12: false });
}
