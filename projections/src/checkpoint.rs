//! Checkpoints: for each projector and slot (live or shadow), the last seq
//! applied, that record's chain hash, and which generation of tables holds the
//! rows. A checkpoint changes only inside the transaction that writes the
//! rows of the records it covers; that is the whole of "exactly once".

use eventlog::{GENESIS_HASH, Hash, StoredRecord};
use serde::Serialize;

use crate::error::{ApplyError, RuntimeError};
use crate::projectors::ProjectorKind;
use crate::sql;
use crate::store::{Store, StoreTx, on_backend, on_tx};

/// Which copy of a projector's tables a checkpoint describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    /// The tables queries read.
    Live,
    /// A rebuild in progress, beside the live tables.
    Shadow,
}

impl Slot {
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Live => "live",
            Slot::Shadow => "shadow",
        }
    }
}

/// A projector's stored position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    pub projector: String,
    pub slot: String,
    pub version: i32,
    pub table_suffix: String,
    pub generation: i64,
    pub last_seq: u64,
    #[serde(serialize_with = "hex")]
    pub last_hash: Hash,
    pub updated_at_us: i64,
}

fn hex<S: serde::Serializer>(hash: &Hash, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&to_hex(hash))
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type CheckpointRow = (String, String, i32, String, i64, i64, Vec<u8>, i64);

fn from_row(row: CheckpointRow) -> Result<Checkpoint, ApplyError> {
    let (projector, slot, version, table_suffix, generation, last_seq, last_hash, updated_at_us) = row;
    let last_hash: Hash =
        last_hash.try_into().map_err(|_| ApplyError::Model("checkpoint hash is not 32 bytes".into()))?;
    Ok(Checkpoint {
        projector,
        slot,
        version,
        table_suffix,
        generation,
        last_seq: u64::try_from(last_seq).map_err(|_| ApplyError::Model("negative checkpoint seq".into()))?,
        last_hash,
        updated_at_us,
    })
}

const SELECT: &str = "SELECT projector, slot, version, table_suffix, generation, last_seq, last_hash, updated_at_us \
                      FROM projector_checkpoints";

/// Every checkpoint, live and shadow, ordered by projector and slot.
pub async fn all(store: &Store) -> Result<Vec<Checkpoint>, ApplyError> {
    let sql = format!("{SELECT} ORDER BY projector, slot");
    let rows: Vec<CheckpointRow> = on_backend!(store, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await?
    });
    rows.into_iter().map(from_row).collect()
}

/// The checkpoint of `kind` in `slot`, if that slot is installed.
pub async fn read(store: &Store, kind: ProjectorKind, slot: Slot) -> Result<Option<Checkpoint>, ApplyError> {
    let sql = format!("{SELECT} WHERE projector = $1 AND slot = $2");
    let row: Option<CheckpointRow> = on_backend!(store, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(kind.name()).bind(slot.as_str()).fetch_optional(pool).await?
    });
    row.map(from_row).transpose()
}

pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Whether `install` creates a generation's secondary indexes at once or
/// leaves them to `create_indexes` (bulk builds).
///
/// On PostgreSQL a bulk build also writes into `UNLOGGED` tables, which skip
/// the write-ahead log: each row of a rebuild is inserted and then updated
/// several times as its task moves on, and every one of those writes went to
/// the WAL. `create_indexes` turns the tables logged (PostgreSQL writes each
/// table to the WAL once) before it builds the indexes. The catch: after a
/// crash PostgreSQL empties every unlogged table, while the checkpoint, in a
/// logged table, still says how far the build had come. So the generation
/// gets a one-row unlogged marker table beside it (see `unlogged_marker`):
/// crash recovery empties it with the others, and a build that finds it empty
/// starts again from seq 0 instead of resuming on emptied tables. Only for
/// projectors that rewrite their rows (`ProjectorKind::rewrites_rows`): the
/// audit log only appends, and making its tables logged copied them into the
/// WAL a second time (its rebuild alone took 7.9–8.4 s unlogged against
/// 6.5–7.4 s logged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Indexes {
    Now,
    Later,
}

/// The table that tells whether a bulk generation's unlogged tables
/// survived; it exists only until `create_indexes` makes them logged.
fn unlogged_marker(kind: ProjectorKind, suffix: &str) -> String {
    format!("{}_unlogged{suffix}", kind.name())
}

