// The status page: polls /readyz and /metrics every second (upstream health, pool use,
// queue depth, requests/s and latency charts), and the admin API every few seconds (live
// streams, keys, today's usage by key and by model). Each admin panel says plainly when it
// needs an admin key or when this gateway has no such endpoint.

import uPlot from "./vendor/uPlot.esm.js";
import { el, fmtClock, fmtMs, fmtNumber, getJSON, getKey, mountKeyBar, setChildren } from "./common.js";
import { firstPresent, histogram, histogramDelta, parsePrometheus, quantile, rate, sum, sumBy } from "./metrics.js";

const POLL_MS = 1000;
const ADMIN_POLL_MS = 5000;
/** Points kept per chart: five minutes at one poll a second. */
const MAX_POINTS = 300;
/** Latency quantiles are computed over the requests of the last LATENCY_WINDOW polls. */
const LATENCY_WINDOW = 5;
const MAX_ROWS = 50;

/** Metric names, newest first (a later version may rename one; the page takes either). */
const REQUESTS = ["shepherd_requests_total"];
const DURATION = ["shepherd_request_duration_seconds", "shepherd_request_seconds"];
const STREAMS = ["shepherd_streams_active"];
const EJECTIONS = ["shepherd_upstream_ejections_total"];
const UPSTREAM_ERRORS = ["shepherd_upstream_errors_total"];
const QUEUE = ["shepherd_queue_depth", "shepherd_upstream_queued"];

const $ = (id) => document.getElementById(id);

/** Only the API's own traffic counts in requests/s and latency: not this page's polling. */
const isApiRequest = (labels) => !labels.endpoint || labels.endpoint.startsWith("/v1");

const readings = []; // {t (s), requests, hist}
let paused = false;

// ---- charts ---------------------------------------------------------------------

const COLORS = { blue: "#3b5bdb", orange: "#e8590c", violet: "#7048e8" };

function makeChart(container, series, valueFormat) {
  const opts = {
    width: container.clientWidth || 600,
    height: 220,
    cursor: { drag: { x: false, y: false }, points: { size: 6 } },
    legend: { live: false },
    scales: { x: { time: true, range: timeRange }, y: { range: (_u, _min, max) => [0, Math.max(1, max * 1.15)] } },
    axes: [
      { stroke: "#667085", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e2e5ea" }, space: 70,
        values: (_u, splits) => splits.map((t) => fmtClock(new Date(t * 1000))) },
      { stroke: "#667085", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e2e5ea" }, size: 64,
        values: (_u, splits) => splits.map(valueFormat) },
    ],
    series: [{ label: "time" },
      ...series.map((s) => ({ spanGaps: false, width: 2, points: { show: false }, ...s }))],
  };
  const data = [[], ...series.map(() => [])];
  const chart = new uPlot(opts, data, container);
  new ResizeObserver(() => chart.setSize({ width: container.clientWidth, height: 220 })).observe(container);
  return { chart, data };
}

/** The x range: the points held, at least MIN_SPAN_S wide, ending at the newest. */
const MIN_SPAN_S = 20;

function timeRange(_u, min, max) {
  if (min === null || max === null) return [min, max];
  return [Math.min(min, max - MIN_SPAN_S), max];
}

const charts = {
  rps: makeChart($("chart-rps"), [{ label: "requests/s", stroke: COLORS.blue, fill: "rgba(59,91,219,0.08)" }], (v) => fmtNumber(v)),
  latency: makeChart($("chart-latency"), [
    { label: "p50", stroke: COLORS.blue },
    { label: "p95", stroke: COLORS.orange },
    { label: "mean", stroke: COLORS.violet, dash: [4, 4] },
  ], (v) => fmtMs(v)),
};

function pushPoint(which, t, values) {
  const { chart, data } = charts[which];
  data[0].push(t);
  values.forEach((value, i) => data[i + 1].push(value));
  if (data[0].length > MAX_POINTS) for (const column of data) column.shift();
  chart.setData(data);
}

// ---- polling /readyz and /metrics -------------------------------------------------

async function poll() {
  if (!paused) {
    const [ready, metrics] = await Promise.allSettled([
      getJSON("/readyz", { okStatuses: [503] }),
      fetchMetrics(),
    ]);
    render(ready, metrics);
  }
  setTimeout(poll, POLL_MS);
}

async function fetchMetrics() {
  const headers = getKey() ? { Authorization: `Bearer ${getKey()}` } : {};
  const response = await fetch("/metrics", { headers, cache: "no-store" });
  if (!response.ok) throw Object.assign(new Error(`/metrics answered HTTP ${response.status}`), { status: response.status });
  return parsePrometheus(await response.text());
}

