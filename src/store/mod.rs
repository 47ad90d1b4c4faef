//! Durable storage of pending schedules.
//!
//! Everything natsched knows survives in one sled database under `store.path`; the rest of the
//! daemon sees only this module's small API, so the engine could be swapped without touching
//! intake, the wheel or firing. Writes are staged in a [`WriteBatch`] and applied atomically by
//! [`Store::commit`]; [`Store::flush`] makes everything committed so far durable (fsync). The
//! caller decides when to flush, which is what lets intake acknowledge a whole group of requests
//! per fsync (group commit).
//!
//! The key layout is in [`keys`]; the value format in [`crate::record`].

mod keys;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use keys::DueKey;

use crate::record::{DecodeError, Schedule};
use crate::time::UnixMs;

/// How long opening waits for the store's lock (see [`Store::open`]).
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// The version of the key layout written by this build, kept under [`keys::FORMAT_KEY`].
pub const STORE_FORMAT: u8 = 1;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path} (is another natsched using it?): {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("store at {path} has format version {found}; this build reads version {STORE_FORMAT}")]
    Format { path: PathBuf, found: u8 },
    #[error("store I/O failed: {0}")]
    Io(#[from] sled::Error),
    #[error("stored schedule {key:?} is unreadable: {source}")]
    Corrupt { key: DueKey, source: DecodeError },
}

/// Tuning for [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Directory of the database; created if missing.
    pub path: PathBuf,
    /// Bytes of sled page cache.
    pub cache_capacity: u64,
}

/// The open database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
}

/// Changes to apply atomically with [`Store::commit`].
#[derive(Default)]
pub struct WriteBatch {
    batch: sled::Batch,
    len: usize,
}

impl WriteBatch {
    /// Stores `schedule` under its due key and indexes its id.
    pub fn put(&mut self, schedule: &Schedule) {
        let key = DueKey::new(schedule.due, &schedule.id);
        self.batch.insert(key.as_bytes(), schedule.encode_value());
        self.batch
            .insert(keys::id_key(&schedule.id), &schedule.due.to_be_bytes());
        self.len += 1;
    }

    /// Removes the schedule at `key` and its id entry.
    ///
    /// Only use this when the id entry is known to point at `key`; otherwise use
    /// [`WriteBatch::remove_due_only`].
    pub fn remove(&mut self, key: &DueKey) {
        self.batch.remove(key.as_bytes());
        self.batch.remove(keys::id_key(key.id()));
        self.len += 1;
    }

