//! `natsched export`: a store's pending schedules as an export file (see the module above).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::line::{Line, Mark};
use crate::record::DecodeError;
use crate::store::{SegmentKey, Store, StoreError, StoreOptions, segment};
use crate::time;

/// sled's page cache while exporting: the store is read once, in order.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// `natsched export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// The store directory (`[store] path`) of a stopped natsched.
    #[arg(long, value_name = "PATH")]
    pub store: PathBuf,
    /// Write to this file (created with mode 0600, replaced only once the export is
    /// complete) instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Why an export could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the export: {0}")]
    Write(#[source] std::io::Error),
    #[error("cannot write the export to {path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    /// Schedule lines written.
    pub schedules: u64,
    /// Problems reported (unreadable records or segments, left out).
    pub unreadable: u64,
}

/// Something the export could not read, left out of it; or a warning about the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unreadable {
    /// A record, or the rest of a segment, that does not decode.
    #[error("{} unreadable in segment {key:?} ({error}); left out", match id {
        Some(id) => format!("schedule {id:?}"),
        None => "a record or the rest".to_owned(),
    })]
    Record {
        key: SegmentKey,
        id: Option<String>,
        error: DecodeError,
    },
    /// The store has fewer writes than when natsched last had it (see the watermark): what
    /// it holds is exported, but acknowledged schedules may be missing. Not counted.
    #[error("warning: {0}")]
    LostWrites(String),
}

/// Exports the store at `args.store` to `args.output` or standard output; `report` is told
/// each problem as it is found.
pub fn export_to(
    args: &ExportArgs,
    report: &mut dyn FnMut(&Unreadable),
) -> Result<Exported, ExportError> {
    let Some(path) = &args.output else {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
        let exported = export(&args.store, &mut out, report)?;
        out.flush().map_err(ExportError::Write)?;
        return Ok(exported);
    };
    // Written aside and renamed over `path` once complete and durable: a failed export
    // never replaces an earlier one.
    let mut partial = path.clone().into_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let failed = |source| ExportError::Output {
        path: path.clone(),
        source,
    };
    let result = (|| {
        use std::os::unix::fs::OpenOptionsExt as _;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(failed)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let exported = export(&args.store, &mut out, report)?;
        let file = out.into_inner().map_err(|e| failed(e.into_error()))?;
        file.sync_all().map_err(failed)?;
        std::fs::rename(&partial, path).map_err(failed)?;
        Ok(exported)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Writes every pending schedule of the store at `store` to `out`, as the export format
/// says (see the module above); `report` is told each problem as it is found.
pub fn export(
    store: &Path,
    out: &mut dyn Write,
    report: &mut dyn FnMut(&Unreadable),
) -> Result<Exported, ExportError> {
    let store = Store::open_to_read(&StoreOptions {
        path: store.to_owned(),
        cache_capacity: CACHE_BYTES,
    })?;
    if let Err(error) = store.check_rollback() {
        report(&Unreadable::LostWrites(error.to_string()));
    }
    let mut exported = Exported {
        schedules: 0,
        unreadable: 0,
    };
    let mut unreadable = |problem: Unreadable| {
        report(&problem);
        exported.unreadable += 1;
    };
    write_line(out, &Mark::header(time::now_ms()))?;
    let mut schedules = 0;
    for window in store.windows_from(0) {
        let window = window?;
        let mut entries = Vec::new();
        for (key, raw) in &window.segments {
            let (found, damage) = segment::entries_salvaging(raw.as_ref());
            if let Some(error) = damage {
                unreadable(Unreadable::Record {
                    key: *key,
                    id: None,
                    error,
                });
            }
            entries.extend(found.into_iter().map(|entry| (*key, entry)));
        }
        // Due order within the window, as `list` has it; a schedule is in one segment at
        // rest, but should two copies be stored, it is written once.
        entries.sort_unstable_by(|(_, a), (_, b)| (a.due, a.id()).cmp(&(b.due, b.id())));
        entries.dedup_by(|(_, a), (_, b)| (a.due, a.id()) == (b.due, b.id()));
        for (key, entry) in entries {
            match store.read_entry(&entry, key)? {
                Some(Ok(schedule)) => {
                    write_line(out, &Line::of(&schedule))?;
                    schedules += 1;
                }
                Some(Err(error)) => unreadable(Unreadable::Record {
                    key,
                    id: Some(entry.id().to_owned()),
                    error,
                }),
                // At rest, a series' record always has its message in its index entry.
                None => unreadable(Unreadable::Record {
                    key,
                    id: Some(entry.id().to_owned()),
                    error: DecodeError::NoBody,
                }),
            }
        }
    }
    exported.schedules = schedules;
    write_line(out, &Mark::end(schedules, exported.unreadable))?;
    Ok(exported)
}

/// Writes `line` as one line of JSON.
fn write_line(out: &mut dyn Write, line: &impl serde::Serialize) -> Result<(), ExportError> {
    serde_json::to_writer(&mut *out, line).map_err(|e| ExportError::Write(e.into()))?;
    out.write_all(b"\n").map_err(ExportError::Write)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::record::{Schedule, test_schedule};
    use crate::recurrence::Series;
    use crate::store::WriteBatch;

    #[test]
    fn what_cannot_be_read_is_reported_by_key_and_the_rest_exported() {
        let dir = tempfile::tempdir().unwrap();
        let (good, bad, thin) = (
            SegmentKey::fine(60_100, 1),
            SegmentKey::far(60_000, 2),
            SegmentKey::fine(60_200, 3),
        );
        {
            let store = Store::open(&StoreOptions {
                path: dir.path().to_owned(),
                cache_capacity: 1 << 20,
            })
            .unwrap();
            let mut batch = WriteBatch::default();
            batch.put_new_segment(good, &[test_schedule("a", 60_150, true)]);
            batch.put_raw_segment(bad, Some(vec![2, 0, 0, 0, 9]));
            // A series' thin record whose index entry (its message) is gone.
            let mut series = Series::every(1000, 3);
            series.body_indexed = true;
            let orphan = Schedule {
                recurrence: Some(Box::new(series)),
                ..test_schedule("s", 60_250, true)
            };
            batch.put_segment(thin, &[orphan]);
            batch.set_next_seq(4);
            store.commit(batch).unwrap();
            store.close().unwrap();
        }
        let (mut out, mut problems) = (Vec::new(), Vec::new());
        let started = Instant::now();
        let exported = loop {
            out.clear();
            problems.clear();
            let mut report = |problem: &Unreadable| problems.push(problem.to_string());
            match export(dir.path(), &mut out, &mut report) {
                // The writer's sled threads may still hold the lock for a moment.
                Err(ExportError::Store(StoreError::Locked { .. }))
                    if started.elapsed() < Duration::from_secs(3) =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                result => break result.unwrap(),
            }
        };
        assert_eq!(
            exported,
            Exported {
                schedules: 1,
                unreadable: 2
            }
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains(&format!("in segment {bad:?}")),
            "{problems:?}"
        );
        assert!(
            problems[1].contains(&format!("schedule \"s\" unreadable in segment {thin:?}")),
            "{problems:?}"
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[1]["id"], "a");
        assert_eq!(
            (&lines[2]["schedules"], &lines[2]["unreadable"]),
            (&1.into(), &2.into())
        );
    }
}
