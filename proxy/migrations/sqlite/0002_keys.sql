-- Runtime virtual keys (POST /admin/keys; proxy/runtime_keys.py). Only the SHA-256 of a
-- secret is stored. models and per_model are JSON; times are unix seconds (UTC); a revoked
-- key keeps its row (revoked_at set) and its name (ledger rows stay unambiguous).
-- rev: the value of keys_version.version written by the row's last change; instances poll
-- keys_version and read the rows with a higher rev (within about a second).
CREATE TABLE virtual_keys (
    name            TEXT    PRIMARY KEY,
    key_sha256      TEXT    NOT NULL UNIQUE,
    models          TEXT    NOT NULL,
    rpm             INTEGER,
    burst           INTEGER,
    tpm             INTEGER,
    max_concurrent  INTEGER,
    per_model       TEXT    NOT NULL DEFAULT '{}',
    budget_tokens   INTEGER,
    budget_usd      REAL,
    budget_period_s REAL,
    priority        INTEGER NOT NULL DEFAULT 0,
    max_websockets  INTEGER NOT NULL DEFAULT 64,
    created_at      REAL    NOT NULL,
    updated_at      REAL    NOT NULL,
    revoked_at      REAL,
    rev             INTEGER NOT NULL
);
CREATE INDEX virtual_keys_rev ON virtual_keys (rev);
CREATE TABLE keys_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO keys_version (id, version) VALUES (1, 0);
