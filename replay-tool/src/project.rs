//! `rebuild` and `materialize --as-of`: run the projectors (the `projections`
//! crate) over a log file into SQL for ad-hoc queries on the past — a scratch
//! SQLite file by default, or any SQLite path or PostgreSQL URL with `--into`.
//! The log is only read; the projections crate owns every SQL detail.

use std::path::PathBuf;

use anyhow::{Context, Result};
use projections::ProjectorKind;
use projections::asof::{self, AsOf};

use crate::Outcome;
use crate::source::{Point, Source};

/// Two workers: a bulk build folds each projector's batches on one while the
/// projector holding SQLite's write gate drives its statements from the other
/// (`projections::runtime`).
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn reader(source: &Source) -> Result<&eventlog::LogReader> {
    match source {
        Source::File { reader, .. } => Ok(reader),
        Source::Feed { .. } => Err(crate::source::usage("projections are built from a log file: use --data or --log")),
    }
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("taskledger-{name}-{}.sqlite", std::process::id()))
}

async fn report(store: &projections::Store, target: &str, seq: u64) -> Result<()> {
    println!("projections at seq {seq} in {}", projections::store::redact_target(target));
    for checkpoint in projections::checkpoint::all(store).await.context("read the projector checkpoints")? {
        println!(
            "  {:<10} v{} {:<6} at seq {} ({})",
            checkpoint.projector,
            checkpoint.version,
            checkpoint.slot,
            checkpoint.last_seq,
            projections::checkpoint::to_hex(&checkpoint.last_hash)
        );
    }
    Ok(())
}

/// Every projector, from its checkpoint in `into` (or from seq 1 in a new store), up to the head.
pub fn rebuild(source: &Source, into: Option<&str>) -> Result<Outcome> {
    let reader = reader(source)?;
    let target = into.map(str::to_owned).unwrap_or_else(|| scratch("projections").display().to_string());
    runtime()?.block_on(async {
        let shown = projections::store::redact_target(&target);
        // Not beside a server writing the same database (it would refuse us), and a failed
        // connection says why (the pool only says that it timed out).
        let _lock = projections::lock::lock(&target).await.with_context(|| format!("open projections at {shown}"))?;
        let store = projections::Store::open(&target).await.with_context(|| format!("open projections at {shown}"))?;
        let head = reader.head().context("read the head")?.seq;
        asof::build(&store, reader, head, &ProjectorKind::ALL)
            .await
            .with_context(|| format!("run the projectors into {shown}"))?;
        report(&store, &target, head).await?;
        store.close().await;
        Ok(Outcome::Clean)
    })
}

/// Every projector as of a point, into a new SQLite file.
pub fn materialize(source: &Source, as_of: Option<Point>, out: Option<PathBuf>) -> Result<Outcome> {
    let reader = reader(source)?;
    let at = match as_of {
        None => AsOf::Seq(source.head()?.seq),
        Some(Point::Seq(seq)) => AsOf::Seq(seq),
        Some(Point::Time(t)) => AsOf::TimeUs(t.as_micros()),
    };
    let path = out.unwrap_or_else(|| scratch("asof"));
    runtime()?.block_on(async {
        let done = asof::materialize(reader, at, &path).await.with_context(|| {
            format!("materialize the projections into {}", projections::store::redact_target(&path.to_string_lossy()))
        })?;
        report(&done.store, &done.path.display().to_string(), done.seq).await?;
        println!("query it with: sqlite3 {}", done.path.display());
        done.store.close().await;
        Ok(Outcome::Clean)
    })
}
