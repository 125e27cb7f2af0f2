-- The runtime's own bookkeeping. Each projector owns its read-model tables and
-- creates them itself (their names carry a generation so that a rebuild can
-- build shadow copies beside the live ones); only the checkpoint table, which
-- every projector shares, is a migration.
CREATE TABLE projector_checkpoints (
    projector     TEXT    NOT NULL,
    -- 'live' (what queries read) or 'shadow' (a rebuild in progress).
    slot          TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    -- Suffix of this generation's table names ('' for the live tables).
    table_suffix  TEXT    NOT NULL,
    generation    BIGINT  NOT NULL,
    -- Last applied seq (0: nothing yet) and that record's chain hash.
    last_seq      BIGINT  NOT NULL,
    last_hash     BYTEA   NOT NULL,
    updated_at_us BIGINT  NOT NULL,
    PRIMARY KEY (projector, slot)
);
