//! Durable storage of pending schedules.
//!
//! Everything natsched knows survives in one sled database under `store.path`; the rest of the
//! daemon sees only this module's small API, so the engine could be swapped without touching
//! intake, the wheel or firing. Writes are staged in a [`WriteBatch`] and applied atomically by
//! [`Store::commit`]; [`Store::flush`] makes everything committed so far durable (fsync). The
//! caller decides when to flush, which is what lets intake acknowledge a whole group of requests
//! per fsync (group commit).
//!
//! Schedules live in time-bucketed *segments*, one value per commit round and bucket, in two
//! tiers (100 ms fine buckets, 1 minute far buckets for sparse far-future schedules); the key
//! layout is in `keys.rs`, the segment format in [`segment`], a schedule's value in
//! [`crate::record`], due-ordered reading across both tiers in `windows.rs`.

mod keys;
pub mod segment;
mod series_index;
mod watermark;
mod windows;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use keys::is_local as is_local_key;
pub use keys::{BUCKET_MS, FAR_BUCKET_MS, SegmentKey, Tier, bucket_of, far_bucket_of};
pub use windows::Window;

use crate::protocol;
use crate::record::{DecodeError, Schedule};
use crate::time::{self, UnixMs};
use segment::Salvage;
use series_index::INDEXED_KEY_LEN;

/// How many of a series' next occurrences [`Store::locate_series`] looks at.
const SERIES_FORWARD_PROBES: usize = 4;
/// How often [`Store::get`] follows a schedule that moved while it was being read.
const GET_ATTEMPTS: usize = 3;
/// How long opening waits for the store's lock (see [`Store::open`]).
const LOCK_WAIT: Duration = Duration::from_secs(3);
/// The file [`Store::probe_room`] writes, and how much: a few of sled's log segments.
const PROBE_FILE: &str = "natsched.probe";
const PROBE_BYTES: usize = 4 * 1024 * 1024;

/// The version of the store format written by this build, kept under the `mformat` key.
/// Version 6: a recurring schedule's body is kept in its index entry, and its segment
/// records are thin (see `series_index.rs`); a format 5 (or 3) store is marked 6 when opened
/// (what it holds stays readable as it is), so a build that knows only 5 refuses it instead
/// of taking thin records for damage.
/// Version 5: segments may hold recurring schedules (segment format 3), whose index entries
/// also say where to look for them once they have moved on (see [`Store::locate_series`]); a
/// format 3 store is marked 5 when opened (nothing else changes), so a build that knows only 3
/// refuses it instead of taking such segments for damage. Version 4 was only ever written by
/// development builds, so it is refused.
/// Version 3: every id natsched generates names its segment's seq (see [`Store::locate`]).
/// Version 2 (far segments, compact segment format 2) is upgraded in place when opened.
/// Version 1 was only ever written by development builds, so it is refused.
pub const STORE_FORMAT: u8 = 6;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path} (is another natsched using it?): {source}")]
    Open { path: PathBuf, source: sled::Error },
    /// [`Store::open_to_read`]: the path holds no store (nothing is created there).
    #[error("no natsched store at {path}: {reason}")]
    Missing { path: PathBuf, reason: &'static str },
    /// [`Store::open_to_read`]: a process (a running natsched) holds the store's lock.
    #[error("the store at {path} is in use (a running natsched holds its lock); stop it first")]
    Locked { path: PathBuf },
    #[error("store at {path} has format version {found}; this build reads version {STORE_FORMAT}")]
    Format { path: PathBuf, found: u8 },
    #[error(
        "store at {path} has lost writes: its next segment seq is {found}, but it was at least \
         {expected} when natsched last opened or closed it (truncated, or restored from an \
         older copy?). Refusing to use it; to accept the loss, delete {path}/{}",
        watermark::FILE
    )]
    RolledBack {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("cannot read or write the store's mark {path}: {source}")]
    Watermark {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store I/O failed: {0}")]
    Io(#[from] sled::Error),
    #[error("stored segment {key:?} is unreadable: {source}")]
    Corrupt {
        key: SegmentKey,
        source: DecodeError,
    },
    #[error("stored metadata {key:?} is unreadable (expected 8 bytes, found {len})")]
    CorruptMeta { key: String, len: usize },
    #[error("the store is being reopened after a write failure")]
    Reopening,
    #[error("no room to write in the store's directory {path}: {source}")]
    NoRoom {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Replicated mode: the log did not take a round, so neither does the store, and this
    /// instance stops leading (see `crate::cluster`).
    #[error("the replicated log did not take the change: {0}")]
    Log(String),
}

impl StoreError {
    /// What went wrong, in words safe to tell a client (no paths, no keys): the rest is for
    /// logs and operators.
    pub fn brief(&self) -> String {
        match self {
            StoreError::Io(sled::Error::Io(source))
            | StoreError::NoRoom { source, .. }
            | StoreError::Watermark { source, .. } => format!("I/O error: {}", source.kind()),
            StoreError::Reopening => "the store is being reopened".to_owned(),
            StoreError::Log(_) => {
                "this natsched stopped leading its prefix; the request may or may not have \
                 taken effect (get tells); retry"
                    .to_owned()
            }
            _ => "store error".to_owned(),
        }
    }
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
    /// `None` only while [`Store::reopen`] swaps it (readers then get [`StoreError::Reopening`]).
    db: Arc<std::sync::RwLock<Option<sled::Db>>>,
    options: StoreOptions,
    path: PathBuf,
    damage: Arc<Damage>,
    /// Tests make writes fail with this, as a full or broken disk would.
    #[cfg(test)]
    fail_writes: Arc<std::sync::atomic::AtomicBool>,
    /// Tests make only fsyncs fail with this: a batch applied, then not made durable.
    #[cfg(test)]
    fail_flushes: Arc<std::sync::atomic::AtomicBool>,
    /// Ids natsched generated before store format 3 did not name their segment; such an id
    /// due before this instant is searched for in its bucket (see [`Store::locate`]), among
    /// the segments of seqs below `legacy_seqs_below`.
    legacy_ids_until: UnixMs,
    legacy_seqs_below: u64,
}

/// An encoded segment as stored; read it with [`segment::entries`].
pub struct RawSegment(sled::IVec);

impl AsRef<[u8]> for RawSegment {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Opens sled's database, waiting for its lock. sled releases the lock from background
/// threads shortly after a database is dropped, so a quick restart (or [`Store::reopen`]) can
/// find it still held. Another live process holding it is a real error, reported once the
/// wait is over.
fn open_db(options: &StoreOptions) -> Result<sled::Db, StoreError> {
    let open_err = |source| StoreError::Open {
        path: options.path.clone(),
        source,
    };
    std::fs::create_dir_all(&options.path).map_err(|e| open_err(e.into()))?;
    let config = sled::Config::new()
        .path(&options.path)
        .cache_capacity(options.cache_capacity);
    let started = Instant::now();
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => return Err(open_err(err)),
        }
    }
}

/// fsyncs every file under `dir` (sled's database files).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            sync_dir(&path)?;
        } else {
            std::fs::File::open(&path)?.sync_all()?;
        }
    }
    Ok(())
}

