//! [`Outbox`], the state it shares with the writer thread, and segment files.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crate::acklog::Totals;
use crate::frame::{self, Decoded, Kind};
use crate::index::{Entry, Index};
use crate::writer::Writer;
use crate::{Config, Error, NewRecord, PerPriority, Priority, Record, Result, Stats, recover};

/// File mode of everything the outbox creates: insights are the owner's.
pub(crate) const FILE_MODE: u32 = 0o600;

/// The durable outbox. Open one per directory; share it between threads with
/// an `Arc` (all methods take `&self`). Dropping it finishes queued requests
/// and stops the writer thread.
///
/// ```
/// use outbox::{Config, NewRecord, Outbox, Priority};
///
/// let dir = tempfile::tempdir()?;
/// let outbox = Outbox::open(Config::new(dir.path()))?;
/// let seq = outbox.append(NewRecord::new(Priority::Alert, 1_700_000_000_000, br#"{"temp":91}"#))?;
/// let batch = outbox.pending(100, 1 << 20)?;
/// assert_eq!(batch[0].seq, seq);
/// // ... deliver the batch, then:
/// outbox.ack(&[seq])?;
/// assert!(outbox.pending(100, 1 << 20)?.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Outbox {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    _lock: File,
}

/// What API calls and the writer thread share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub dir: PathBuf,
    pub budget_bytes: u64,
    pub queue: Mutex<Queue>,
    pub wake: Condvar,
    pub state: Mutex<State>,
    pub corrupt_reads: AtomicU64,
}

/// Requests waiting for the writer.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    pub requests: Vec<Request>,
    pub shutdown: bool,
}

/// Append outcomes: outer error for the whole batch, inner for one record.
pub(crate) type AppendReply = Result<Vec<Result<u64>>>;

#[derive(Debug)]
pub(crate) enum Request {
    Append {
        records: Vec<NewRecord>,
        reply: SyncSender<AppendReply>,
    },
    Ack {
        seqs: Vec<u64>,
        reply: SyncSender<Result<u64>>,
    },
}

/// The index and everything needed to interpret it. Only the writer thread
/// (or `open`, before it starts) mutates it.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub index: Index,
    /// Sorted by `first_seq`; the last one is the active segment.
    pub segments: Vec<Segment>,
    /// The next sequence number to assign.
    pub next_seq: u64,
    /// Records below this are durable and may be returned by `pending`;
    /// the others are being written by the current batch.
    pub visible_seq: u64,
    pub totals: Totals,
    pub quarantined_frames: u64,
    pub quarantined_bytes: u64,
    pub torn_tail_bytes: u64,
    pub ack_log_bytes: u64,
}

#[derive(Debug)]
pub(crate) struct Segment {
    /// From the file name: every record in it has `seq >= first_seq`, and
    /// below the next segment's `first_seq`.
    pub first_seq: u64,
    pub file: Arc<SegmentFile>,
    /// Durable length in bytes.
    pub len: u64,
    /// Pending records in it.
    pub live: u64,
}

#[derive(Debug)]
pub(crate) struct SegmentFile {
    pub path: PathBuf,
    pub file: File,
}

pub(crate) fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.log")
}

pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

