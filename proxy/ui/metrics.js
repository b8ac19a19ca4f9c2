// Prometheus text exposition (format 0.0.4) → samples, and the few computations the status
// page needs: counter rates and histogram quantiles over a window (as PromQL's rate() and
// histogram_quantile() do: linear interpolation inside the bucket).

/** Parse the exposition text; returns Map<sample name, Array<{labels, value}>>. Comments,
 * HELP/TYPE lines and timestamps are skipped; label values are unescaped. */
export function parsePrometheus(text) {
  const samples = new Map();
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const sample = parseLine(line);
    if (!sample) continue;
    if (!samples.has(sample.name)) samples.set(sample.name, []);
    samples.get(sample.name).push({ labels: sample.labels, value: sample.value });
  }
  return samples;
}

function parseLine(line) {
  const nameEnd = line.search(/[{\s]/);
  if (nameEnd <= 0) return null;
  const name = line.slice(0, nameEnd);
  let rest = line.slice(nameEnd);
  const labels = {};
  if (rest.startsWith("{")) {
    const close = parseLabels(rest, labels);
    if (close < 0) return null;
    rest = rest.slice(close + 1);
  }
  const value = parseValue(rest.trim().split(/\s+/)[0]);
  return value === null ? null : { name, labels, value };
}

/** Fill `labels` from `text` starting at "{"; returns the index of the closing "}" or -1. */
function parseLabels(text, labels) {
  const pattern = /\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?/y;
  pattern.lastIndex = 1;
  for (;;) {
    if (text[pattern.lastIndex] === "}") return pattern.lastIndex;
    const match = pattern.exec(text);
    if (!match) {
      const close = text.indexOf("}", pattern.lastIndex);
      return close >= 0 && text.slice(pattern.lastIndex, close).trim() === "" ? close : -1;
    }
    labels[match[1]] = match[2].replace(/\\(["\\n])/g, (_, ch) => (ch === "n" ? "\n" : ch));
  }
}

function parseValue(token) {
  if (token === undefined) return null;
  if (token === "+Inf") return Infinity;
  if (token === "-Inf") return -Infinity;
  if (token === "NaN") return NaN;
  const value = Number(token);
  return Number.isNaN(value) ? null : value;
}

/** The first of `names` present in `samples` (metric names may change between versions). */
export function firstPresent(samples, names) {
  return names.find((name) => samples.has(name)) ?? null;
}

/** Sum of the samples of `name` whose labels pass `keep` (null when the metric is absent). */
export function sum(samples, name, keep = () => true) {
  const rows = name ? samples.get(name) : undefined;
  if (!rows) return null;
  return rows.filter((row) => keep(row.labels)).reduce((total, row) => total + row.value, 0);
}

/** Sums of `name` grouped by the value of `label`: {labelValue: total}. */
export function sumBy(samples, name, label, keep = () => true) {
  const out = {};
  for (const row of samples.get(name) || []) {
    if (!keep(row.labels)) continue;
    const key = row.labels[label] ?? "";
    out[key] = (out[key] || 0) + row.value;
  }
  return out;
}

/** A histogram `base` (…_bucket, …_sum, …_count) summed over the series `keep` accepts:
 * {buckets: [[le, cumulative count]…] sorted by le, sum, count}, or null when absent. */
export function histogram(samples, base, keep = () => true) {
  const rows = samples.get(`${base}_bucket`);
  if (!rows) return null;
  const byLe = new Map();
  for (const row of rows) {
    if (!keep(row.labels)) continue;
    const le = parseValue(row.labels.le);
    byLe.set(le, (byLe.get(le) || 0) + row.value);
  }
  return {
    buckets: [...byLe.entries()].sort((a, b) => a[0] - b[0]),
    sum: sum(samples, `${base}_sum`, keep) ?? 0,
    count: sum(samples, `${base}_count`, keep) ?? 0,
  };
}

/** `newer - older` bucket by bucket (a counter reset gives `newer` alone). */
export function histogramDelta(newer, older) {
  if (!newer) return null;
  if (!older || newer.count < older.count) return newer;
  const before = new Map(older.buckets);
  return {
    buckets: newer.buckets.map(([le, count]) => [le, count - (before.get(le) || 0)]),
    sum: newer.sum - older.sum,
    count: newer.count - older.count,
  };
}

/** The q-quantile (0..1) of a histogram, as PromQL's histogram_quantile; null if empty. */
export function quantile(hist, q) {
  if (!hist || hist.buckets.length === 0) return null;
  const total = hist.buckets[hist.buckets.length - 1][1];
  if (!(total > 0)) return null;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const [le, count] of hist.buckets) {
    if (count >= rank) {
      if (le === Infinity) return prevLe; // beyond the last finite bound: its bound
      if (count === prevCount) return le;
      return prevLe + (le - prevLe) * ((rank - prevCount) / (count - prevCount));
    }
    prevLe = le;
    prevCount = count;
  }
  return prevLe;
}

/** Per-second rate of a counter between two readings (null without both; 0 on reset). */
export function rate(newer, older, seconds) {
  if (newer === null || older === null || !(seconds > 0)) return null;
  return newer >= older ? (newer - older) / seconds : 0;
}
