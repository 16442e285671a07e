//! The writer thread: group commit of appends, acks and evictions.
//!
//! One loop iteration takes every queued request, plans it under the state
//! lock (budget, sequence numbers, index updates, frame encoding), writes and
//! fsyncs the segment and then the ack log without the lock, publishes the
//! new records to readers, answers every waiter, and finally deletes fully
//! acked segments and compacts the ack log when due.

use std::fs::{File, OpenOptions};
use std::mem;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::acklog::{self, to_ranges};
use crate::frame::{self, Kind};
use crate::index::Entry;
use crate::store::{FILE_MODE, Request, Segment, SegmentFile, Shared, State, lock};
use crate::{Config, Error, PerPriority, Priority, Result};

pub(crate) struct Writer {
    shared: Arc<Shared>,
    segment_bytes: u64,
    ack_log_compact_bytes: u64,
    /// The segment appended to (the last in `State::segments`).
    active: Arc<SegmentFile>,
    /// Bytes of `active` written, not counting `seg_buf`.
    active_len: u64,
    ack_log: File,
    ack_log_path: PathBuf,
    ack_log_len: u64,
    /// Size of the ack log right after its last compaction.
    ack_log_compacted_len: u64,
    /// Frames planned for `active` in this batch.
    seg_buf: Vec<u8>,
    /// Frames planned for the ack log in this batch.
    ack_buf: Vec<u8>,
    acked: Vec<u64>,
    evicted: PerPriority<Vec<u64>>,
    refused: PerPriority<u64>,
    failed: bool,
}

/// The answer owed to one request of a batch.
enum Outcome {
    Append(Vec<Result<u64>>),
    Ack(u64),
}

impl Writer {
    pub fn new(shared: Arc<Shared>, config: &Config, ack_log: File, ack_log_len: u64) -> Writer {
        let (active, active_len) = {
            let state = lock(&shared.state);
            let last = state
                .segments
                .last()
                .expect("recovery leaves an active segment");
            (last.file.clone(), last.len)
        };
        Writer {
            segment_bytes: config.segment_bytes,
            ack_log_compact_bytes: config.ack_log_compact_bytes,
            active,
            active_len,
            ack_log,
            ack_log_path: shared.dir.join(acklog::FILE_NAME),
            ack_log_len,
            ack_log_compacted_len: 0,
            seg_buf: Vec::new(),
            ack_buf: Vec::new(),
            acked: Vec::new(),
            evicted: PerPriority::default(),
            refused: PerPriority::default(),
            failed: false,
            shared,
        }
    }

