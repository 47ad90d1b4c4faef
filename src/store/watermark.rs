//! The store's high-water mark: a small file beside the database that says how far the store
//! had got when natsched last opened or closed it.
//!
//! sled recovers a database whose log was cut short (a truncated copy, a restore from an old
//! backup, a file lost on a bad disk) as if the missing writes had never happened, and an
//! empty directory as a new store: either way acknowledged schedules would vanish without a
//! trace. Segment sequence numbers only ever grow, so a store whose next seq is below the
//! mark has lost writes, and is refused at start instead of served. The mark is written
//! when the store is opened and when it is closed cleanly; a store cut short within one
//! crashed run (after its last start) cannot be told from the crash itself.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::StoreError;

/// The mark's file name inside the store directory.
pub(crate) const FILE: &str = "natsched.watermark";
const HEADER: &str = "natsched store watermark 1";

/// The next segment seq the mark records, if there is a mark.
pub(crate) fn read(dir: &Path) -> Result<Option<u64>, StoreError> {
    let path = dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::Watermark { path, source }),
    };
    let mut lines = text.lines();
    let seq = (lines.next() == Some(HEADER))
        .then(|| lines.next()?.strip_prefix("next_seq ")?.parse().ok())
        .flatten();
    match seq {
        Some(seq) => Ok(Some(seq)),
        None => Err(StoreError::Watermark {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "unreadable mark"),
        }),
    }
}

/// Records `next_seq` durably (written aside, fsync'd, renamed over the old mark).
pub(crate) fn write(dir: &Path, next_seq: u64) -> Result<(), StoreError> {
    let path = dir.join(FILE);
    let fail = |source| StoreError::Watermark {
        path: path.clone(),
        source,
    };
    let temporary: PathBuf = dir.join(format!("{FILE}.new"));
    let mut file = std::fs::File::create(&temporary).map_err(fail)?;
    write!(file, "{HEADER}\nnext_seq {next_seq}\n").map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&temporary, &path).map_err(fail)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        write(dir.path(), 42).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(42));
        write(dir.path(), 43).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(43));
        std::fs::write(dir.path().join(FILE), "something else\n").unwrap();
        assert!(matches!(
            read(dir.path()),
            Err(StoreError::Watermark { .. })
        ));
    }
}
