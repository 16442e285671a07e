//! Opening a directory: verify every frame, truncate torn tails, quarantine
//! damage, and rebuild the index and counters.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::acklog::{self, RemovedSet};
use crate::frame::{Decoded, Frame, Kind, decode, next_magic};
use crate::index::Entry;
use crate::store::{FILE_MODE, Segment, SegmentFile, State, parse_segment_name};
use crate::{Config, Error, Priority, Result};

/// Name of the directory (inside the outbox directory) that receives damaged
/// byte ranges.
pub(crate) const QUARANTINE_DIR: &str = "quarantine";

/// What recovery hands to `Outbox::open`.
pub(crate) struct Opened {
    pub state: State,
    pub ack_log: File,
    pub ack_log_len: u64,
    /// The ack log had damage and should be rewritten from the state.
    pub ack_log_damaged: bool,
}

/// Damage found by [`scan`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Damage {
    /// Byte ranges that are not valid frames, with valid frames after them
    /// (or at the end of a file whose tail cannot be torn).
    pub ranges: Vec<Range<usize>>,
    /// Where trailing damage starts in a file whose tail may be torn.
    pub torn_from: Option<usize>,
}

/// Walks the frames of `buf`, calling `accept(offset, frame)` for each valid
/// one; a frame it rejects counts as damage. After damage, resumes at the next
/// magic that starts an accepted frame, so one bad frame never hides the good
/// ones after it. Always terminates: every step moves forward.
pub(crate) fn scan(
    buf: &[u8],
    tail_may_tear: bool,
    mut accept: impl FnMut(usize, &Frame<'_>) -> bool,
) -> Damage {
    let mut damage = Damage::default();
    let mut pos = 0;
    let mut bad_from = None;
    while pos < buf.len() {
        if let Decoded::Frame(frame) = decode(&buf[pos..])
            && accept(pos, &frame)
        {
            if let Some(from) = bad_from.take() {
                damage.ranges.push(from..pos);
            }
            pos += frame.len();
        } else {
            bad_from.get_or_insert(pos);
            pos = next_magic(buf, pos + 1).unwrap_or(buf.len());
        }
    }
    if let Some(from) = bad_from {
        if tail_may_tear {
            damage.torn_from = Some(from);
        } else {
            damage.ranges.push(from..buf.len());
        }
    }
    damage
}

pub(crate) fn recover(config: &Config) -> Result<Opened> {
    let dir = &config.dir;
    let mut state = State::default();
    let mut quarantine = Quarantine::new(dir);

    let mut segment_paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(Error::io("list directory", dir))? {
        let entry = entry.map_err(Error::io("list directory", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(first_seq) = parse_segment_name(name) {
            segment_paths.push((first_seq, entry.path()));
        } else if is_leftover_temp(name) {
            remove(&entry.path())?;
        }
    }
    segment_paths.sort();

    // The ack log first: which records are gone, and the persisted counters.
    let ack_path = dir.join(acklog::FILE_NAME);
    let ack_bytes = read_if_exists(&ack_path)?;
    let mut removed_ranges = Vec::new();
    let mut next_seq_floor = 1;
    let damage = scan(&ack_bytes, true, |_, frame| {
        let Some(entry) = acklog::Entry::parse(frame) else {
            return false;
        };
        match entry {
            acklog::Entry::Ack(ranges) => {
                state.totals.acked += ranges.iter().map(|r| r.1).sum::<u64>();
                removed_ranges.extend(ranges);
            }
            acklog::Entry::Evict(priority, ranges) => {
                state.totals.evicted[priority] += ranges.iter().map(|r| r.1).sum::<u64>();
                removed_ranges.extend(ranges);
            }
            acklog::Entry::Removed(ranges) => removed_ranges.extend(ranges),
            acklog::Entry::Refuse(priority, count) => state.totals.refused[priority] += count,
            acklog::Entry::Totals { next_seq, totals } => {
                state.totals = totals;
                next_seq_floor = next_seq_floor.max(next_seq);
            }
        }
        true
    });
    quarantine.keep(acklog::FILE_NAME, &ack_bytes, &damage.ranges)?;
    let mut ack_log_len = ack_bytes.len();
    if let Some(from) = damage.torn_from {
        truncate(&ack_path, from)?;
        state.torn_tail_bytes += (ack_bytes.len() - from) as u64;
        ack_log_len = from;
    }
    let ack_log_damaged = !damage.ranges.is_empty();
    drop(ack_bytes);
    let mut removed = RemovedSet::new(removed_ranges);

    // Then every segment, oldest first, rebuilding the index.
    let mut last_seq = 0;
    for (i, (first_seq, path)) in segment_paths.iter().enumerate() {
        let (first_seq, is_last) = (*first_seq, i + 1 == segment_paths.len());
        let next_first_seq = segment_paths.get(i + 1).map_or(u64::MAX, |s| s.0);
        let bytes = fs::read(path).map_err(Error::io("read segment", path))?;
        let mut kept: Vec<(Range<usize>, Priority, u64)> = Vec::new();
        let damage = scan(&bytes, is_last, |pos, frame| {
            let in_order = frame.seq > last_seq && (first_seq..next_first_seq).contains(&frame.seq);
            let ok = frame.kind == Kind::Record && in_order;
            if ok {
                last_seq = frame.seq;
                kept.push((pos..pos + frame.len(), frame.priority, frame.seq));
            }
            ok
        });
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("segment");
        quarantine.keep(name, &bytes, &damage.ranges)?;
        let len = if !damage.ranges.is_empty() {
            let mut clean = Vec::with_capacity(bytes.len());
            for (range, ..) in &kept {
                clean.extend_from_slice(&bytes[range.clone()]);
            }
            durable::write_atomic(path, &clean, FILE_MODE)
                .map_err(Error::io("rewrite segment", path))?;
            clean.len()
        } else if let Some(from) = damage.torn_from {
            truncate(path, from)?;
            from
        } else {
            bytes.len()
        };
        if let Some(from) = damage.torn_from {
            let torn = bytes.len() - from;
            tracing::warn!(path = %path.display(), bytes = torn, "truncated torn tail");
            state.torn_tail_bytes += torn as u64;
        }
        let mut segment = Segment {
            first_seq,
            file: Arc::new(SegmentFile::open(path.clone())?),
            len: len as u64,
            live: 0,
        };
        let mut offset = 0;
        for (range, priority, seq) in kept {
            let len = range.len();
            if !removed.contains_ascending(seq) {
                // Segments are rolled near `segment_bytes` (at most 1 GiB),
                // so offsets and lengths fit in 32 bits.
                let entry = Entry {
                    seq,
                    offset: offset as u32,
                    len: len as u32,
                };
                state.index.push(priority, entry);
                segment.live += 1;
            }
            offset += len;
        }
        state.segments.push(segment);
    }

    let last_first_seq = state.segments.last().map_or(1, |s| s.first_seq);
    state.next_seq = next_seq_floor.max(last_seq + 1).max(last_first_seq);
    state.visible_seq = state.next_seq;
    if state
        .segments
        .last()
        .is_none_or(|s| s.len >= config.segment_bytes)
    {
        let file = SegmentFile::create(dir, state.next_seq)?;
        state.segments.push(Segment {
            first_seq: state.next_seq,
            file: Arc::new(file),
            len: 0,
            live: 0,
        });
    }

    (state.quarantined_frames, state.quarantined_bytes) = quarantine.totals()?;
    let ack_log = open_ack_log(&ack_path, dir)?;
    state.ack_log_bytes = ack_log_len as u64;
    Ok(Opened {
        state,
        ack_log,
        ack_log_len: ack_log_len as u64,
        ack_log_damaged,
    })
}

/// Temporary files left by an interrupted `durable::write_atomic`.
fn is_leftover_temp(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

fn read_if_exists(path: &Path) -> Result<Vec<u8>> {
    match fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io("read", path)(e)),
    }
}

fn remove(path: &Path) -> Result<()> {
    fs::remove_file(path).map_err(Error::io("remove", path))
}

fn truncate(path: &Path, len: usize) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(Error::io("open for truncation", path))?;
    file.set_len(len as u64)
        .map_err(Error::io("truncate", path))?;
    file.sync_all().map_err(Error::io("fsync", path))
}

fn open_ack_log(path: &Path, dir: &Path) -> Result<File> {
    let existed = path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)
        .map_err(Error::io("open ack log", path))?;
    if !existed {
        durable::sync_dir(dir).map_err(Error::io("fsync directory", dir))?;
    }
    Ok(file)
}

