//! The device's durable outbox for insights: a crash-safe, prioritised
//! append log in one directory. The agent appends serialised insights, a
//! delivery loop reads [`Outbox::pending`] records (alerts first) and
//! [`Outbox::ack`]s what the cloud accepted; a byte budget bounds the disk used
//! and evicts the least urgent records first, counting every eviction.
//!
//! It is not a queue between processes (one process owns the directory, under
//! an exclusive lock), not a delivery client (retries and backoff are the
//! caller's), and not a serialiser (payloads are opaque bytes). Start reading
//! at [`Outbox`]; [`Config`] lists the knobs and [`Stats`] what is exported.
//!
//! # Guarantees
//!
//! - When [`Outbox::append`] returns `Ok(seq)` the record is written and
//!   `fdatasync`'d: it survives `kill -9` and power loss. Sequence numbers
//!   increase monotonically and are never reused, also across restarts.
//! - When [`Outbox::ack`] returns, the acks are fsync'd too: acknowledged (and
//!   evicted) records never come back.
//! - Delivery is at least once: records stay pending until acked, and
//!   repeated [`Outbox::pending`] calls return the same records.
//!
//! # Group commit
//!
//! Every mutation goes through one writer thread. Callers enqueue requests
//! and block; the writer takes everything queued, assigns sequence numbers,
//! applies the budget, writes all frames with one `write`, calls
//! `fdatasync` once, appends acks and evictions to the ack log (one more
//! `fdatasync` if there are any), then wakes every waiter. Throughput is
//! therefore "records in flight per fsync", so many threads or
//! [`Outbox::append_batch`] both scale. The API is blocking on purpose (no
//! async runtime dependency): an async caller wraps calls in
//! `tokio::task::spawn_blocking`, which costs one pool thread per in-flight
//! call, and a call takes one fsync (milliseconds) anyway. If a write or fsync
//! fails, the outbox stops (every later call returns [`Error::Stopped`])
//! rather than guessing what the kernel kept; reopening recovers from disk.
//!
//! # Budget and overflow
//!
//! [`Config::budget_bytes`] bounds the pending *frame* bytes (payload plus the
//! 32-byte header, i.e. what the records occupy on disk). When an append does
//! not fit, pending records are evicted in order (telemetry before insight
//! before alert, oldest first within a priority) until it fits, but never a
//! record more urgent than the incoming one: if evicting every record of equal
//! or lower priority would not make room, nothing is evicted and the record is
//! refused with [`Error::BudgetFull`]. A record larger than the budget is
//! refused with [`Error::TooLarge`]; a refusal consumes no sequence number.
//! Evictions and refusals are counted per priority in [`Stats`] and recorded
//! durably in the ack log, fsync'd in the same batch as the append that caused
//! them (records first). On open, if the pending bytes exceed the (possibly
//! lowered) budget, records are evicted in the same order until they fit,
//! which also repairs a crash between the two fsyncs.
//!
//! # Memory
//!
//! Payloads stay on disk. The index holds one 16-byte entry per pending
//! record (sequence number, offset, length; the priority is implied by which
//! of three lanes holds it), so a million pending records cost 16 MB, up to
//! 32 MB while a `VecDeque` has just doubled. Acks out of order leave
//! tombstones until they outnumber the live entries and a lane shrinks once
//! it is three-quarters empty, so right after bulk acks the cost per
//! remaining record can briefly be a few times higher. [`Outbox::pending`]
//! reads payloads with positioned reads.
//!
//! # Performance
//!
//! `strata bench insights` measures it (see BENCHMARKS.md). Throughput is
//! records in flight divided by `fdatasync` latency, which on a shared 2-core
//! VM (ext4 on virtio) varied between runs from 0.26 ms (quiet) to 3.5 ms
//! (other builds writing); appends/s of 300-byte records, quiet / busy:
//!
//! | threads x batch | 1 x 1 | 16 x 1 | 64 x 1 | 256 x 1 | 16 x 16 | 64 x 16 | 16 x 64 | 1 x 1000 |
//! |-----------------|-------|--------|--------|---------|---------|---------|---------|----------|
//! | quiet disk      | 3.8k  | 24k    | 66k    | 116k    | 226k    | 288k    | 589k    | 252k     |
//! | busy disk       | 0.3k  | 9k     | 23k    | 90k     | 108k    | 398k    | 276k    | 231k     |
//!

