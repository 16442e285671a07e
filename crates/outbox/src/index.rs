//! The in-memory index of pending records. Pure: no I/O.
//!
//! One lane per priority, each a `VecDeque` of 16-byte [`Entry`]s sorted by
//! sequence number (appends arrive in sequence order). Payloads stay on disk;
//! an entry only says where its frame is. Removing from the middle (an ack)
//! leaves a tombstone that is dropped when it reaches either end of the lane or
//! when tombstones outnumber live entries, so every operation is O(log n)
//! amortised and memory stays at 16 bytes per pending record plus `VecDeque`
//! growth slack.

use std::collections::VecDeque;

use crate::{PerPriority, Priority};

/// Where a pending record's frame is. `len == 0` marks a tombstone (a real
/// frame is never empty: the header alone is 32 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub seq: u64,
    /// Byte offset of the frame in its segment (segments stay below 4 GiB).
    pub offset: u32,
    /// Frame length in bytes, header included.
    pub len: u32,
}

const _: () = assert!(size_of::<Entry>() == 16);

#[derive(Debug, Default)]
struct Lane {
    entries: VecDeque<Entry>,
    tombstones: usize,
    live_bytes: u64,
}

impl Lane {
    fn live(&self) -> usize {
        self.entries.len() - self.tombstones
    }

    fn trim(&mut self) {
        while self.entries.front().is_some_and(|e| e.len == 0) {
            self.entries.pop_front();
            self.tombstones -= 1;
        }
        while self.entries.back().is_some_and(|e| e.len == 0) {
            self.entries.pop_back();
            self.tombstones -= 1;
        }
        if self.tombstones > 64 && self.tombstones > self.live() {
            self.entries.retain(|e| e.len != 0);
            self.tombstones = 0;
        }
        if self.entries.capacity() > 1024 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to(self.entries.len() * 2);
        }
    }
}

/// Pending records by priority, then sequence number.
#[derive(Debug, Default)]
pub(crate) struct Index {
    lanes: PerPriority<Lane>,
}

impl Index {
    /// Adds a record; its sequence number must exceed every other in the index.
    pub fn push(&mut self, priority: Priority, entry: Entry) {
        debug_assert!(entry.len > 0);
        let lane = &mut self.lanes[priority];
        debug_assert!(lane.entries.back().is_none_or(|e| e.seq < entry.seq));
        lane.live_bytes += u64::from(entry.len);
        lane.entries.push_back(entry);
    }

    /// Removes the pending record `seq`, if there is one.
    pub fn remove(&mut self, seq: u64) -> Option<(Priority, Entry)> {
        for priority in Priority::ALL {
            let lane = &mut self.lanes[priority];
            let Ok(i) = lane.entries.binary_search_by_key(&seq, |e| e.seq) else {
                continue;
            };
            let entry = lane.entries[i];
            if entry.len == 0 {
                return None;
            }
            lane.entries[i].len = 0;
            lane.tombstones += 1;
            lane.live_bytes -= u64::from(entry.len);
            lane.trim();
            return Some((priority, entry));
        }
        None
    }

    /// Removes and returns the oldest pending record of `priority`.
    pub fn pop_oldest(&mut self, priority: Priority) -> Option<Entry> {
        let lane = &mut self.lanes[priority];
        let entry = lane.entries.pop_front()?;
        // `trim` keeps tombstones off both ends, so the front is live.
        debug_assert!(entry.len > 0);
        lane.live_bytes -= u64::from(entry.len);
        lane.trim();
        Some(entry)
    }

    /// Live entries of one priority, oldest first.
    pub fn iter(&self, priority: Priority) -> impl Iterator<Item = &Entry> {
        self.lanes[priority].entries.iter().filter(|e| e.len > 0)
    }

    /// Pending records of one priority.
    pub fn records(&self, priority: Priority) -> u64 {
        self.lanes[priority].live() as u64
    }

    /// Pending frame bytes of one priority.
    pub fn bytes(&self, priority: Priority) -> u64 {
        self.lanes[priority].live_bytes
    }

    /// Pending frame bytes of all priorities.
    pub fn total_bytes(&self) -> u64 {
        Priority::ALL.iter().map(|&p| self.bytes(p)).sum()
    }

    /// Every pending sequence number in ascending order.
    pub fn sorted_seqs(&self) -> Vec<u64> {
        let mut seqs: Vec<u64> = Priority::ALL
            .iter()
            .flat_map(|&p| self.iter(p).map(|e| e.seq))
            .collect();
        seqs.sort_unstable();
        seqs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            offset: seq as u32 * 100,
            len: 100,
        }
    }

    #[test]
    fn removes_from_the_middle_and_keeps_order() {
        let mut index = Index::default();
        for seq in 1..=10 {
            let p = if seq % 2 == 0 {
                Priority::Alert
            } else {
                Priority::Telemetry
            };
            index.push(p, entry(seq));
        }
        assert_eq!(index.remove(4), Some((Priority::Alert, entry(4))));
        assert_eq!(index.remove(4), None, "second removal is a no-op");
        assert_eq!(index.remove(11), None, "unknown seq");
        assert_eq!(index.remove(1), Some((Priority::Telemetry, entry(1))));
        let alerts: Vec<u64> = index.iter(Priority::Alert).map(|e| e.seq).collect();
        assert_eq!(alerts, [2, 6, 8, 10]);
        assert_eq!(index.pop_oldest(Priority::Telemetry), Some(entry(3)));
        assert_eq!(index.records(Priority::Telemetry), 3);
        assert_eq!(index.bytes(Priority::Alert), 400);
        assert_eq!(index.total_bytes(), 700);
        assert_eq!(index.sorted_seqs(), [2, 5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn tombstones_are_reclaimed() {
        let mut index = Index::default();
        for seq in 1..=10_000 {
            index.push(Priority::Insight, entry(seq));
        }
        // Remove every record but the first and the last, from the middle out.
        for seq in 2..10_000 {
            assert!(index.remove(seq).is_some());
        }
        let lane = &index.lanes[Priority::Insight];
        assert!(
            lane.entries.len() < 200,
            "{} entries left",
            lane.entries.len()
        );
        assert_eq!(index.records(Priority::Insight), 2);
        assert_eq!(index.pop_oldest(Priority::Insight), Some(entry(1)));
        assert_eq!(index.pop_oldest(Priority::Insight), Some(entry(10_000)));
        assert_eq!(index.pop_oldest(Priority::Insight), None);
        assert_eq!(index.total_bytes(), 0);
    }
}