/// A segment found damaged: its original bytes and how many of its schedules were lost
/// (`None` if even its header is unreadable).
#[derive(Debug)]
pub struct Damaged {
    pub key: SegmentKey,
    pub raw: sled::IVec,
    pub lost: Option<u32>,
    error: DecodeError,
}

impl Damaged {
    /// Why it is damaged.
    pub fn error(&self) -> DecodeError {
        self.error.clone()
    }
}

/// Damaged segments found since the store was opened: each logged once.
#[derive(Default)]
struct Damage {
    reported: std::sync::Mutex<std::collections::HashSet<SegmentKey>>,
    found: std::sync::atomic::AtomicU64,
    /// Schedules lost with segments that scans repaired, not yet taken by the writer.
    lost: std::sync::atomic::AtomicU64,
}

impl Damage {
    fn report(&self, key: SegmentKey, salvage: &Salvage) {
        let lost = match salvage.lost {
            Some(lost) => format!("{lost} unreadable"),
            None => "its header is unreadable".to_owned(),
        };
        let what = format!(
            "{} readable schedules kept, {lost} ({}); the original bytes are kept under its \
             quarantine key",
            salvage.schedules.len(),
            salvage.error
        );
        self.note(key, &what);
    }

    fn note(&self, key: SegmentKey, what: &str) {
        let first = self
            .reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key);
        if first {
            self.found
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(?key, "damaged segment in the store: {what}");
        }
    }
}

/// Changes to apply atomically with [`Store::commit`]: a list of key changes, in order (a
/// later change of a key wins). Kept as a list, not as a `sled::Batch`, so that replicated
/// mode can log exactly what a round changed (see `crate::cluster`).
#[derive(Default)]
pub struct WriteBatch {
    changes: Vec<Change>,
}

/// One key change: its new value, or `None` to remove it.
pub(crate) type Change = (Vec<u8>, Option<Vec<u8>>);

impl WriteBatch {
    fn insert(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.changes.push((key.into(), Some(value.into())));
    }

    fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.changes.push((key.into(), None));
    }

    /// The changes, in order.
    pub(crate) fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// A batch of `changes` read from elsewhere (a replicated log).
    pub(crate) fn from_changes(changes: Vec<Change>) -> WriteBatch {
        WriteBatch { changes }
    }

    fn into_sled(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (key, value) in self.changes {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        batch
    }

    /// Writes the segment `key` holding `schedules`, or removes it when there are none.
    pub fn put_segment<'a>(
        &mut self,
        key: SegmentKey,
        schedules: impl IntoIterator<Item = &'a Schedule>,
    ) {
        let mut schedules = schedules.into_iter().peekable();
        if schedules.peek().is_none() {
            self.remove(key.to_bytes());
        } else {
            self.insert(key.to_bytes(), segment::encode(schedules));
        }
    }

    /// Writes the new segment `key` holding `schedules` and indexes their caller-chosen ids.
    pub fn put_new_segment(&mut self, key: SegmentKey, schedules: &[Schedule]) {
        self.put_new_segment_indexing(key, schedules, |_| true);
    }

    /// [`WriteBatch::put_new_segment`], indexing only the caller ids `index` says: a series'
    /// successor keeps the index entry of its series (see [`Store::locate_indexed`]).
    pub fn put_new_segment_indexing(
        &mut self,
        key: SegmentKey,
        schedules: &[Schedule],
        index: impl Fn(&Schedule) -> bool,
    ) {
        self.put_segment(key, schedules);
        for schedule in schedules.iter().filter(|s| s.caller_id && index(s)) {
            self.index_schedule(schedule, key);
        }
    }

    /// Points the id of `schedule` at segment `key`; for a series, with what finds it after
    /// it has moved on (its due and rule).
    pub fn index_schedule(&mut self, schedule: &Schedule, key: SegmentKey) {
        match schedule.recurrence {
            None => self.index(&schedule.id, key),
            Some(_) => {
                let value = series_index::encode(schedule, key);
                self.insert(keys::id_key(&schedule.id), value);
            }
        }
    }

    /// Writes an already encoded segment (see [`segment::without`]), or removes the segment
    /// when `value` is `None`.
    pub fn put_raw_segment(&mut self, key: SegmentKey, value: Option<Vec<u8>>) {
        match value {
            Some(value) => self.insert(key.to_bytes(), value),
            None => self.remove(key.to_bytes()),
        }
    }

    /// Keeps the original bytes of the damaged segment `key` aside (see
    /// [`keys::quarantine_key`]); the caller rewrites the segment with what is readable.
    pub fn quarantine(&mut self, key: SegmentKey, raw: &[u8]) {
        self.insert(keys::quarantine_key(key), raw);
    }

    /// Points the caller-chosen `id` at the segment holding it.
    pub fn index(&mut self, id: &str, key: SegmentKey) {
        self.insert(keys::id_key(id), key.to_bytes());
    }

    /// Removes the index entry of `id`.
    pub fn unindex(&mut self, id: &str) {
        self.remove(keys::id_key(id));
    }

    /// Records the latest wall-clock reading of the store writer (see `Store::locate_series`).
    pub fn set_clock_mark(&mut self, now: UnixMs) {
        self.insert(keys::CLOCK_MARK_KEY, now.to_be_bytes());
    }

    /// Records the next free segment sequence number.
    pub fn set_next_seq(&mut self, seq: u64) {
        self.insert(keys::NEXT_SEQ_KEY, seq.to_be_bytes());
    }

    /// Records how many schedules are pending, so that counting them never needs a scan.
    pub fn set_pending(&mut self, pending: u64) {
        self.insert(keys::PENDING_KEY, pending.to_be_bytes());
    }

    /// Records the sequence of the last replicated log entry this batch applies.
    pub(crate) fn set_log_applied(&mut self, seq: u64) {
        self.insert(keys::LOG_APPLIED_KEY, seq.to_be_bytes());
    }

    /// Records the JetStream intake's mark (see `committer/intake_mark.rs`).
    pub fn set_intake_mark(&mut self, record: &[u8]) {
        self.insert(keys::INTAKE_MARK_KEY, record);
    }

    /// Records how many schedules are pending per quota, by quota pattern.
    pub fn set_quota_counts<'a>(&mut self, counts: impl IntoIterator<Item = (&'a str, u64)>) {
        let counts: Vec<(&str, u64)> = counts.into_iter().collect();
        let json = serde_json::to_vec(&counts).unwrap_or_default();
        self.insert(keys::QUOTAS_KEY, json);
    }

    /// Asks the next start to count the pending schedules again: damage lost some whose
    /// number (an unreadable segment header) or quotas are unknown.
    pub fn request_recount(&mut self) {
        self.insert(keys::RECOUNT_KEY, [1]);
    }

    /// The counts are exact again.
    pub fn clear_recount(&mut self) {
        self.remove(keys::RECOUNT_KEY);
    }

    /// Forgets the counts per quota (no quotas are configured: once some are again, they are
    /// counted afresh rather than trusted from before).
    pub fn clear_quota_counts(&mut self) {
        self.remove(keys::QUOTAS_KEY);
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

impl Store {
    /// Opens (or creates) the database and checks its format version.
    pub fn open(options: &StoreOptions) -> Result<Store, StoreError> {
        let mut store = Store::over(open_db(options)?, options);
        // Checked before anything is written, so a refused store is left as it was.
        store.check_rollback()?;
        store.check_format(&options.path)?;
        store.mark()?;
        Ok(store)
    }

    /// Opens an existing store only to read it (`natsched export`). Nothing is created, and
    /// natsched writes nothing: no format mark or upgrade (stores of formats 2, 3 and 5 are
    /// read as they are), no watermark, no instance id, and sled's flush thread (which also
    /// cleans its log) is not started. Refused: a path without a store
    /// ([`StoreError::Missing`]), a store whose lock another process holds
    /// ([`StoreError::Locked`], at once), a format this build does not read
    /// ([`StoreError::Format`]). The watermark is not checked here (see
    /// [`Store::check_rollback`]): what the store holds can be read even if it lost writes.
    ///
    /// sled itself may write when it opens a database, as at any open: after recovering its
    /// log it may write a newer snapshot file (and drop a torn write at the log's end, or a
    /// blob file no page refers to). The keys and values it holds stay as they were.
    pub fn open_to_read(options: &StoreOptions) -> Result<Store, StoreError> {
        let path = &options.path;
        let missing = |reason| StoreError::Missing {
            path: path.clone(),
            reason,
        };
        if !path.is_dir() {
            return Err(missing(match path.exists() {
                true => "not a directory",
                false => "the directory does not exist",
            }));
        }
        // What sled creates first; without them it would make a new database here.
        if !path.join("db").is_file() || !path.join("conf").is_file() {
            return Err(missing("the directory holds no database"));
        }
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(options.cache_capacity)
            .flush_every_ms(None);
        let db = config.open().map_err(|source| match source {
            sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
                StoreError::Locked { path: path.clone() }
            }
            source => StoreError::Open {
                path: path.clone(),
                source,
            },
        })?;
        match db.get(keys::FORMAT_KEY)?.as_deref() {
            Some([2 | 3 | 5 | STORE_FORMAT]) => {}
            Some(other) => {
                return Err(StoreError::Format {
                    path: path.clone(),
                    found: other.first().copied().unwrap_or(0),
                });
            }
            None => return Err(missing("the database has no natsched format mark")),
        }
        Ok(Store::over(db, options))
    }

    /// A handle over the opened database `db`, before anything of natsched's is read.
    fn over(db: sled::Db, options: &StoreOptions) -> Store {
        Store {
            db: Arc::new(std::sync::RwLock::new(Some(db))),
            options: options.clone(),
            path: options.path.clone(),
            damage: Arc::default(),
            #[cfg(test)]
            fail_writes: Arc::default(),
            #[cfg(test)]
            fail_flushes: Arc::default(),
            legacy_ids_until: 0,
            legacy_seqs_below: 0,
        }
    }

    /// Refuses a store that has fewer writes than the watermark says it had.
    pub fn check_rollback(&self) -> Result<(), StoreError> {
        if let Some(expected) = watermark::read(&self.path)? {
            let found = self.next_seq()?;
            if found < expected || self.db()?.get(keys::FORMAT_KEY)?.is_none() {
                return Err(StoreError::RolledBack {
                    path: self.path.clone(),
                    found,
                    expected,
                });
            }
        }
        Ok(())
    }

    /// Makes what sled recovered durable, then records how far the store got. (What sled
    /// recovered may sit only in the page cache, after a process killed before its fsync: a
    /// power loss after the mark would make the next start refuse a store that lost nothing
    /// acknowledged.)
    fn mark(&self) -> Result<(), StoreError> {
        sync_dir(&self.path).map_err(|source| StoreError::Watermark {
            path: self.path.clone(),
            source,
        })?;
        watermark::write(&self.path, self.next_seq()?)
    }

    /// Closes the database and opens it again, for every clone of this handle: how the
    /// writer recovers from a failed write. sled 0.34 refuses every write after one of its
    /// log writes failed (a full disk, an I/O error) until the database is opened again, and
    /// what it had taken in memory but not written is then gone, as after a crash. The
    /// watermark check applies as at start. Readers meanwhile get [`StoreError::Reopening`].
    pub fn reopen(&self) -> Result<(), StoreError> {
        // Dropped before opening again: it holds the database's lock. The handle's lock is
        // not held while sled's is waited for, so readers get `Reopening` meanwhile instead
        // of waiting; should the open fail, they keep getting it until a reopen succeeds.
        let old = self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        drop(old);
        let db = open_db(&self.options)?;
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(db);
        self.check_rollback()?;
        self.mark()
    }

    /// Whether the store's directory takes writes again: writes [`PROBE_BYTES`] to a file
    /// beside the database, fsyncs and removes it. Cheaper than reopening the database to
    /// find out, and it leaves readers their database while the disk is still full.
    pub fn probe_room(&self) -> Result<(), StoreError> {
        use std::io::Write as _;
        self.injected_failure()?;
        let path = self.path.join(PROBE_FILE);
        let no_room = |source| StoreError::NoRoom {
            path: self.path.clone(),
            source,
        };
        let written = std::fs::File::create(&path).and_then(|mut file| {
            file.write_all(&vec![0; PROBE_BYTES])?;
            file.sync_all()
        });
        let removed = std::fs::remove_file(&path);
        written.map_err(no_room)?;
        removed.map_err(no_room)
    }

    /// The open database (a cheap handle).
    fn db(&self) -> Result<sled::Db, StoreError> {
        self.db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(StoreError::Reopening)
    }

    /// Makes everything durable and records how far the store has got (see
    /// `watermark.rs`): the last thing the writer does before natsched exits.
    pub fn close(&self) -> Result<(), StoreError> {
        self.flush()?;
        watermark::write(&self.path, self.next_seq()?)
    }

    fn check_format(&mut self, path: &Path) -> Result<(), StoreError> {
        match self.db()?.get(keys::FORMAT_KEY)?.as_deref() {
            Some([STORE_FORMAT]) => {}
            Some([from @ (3 | 5)]) => {
                self.db()?.insert(keys::FORMAT_KEY, &[STORE_FORMAT])?;
                self.db()?.flush()?;
                tracing::info!("store marked format {STORE_FORMAT} (was {from}; thin records)");
            }
            Some([2]) => self.upgrade_from_2()?,
            Some(other) => {
                return Err(StoreError::Format {
                    path: path.to_owned(),
                    found: other.first().copied().unwrap_or(0),
                });
            }
            None => {
                self.db()?.insert(keys::FORMAT_KEY, &[STORE_FORMAT])?;
                self.db()?.flush()?;
            }
        }
        self.legacy_ids_until = self.meta_u64(keys::LEGACY_IDS_KEY)?.unwrap_or(0);
        self.legacy_seqs_below = self.meta_u64(keys::LEGACY_SEQS_KEY)?.unwrap_or(0);
        Ok(())
    }

    /// Store format 2 to 3, in one atomic batch. Format 2 generated random ids for fine
    /// segments (found by searching their bucket): that search stays on for ids due up to the
    /// end of the last bucket holding a segment now. Format 2 accepted caller ids shaped like
    /// the ids format 3 generates: the seqs they name are never handed out.
    fn upgrade_from_2(&self) -> Result<(), StoreError> {
        let mut legacy_until = 0;
        for tier in [Tier::Far, Tier::Fine] {
            let from = SegmentKey::first_of(tier).to_bytes();
            let last = self.db()?.range(from..).next_back().transpose()?;
            if let Some(key) = last.and_then(|(key, _)| SegmentKey::from_bytes(&key))
                && key.tier == tier
            {
                let width = if tier == Tier::Far {
                    FAR_BUCKET_MS
                } else {
                    BUCKET_MS
                };
                legacy_until = legacy_until.max(key.bucket.saturating_add(width));
            }
        }
        let mut next_seq = self.next_seq()?;
        for item in self.db()?.scan_prefix(keys::ID_KEYS) {
            let (key, _) = item?;
            let id = std::str::from_utf8(&key[1..]).unwrap_or_default();
            if let Some((_, seq, _)) = protocol::far_parts(id) {
                next_seq = next_seq.max(seq.saturating_add(1));
            }
        }
        let mut batch = sled::Batch::default();
        batch.insert(keys::LEGACY_IDS_KEY, &legacy_until.to_be_bytes());
        batch.insert(keys::NEXT_SEQ_KEY, &next_seq.to_be_bytes());
        batch.insert(keys::LEGACY_SEQS_KEY, &next_seq.to_be_bytes());
        batch.insert(keys::FORMAT_KEY, &[STORE_FORMAT]);
        self.db()?.apply_batch(batch)?;
        self.db()?.flush()?;
        tracing::info!(
            legacy_until,
            "store upgraded from format 2 to {STORE_FORMAT}"
        );
        Ok(())
    }

    /// The next free segment sequence number (kept up to date by the writer's batches).
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(self.meta_u64(keys::NEXT_SEQ_KEY)?.unwrap_or(1))
    }

    /// This store's id, made (and made durable) at the first call: a random ULID. The lease
    /// of `crate::cluster` uses it to recognise its own earlier holder after a crash.
    pub fn instance_id(&self) -> Result<String, StoreError> {
        let db = self.db()?;
        if let Some(id) = db.get(keys::INSTANCE_KEY)? {
            return Ok(String::from_utf8_lossy(&id).into_owned());
        }
        let id = ulid::Ulid::generate().to_string();
        db.insert(keys::INSTANCE_KEY, id.as_bytes())?;
        db.flush()?;
        Ok(id)
    }

    /// Every key and value, in key order.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let db = self.db().unwrap();
        db.iter()
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    }

    /// Replicated keys (see `keys::is_local`) after `after`, in key order, until about
    /// `max_bytes` of keys and values are read; `None` once there are none.
    pub(crate) fn replicated_after(
        &self,
        after: &[u8],
        max_bytes: usize,
    ) -> Result<Option<Vec<Change>>, StoreError> {
        use std::ops::Bound;
        let db = self.db()?;
        let mut out = Vec::new();
        let mut bytes = 0;
        let range = db.range::<&[u8], _>((Bound::Excluded(after), Bound::Unbounded));
        for item in range {
            let (key, value) = item?;
            if keys::is_local(&key) {
                continue;
            }
            bytes += key.len() + value.len();
            out.push((key.to_vec(), Some(value.to_vec())));
            if bytes >= max_bytes {
                break;
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }

    /// Removes every replicated key and records `applied` as the last log entry applied: a
    /// follower that fell behind a compaction of the log starts over from its first entry.
    pub(crate) fn clear_replicated(&self, applied: u64) -> Result<(), StoreError> {
        let db = self.db()?;
        let mut batch = WriteBatch::default();
        for key in db.iter().keys() {
            let key = key?;
            if !keys::is_local(&key) {
                batch.remove(key.to_vec());
            }
        }
        batch.set_log_applied(applied);
        self.commit(batch)?;
        self.flush()?;
        // The store is behind its mark now, on purpose: mark where it is, so that a crash
        // before the log refills it does not make the next start refuse it as rolled back.
        watermark::write(&self.path, self.next_seq()?)
    }

    /// Which log this store follows, if it follows one.
    pub(crate) fn log_id(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db()?.get(keys::LOG_ID_KEY)?.map(|v| v.to_vec()))
    }

    /// Records (durably) that this store follows the log `id`.
    pub(crate) fn set_log_id(&self, id: &[u8]) -> Result<(), StoreError> {
        let db = self.db()?;
        db.insert(keys::LOG_ID_KEY, id)?;
        db.flush()?;
        Ok(())
    }

    /// The sequence of the last replicated log entry applied to this store (0: none).
    pub(crate) fn log_applied(&self) -> Result<u64, StoreError> {
        Ok(self.meta_u64(keys::LOG_APPLIED_KEY)?.unwrap_or(0))
    }

    /// How many schedules are pending, as last recorded by [`WriteBatch::set_pending`].
    pub fn pending(&self) -> Result<u64, StoreError> {
        Ok(self.meta_u64(keys::PENDING_KEY)?.unwrap_or(0))
    }

    /// The JetStream intake's mark as last recorded, if any.
    pub fn intake_mark(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db()?.get(keys::INTAKE_MARK_KEY)?.map(|v| v.to_vec()))
    }

    /// The pending counts per quota pattern as last recorded; `None` if there are none, or if
    /// the record is unreadable (they can always be counted again: [`Store::for_each_pending`]).
    pub fn quota_counts(&self) -> Result<Option<Vec<(String, u64)>>, StoreError> {
        let Some(value) = self.db()?.get(keys::QUOTAS_KEY)? else {
            return Ok(None);
        };
        let counts = serde_json::from_slice(&value);
        if counts.is_err() {
            tracing::warn!("the stored counts per quota are unreadable; counting again");
        }
        Ok(counts.ok())
    }

    /// Whether the pending counts must be counted again ([`WriteBatch::request_recount`]).
    pub fn recount_requested(&self) -> Result<bool, StoreError> {
        Ok(self.db()?.contains_key(keys::RECOUNT_KEY)?)
    }

    /// Shows `visit` every pending schedule: reads every segment, so it is for counting when
    /// no count can be trusted (quotas newly configured, damage). Damaged segments met are
    /// repaired as the writer's scans repair them (only the writer calls this), and their
    /// losses are not taken off the pending count later: a count made from this is absolute.
    pub fn for_each_pending(&self, mut visit: impl FnMut(&Schedule)) -> Result<(), StoreError> {
        let db = self.db()?;
        for tier in [Tier::Far, Tier::Fine] {
            let from = SegmentKey::first_of(tier);
            let to = SegmentKey {
                bucket: UnixMs::MAX,
                seq: u64::MAX,
                ..from
            };
            for item in db.range(from.to_bytes()..=to.to_bytes()) {
                let (key, value) = item?;
                let schedules = match self.decode_segment(&value)? {
                    Ok(schedules) => schedules,
                    Err(salvage) => {
                        if let Some(key) = SegmentKey::from_bytes(&key) {
                            self.damage.report(key, &salvage);
                            self.repair(key, &value, &salvage)?;
                        }
                        salvage.schedules
                    }
                };
                schedules.iter().for_each(&mut visit);
            }
        }
        self.take_lost();
        Ok(())
    }

    /// A metadata number; a damaged one is an error, never a default (a next seq read as 1
    /// would overwrite segments).
    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        let Some(value) = self.db()?.get(key)? else {
            return Ok(None);
        };
        let bytes: [u8; 8] = value
            .as_ref()
            .try_into()
            .map_err(|_| StoreError::CorruptMeta {
                key: String::from_utf8_lossy(key).into_owned(),
                len: value.len(),
            })?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }

    /// Applies `batch` atomically (not yet durable: see [`Store::flush`]).
    pub fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.injected_failure()?;
        if !batch.is_empty() {
            self.db()?.apply_batch(batch.into_sled())?;
        }
        Ok(())
    }

    /// Makes every committed change durable (fsync).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.injected_failure()?;
        #[cfg(test)]
        if self.fail_flushes.load(std::sync::atomic::Ordering::Relaxed) {
            let error = std::io::Error::other("injected fsync failure");
            return Err(StoreError::Io(sled::Error::Io(error)));
        }
        self.db()?.flush()?;
        Ok(())
    }

    /// Makes every write fail (or work again), as a full or broken disk would.
    #[cfg(test)]
    pub(crate) fn fail_writes(&self, fail: bool) {
        self.fail_writes
            .store(fail, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes fsyncs fail (or not), leaving batches applied.
    #[cfg(test)]
    pub(crate) fn fail_flushes(&self, fail: bool) {
        self.fail_flushes
            .store(fail, std::sync::atomic::Ordering::Relaxed);
    }

    #[cfg(test)]
    fn injected_failure(&self) -> Result<(), StoreError> {
        if self.fail_writes.load(std::sync::atomic::Ordering::Relaxed) {
            let error = std::io::Error::other("injected write failure");
            return Err(StoreError::Io(sled::Error::Io(error)));
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn injected_failure(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The segment holding the pending schedule `id`, if any: at most three lookups.
    ///
    /// A caller-chosen id is looked up in the index. An id natsched generated names its due
    /// instant and its segment's seq ([`protocol::far_parts`]); the segment is the far or the
    /// fine segment of that seq in the due's bucket (a far segment's schedules move to fine
    /// segments of the same seq). Any other id is unknown without reading further, however
    /// many schedules share its bucket, so a made-up id costs no more than a real one. (Ids
    /// generated by store format 2 are the exception: random ULIDs, searched for in their
    /// bucket while any may still be pending.)
    pub fn locate(&self, id: &str) -> Result<Option<SegmentKey>, StoreError> {
        if let Some(value) = self.db()?.get(keys::id_key(id))? {
            return self.indexed_at(id, &value);
        }
        if let Some((due, seq, _)) = protocol::far_parts(id) {
            for key in [
                SegmentKey::far(far_bucket_of(due), seq),
                SegmentKey::fine(bucket_of(due), seq),
            ] {
                if let Some(value) = self.db()?.get(key.to_bytes())?
                    && segment::finds_generated_id(&value, id)
                {
                    return Ok(Some(key));
                }
            }
        }
        match protocol::due_of_generated_id(id) {
            Some(due) if due < self.legacy_ids_until => self.search_bucket(id, due),
            _ => Ok(None),
        }
    }

    /// The segment the caller-chosen id `id` is indexed to, if it is pending: one lookup (a
    /// pending caller id is always indexed), or for a series a few (see
    /// [`Store::locate_series`]).
    pub fn locate_indexed(&self, id: &str) -> Result<Option<SegmentKey>, StoreError> {
        match self.db()?.get(keys::id_key(id))? {
            Some(value) => self.indexed_at(id, &value),
            None => Ok(None),
        }
    }

    /// Where the index entry `value` of `id` says it is.
    fn indexed_at(&self, id: &str, value: &[u8]) -> Result<Option<SegmentKey>, StoreError> {
        let Some(key) = value
            .get(..INDEXED_KEY_LEN)
            .and_then(SegmentKey::from_bytes)
        else {
            return Ok(None);
        };
        match value.get(INDEXED_KEY_LEN..) {
            Some([]) | None => Ok(Some(key)),
            Some(series) => self.locate_series(id, key, series),
        }
    }

    /// Finds a series. Its index entry is written when it is scheduled (or replaced, or its
    /// far segment migrated), not each time it fires: the store writer moves it to its next
    /// occurrence without touching the index, which at 100 000 fires a second is most of
    /// what firing a series would cost. The entry keeps where it was stored then, its due
    /// there and its rule, which is enough to find it:
    ///
    /// * where it was indexed, if it has not fired since;
    /// * otherwise it is due by now and waits to fire (or is firing): somewhere between
    ///   where it was indexed and now, a range that only ever holds what is overdue;
    /// * otherwise at its first occurrence after now (where the writer puts a series that
    ///   fired: after the occurrence it published, which was at most now), or one of the
    ///   few after that. "Now" is never before the latest clock reading the writer recorded
    ///   (`mclock`, kept with every round), so a wall clock stepped back, or a new leader's
    ///   clock behind the old one's, does not hide a series.
    fn locate_series(
        &self,
        id: &str,
        indexed: SegmentKey,
        rest: &[u8],
    ) -> Result<Option<SegmentKey>, StoreError> {
        if let Some(raw) = self.raw_segment(indexed)?
            && segment::holds_id(raw.as_ref(), id)
        {
            return Ok(Some(indexed));
        }
        let Some((due, series, _)) = series_index::decode(id, rest) else {
            return Ok(None);
        };
        // Where a series waits only ever moves later: overdue positions first, oldest first,
        // then its next occurrences, so a move during the search is not missed twice.
        let now = time::now_ms().max(self.meta_u64(keys::CLOCK_MARK_KEY)?.unwrap_or(0));
        let (fine_end, far_end) = (
            bucket_of(now) + BUCKET_MS,
            far_bucket_of(now) + FAR_BUCKET_MS,
        );
        let overdue = [
            (
                SegmentKey::far(far_bucket_of(due), 0),
                SegmentKey::far(far_end, 0),
            ),
            (
                SegmentKey::start_of(bucket_of(due)),
                SegmentKey::start_of(fine_end),
            ),
        ];
        if let Some(found) = self.search_ranges(id, overdue)? {
            return Ok(Some(found));
        }
        let mut at = now;
        for _ in 0..SERIES_FORWARD_PROBES {
            let Some(next) = series.rule().next_after(due, at) else {
                break;
            };
            let (fine, far) = (bucket_of(next), far_bucket_of(next));
            // Far first: a far segment's schedules move to fine ones of the same due.
            let ranges = [
                (
                    SegmentKey::far(far, 0),
                    SegmentKey::far(far + FAR_BUCKET_MS, 0),
                ),
                (
                    SegmentKey::start_of(fine),
                    SegmentKey::start_of(fine + BUCKET_MS),
                ),
            ];
            if let Some(found) = self.search_ranges(id, ranges)? {
                return Ok(Some(found));
            }
            at = next;
        }
        Ok(None)
    }

    /// The first segment in the key ranges `ranges` holding `id`.
    fn search_ranges(
        &self,
        id: &str,
        ranges: [(SegmentKey, SegmentKey); 2],
    ) -> Result<Option<SegmentKey>, StoreError> {
        for (from, to) in ranges {
            if from >= to {
                continue;
            }
            for item in self.db()?.range(from.to_bytes()..to.to_bytes()) {
                let (key, value) = item?;
                if let Some(key) = SegmentKey::from_bytes(&key)
                    && segment::holds_id(&value, id)
                {
                    return Ok(Some(key));
                }
            }
        }
        Ok(None)
    }

    /// Searches the fine bucket of `due` for the generated id `id` (store format 2's ids),
    /// among the segments written before the upgrade only.
    fn search_bucket(&self, id: &str, due: UnixMs) -> Result<Option<SegmentKey>, StoreError> {
        let bucket = bucket_of(due);
        let from = SegmentKey::start_of(bucket).to_bytes();
        let to = SegmentKey::start_of(bucket + BUCKET_MS)
            .min(SegmentKey::fine(bucket, self.legacy_seqs_below))
            .to_bytes();
        if from >= to {
            return Ok(None);
        }
        for item in self.db()?.range(from..to) {
            let (key, value) = item?;
            let Some(key) = SegmentKey::from_bytes(&key) else {
                continue; // not a segment key: not ours to read
            };
            if segment::finds_generated_id(&value, id) {
                return Ok(Some(key));
            }
        }
        Ok(None)
    }

    /// The schedules of segment `key` (empty if it does not exist): the readable ones, if it
    /// is damaged (see [`Store::read_segment`]).
    pub fn segment(&self, key: SegmentKey) -> Result<Vec<Schedule>, StoreError> {
        Ok(self.read_segment(key)?.0)
    }

    /// The schedules of segment `key`, and if it is damaged, its original bytes and what was
    /// lost. Damage is logged once per segment and counted; only the writer repairs it
    /// ([`WriteBatch::quarantine`]).
    pub fn read_segment(
        &self,
        key: SegmentKey,
    ) -> Result<(Vec<Schedule>, Option<Damaged>), StoreError> {
        let Some(value) = self.db()?.get(key.to_bytes())? else {
            return Ok((Vec::new(), None));
        };
        match self.decode_segment(&value)? {
            Ok(schedules) => Ok((schedules, None)),
            Err(salvage) => {
                self.damage.report(key, &salvage);
                let damaged = Damaged {
                    key,
                    raw: value,
                    lost: salvage.lost,
                    error: salvage.error,
                };
                Ok((salvage.schedules, Some(damaged)))
            }
        }
    }

    /// Notes that segment `key` was found damaged by a reader that only reads (list): logged
    /// once per segment, counted once.
    pub fn report_damage(&self, key: SegmentKey, what: &str) {
        self.damage.note(key, what);
    }

    /// How many damaged segments were found since the store was opened.
    pub fn damaged_total(&self) -> u64 {
        self.damage.found.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Schedules lost with damaged segments that [`Store::scan`] repaired since the last call:
    /// the writer takes them off its pending count.
    pub fn take_lost(&self) -> u64 {
        self.damage
            .lost
            .swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// The encoded segment `key`, if it exists.
    pub fn raw_segment(
        &self,
        key: SegmentKey,
    ) -> Result<Option<impl AsRef<[u8]> + use<>>, StoreError> {
        Ok(self.db()?.get(key.to_bytes())?)
    }

    /// Whether the caller-chosen id `id` is indexed (pending).
    pub fn is_indexed(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.db()?.contains_key(keys::id_key(id))?)
    }

    /// The pending schedule `id`, if any.
    pub fn get(&self, id: &str) -> Result<Option<Schedule>, StoreError> {
        // The writer may move the schedule between finding and reading its segment (a
        // replace, or a far segment migrating): then it is found again where it went.
        let mut located = self.locate(id)?;
        for _ in 0..GET_ATTEMPTS {
            let Some(key) = located else {
                // A series can move on while it is searched for (see `locate_series`):
                // an index entry without a schedule is looked for again.
                if self.is_indexed(id)? {
                    located = self.locate(id)?;
                    continue;
                }
                return Ok(None);
            };
            let damage = match self.read_one(key, id)? {
                Ok(Some(schedule)) => return Ok(Some(schedule)),
                Ok(None) => None,
                Err(damage) => Some(damage),
            };
            let again = self.locate(id)?;
            if again == located {
                // Where it should be, the segment is damaged: say so rather than "unknown".
                // (A series' body that went missing while it was read would have moved it:
                // its index entry goes with the body.)
                return match damage {
                    Some(source) => {
                        self.damage
                            .note(key, &format!("get found it unreadable: {source}"));
                        Err(StoreError::Corrupt { key, source })
                    }
                    None => Ok(None),
                };
            }
            located = again;
        }
        Ok(None)
    }

    /// The schedule `id` in segment `key`, decoding nothing else: `Ok(None)` if it is not
    /// there, an error if it is unreadable, or not found in a damaged segment.
    fn read_one(
        &self,
        key: SegmentKey,
        id: &str,
    ) -> Result<Result<Option<Schedule>, DecodeError>, StoreError> {
        let Some(raw) = self.raw_segment(key)? else {
            return Ok(Ok(None));
        };
        let (entries, damage) = segment::entries_salvaging(raw.as_ref());
        let Some(entry) = entries.into_iter().find(|entry| entry.id() == id) else {
            return Ok(damage.map_or(Ok(None), Err));
        };
        // No body: the series has moved on, ended or been replaced since (see `get`).
        Ok(self.read_entry(&entry, key)?.transpose())
    }

    /// Decodes `entry` of segment `key` for a reader that is not the store writer: `None`
    /// for a thin record whose series ended, was cancelled or was replaced since the segment
    /// was read (see [`Store::series_body_for`]).
    pub(crate) fn read_entry(
        &self,
        entry: &segment::Entry<'_>,
        key: SegmentKey,
    ) -> Result<Option<Result<Schedule, DecodeError>>, StoreError> {
        if !entry.is_thin() {
            return Ok(Some(entry.decode(&segment::NoBodies)));
        }
        let body = self.series_body_for(entry.id(), key)?;
        Ok(body.map(|body| entry.decode_thin(body)))
    }

    /// Decodes a segment as the store writer reads it: thin records with their bodies from
    /// the index, damage salvaged (see [`segment::decode_salvaging`]). A failed read of a body
    /// is an error here, never taken for damage.
    fn decode_segment(&self, value: &[u8]) -> Result<Result<Vec<Schedule>, Salvage>, StoreError> {
        let bodies = self.bodies();
        let decoded = segment::decode_salvaging(value, &bodies);
        bodies.check()?;
        Ok(decoded)
    }

    /// Whole segments of `from`'s tier with keys in `from..` and buckets starting before
    /// `bucket_before`, in key order, until they hold at least `max_schedules` schedules. The
    /// bucket of the last segment is completed (up to twice `max_schedules`), so that callers
    /// can order what they get by due time without a later scan bringing something earlier.
    /// Costs what it returns plus one seek.
    pub fn scan(
        &self,
        from: SegmentKey,
        bucket_before: UnixMs,
        max_schedules: usize,
    ) -> Result<Vec<(SegmentKey, Vec<Schedule>)>, StoreError> {
        let mut out: Vec<(SegmentKey, Vec<Schedule>)> = Vec::new();
        let mut total = 0;
        let end = SegmentKey {
            bucket: bucket_before,
            seq: 0,
            ..from
        };
        if from >= end || max_schedules == 0 {
            return Ok(out);
        }
        for item in self.db()?.range(from.to_bytes()..end.to_bytes()) {
            let (key, value) = item?;
            let Some(key) = SegmentKey::from_bytes(&key) else {
                tracing::error!(key = ?key, "skipping a key that is not a segment key");
                continue;
            };
            if total >= max_schedules {
                let same_bucket = out
                    .last()
                    .is_some_and(|(last, _)| last.bucket == key.bucket);
                if !same_bucket || total >= 2 * max_schedules {
                    break;
                }
            }
            let schedules = match self.decode_segment(&value)? {
                Ok(schedules) => schedules,
                // One damaged value must not stop anything else: its readable schedules stay
                // (rewritten in place, so their ids still find them), the original bytes are
                // kept aside for inspection, and the scan goes on.
                Err(salvage) => {
                    self.damage.report(key, &salvage);
                    // A repair is a write: when the store cannot be written, the readable
                    // schedules load all the same, and a later scan repairs it.
                    if let Err(error) = self.repair(key, &value, &salvage) {
                        tracing::warn!(?key, %error, "cannot repair a damaged segment now");
                    }
                    salvage.schedules
                }
            };
            if schedules.is_empty() {
                continue; // a damaged segment with nothing readable is gone now
            }
            total += schedules.len();
            out.push((key, schedules));
        }
        Ok(out)
    }

    /// Rewrites the damaged segment `key` with only its readable schedules, moves its original
    /// bytes to quarantine and takes the lost ones off the pending count, in one batch. Only
    /// the writer's scans call this (see [`Store::take_lost`]).
    fn repair(&self, key: SegmentKey, raw: &[u8], salvage: &Salvage) -> Result<(), StoreError> {
        let lost = u64::from(salvage.lost.unwrap_or(0));
        let mut batch = WriteBatch::default();
        batch.quarantine(key, raw);
        batch.put_segment(key, &salvage.schedules);
        batch.request_recount();
        if lost > 0 {
            batch.set_pending(self.pending()?.saturating_sub(lost));
        }
        self.commit(batch)?;
        self.damage
            .lost
            .fetch_add(lost, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db()?.size_on_disk()?)
    }
}

#[cfg(test)]
mod tests;