//! # On-disk format
//!
//! ```text
//! <dir>/LOCK                     exclusive lock (flock), holds the owner's pid
//! <dir>/seg-<first_seq:020>.log  segments: record frames in ascending seq order
//! <dir>/acks.log                 ack log: ack, evict, refuse and totals frames
//! <dir>/quarantine/<file>-<offset:010>-<crc:08x>.bin   damaged byte ranges
//! ```
//!
//! Both kinds of file are sequences of frames with a 32-byte little-endian
//! header:
//!
//! ```text
//! offset size field
//!      0    4 magic        FB 4F 42 58 ("\xFBOBX"; 0xFB never occurs in UTF-8)
//!      4    4 crc32        CRC-32 (IEEE) of bytes 8..32+payload_len
//!      8    4 payload_len  u32, at most 16 MiB
//!     12    1 kind         1 record, 2 ack, 3 evict, 4 refuse, 5 totals,
//!                             6 removed
//!     13    1 priority     0 alert, 1 insight, 2 telemetry
//!     14    2 reserved     zero
//!     16    8 seq          u64 (record: its sequence number; totals: next seq)
//!     24    8 time_ms      u64 (record: append time, unix ms; otherwise 0)
//!     32    n payload
//! ```
//!
//! Record payloads are the caller's bytes. Ack, evict and removed payloads
//! are `(first_seq u64, count u64)` ranges of records that are gone; ack and
//! evict frames also add their counts to the acked and evicted (for the
//! frame's priority) counters, removed frames do not. A refuse payload is a
//! `u64` count. A totals payload is 7 `u64` counters (acked, evicted per
//! priority, refused per priority) that replace the running counters. A
//! compacted ack log is one totals frame followed by removed frames.
//!
//! A segment is rolled once it reaches [`Config::segment_bytes`] and deleted
//! once none of its records is pending (the newest segment is kept, so the
//! sequence survives even when everything is acked). The ack log is rewritten
//! (atomically: temporary file, fsync, rename, fsync directory) as a totals
//! frame plus the acked ranges that still fall inside live segments once it
//! outgrows [`Config::ack_log_compact_bytes`] and twice its last compacted
//! size, so it stays proportional to the pending records.
//!
//! # Recovery
//!
//! [`Outbox::open`] verifies every frame. Damage at the end of the newest
//! segment or the ack log (a write torn by a crash) is truncated and counted in
//! [`Stats::torn_tail_bytes`]. Damage anywhere else (bad checksum, impossible
//! length, sequence numbers out of order) is copied to `quarantine/`, counted
//! in [`Stats::quarantined_frames`] (one per damaged byte range) and
//! [`Stats::quarantined_bytes`], and recovery resumes at the next valid frame
//! (the next magic whose frame checks out), so the records after the damage
//! survive; then the file is rewritten without the damage. Recovery is
//! idempotent: a crash halfway through it repeats the same steps under the
//! same quarantine file names. Lost ack-log entries mean redelivery, never
//! loss.
//!
//! The crate uses positioned I/O and `flock` and so supports Unix only.

mod acklog;
mod error;
mod frame;
mod index;
mod recover;
mod store;
mod writer;

use std::ops::{Index, IndexMut};
use std::path::PathBuf;

pub use error::{Error, Result};
pub use frame::{FRAME_HEADER_BYTES, MAX_PAYLOAD_BYTES};
pub use store::Outbox;

/// How urgent a record is. Delivery order is `Alert`, `Insight`, `Telemetry`;
/// eviction order is the reverse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Must reach the cloud: evicted last, delivered first.
    Alert = 0,
    /// The normal case.
    Insight = 1,
    /// Nice to have: evicted first, delivered last.
    Telemetry = 2,
}

impl Priority {
    /// All priorities in delivery order, most urgent first.
    pub const ALL: [Priority; 3] = [Priority::Alert, Priority::Insight, Priority::Telemetry];