function render(ready, metrics) {
  const samples = metrics.status === "fulfilled" ? metrics.value : null;
  const readyz = ready.status === "fulfilled" ? ready.value : null;
  const errors = [ready, metrics].filter((r) => r.status === "rejected").map((r) => describeError(r.reason));
  setChildren($("poll-error"), errors.join(" · "));
  $("poll-error").classList.toggle("hidden", errors.length === 0);
  $("poll-dot").classList.toggle("stale", errors.length > 0);
  $("poll-state").textContent = `updated ${fmtClock()} · polling every ${POLL_MS / 1000} s`;
  if (readyz) renderReadyz(readyz, samples);
  if (samples) renderMetrics(samples);
}

function describeError(error) {
  if (error?.status === 401 || error?.status === 403) return `${error.message}: this endpoint needs an admin key`;
  return error?.message || String(error);
}

const STATE_CLASS = { ready: "ok", healthy: "ok", cooldown: "warn", ejected: "warn", draining: "warn", unhealthy: "bad", no_healthy_upstream: "bad" };

function badge(state) {
  return el("span", { class: `badge ${STATE_CLASS[state] || ""}` }, state.replaceAll("_", " "));
}

function renderReadyz(readyz, samples) {
  setChildren($("tile-status"), badge(readyz.status));
  const upstreams = Object.entries(readyz.upstreams || {});
  const healthy = upstreams.filter(([, u]) => u.state === "healthy").length;
  const ejected = upstreams.filter(([, u]) => u.state === "ejected").length;
  $("tile-upstreams").textContent = `${healthy} / ${upstreams.length}`;
  $("tile-upstreams-sub").textContent = ejected ? `healthy · ${ejected} ejected` : "healthy";
  const inFlight = upstreams.reduce((n, [, u]) => n + (u.in_flight || 0), 0);
  const queued = upstreams.reduce((n, [, u]) => n + (u.queued || 0), 0);
  const depth = samples ? sum(samples, firstPresent(samples, QUEUE)) : null;
  $("tile-queue").textContent = String(depth ?? queued);
  $("tile-inflight").textContent = `${inFlight} in flight`;
  const ejections = samples ? sumBy(samples, firstPresent(samples, EJECTIONS), "upstream") : {};
  const failures = samples ? sumBy(samples, firstPresent(samples, UPSTREAM_ERRORS), "upstream") : {};
  const rows = upstreams.map(([name, u]) => el("tr", { dataset: { upstream: name } },
    el("td", {}, el("strong", {}, name)),
    el("td", { dataset: { field: "state" } }, badge(u.state)),
    numCell("in_flight", u.in_flight),
    numCell("queued", u.queued),
    numCell("pool_in_use", u.pool?.in_use),
    numCell("pool_idle", u.pool?.idle),
    numCell("ejections", samples ? (ejections[name] ?? 0) : null),
    numCell("errors", samples ? (failures[name] ?? 0) : null)));
  setChildren($("upstreams").tBodies[0], rows.length ? rows : el("tr", {}, el("td", { colspan: 8, class: "hint" }, "no upstream configured")));
}

function numCell(field, value) {
  return el("td", { class: "num", dataset: { field } }, value === null || value === undefined ? "—" : String(value));
}

function renderMetrics(samples) {
  const t = Date.now() / 1000;
  const reading = {
    t,
    requests: sum(samples, firstPresent(samples, REQUESTS), isApiRequest),
    hist: histogram(samples, DURATION.find((name) => samples.has(`${name}_bucket`)), isApiRequest),
  };
  const previous = readings[readings.length - 1];
  readings.push(reading);
  if (readings.length > LATENCY_WINDOW + 1) readings.shift();
  const rps = previous ? rate(reading.requests, previous.requests, t - previous.t) : null;
  const window = histogramDelta(reading.hist, readings.length > 1 ? readings[0].hist : null);
  const recent = window && window.count > 0 ? window : null;
  const p50 = recent ? quantile(recent, 0.5) * 1000 : null;
  const p95 = recent ? quantile(recent, 0.95) * 1000 : null;
  const mean = recent ? (recent.sum / recent.count) * 1000 : null;
  $("tile-rps").textContent = rps === null ? "—" : fmtNumber(rps);
  $("tile-p50").textContent = fmtMs(p50);
  $("tile-p95").textContent = recent ? `p95 ${fmtMs(p95)} · ${recent.count} req in ${LATENCY_WINDOW} s` : "no requests in the last 5 s";
  const streams = sum(samples, firstPresent(samples, STREAMS));
  $("tile-streams").textContent = streams === null ? "—" : String(streams);
  if (previous) {
    pushPoint("rps", t, [rps]);
    pushPoint("latency", t, [p50, p95, mean]);
  }
}