impl SegmentFile {
    pub fn open(path: PathBuf) -> Result<SegmentFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(Error::io("open segment", &path))?;
        Ok(SegmentFile { path, file })
    }

    /// Creates an empty segment and makes its directory entry durable.
    pub fn create(dir: &Path, first_seq: u64) -> Result<SegmentFile> {
        let path = dir.join(segment_name(first_seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(Error::io("create segment", &path))?;
        durable::sync_dir(dir).map_err(Error::io("fsync directory", dir))?;
        Ok(SegmentFile { path, file })
    }
}

impl State {
    fn segment_index(&self, seq: u64) -> usize {
        self.segments
            .partition_point(|s| s.first_seq <= seq)
            .saturating_sub(1)
    }

    /// Counts a new pending record in the index and its segment (the last).
    pub fn add(&mut self, priority: Priority, entry: Entry) {
        self.index.push(priority, entry);
        if let Some(segment) = self.segments.last_mut() {
            segment.live += 1;
        }
    }

    /// Removes a pending record (ack or eviction); `None` if it is not pending.
    pub fn remove(&mut self, seq: u64) -> Option<Priority> {
        let (priority, _) = self.index.remove(seq)?;
        let i = self.segment_index(seq);
        self.segments[i].live -= 1;
        Some(priority)
    }

    /// Makes room for a frame of `frame_bytes` at `priority` under `budget`,
    /// evicting by the documented order and pushing evicted seqs into
    /// `evicted`. On refusal nothing is evicted.
    pub fn make_room(
        &mut self,
        priority: Priority,
        frame_bytes: u64,
        budget_bytes: u64,
        evicted: &mut PerPriority<Vec<u64>>,
    ) -> Result<()> {
        let limit_bytes =
            budget_bytes.min((frame::FRAME_HEADER_BYTES + frame::MAX_PAYLOAD_BYTES) as u64);
        if frame_bytes > limit_bytes {
            return Err(Error::TooLarge {
                priority,
                frame_bytes,
                limit_bytes,
            });
        }
        let total = self.index.total_bytes();
        let Some(mut excess) = (total + frame_bytes)
            .checked_sub(budget_bytes)
            .filter(|&e| e > 0)
        else {
            return Ok(());
        };
        // Eviction order: least urgent first, never above the incoming priority.
        let victims = Priority::ALL
            .into_iter()
            .rev()
            .take_while(|&p| p as u8 >= priority as u8);
        let evictable: u64 = victims.clone().map(|p| self.index.bytes(p)).sum();
        if evictable < excess {
            return Err(Error::BudgetFull {
                priority,
                frame_bytes,
                budget_bytes,
            });
        }
        for victim in victims {
            while excess > 0 {
                let Some(entry) = self.index.pop_oldest(victim) else {
                    break;
                };
                let i = self.segment_index(entry.seq);
                self.segments[i].live -= 1;
                self.totals.evicted[victim] += 1;
                evicted[victim].push(entry.seq);
                excess = excess.saturating_sub(u64::from(entry.len));
            }
        }
        Ok(())
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the outbox down with it; the writer
    // keeps the state consistent between statements that can panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Outbox {
    /// Opens (creating if needed) the outbox in `config.dir`: takes the lock,
    /// recovers from whatever a crash left (see the crate docs), applies the
    /// budget and starts the writer thread.
    pub fn open(config: Config) -> Result<Outbox> {
        config.validate()?;
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(Error::io("create directory", &dir))?;
        let lock = take_lock(&dir)?;
        let opened = recover::recover(&config)?;
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            budget_bytes: config.budget_bytes,
            queue: Mutex::default(),
            wake: Condvar::new(),
            state: Mutex::new(opened.state),
            corrupt_reads: AtomicU64::new(0),
        });
        let mut writer = Writer::new(shared.clone(), &config, opened.ack_log, opened.ack_log_len);
        writer.enforce_budget()?;
        writer.housekeep(opened.ack_log_damaged)?;
        let writer = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer.run())
            .map_err(Error::io("spawn writer thread for", &dir))?;
        Ok(Outbox {
            shared,
            writer: Some(writer),
            _lock: lock,
        })
    }

    /// The outbox directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Appends one record and returns its sequence number once it is on disk
    /// and fsync'd. May evict less urgent records (see the crate docs); fails
    /// with [`Error::BudgetFull`] or [`Error::TooLarge`] if it cannot fit.
    pub fn append(&self, record: NewRecord) -> Result<u64> {
        let mut outcomes = self.append_batch(vec![record])?;
        outcomes.pop().unwrap_or_else(|| Err(self.stopped()))
    }

    /// Appends many records with one fsync and returns one outcome per record,
    /// in order: its sequence number, or why it was refused. The outer error
    /// means the batch as a whole failed (I/O) and none of it is known durable.
    /// Records are admitted in order, so a later record may evict an earlier
    /// one of the same batch.
    pub fn append_batch(&self, records: Vec<NewRecord>) -> Result<Vec<Result<u64>>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(|reply| Request::Append { records, reply })?
    }

    /// Acknowledges delivered records: they are never returned again and
    /// their space is reclaimed. Returns how many of `seqs` were pending
    /// (unknown, already acked or evicted seqs are ignored) once the acks are
    /// fsync'd.
    pub fn ack(&self, seqs: &[u64]) -> Result<u64> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let seqs = seqs.to_vec();
        self.submit(|reply| Request::Ack { seqs, reply })?
    }

    /// Up to `max_records` pending records, alerts first, then insights, then
    /// telemetry, oldest first within a priority. Stops before the first
    /// record whose payload would take the total past `max_bytes`, except that
    /// the first record is always returned so that an oversized one cannot
    /// block delivery. Without acks, repeated calls return the same records.
    pub fn pending(&self, max_records: usize, max_bytes: u64) -> Result<Vec<Record>> {
        let mut wanted = Vec::new();
        {
            let state = lock(&self.shared.state);
            let mut payload_bytes = 0;
            'lanes: for priority in Priority::ALL {
                for entry in state.index.iter(priority) {
                    if entry.seq >= state.visible_seq {
                        break;
                    }
                    let size = u64::from(entry.len) - frame::FRAME_HEADER_BYTES as u64;
                    if wanted.len() == max_records
                        || (!wanted.is_empty() && payload_bytes + size > max_bytes)
                    {
                        break 'lanes;
                    }
                    payload_bytes += size;
                    let segment = &state.segments[state.segment_index(entry.seq)];
                    wanted.push((priority, *entry, segment.file.clone()));
                }
            }
        }
        // Read outside the lock so that appends are not held up by disk reads;
        // an open handle stays readable even if the segment is deleted meanwhile.
        let mut records = Vec::with_capacity(wanted.len());
        let mut buf = Vec::new();
        for (priority, entry, segment) in wanted {
            buf.resize(entry.len as usize, 0);
            segment
                .file
                .read_exact_at(&mut buf, u64::from(entry.offset))
                .map_err(Error::io("read segment", &segment.path))?;
            match frame::decode(&buf) {
                Decoded::Frame(f)
                    if f.kind == Kind::Record && f.seq == entry.seq && f.priority == priority =>
                {
                    records.push(Record {
                        seq: f.seq,
                        priority,
                        time_ms: f.time_ms,
                        payload: f.payload.to_vec(),
                    });
                }
                _ => {
                    self.shared.corrupt_reads.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        path = %segment.path.display(),
                        offset = entry.offset,
                        seq = entry.seq,
                        "pending record fails its checksum on read; skipped until the next open quarantines it"
                    );
                }
            }
        }
        Ok(records)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let state = lock(&self.shared.state);
        let per = |f: &dyn Fn(Priority) -> u64| PerPriority {
            alert: f(Priority::Alert),
            insight: f(Priority::Insight),
            telemetry: f(Priority::Telemetry),
        };
        Stats {
            pending_records: per(&|p| state.index.records(p)),
            pending_bytes: per(&|p| state.index.bytes(p)),
            budget_bytes: self.shared.budget_bytes,
            appended: state.visible_seq - 1,
            acked: state.totals.acked,
            evicted: state.totals.evicted,
            refused: state.totals.refused,
            quarantined_frames: state.quarantined_frames,
            quarantined_bytes: state.quarantined_bytes,
            torn_tail_bytes: state.torn_tail_bytes,
            corrupt_reads: self.shared.corrupt_reads.load(Ordering::Relaxed),
            segments: state.segments.len() as u64,
            disk_bytes: state.segments.iter().map(|s| s.len).sum::<u64>() + state.ack_log_bytes,
        }
    }

    fn stopped(&self) -> Error {
        Error::Stopped {
            dir: self.shared.dir.clone(),
        }
    }

    fn submit<T>(&self, request: impl FnOnce(SyncSender<T>) -> Request) -> Result<T> {
        let (reply, outcome) = sync_channel(1);
        {
            let mut queue = lock(&self.shared.queue);
            if queue.shutdown {
                return Err(self.stopped());
            }
            queue.requests.push(request(reply));
        }
        self.shared.wake.notify_one();
        // A closed channel means the writer thread is gone.
        outcome.recv().map_err(|_| self.stopped())
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(dir = %self.shared.dir.display(), "outbox writer thread panicked");
        }
    }
}

/// Takes the directory's exclusive lock and records our pid in it.
fn take_lock(dir: &Path) -> Result<File> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(&path)
        .map_err(Error::io("open lock file", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Locked { dir: dir.into() }),
        Err(std::fs::TryLockError::Error(source)) => return Err(Error::io("lock", &path)(source)),
    }
    let pid = std::process::id();
    file.set_len(0)
        .and_then(|()| file.write_all_at(format!("{pid}\n").as_bytes(), 0))
        .map_err(Error::io("write pid to", &path))?;
    Ok(file)
}

#[cfg(test)]
mod tests;
