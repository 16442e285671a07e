//! Payloads of the ack log's frames and the compacted ack log. Pure: no I/O.

use crate::frame::{self, Kind, MAX_PAYLOAD_BYTES};
use crate::{PerPriority, Priority};

/// The ack log's file name inside the outbox directory.
pub(crate) const FILE_NAME: &str = "acks.log";

const RANGE_BYTES: usize = 16;
const TOTALS_BYTES: usize = 7 * 8;

/// Counters that survive restarts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub acked: u64,
    pub evicted: PerPriority<u64>,
    pub refused: PerPriority<u64>,
}

impl Totals {
    fn encode(&self) -> [u8; TOTALS_BYTES] {
        let values = [
            self.acked,
            self.evicted.alert,
            self.evicted.insight,
            self.evicted.telemetry,
            self.refused.alert,
            self.refused.insight,
            self.refused.telemetry,
        ];
        let mut out = [0; TOTALS_BYTES];
        for (chunk, value) in out.chunks_exact_mut(8).zip(values) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        out
    }

    fn decode(payload: &[u8]) -> Option<Totals> {
        if payload.len() != TOTALS_BYTES {
            return None;
        }
        let v = |i: usize| frame::u64_at(payload, i * 8);
        Some(Totals {
            acked: v(0),
            evicted: PerPriority {
                alert: v(1),
                insight: v(2),
                telemetry: v(3),
            },
            refused: PerPriority {
                alert: v(4),
                insight: v(5),
                telemetry: v(6),
            },
        })
    }
}

/// One decoded ack-log entry.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// Acked records; adds to `acked`.
    Ack(Vec<(u64, u64)>),
    /// Evicted records of one priority; adds to `evicted`.
    Evict(Priority, Vec<(u64, u64)>),
    /// Refused appends; adds to `refused`.
    Refuse(Priority, u64),
    /// Replaces all counters; `seq` is the next sequence number at the time.
    Totals { next_seq: u64, totals: Totals },
    /// Records acked or evicted before a compaction, already counted.
    Removed(Vec<(u64, u64)>),
}

impl Entry {
    /// Parses an ack-log frame; `None` if it cannot be one (treated as damage).
    pub fn parse(frame: &frame::Frame<'_>) -> Option<Entry> {
        Some(match frame.kind {
            Kind::Ack => Entry::Ack(parse_ranges(frame.payload)?),
            Kind::Evict => Entry::Evict(frame.priority, parse_ranges(frame.payload)?),
            Kind::Removed => Entry::Removed(parse_ranges(frame.payload)?),
            Kind::Refuse => Entry::Refuse(
                frame.priority,
                (frame.payload.len() == 8).then(|| frame::u64_at(frame.payload, 0))?,
            ),
            Kind::Totals => Entry::Totals {
                next_seq: frame.seq,
                totals: Totals::decode(frame.payload)?,
            },
            Kind::Record => return None,
        })
    }
}

/// Sorts `seqs` and merges them into `(first, count)` ranges.
pub(crate) fn to_ranges(seqs: &mut [u64]) -> Vec<(u64, u64)> {
    seqs.sort_unstable();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &seq in seqs.iter() {
        match ranges.last_mut() {
            Some((first, count)) if *first + *count == seq => *count += 1,
            Some((first, count)) if *first + *count > seq => {} // duplicate
            _ => ranges.push((seq, 1)),
        }
    }
    ranges
}

fn parse_ranges(payload: &[u8]) -> Option<Vec<(u64, u64)>> {
    if payload.is_empty() || !payload.len().is_multiple_of(RANGE_BYTES) {
        return None;
    }
    payload
        .chunks_exact(RANGE_BYTES)
        .map(|c| {
            let (first, count) = (frame::u64_at(c, 0), frame::u64_at(c, 8));
            (count > 0 && first.checked_add(count).is_some()).then_some((first, count))
        })
        .collect()
}

/// Appends frames of `kind` carrying `ranges`, split to respect the payload limit.
pub(crate) fn encode_ranges(
    out: &mut Vec<u8>,
    kind: Kind,
    priority: Priority,
    ranges: &[(u64, u64)],
) {
    let mut payload =
        Vec::with_capacity(ranges.len().min(MAX_PAYLOAD_BYTES / RANGE_BYTES) * RANGE_BYTES);
    for chunk in ranges.chunks(MAX_PAYLOAD_BYTES / RANGE_BYTES) {
        payload.clear();
        for &(first, count) in chunk {
            payload.extend_from_slice(&first.to_le_bytes());
            payload.extend_from_slice(&count.to_le_bytes());
        }
        frame::encode(out, kind, priority, 0, 0, &payload);
    }
}

/// Appends a refuse frame.
pub(crate) fn encode_refused(out: &mut Vec<u8>, priority: Priority, count: u64) {
    frame::encode(out, Kind::Refuse, priority, 0, 0, &count.to_le_bytes());
}