    /// The lower-case name, e.g. for a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Alert => "alert",
            Priority::Insight => "insight",
            Priority::Telemetry => "telemetry",
        }
    }

    pub(crate) fn from_u8(byte: u8) -> Option<Priority> {
        Priority::ALL.get(usize::from(byte)).copied()
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One value per priority, indexable by [`Priority`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerPriority<T> {
    /// The value for [`Priority::Alert`].
    pub alert: T,
    /// The value for [`Priority::Insight`].
    pub insight: T,
    /// The value for [`Priority::Telemetry`].
    pub telemetry: T,
}

impl<T> PerPriority<T> {
    /// `(priority, value)` pairs, most urgent first.
    pub fn iter(&self) -> impl Iterator<Item = (Priority, &T)> {
        Priority::ALL.into_iter().map(move |p| (p, &self[p]))
    }
}

impl PerPriority<u64> {
    /// The sum over all priorities.
    pub fn total(&self) -> u64 {
        self.alert + self.insight + self.telemetry
    }
}

impl<T> Index<Priority> for PerPriority<T> {
    type Output = T;
    fn index(&self, priority: Priority) -> &T {
        match priority {
            Priority::Alert => &self.alert,
            Priority::Insight => &self.insight,
            Priority::Telemetry => &self.telemetry,
        }
    }
}

impl<T> IndexMut<Priority> for PerPriority<T> {
    fn index_mut(&mut self, priority: Priority) -> &mut T {
        match priority {
            Priority::Alert => &mut self.alert,
            Priority::Insight => &mut self.insight,
            Priority::Telemetry => &mut self.telemetry,
        }
    }
}

/// A record to append: the caller's serialised insight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRecord {
    /// Delivery and eviction class.
    pub priority: Priority,
    /// When the insight was produced, unix milliseconds (the caller's clock).
    pub time_ms: u64,
    /// Opaque bytes, typically JSON; at most [`MAX_PAYLOAD_BYTES`].
    pub payload: Vec<u8>,
}

impl NewRecord {
    /// A record with the given priority, time and payload.
    pub fn new(priority: Priority, time_ms: u64, payload: impl Into<Vec<u8>>) -> NewRecord {
        NewRecord {
            priority,
            time_ms,
            payload: payload.into(),
        }
    }

    /// Bytes its frame takes on disk and in the budget.
    pub fn frame_bytes(&self) -> u64 {
        (FRAME_HEADER_BYTES + self.payload.len()) as u64
    }
}

/// A pending record as read back for delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Sequence number assigned by [`Outbox::append`]; pass it to [`Outbox::ack`].
    pub seq: u64,
    /// Delivery class.
    pub priority: Priority,
    /// Append time given by the caller, unix milliseconds.
    pub time_ms: u64,
    /// The bytes that were appended.
    pub payload: Vec<u8>,
}

/// Where and how big the outbox is. Build with [`Config::new`] and override
/// fields as needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The outbox directory; created if missing.
    pub dir: PathBuf,
    /// Maximum pending frame bytes (payload plus 32 bytes per record).
    /// Default 64 MiB.
    pub budget_bytes: u64,
    /// Size at which a segment file is rolled, 4 KiB to 1 GiB. Default 8 MiB.
    pub segment_bytes: u64,
    /// The ack log is compacted once it is larger than this and than twice its
    /// last compacted size. Default 1 MiB.
    pub ack_log_compact_bytes: u64,
}

impl Config {
    /// The defaults for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Config {
        Config {
            dir: dir.into(),
            budget_bytes: 64 << 20,
            segment_bytes: 8 << 20,
            ack_log_compact_bytes: 1 << 20,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str| {
            Err(Error::Config {
                field,
                reason: reason.into(),
            })
        };
        if !(4096..=1 << 30).contains(&self.segment_bytes) {
            return bad("segment_bytes", "must be between 4 KiB and 1 GiB");
        }
        if self.budget_bytes <= FRAME_HEADER_BYTES as u64 {
            return bad("budget_bytes", "must exceed the 32-byte frame header");
        }
        Ok(())
    }
}

/// A snapshot of the outbox's counters, cheap to take at any time (a short
/// lock and a copy). Counters marked *persisted* survive restarts; the others
/// describe this process or the current state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Pending (unacked, unevicted) records per priority.
    pub pending_records: PerPriority<u64>,
    /// Pending frame bytes per priority: what the budget counts.
    pub pending_bytes: PerPriority<u64>,
    /// The configured budget.
    pub budget_bytes: u64,
    /// Records ever appended, i.e. the last sequence number (persisted).
    pub appended: u64,
    /// Records ever acked (persisted).
    pub acked: u64,
    /// Records ever evicted to make room, per priority of the evicted record
    /// (persisted).
    pub evicted: PerPriority<u64>,
    /// Appends ever refused (budget full or too large), per priority
    /// (persisted).
    pub refused: PerPriority<u64>,
    /// Damaged byte ranges in `quarantine/` (reconstructed from its files).
    pub quarantined_frames: u64,
    /// Bytes in `quarantine/` (reconstructed from its files).
    pub quarantined_bytes: u64,
    /// Bytes of torn writes truncated when this process opened the outbox.
    pub torn_tail_bytes: u64,
    /// Pending records whose frame failed its checksum when read back by this
    /// process (skipped by [`Outbox::pending`]; quarantined on next open).
    pub corrupt_reads: u64,
    /// Segment files.
    pub segments: u64,
    /// Bytes in segment files and the ack log.
    pub disk_bytes: u64,
}
