-- Runtime virtual keys (POST /admin/keys; proxy/runtime_keys.py). Only the SHA-256 of a
-- secret is stored. models and per_model are JSON; a revoked key keeps its row (revoked_at
-- set) and its name (ledger rows stay unambiguous).
-- rev: the value of keys_version.version written by the row's last change (the version row
-- is locked until commit, so revs commit in order); instances poll keys_version and read
-- the rows with a higher rev (within about a second).
CREATE TABLE virtual_keys (
    name            TEXT             PRIMARY KEY,
    key_sha256      TEXT             NOT NULL UNIQUE,
    models          TEXT             NOT NULL,
    rpm             INTEGER,
    burst           INTEGER,
    tpm             INTEGER,
    max_concurrent  INTEGER,
    per_model       TEXT             NOT NULL DEFAULT '{}',
    budget_tokens   BIGINT,
    budget_usd      DOUBLE PRECISION,
    budget_period_s DOUBLE PRECISION,
    priority        INTEGER          NOT NULL DEFAULT 0,
    max_websockets  INTEGER          NOT NULL DEFAULT 64,
    created_at      TIMESTAMPTZ      NOT NULL,
    updated_at      TIMESTAMPTZ      NOT NULL,
    revoked_at      TIMESTAMPTZ,
    rev             BIGINT           NOT NULL
);
CREATE INDEX virtual_keys_rev ON virtual_keys (rev);
CREATE TABLE keys_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT  NOT NULL
);
INSERT INTO keys_version (id, version) VALUES (1, 0);
