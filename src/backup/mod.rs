//! `natsched export` and `natsched import`: every pending schedule out of a store as JSON
//! lines, and back in through a running natsched. The backup, the way from one store format
//! to another, and the way between standalone and replicated mode.
//!
//! **Export** ([`export()`]) reads a store without a daemon: [`Store::open_to_read`] refuses a
//! store in use, a path without a store (creating nothing) and a format this build does not
//! read, and natsched writes nothing to it. It walks the store in due order as `list` does
//! (time windows across both segment tiers, a series' message read from its index entry).
//! What it cannot read is reported with its segment key, left out, and counted in the end
//! line; the command then exits 1.
//!
//! **Import** ([`import()`]) reads an export and sends each schedule to `P.add.<subject>` as
//! any client would, with its id as `Sched-Id` (an import is idempotent: a second one
//! replaces each schedule by itself), its due as `Sched-At` (a past one fires at once) and a
//! series' progress as `Sched-Seq`, many requests in flight at once. A malformed line is
//! reported with its number and skipped, a refused schedule with its reason; the command
//! then exits 1.
//!
//! # The file, format version 1
//!
//! UTF-8, one JSON object per line, each ending in `\n`:
//!
//! ```text
//! {"format":"natsched-export","version":1,"exported_at":"2026-11-30T18:00:00.000Z","written_by":"natsched 0.1.0"}
//! {"id":"order-42","subject":"orders.expired","due":"2026-11-30T18:15:00.250Z","headers":[["Trace","abc"],["X","1"],["X","2"]],"payload":"eyJvcmRlciI6NDJ9","delivery":"core","created":"2026-11-30T18:00:00.250Z"}
//! {"id":"daily-report","subject":"reports.daily","due":"2026-12-01T05:00:00.000Z","headers":[],"payload":"","delivery":"core","created":"…","rule":{"cron":"0 6 * * MON-FRI","tz":"Europe/Berlin","next_seq":4,"until":"2027-01-01T00:00:00.000Z","count":100}}
//! {"format":"natsched-export","version":1,"end":true,"schedules":2,"unreadable":0}
//! ```
//!
//! * The first line is the header, the last the end line (with how many schedule lines the
//!   file holds, and how many problems the export reported): a file without its end line was
//!   cut short. An import refuses a file whose first line is not a header of a version it
//!   reads. Files may be concatenated (header, schedules, end, header, …).
//! * One line per pending schedule, in due order. `due` is RFC 3339 in UTC with exactly three
//!   fractional digits: exact, the millisecond being natsched's unit. `headers` are the
//!   schedule's own, as `[name, value]` pairs in the order they are delivered (a repeated name
//!   is a repeated pair); natsched's delivery headers (`Sched-Id`, `Sched-Due`, `Sched-Seq`,
//!   `Nats-Msg-Id`) are not among them. `payload` is base64 (standard alphabet, padded).
//!   `delivery` is `core` or `jetstream`. `created` is informational: an import is accepted
//!   anew.
//! * A series has a `rule`: `cron` and `tz`, or `every_ms`; `until` (inclusive) and `count`
//!   when bounded; `next_seq`, the number of the occurrence due at `due` (`next_seq - 1`
//!   occurrences are past). An import sends them as `Sched-Cron`/`Sched-TZ` or
//!   `Sched-Every`, `Sched-Until`, `Sched-Count` and `Sched-Seq` with `Sched-At` = `due`: the
//!   series goes on with the same numbering and the same bounds, and an overdue one fires
//!   once as the stored series would have (see `Sched-Seq` in [`crate::protocol`]).
//!
//! A later format that an older import could misread gets a new version.
//!
//! [`Store::open_to_read`]: crate::store::Store::open_to_read

mod export;
mod import;
mod line;

pub use export::{ExportArgs, ExportError, Exported, Unreadable, export, export_to};
pub use import::{ImportArgs, ImportError, Imported, Problem, import};
pub use line::LineError;