/// Copies damaged byte ranges to `<dir>/quarantine/`. A file is named after
/// its source, offset and checksum, so quarantining the same damage twice
/// (after a crash during recovery) rewrites the same file.
struct Quarantine {
    parent: PathBuf,
    dir: PathBuf,
}

impl Quarantine {
    fn new(parent: &Path) -> Quarantine {
        Quarantine {
            parent: parent.into(),
            dir: parent.join(QUARANTINE_DIR),
        }
    }

    fn keep(&mut self, source: &str, bytes: &[u8], ranges: &[Range<usize>]) -> Result<()> {
        for range in ranges {
            if !self.dir.exists() {
                fs::create_dir_all(&self.dir).map_err(Error::io("create directory", &self.dir))?;
                durable::sync_dir(&self.parent)
                    .map_err(Error::io("fsync directory", &self.parent))?;
            }
            let data = &bytes[range.clone()];
            let name = format!(
                "{source}-{:010}-{:08x}.bin",
                range.start,
                crc32fast::hash(data)
            );
            let path = self.dir.join(name);
            durable::write_atomic(&path, data, FILE_MODE)
                .map_err(Error::io("write quarantine file", &path))?;
            tracing::warn!(
                source,
                offset = range.start,
                bytes = data.len(),
                quarantine = %path.display(),
                "quarantined damaged bytes"
            );
        }
        Ok(())
    }