/// The whole compacted ack log: the totals, then every sequence number in
/// `low..high` that is not in `pending` (ascending) as removed ranges.
pub(crate) fn compacted(
    totals: &Totals,
    next_seq: u64,
    low: u64,
    high: u64,
    pending: &[u64],
) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode(
        &mut out,
        Kind::Totals,
        Priority::Alert,
        next_seq,
        0,
        &totals.encode(),
    );
    let mut gaps = Vec::new();
    let mut from = low;
    for &seq in pending {
        if seq > from {
            gaps.push((from, seq - from));
        }
        from = from.max(seq + 1);
    }
    if high > from {
        gaps.push((from, high - from));
    }
    encode_ranges(&mut out, Kind::Removed, Priority::Alert, &gaps);
    out
}

/// Merged, sorted ranges with a forward-only membership cursor, for checking
/// ascending sequence numbers during recovery.
#[derive(Debug, Default)]
pub(crate) struct RemovedSet {
    ranges: Vec<(u64, u64)>,
    next: usize,
}

impl RemovedSet {
    /// Builds the set from `(first, count)` ranges in any order.
    pub fn new(mut ranges: Vec<(u64, u64)>) -> RemovedSet {
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (first, count) in ranges {
            let end = first + count;
            match merged.last_mut() {
                Some((_, last_end)) if first <= *last_end => *last_end = (*last_end).max(end),
                _ => merged.push((first, end)),
            }
        }
        RemovedSet {
            ranges: merged,
            next: 0,
        }
    }

    /// Whether `seq` was removed; calls must come in ascending `seq` order.
    pub fn contains_ascending(&mut self, seq: u64) -> bool {
        while self
            .ranges
            .get(self.next)
            .is_some_and(|&(_, end)| end <= seq)
        {
            self.next += 1;
        }
        self.ranges
            .get(self.next)
            .is_some_and(|&(first, _)| first <= seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Decoded, decode};

    fn entries(mut bytes: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        while let Decoded::Frame(frame) = decode(bytes) {
            out.push(Entry::parse(&frame).expect("parses"));
            bytes = &bytes[frame.len()..];
        }
        assert!(bytes.is_empty());
        out
    }

    #[test]
    fn merges_seqs_into_ranges() {
        type Case<'a> = (&'a [u64], &'a [(u64, u64)]);
        let cases: &[Case] = &[
            (&[], &[]),
            (&[5], &[(5, 1)]),
            (&[3, 1, 2, 2, 7, 8, 10], &[(1, 3), (7, 2), (10, 1)]),
        ];
        for (seqs, ranges) in cases {
            assert_eq!(to_ranges(&mut seqs.to_vec()), *ranges, "{seqs:?}");
        }
    }

    #[test]
    fn compaction_writes_totals_and_the_gaps_between_pending_records() {
        let totals = Totals {
            acked: 9,
            evicted: PerPriority {
                alert: 0,
                insight: 1,
                telemetry: 2,
            },
            refused: PerPriority {
                alert: 3,
                insight: 4,
                telemetry: 5,
            },
        };
        let bytes = compacted(&totals, 21, 10, 21, &[10, 12, 13, 17]);
        assert_eq!(
            entries(&bytes),
            [
                Entry::Totals {
                    next_seq: 21,
                    totals
                },
                Entry::Removed(vec![(11, 1), (14, 3), (18, 3)]),
            ]
        );
        // Nothing pending and nothing removed: totals only.
        assert_eq!(entries(&compacted(&totals, 5, 5, 5, &[])).len(), 1);
    }

    #[test]
    fn parses_what_it_encodes_and_rejects_bad_shapes() {
        let mut bytes = Vec::new();
        encode_ranges(
            &mut bytes,
            Kind::Evict,
            Priority::Telemetry,
            &[(1, 2), (9, 1)],
        );
        encode_refused(&mut bytes, Priority::Insight, 4);
        assert_eq!(
            entries(&bytes),
            [
                Entry::Evict(Priority::Telemetry, vec![(1, 2), (9, 1)]),
                Entry::Refuse(Priority::Insight, 4),
            ]
        );
        for payload in [&[][..], &[0; 15], &[0; 16], &[0xFF; 16]] {
            let mut bytes = Vec::new();
            frame::encode(&mut bytes, Kind::Ack, Priority::Alert, 0, 0, payload);
            let Decoded::Frame(frame) = decode(&bytes) else {
                panic!()
            };
            assert_eq!(Entry::parse(&frame), None, "{payload:?}");
        }
    }

    #[test]
    fn removed_set_answers_ascending_queries() {
        let mut set = RemovedSet::new(vec![(10, 5), (1, 2), (12, 10), (40, 1)]);
        let hits: Vec<u64> = (0..45).filter(|&s| set.contains_ascending(s)).collect();
        let expected: Vec<u64> = [1, 2].into_iter().chain(10..22).chain([40]).collect();
        assert_eq!(hits, expected);
    }
}