// ---- admin panels ------------------------------------------------------------------

/** The panels fed by the admin API: container id → the request. `since` is local midnight. */
function adminPanels() {
  const midnight = new Date();
  midnight.setHours(0, 0, 0, 0);
  const since = encodeURIComponent(midnight.toISOString());
  return [
    ["admin-streams", "/admin/streams", "live streams"],
    ["admin-keys", "/admin/keys", "keys"],
    ["admin-usage-key", `/admin/usage?group_by=key&since=${since}`, "usage by key"],
    ["admin-usage-model", `/admin/usage?group_by=model&since=${since}`, "usage by model"],
  ];
}

async function pollAdmin() {
  if (!paused) await Promise.all(adminPanels().map(([id, path, what]) => loadPanel($(id), path, what)));
  setTimeout(pollAdmin, ADMIN_POLL_MS);
}

async function loadPanel(container, path, what) {
  if (!getKey()) {
    setPanelNote(container, "needs-key", `Needs an admin key: enter one at the top right to see ${what}.`);
    return;
  }
  try {
    const rows = rowsOf(await getJSON(path));
    container.dataset.state = "ok";
    setChildren(container, rows.length ? table(rows) : el("p", { class: "hint" }, `No ${what} right now.`));
  } catch (error) {
    if (error.status === 401 || error.status === 403) {
      setPanelNote(container, "needs-key", `Needs an admin key: ${path.split("?")[0]} answered HTTP ${error.status} (${error.message})`);
    } else if (error.status === 404 || error.status === 405 || error.status === 501) {
      setPanelNote(container, "unavailable", `Not available: this gateway does not serve ${path.split("?")[0]} (HTTP ${error.status}).`);
    } else {
      setPanelNote(container, "error", `Could not load ${what}: ${error.message}`, "bad");
    }
  }
}

function setPanelNote(container, state, text, tone = "warn") {
  container.dataset.state = state;
  setChildren(container, el("div", { class: `notice ${tone}` }, text));
}

/** The rows of an admin answer: a list, or the first list among the usual envelope fields,
 * or an object of objects (name → row). */
export function rowsOf(body) {
  if (Array.isArray(body)) return body;
  if (!body || typeof body !== "object") return [];
  for (const field of ["data", "rows", "items", "streams", "keys", "usage", "groups", "results"]) {
    if (Array.isArray(body[field])) return body[field];
  }
  const values = Object.entries(body).filter(([, v]) => v && typeof v === "object" && !Array.isArray(v));
  return values.map(([name, v]) => ({ name, ...v }));
}

function table(rows) {
  const columns = [];
  for (const row of rows.slice(0, MAX_ROWS)) for (const key of Object.keys(row)) if (!columns.includes(key)) columns.push(key);
  const numeric = (column) => rows.every((row) => row[column] === null || row[column] === undefined || typeof row[column] === "number");
  const head = el("tr", {}, columns.map((c) => el("th", { class: numeric(c) ? "num" : null }, c.replaceAll("_", " "))));
  const body = rows.slice(0, MAX_ROWS).map((row) => el("tr", {}, columns.map((c) =>
    el("td", { class: numeric(c) ? "num" : null }, cellText(row[c], c)))));
  const more = rows.length > MAX_ROWS ? el("p", { class: "hint" }, `and ${rows.length - MAX_ROWS} more`) : null;
  return [el("table", { class: "data" }, el("thead", {}, head), el("tbody", {}, body)), more];
}

function cellText(value, column = "") {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    return column.includes("cost") ? `$${value.toFixed(6).replace(/0+$/, "").replace(/\.$/, "")}` : value.toFixed(1);
  }
  if (Array.isArray(value)) return value.map((v) => cellText(v)).join(", ");
  if (typeof value === "object") return Object.entries(value).map(([k, v]) => `${k}: ${cellText(v)}`).join(", ");
  return String(value);
}

// ---- wiring ---------------------------------------------------------------------

$("pause").addEventListener("click", () => {
  paused = !paused;
  $("pause").textContent = paused ? "Resume" : "Pause";
  $("poll-state").textContent = paused ? "paused" : "resuming…";
});

mountKeyBar(() => adminPanels().forEach(([id, path, what]) => loadPanel($(id), path, what)));
poll();
pollAdmin();