    /// Files and bytes in quarantine: the persisted quarantine counters.
    fn totals(&self) -> Result<(u64, u64)> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => return Err(Error::io("list directory", &self.dir)(e)),
        };
        let (mut files, mut bytes) = (0, 0);
        for entry in entries {
            let entry = entry.map_err(Error::io("list directory", &self.dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if is_leftover_temp(&name) {
                remove(&entry.path())?;
            } else if name.ends_with(".bin") {
                files += 1;
                bytes += entry
                    .metadata()
                    .map_err(Error::io("stat", entry.path()))?
                    .len();
            }
        }
        Ok((files, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode;

    fn frames(seqs: &[u64]) -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut offsets = Vec::new();
        for &seq in seqs {
            offsets.push(buf.len());
            encode(
                &mut buf,
                Kind::Record,
                Priority::Insight,
                seq,
                0,
                format!("record {seq}").as_bytes(),
            );
        }
        (buf, offsets)
    }

    fn accepted(buf: &[u8], tail_may_tear: bool) -> (Vec<u64>, Damage) {
        let mut seqs = Vec::new();
        let damage = scan(buf, tail_may_tear, |_, f| {
            seqs.push(f.seq);
            true
        });
        (seqs, damage)
    }

    #[test]
    fn scan_separates_good_frames_from_damage() {
        let (clean, at) = frames(&[1, 2, 3, 4]);
        let flip = |offsets: &[usize]| {
            let mut buf = clean.clone();
            for &o in offsets {
                buf[o] ^= 0x55;
            }
            buf
        };
        let end = clean.len();
        // (case, bytes, tail may tear, accepted seqs, damaged (start, end) ranges, torn from)
        type Case<'a> = (
            &'a str,
            Vec<u8>,
            bool,
            &'a [u64],
            Vec<(usize, usize)>,
            Option<usize>,
        );
        let cases: Vec<Case> = vec![
            ("clean", clean.clone(), true, &[1, 2, 3, 4], vec![], None),
            (
                "torn last frame",
                clean[..end - 3].to_vec(),
                true,
                &[1, 2, 3],
                vec![],
                Some(at[3]),
            ),
            (
                "torn last frame, tail cannot tear",
                clean[..end - 3].to_vec(),
                false,
                &[1, 2, 3],
                vec![(at[3], end - 3)],
                None,
            ),
            (
                "bad payload in the middle",
                flip(&[at[1] + 35]),
                true,
                &[1, 3, 4],
                vec![(at[1], at[2])],
                None,
            ),
            (
                "bad magic of the first frame",
                flip(&[0]),
                true,
                &[2, 3, 4],
                vec![(0, at[1])],
                None,
            ),
            (
                "two damaged frames in a row",
                flip(&[at[1] + 9, at[2] + 9]),
                true,
                &[1, 4],
                vec![(at[1], at[3])],
                None,
            ),
            ("garbage only", vec![0xFB; 100], true, &[], vec![], Some(0)),
        ];
        for (name, buf, tail_may_tear, seqs, ranges, torn_from) in cases {
            let damage = Damage {
                ranges: ranges.into_iter().map(|(start, end)| start..end).collect(),
                torn_from,
            };
            assert_eq!(
                accepted(&buf, tail_may_tear),
                (seqs.to_vec(), damage),
                "{name}"
            );
        }
    }

    #[test]
    fn rejected_frames_count_as_damage() {
        let (buf, at) = frames(&[1, 2, 3]);
        let damage = scan(&buf, true, |_, f| f.seq != 2);
        assert_eq!(damage.ranges, vec![at[1]..at[2]]);
    }
}