    /// Serves requests until the outbox is dropped and the queue is empty.
    pub fn run(mut self) {
        let _stop = StopOnExit(self.shared.clone());
        let mut batch = Vec::new();
        loop {
            {
                let mut queue = lock(&self.shared.queue);
                while queue.requests.is_empty() && !queue.shutdown {
                    queue = self
                        .shared
                        .wake
                        .wait(queue)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if queue.requests.is_empty() {
                    return;
                }
                mem::swap(&mut batch, &mut queue.requests);
            }
            self.process(&mut batch);
        }
    }

    fn process(&mut self, batch: &mut Vec<Request>) {
        if self.failed {
            let stopped = Error::Stopped {
                dir: self.shared.dir.clone(),
            };
            for request in batch.drain(..) {
                reply_err(request, &stopped, &self.shared.dir);
            }
            return;
        }
        let result = self.plan(batch).and_then(|outcomes| {
            self.commit()?;
            Ok(outcomes)
        });
        match result {
            Ok(outcomes) => {
                // Housekeeping before answering makes "fully acked segments
                // are gone when `ack` returns" hold; it is rare and cheap.
                let housekeeping = self.housekeep(false);
                for (request, outcome) in batch.drain(..).zip(outcomes) {
                    // A waiter that has gone away is no reason to stop.
                    let _ = match (request, outcome) {
                        (Request::Append { reply, .. }, Outcome::Append(seqs)) => {
                            reply.send(Ok(seqs)).is_ok()
                        }
                        (Request::Ack { reply, .. }, Outcome::Ack(n)) => reply.send(Ok(n)).is_ok(),
                        _ => unreachable!("outcomes are built in request order"),
                    };
                }
                // The batch itself is durable, so its callers got `Ok`; but
                // the outbox cannot go on.
                if let Err(error) = housekeeping {
                    self.fail(&error);
                }
            }
            Err(error) => {
                self.fail(&error);
                for request in batch.drain(..) {
                    reply_err(request, &error, &self.shared.dir);
                }
            }
        }
    }

    fn fail(&mut self, error: &Error) {
        tracing::error!(dir = %self.shared.dir.display(), error = %error, "outbox stopped; reopen it to recover");
        self.failed = true;
    }

    /// Decides every request under the state lock and encodes the frames.
    fn plan(&mut self, batch: &mut [Request]) -> Result<Vec<Outcome>> {
        let shared = self.shared.clone();
        let mut state = lock(&shared.state);
        let mut outcomes = Vec::with_capacity(batch.len());
        for request in batch.iter_mut() {
            match request {
                Request::Append { records, .. } => {
                    let mut seqs = Vec::with_capacity(records.len());
                    for record in records.drain(..) {
                        let frame_bytes = record.frame_bytes();
                        let priority = record.priority;
                        let budget = shared.budget_bytes;
                        if let Err(refusal) =
                            state.make_room(priority, frame_bytes, budget, &mut self.evicted)
                        {
                            state.totals.refused[priority] += 1;
                            self.refused[priority] += 1;
                            seqs.push(Err(refusal));
                            continue;
                        }
                        let planned = self.active_len + self.seg_buf.len() as u64;
                        if planned > 0 && planned + frame_bytes > self.segment_bytes {
                            self.roll(&mut state)?;
                        }
                        let seq = state.next_seq;
                        state.next_seq += 1;
                        let offset = (self.active_len + self.seg_buf.len() as u64) as u32;
                        frame::encode(
                            &mut self.seg_buf,
                            Kind::Record,
                            priority,
                            seq,
                            record.time_ms,
                            &record.payload,
                        );
                        let len = frame_bytes as u32;
                        state.add(priority, Entry { seq, offset, len });
                        seqs.push(Ok(seq));
                    }
                    outcomes.push(Outcome::Append(seqs));
                }
                Request::Ack { seqs, .. } => {
                    let mut n = 0;
                    for &seq in seqs.iter() {
                        // Only durable records can be acked: their seqs have
                        // been returned to someone.
                        if seq < state.visible_seq && state.remove(seq).is_some() {
                            self.acked.push(seq);
                            n += 1;
                        }
                    }
                    state.totals.acked += n;
                    outcomes.push(Outcome::Ack(n));
                }
            }
        }
        Ok(outcomes)
    }

    /// Finishes the active segment (durably) and starts a new one named
    /// after the next sequence number.
    fn roll(&mut self, state: &mut State) -> Result<()> {
        self.flush_segment()?;
        if let Some(last) = state.segments.last_mut() {
            last.len = self.active_len;
        }
        let file = Arc::new(SegmentFile::create(&self.shared.dir, state.next_seq)?);
        state.segments.push(Segment {
            first_seq: state.next_seq,
            file: file.clone(),
            len: 0,
            live: 0,
        });
        self.active = file;
        self.active_len = 0;
        Ok(())
    }

    fn flush_segment(&mut self) -> Result<()> {
        if self.seg_buf.is_empty() {
            return Ok(());
        }
        let path = &self.active.path;
        self.active
            .file
            .write_all_at(&self.seg_buf, self.active_len)
            .map_err(Error::io("write segment", path))?;
        self.active
            .file
            .sync_data()
            .map_err(Error::io("fsync segment", path))?;
        self.active_len += self.seg_buf.len() as u64;
        self.seg_buf.clear();
        Ok(())
    }

    /// Makes the batch durable (records first, then the acks and evictions
    /// that may refer to them) and publishes it.
    fn commit(&mut self) -> Result<()> {
        self.flush_segment()?;
        self.write_ack_entries()?;
        let mut state = lock(&self.shared.state);
        state.visible_seq = state.next_seq;
        if let Some(last) = state.segments.last_mut() {
            last.len = self.active_len;
        }
        state.ack_log_bytes = self.ack_log_len;
        Ok(())
    }

    fn write_ack_entries(&mut self) -> Result<()> {
        self.ack_buf.clear();
        if !self.acked.is_empty() {
            let ranges = to_ranges(&mut self.acked);
            acklog::encode_ranges(&mut self.ack_buf, Kind::Ack, Priority::Alert, &ranges);
            self.acked.clear();
        }
        for priority in Priority::ALL {
            let evicted = &mut self.evicted[priority];
            if !evicted.is_empty() {
                let ranges = to_ranges(evicted);
                acklog::encode_ranges(&mut self.ack_buf, Kind::Evict, priority, &ranges);
                evicted.clear();
            }
            let refused = mem::take(&mut self.refused[priority]);
            if refused > 0 {
                acklog::encode_refused(&mut self.ack_buf, priority, refused);
            }
        }
        if self.ack_buf.is_empty() {
            return Ok(());
        }
        let path = &self.ack_log_path;
        self.ack_log
            .write_all_at(&self.ack_buf, self.ack_log_len)
            .map_err(Error::io("write ack log", path))?;
        self.ack_log
            .sync_data()
            .map_err(Error::io("fsync ack log", path))?;
        self.ack_log_len += self.ack_buf.len() as u64;
        Ok(())
    }

    /// Evicts until the pending records fit the budget (it may have been
    /// lowered, or a crash may have lost evictions), durably.
    pub fn enforce_budget(&mut self) -> Result<()> {
        {
            let mut state = lock(&self.shared.state);
            let budget = self.shared.budget_bytes;
            state.make_room(Priority::Alert, 0, budget, &mut self.evicted)?;
        }
        self.commit()
    }

    /// Deletes segments with no pending records (except the active one), then
    /// compacts the ack log if it is due or `force`d. Deletion comes first and
    /// is made durable, so that compaction never drops the acks of a segment
    /// that could reappear after a crash.
    pub fn housekeep(&mut self, force: bool) -> Result<()> {
        let dead: Vec<Segment> = {
            let mut state = lock(&self.shared.state);
            let active = state.segments.last().map(|s| s.first_seq);
            state
                .segments
                .extract_if(.., |s| s.live == 0 && Some(s.first_seq) != active)
                .collect()
        };
        if !dead.is_empty() {
            for segment in &dead {
                let path = &segment.file.path;
                std::fs::remove_file(path).map_err(Error::io("delete segment", path))?;
            }
            let dir = &self.shared.dir;
            durable::sync_dir(dir).map_err(Error::io("fsync directory", dir))?;
        }
        let due = self.ack_log_len
            > self
                .ack_log_compact_bytes
                .max(2 * self.ack_log_compacted_len);
        if force || due {
            self.compact_ack_log()?;
        }
        Ok(())
    }

    fn compact_ack_log(&mut self) -> Result<()> {
        let bytes = {
            let state = lock(&self.shared.state);
            let low = state
                .segments
                .first()
                .map_or(state.next_seq, |s| s.first_seq);
            acklog::compacted(
                &state.totals,
                state.next_seq,
                low,
                state.visible_seq,
                &state.index.sorted_seqs(),
            )
        };
        let path = &self.ack_log_path;
        durable::write_atomic(path, &bytes, FILE_MODE)
            .map_err(Error::io("rewrite ack log", path))?;
        self.ack_log = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(Error::io("open ack log", path))?;
        self.ack_log_len = bytes.len() as u64;
        self.ack_log_compacted_len = self.ack_log_len;
        lock(&self.shared.state).ack_log_bytes = self.ack_log_len;
        tracing::debug!(path = %path.display(), bytes = bytes.len(), "compacted ack log");
        Ok(())
    }
}

/// Refuses further requests and drops queued ones (their callers get
/// [`Error::Stopped`]) when the writer exits, even by panicking, so that no
/// caller waits forever on a thread that is gone.
struct StopOnExit(Arc<Shared>);

impl Drop for StopOnExit {
    fn drop(&mut self) {
        let mut queue = lock(&self.0.queue);
        queue.shutdown = true;
        queue.requests.clear();
    }
}

fn reply_err(request: Request, error: &Error, dir: &std::path::Path) {
    let _ = match request {
        Request::Append { reply, .. } => reply.send(Err(error.duplicate(dir))).is_ok(),
        Request::Ack { reply, .. } => reply.send(Err(error.duplicate(dir))).is_ok(),
    };
}