/// What became of a generation's unlogged tables (PostgreSQL bulk builds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unlogged {
    /// The tables are logged (or the backend is SQLite): nothing to do.
    None,
    /// A bulk build in progress; its rows are all there.
    Intact,
    /// PostgreSQL crashed since the build wrote: the tables were emptied.
    Reset,
}

/// Whether the generation `checkpoint` describes is still a bulk build on
/// unlogged tables, and whether a crash has emptied them.
pub async fn unlogged_state(
    store: &Store,
    kind: ProjectorKind,
    checkpoint: &Checkpoint,
) -> Result<Unlogged, ApplyError> {
    let Store::Postgres(pool) = store else { return Ok(Unlogged::None) };
    let marker = unlogged_marker(kind, &checkpoint.table_suffix);
    let exists: Option<String> =
        sqlx::query_scalar("SELECT to_regclass($1)::text").bind(&marker).fetch_one(pool).await?;
    if exists.is_none() {
        return Ok(Unlogged::None);
    }
    let rows: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {marker}"))).fetch_one(pool).await?;
    Ok(if rows > 0 { Unlogged::Intact } else { Unlogged::Reset })
}

/// Creates generation `generation` of `kind`'s tables (named with `suffix`)
/// and its checkpoint at seq 0, in one transaction. Drops leftovers of an
/// abandoned generation with the same names first.
pub async fn install(
    store: &Store,
    kind: ProjectorKind,
    slot: Slot,
    suffix: &str,
    generation: i64,
    indexes: Indexes,
) -> Result<Checkpoint, ApplyError> {
    let mut tx = store.begin().await?;
    let postgres = tx.backend() == crate::store::Backend::Postgres;
    let marker = unlogged_marker(kind, suffix);
    for table in kind.tables() {
        sql::execute(&mut tx, &format!("DROP TABLE IF EXISTS {table}{suffix}")).await?;
    }
    let unlogged = indexes == Indexes::Later && postgres && kind.rewrites_rows();
    if postgres {
        sql::execute(&mut tx, &format!("DROP TABLE IF EXISTS {marker}")).await?;
    }
    if unlogged {
        sql::execute(&mut tx, &format!("CREATE UNLOGGED TABLE {marker} (intact BOOLEAN NOT NULL)")).await?;
        sql::execute(&mut tx, &format!("INSERT INTO {marker} VALUES (TRUE)")).await?;
    }
    for statement in kind.table_ddl(tx.backend(), suffix, generation) {
        let statement =
            if unlogged { statement.replacen("CREATE TABLE", "CREATE UNLOGGED TABLE", 1) } else { statement };
        sql::execute(&mut tx, &statement).await?;
    }
    kind.initial_mirror(tx.backend(), suffix).run(&mut tx).await?;
    if indexes == Indexes::Now {
        for statement in kind.index_ddl(tx.backend(), suffix, generation) {
            sql::execute(&mut tx, &statement).await?;
        }
    }
    let checkpoint = Checkpoint {
        projector: kind.name().to_owned(),
        slot: slot.as_str().to_owned(),
        version: kind.version(),
        table_suffix: suffix.to_owned(),
        generation,
        last_seq: 0,
        last_hash: GENESIS_HASH,
        updated_at_us: now_us(),
    };
    on_tx!(&mut tx, t => {
        sqlx::query(
            "DELETE FROM projector_checkpoints WHERE projector = $1 AND slot = $2",
        )
        .bind(kind.name())
        .bind(slot.as_str())
        .execute(&mut **t)
        .await?;
        sqlx::query(
            "INSERT INTO projector_checkpoints (projector, slot, version, table_suffix, generation, last_seq, \
             last_hash, updated_at_us) VALUES ($1, $2, $3, $4, $5, 0, $6, $7)",
        )
        .bind(kind.name())
        .bind(slot.as_str())
        .bind(kind.version())
        .bind(suffix.to_owned())
        .bind(generation)
        .bind(GENESIS_HASH.to_vec())
        .bind(checkpoint.updated_at_us)
        .execute(&mut **t)
        .await?;
    });
    tx.commit().await?;
    Ok(checkpoint)
}

/// Memory PostgreSQL may use to sort while it builds a generation's indexes.
const INDEX_BUILD_MEMORY_MB: u32 = 256;