    /// Removes the schedule at `key` but leaves its id entry, which already points at a newer
    /// schedule with the same id.
    pub fn remove_due_only(&mut self, key: &DueKey) {
        self.batch.remove(key.as_bytes());
        self.len += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Store {
    /// Opens (or creates) the database and checks its format version.
    pub fn open(options: &StoreOptions) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: options.path.clone(),
            source,
        };
        std::fs::create_dir_all(&options.path).map_err(|e| open_err(e.into()))?;
        let config = sled::Config::new()
            .path(&options.path)
            .cache_capacity(options.cache_capacity);
        // sled releases its file lock from background threads shortly after a database is
        // dropped, so a quick restart can find it still held. Another live process holding it
        // is a real error, reported once the wait is over.
        let started = Instant::now();
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && started.elapsed() < LOCK_WAIT =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) => return Err(open_err(err)),
            }
        };
        let store = Store { db };
        store.check_format(&options.path)?;
        Ok(store)
    }

    fn check_format(&self, path: &Path) -> Result<(), StoreError> {
        match self.db.get(keys::FORMAT_KEY)? {
            Some(v) if v.as_ref() == [STORE_FORMAT] => Ok(()),
            Some(v) => Err(StoreError::Format {
                path: path.to_owned(),
                found: v.first().copied().unwrap_or(0),
            }),
            None => {
                self.db.insert(keys::FORMAT_KEY, &[STORE_FORMAT])?;
                self.db.flush()?;
                Ok(())
            }
        }
    }

    /// Applies `batch` atomically (not yet durable: see [`Store::flush`]).
    pub fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if !batch.is_empty() {
            self.db.apply_batch(batch.batch)?;
        }
        Ok(())
    }

    /// Makes every committed change durable (fsync).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// The due instant of the pending schedule `id`, if any.
    pub fn due_of(&self, id: &str) -> Result<Option<UnixMs>, StoreError> {
        Ok(self.db.get(keys::id_key(id))?.and_then(|v| {
            let bytes: [u8; 8] = v.as_ref().try_into().ok()?;
            Some(u64::from_be_bytes(bytes))
        }))
    }

    /// The pending schedule `id`, if any.
    pub fn get(&self, id: &str) -> Result<Option<Schedule>, StoreError> {
        let Some(due) = self.due_of(id)? else {
            return Ok(None);
        };
        let key = DueKey::new(due, id);
        match self.db.get(key.as_bytes())? {
            Some(value) => decode(&key, &value).map(Some),
            None => Ok(None),
        }
    }

    /// Up to `limit` schedules with keys in `from..` and due before `due_before`, in key order.
    ///
    /// Costs what it returns plus one seek: it never looks past `due_before`.
    pub fn scan(
        &self,
        from: &DueKey,
        due_before: UnixMs,
        limit: usize,
    ) -> Result<Vec<(DueKey, Schedule)>, StoreError> {
        let end = DueKey::start_of(due_before).min(DueKey::end());
        let mut out = Vec::new();
        if *from >= end {
            return Ok(out);
        }
        for item in self.db.range(from.as_bytes()..end.as_bytes()).take(limit) {
            let (key, value) = item?;
            let key = DueKey::from_bytes(&key).expect("range stays inside the due key space");
            let schedule = decode(&key, &value)?;
            out.push((key, schedule));
        }
        Ok(out)
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

fn decode(key: &DueKey, value: &[u8]) -> Result<Schedule, StoreError> {
    Schedule::decode(key.id().to_owned(), key.due(), value).map_err(|source| StoreError::Corrupt {
        key: key.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Delivery;
    use bytes::Bytes;

    fn schedule(id: &str, due: UnixMs) -> Schedule {
        Schedule {
            id: id.into(),
            due,
            subject: "t".into(),
            headers: vec![],
            payload: Bytes::from_static(b"p"),
            created: 0,
            delivery: Delivery::Core,
            recurrence: None,
        }
    }

    fn open(dir: &Path) -> Store {
        Store::open(&StoreOptions {
            path: dir.to_owned(),
            cache_capacity: 1 << 20,
        })
        .unwrap()
    }

    #[test]
    fn put_get_remove_and_scan_in_due_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut batch = WriteBatch::default();
        for (id, due) in [("c", 30), ("a", 10), ("b", 20), ("a2", 10)] {
            batch.put(&schedule(id, due));
        }
        store.commit(batch).unwrap();
        assert_eq!(store.due_of("b").unwrap(), Some(20));
        assert_eq!(store.get("c").unwrap(), Some(schedule("c", 30)));

        let all = store.scan(&DueKey::start_of(0), u64::MAX, 10).unwrap();
        let ids: Vec<_> = all.iter().map(|(k, s)| (k.due(), s.id.as_str())).collect();
        assert_eq!(ids, [(10, "a"), (10, "a2"), (20, "b"), (30, "c")]);

        // The bound is exclusive, the limit counts, and the cursor resumes after a key.
        let before_20 = store.scan(&DueKey::start_of(0), 20, 10).unwrap();
        assert_eq!(before_20.len(), 2);
        let first = store.scan(&DueKey::start_of(0), u64::MAX, 1).unwrap();
        let rest = store.scan(&first[0].0.successor(), u64::MAX, 10).unwrap();
        assert_eq!(rest.len(), 3);

        let mut batch = WriteBatch::default();
        batch.remove(&DueKey::new(20, "b"));
        store.commit(batch).unwrap();
        assert_eq!(store.get("b").unwrap(), None);
        assert_eq!(
            store
                .scan(&DueKey::start_of(0), u64::MAX, 10)
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn survives_reopen_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            let mut batch = WriteBatch::default();
            batch.put(&schedule("x", 5));
            store.commit(batch).unwrap();
            store.flush().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(store.get("x").unwrap(), Some(schedule("x", 5)));
    }

    #[test]
    fn refuses_an_unknown_format() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.insert(keys::FORMAT_KEY, &[9]).unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(&StoreOptions {
            path: dir.path().to_owned(),
            cache_capacity: 1 << 20,
        })
        .err()
        .expect("format 9 must be refused");
        assert!(matches!(err, StoreError::Format { found: 9, .. }), "{err}");
    }
}
