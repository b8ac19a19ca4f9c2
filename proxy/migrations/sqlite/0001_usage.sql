-- The usage ledger: one row per request (proxy/ledger.py). ts: unix seconds (UTC) when the
-- request arrived; durations in milliseconds; cost in USD (NULL: the model has no price).
-- No index on request_id: a SQLite batch is never retried after it may have committed
-- (its insert is not timed out), and the index would cost a third of a row's write.
CREATE TABLE usage (
    id                INTEGER PRIMARY KEY,
    ts                REAL    NOT NULL,
    request_id        TEXT    NOT NULL,
    stream_id         TEXT,
    key_name          TEXT    NOT NULL,
    model             TEXT,
    upstream          TEXT,
    endpoint          TEXT    NOT NULL,
    transport         TEXT    NOT NULL,
    status            INTEGER NOT NULL,
    error_code        TEXT,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    total_tokens      INTEGER,
    cost_usd          REAL,
    latency_ms        REAL,
    ttft_ms           REAL,
    overhead_ms       REAL,
    resumes           INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX usage_ts ON usage (ts);
CREATE INDEX usage_key_ts ON usage (key_name, ts);
CREATE INDEX usage_model_ts ON usage (model, ts);