/// Finishes a generation installed with `Indexes::Later` (idempotent): on
/// PostgreSQL turns its tables logged and drops the unlogged marker, then
/// creates the secondary indexes.
pub async fn create_indexes(store: &Store, kind: ProjectorKind, checkpoint: &Checkpoint) -> Result<(), ApplyError> {
    let mut tx = store.begin().await?;
    if tx.backend() == crate::store::Backend::Postgres {
        // Sort a million-row table's keys in memory rather than in temporary files.
        sql::execute(&mut tx, &format!("SET LOCAL maintenance_work_mem = '{INDEX_BUILD_MEMORY_MB}MB'")).await?;
        // Already logged tables are left as they are.
        for table in kind.tables() {
            sql::execute(&mut tx, &format!("ALTER TABLE {table}{} SET LOGGED", checkpoint.table_suffix)).await?;
        }
        sql::execute(&mut tx, &format!("DROP TABLE IF EXISTS {}", unlogged_marker(kind, &checkpoint.table_suffix)))
            .await?;
    }
    create_each_index(&mut tx, kind, checkpoint).await?;
    tx.commit().await?;
    Ok(())
}

/// The generation's secondary indexes, each created unless it exists.
async fn create_each_index(tx: &mut StoreTx, kind: ProjectorKind, checkpoint: &Checkpoint) -> Result<(), ApplyError> {
    for statement in kind.index_ddl(tx.backend(), &checkpoint.table_suffix, checkpoint.generation) {
        sql::execute(tx, &statement.replacen("INDEX ", "INDEX IF NOT EXISTS ", 1)).await?;
    }
    Ok(())
}

/// Creates the indexes this version keeps that an older one did not give this generation
/// (idempotent): a live projector runs it as it loads, so an upgraded store has them at once
/// rather than at its next rebuild. Each is built over the rows the table holds then.
pub async fn create_missing_indexes(
    store: &Store,
    kind: ProjectorKind,
    checkpoint: &Checkpoint,
) -> Result<(), ApplyError> {
    let mut tx = store.begin().await?;
    create_each_index(&mut tx, kind, checkpoint).await?;
    tx.commit().await?;
    Ok(())
}

/// Drops the indexes an older version gave this generation and the code no
/// longer keeps (`ProjectorKind::retired_index_ddl`; idempotent).
pub async fn drop_retired_indexes(
    store: &Store,
    kind: ProjectorKind,
    checkpoint: &Checkpoint,
) -> Result<(), ApplyError> {
    let statements = kind.retired_index_ddl(checkpoint.generation);
    if statements.is_empty() {
        return Ok(());
    }
    let mut tx = store.begin().await?;
    for statement in statements {
        sql::execute(&mut tx, &statement).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Moves the checkpoint of `kind`/`slot` from `from_seq` to `last`, inside
/// `tx`. Fails (and so the whole batch rolls back) if someone else moved it:
/// two runners on one projector can never both apply a batch.
pub(crate) async fn advance(
    tx: &mut StoreTx,
    kind: ProjectorKind,
    slot: Slot,
    from_seq: u64,
    last: &StoredRecord,
) -> Result<(), ApplyError> {
    let affected = on_tx!(tx, t => {
        sqlx::query(
            "UPDATE projector_checkpoints SET last_seq = $1, last_hash = $2, updated_at_us = $3 \
             WHERE projector = $4 AND slot = $5 AND last_seq = $6",
        )
        .bind(last.seq as i64)
        .bind(last.hash.to_vec())
        .bind(now_us())
        .bind(kind.name())
        .bind(slot.as_str())
        .bind(from_seq as i64)
        .execute(&mut **t)
        .await?
        .rows_affected()
    });
    if affected != 1 {
        return Err(ApplyError::CheckpointMoved { at: from_seq, last: last.seq });
    }
    Ok(())
}

/// Checks a stored checkpoint against the log it is about to follow.
pub(crate) fn check_against_log(checkpoint: &Checkpoint, reader: &eventlog::LogReader) -> Result<(), RuntimeError> {
    if checkpoint.last_seq == 0 {
        return Ok(());
    }
    let head = reader.head()?.seq;
    if checkpoint.last_seq > head {
        return Err(RuntimeError::CheckpointAhead {
            projector: checkpoint.projector.clone(),
            checkpoint: checkpoint.last_seq,
            head,
        });
    }
    if reader.record_hash(checkpoint.last_seq)? != Some(checkpoint.last_hash) {
        return Err(RuntimeError::CheckpointMismatch {
            projector: checkpoint.projector.clone(),
            seq: checkpoint.last_seq,
        });
    }
    Ok(())
}
