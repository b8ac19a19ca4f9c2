-- The usage ledger: one row per request (proxy/ledger.py). ts: when the request arrived;
-- durations in milliseconds; cost in USD (NULL: the model has no price).
CREATE TABLE usage (
    id                BIGSERIAL PRIMARY KEY,
    ts                TIMESTAMPTZ      NOT NULL,
    request_id        TEXT             NOT NULL,
    stream_id         TEXT,
    key_name          TEXT             NOT NULL,
    model             TEXT,
    upstream          TEXT,
    endpoint          TEXT             NOT NULL,
    transport         TEXT             NOT NULL,
    status            INTEGER          NOT NULL,
    error_code        TEXT,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    total_tokens      INTEGER,
    cost_usd          DOUBLE PRECISION,
    latency_ms        DOUBLE PRECISION,
    ttft_ms           DOUBLE PRECISION,
    overhead_ms       DOUBLE PRECISION,
    resumes           INTEGER          NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX usage_request_id ON usage (request_id);  -- retried batches insert once
CREATE INDEX usage_ts ON usage (ts);
CREATE INDEX usage_key_ts ON usage (key_name, ts);
CREATE INDEX usage_model_ts ON usage (model, ts);
