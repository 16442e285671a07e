use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use crate::FRAME_HEADER_BYTES;
use crate::recover::QUARANTINE_DIR;

/// Every test record's frame is exactly this big (68-byte payload).
const FRAME: u64 = 100;

fn config(dir: &Path) -> Config {
    Config {
        segment_bytes: 4096,
        ..Config::new(dir)
    }
}

fn rec(priority: Priority, n: u64) -> NewRecord {
    let record = NewRecord::new(
        priority,
        1_700_000_000_000 + n,
        format!("{:<10}{n:058}", priority.as_str()),
    );
    assert_eq!(record.frame_bytes(), FRAME);
    record
}

fn all(outbox: &Outbox) -> Vec<Record> {
    outbox.pending(usize::MAX, u64::MAX).unwrap()
}

fn seqs(outbox: &Outbox) -> Vec<u64> {
    all(outbox).iter().map(|r| r.seq).collect()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_segment_name)
                .is_some()
        })
        .collect();
    files.sort();
    files
}

fn quarantine_files(dir: &Path) -> usize {
    fs::read_dir(dir.join(QUARANTINE_DIR)).map_or(0, |d| d.count())
}

#[test]
fn append_pending_ack_roundtrip_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = {
        let outbox = Outbox::open(config(dir.path())).unwrap();
        let a = outbox.append(rec(Priority::Insight, 1)).unwrap();
        let b = outbox.append(rec(Priority::Insight, 2)).unwrap();
        let c = outbox.append(rec(Priority::Insight, 3)).unwrap();
        assert_eq!((a, b, c), (1, 2, 3));
        (a, b, c)
    };
    let outbox = Outbox::open(config(dir.path())).unwrap();
    let records = all(&outbox);
    assert_eq!(records.len(), 3);
    assert_eq!(
        records[1],
        Record {
            seq: b,
            priority: Priority::Insight,
            time_ms: 1_700_000_000_002,
            payload: rec(Priority::Insight, 2).payload,
        }
    );
    assert_eq!(
        outbox.ack(&[b, b, 999]).unwrap(),
        1,
        "duplicates and unknown seqs are ignored"
    );
    assert_eq!(outbox.ack(&[b]).unwrap(), 0, "acking twice is a no-op");
    drop(outbox);

    let outbox = Outbox::open(config(dir.path())).unwrap();
    assert_eq!(seqs(&outbox), [a, c]);
    let stats = outbox.stats();
    assert_eq!((stats.appended, stats.acked), (3, 1));
    assert_eq!(stats.pending_records.insight, 2);
    assert_eq!(stats.pending_bytes.insight, 2 * FRAME);
}

#[test]
fn pending_orders_by_priority_then_seq_within_limits() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    let order = [
        Priority::Telemetry,
        Priority::Insight,
        Priority::Alert,
        Priority::Telemetry,
        Priority::Alert,
        Priority::Insight,
    ];
    let records = order
        .iter()
        .enumerate()
        .map(|(i, &p)| rec(p, i as u64))
        .collect();
    let appended: Vec<u64> = outbox
        .append_batch(records)
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(appended, [1, 2, 3, 4, 5, 6]);

    let payload = FRAME - FRAME_HEADER_BYTES as u64;
    let cases: &[(usize, u64, &[u64])] = &[
        (usize::MAX, u64::MAX, &[3, 5, 2, 6, 1, 4]),
        (3, u64::MAX, &[3, 5, 2]),
        (0, u64::MAX, &[]),
        (usize::MAX, 2 * payload, &[3, 5]),
        (usize::MAX, 2 * payload + 1, &[3, 5]),
        (usize::MAX, 1, &[3]), // the first record always comes back
    ];
    for &(max_records, max_bytes, expected) in cases {
        let got: Vec<u64> = outbox
            .pending(max_records, max_bytes)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(got, expected, "pending({max_records}, {max_bytes})");
    }
    // Without acks, the same records come back.
    assert_eq!(seqs(&outbox), [3, 5, 2, 6, 1, 4]);
}

#[test]
fn sequence_numbers_continue_after_restart_even_when_all_is_acked() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        ack_log_compact_bytes: 0, // compact after every batch
        ..config(dir.path())
    };
    for round in 0..3 {
        let outbox = Outbox::open(cfg.clone()).unwrap();
        let records = (0..50).map(|n| rec(Priority::Insight, n)).collect();
        let got: Vec<u64> = outbox
            .append_batch(records)
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let first = round * 50 + 1;
        assert_eq!(got, (first..first + 50).collect::<Vec<_>>());
        assert_eq!(outbox.ack(&got).unwrap(), 50);
        assert!(all(&outbox).is_empty());
    }
    let outbox = Outbox::open(cfg).unwrap();
    assert!(all(&outbox).is_empty());
    assert_eq!(outbox.append(rec(Priority::Alert, 0)).unwrap(), 151);
    assert_eq!(outbox.stats().acked, 150);
}

#[test]
fn segments_are_deleted_once_fully_acked() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    let records = (0..200).map(|n| rec(Priority::Telemetry, n)).collect();
    let got: Vec<u64> = outbox
        .append_batch(records)
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let before = segment_files(dir.path()).len();
    assert_eq!(before as u64, outbox.stats().segments);
    assert!(before >= 5, "{before} segments of 4 KiB hold 20 KB");

    // Acking the first half frees the segments that hold only those.
    outbox.ack(&got[..100]).unwrap();
    let middle = segment_files(dir.path()).len();
    assert!(middle < before && middle > 1, "{middle} segments left");
    outbox.ack(&got[100..]).unwrap();
    assert_eq!(
        segment_files(dir.path()).len(),
        1,
        "only the active segment remains"
    );
    drop(outbox);
    let outbox = Outbox::open(config(dir.path())).unwrap();
    assert!(all(&outbox).is_empty());
    assert_eq!(outbox.stats().segments, 1);
}

#[test]
fn ack_log_stays_small_under_many_ack_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        ack_log_compact_bytes: 4096,
        ..config(dir.path())
    };
    let outbox = Outbox::open(cfg.clone()).unwrap();
    // Keep one old record pending so that its segment (and acks) stay live.
    let keep = outbox.append(rec(Priority::Telemetry, 0)).unwrap();
    for n in 0..300 {
        let seq = outbox.append(rec(Priority::Insight, n)).unwrap();
        outbox.ack(&[seq]).unwrap();
    }
    let ack_log = fs::metadata(dir.path().join(crate::acklog::FILE_NAME))
        .unwrap()
        .len();
    assert!(ack_log <= 2 * 4096 + 200, "ack log is {ack_log} bytes");
    drop(outbox);
    let outbox = Outbox::open(cfg).unwrap();
    assert_eq!(seqs(&outbox), [keep]);
    assert_eq!(outbox.stats().acked, 300);
}

#[test]
fn overflow_evicts_lowest_priority_oldest_first_durably() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        budget_bytes: 6 * FRAME,
        ..config(dir.path())
    };
    let outbox = Outbox::open(cfg.clone()).unwrap();
    use Priority::{Alert as A, Insight as I, Telemetry as T};
    // (incoming priority, expected outcome, pending seqs afterwards)
    let steps: &[(Priority, Option<u64>, &[u64])] = &[
        (T, Some(1), &[1]),
        (I, Some(2), &[2, 1]),
        (T, Some(3), &[2, 1, 3]),
        (A, Some(4), &[4, 2, 1, 3]),
        (I, Some(5), &[4, 2, 5, 1, 3]),
        (T, Some(6), &[4, 2, 5, 1, 3, 6]),
        // Full: an alert evicts the oldest telemetry.
        (A, Some(7), &[4, 7, 2, 5, 3, 6]),
        // An insight evicts telemetry before insights.
        (I, Some(8), &[4, 7, 2, 5, 8, 6]),
        (I, Some(9), &[4, 7, 2, 5, 8, 9]),
        // No telemetry left: the oldest insight goes.
        (I, Some(10), &[4, 7, 5, 8, 9, 10]),
        // Telemetry may only evict telemetry, and there is none: refused.
        (T, None, &[4, 7, 5, 8, 9, 10]),
        // A refusal consumes no sequence number.
        (A, Some(11), &[4, 7, 11, 8, 9, 10]),
    ];
    for (i, &(priority, expected, pending)) in steps.iter().enumerate() {
        let got = outbox.append(rec(priority, i as u64));
        match expected {
            Some(seq) => assert_eq!(got.unwrap(), seq, "step {i}"),
            None => assert!(
                matches!(got, Err(Error::BudgetFull { priority: p, .. }) if p == priority),
                "step {i}: {got:?}"
            ),
        }
        assert_eq!(seqs(&outbox), pending, "step {i}");
    }
    let expect_counters = |stats: &Stats| {
        assert_eq!(
            stats.evicted,
            PerPriority {
                alert: 0,
                insight: 2,
                telemetry: 3
            }
        );
        assert_eq!(
            stats.refused,
            PerPriority {
                alert: 0,
                insight: 0,
                telemetry: 1
            }
        );
        assert_eq!(stats.pending_bytes.total(), 6 * FRAME);
    };
    expect_counters(&outbox.stats());
    drop(outbox);
    let outbox = Outbox::open(cfg.clone()).unwrap();
    assert_eq!(
        seqs(&outbox),
        [4, 7, 11, 8, 9, 10],
        "evicted records stay evicted"
    );
    expect_counters(&outbox.stats());
    drop(outbox);

    // Lowering the budget evicts on open, in the same order, durably.
    let smaller = Config {
        budget_bytes: 3 * FRAME,
        ..cfg
    };
    drop(Outbox::open(smaller.clone()).unwrap());
    let outbox = Outbox::open(smaller).unwrap();
    assert_eq!(seqs(&outbox), [4, 7, 11]);
    assert_eq!(outbox.stats().evicted.insight, 5);
}

#[test]
fn a_batch_reports_each_record_and_may_evict_its_own_records() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        budget_bytes: 2 * FRAME,
        ..config(dir.path())
    };
    let outbox = Outbox::open(cfg).unwrap();
    let mut huge = rec(Priority::Alert, 0);
    huge.payload = vec![b'x'; 500];
    let outcomes = outbox
        .append_batch(vec![
            rec(Priority::Telemetry, 1),
            rec(Priority::Alert, 2),
            rec(Priority::Alert, 3),
            huge,
            rec(Priority::Insight, 4),
        ])
        .unwrap();
    assert!(
        matches!(outcomes[..3], [Ok(1), Ok(2), Ok(3)]),
        "{outcomes:?}"
    );
    assert!(
        matches!(
            outcomes[3],
            Err(Error::TooLarge {
                frame_bytes: 532,
                limit_bytes: 200,
                ..
            })
        ),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[4], Err(Error::BudgetFull { .. })),
        "{outcomes:?}"
    );
    assert_eq!(seqs(&outbox), [2, 3]);
    let stats = outbox.stats();
    assert_eq!(
        (
            stats.evicted.telemetry,
            stats.refused.alert,
            stats.refused.insight
        ),
        (1, 1, 1)
    );
}

#[test]
fn an_oversized_record_is_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        budget_bytes: 1000,
        ..config(dir.path())
    };
    let outbox = Outbox::open(cfg.clone()).unwrap();
    let err = outbox
        .append(NewRecord::new(Priority::Alert, 0, vec![0; 1000]))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "alert record of 1032 bytes is larger than the limit of 1000 bytes"
    );
    assert!(all(&outbox).is_empty());
    drop(outbox);
    assert_eq!(Outbox::open(cfg).unwrap().stats().refused.alert, 1);
}

#[test]
fn a_torn_tail_is_truncated_once() {
    let dir = tempfile::tempdir().unwrap();
    {
        let outbox = Outbox::open(config(dir.path())).unwrap();
        for n in 0..3 {
            outbox.append(rec(Priority::Insight, n)).unwrap();
        }
    }
    let segment = segment_files(dir.path()).pop().unwrap();
    let mut partial = Vec::new();
    crate::frame::encode(&mut partial, Kind::Record, Priority::Alert, 4, 0, &[7; 50]);
    partial.truncate(60);
    fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap()
        .write_all(&partial)
        .unwrap();

    let outbox = Outbox::open(config(dir.path())).unwrap();
    assert_eq!(seqs(&outbox), [1, 2, 3]);
    assert_eq!(outbox.stats().torn_tail_bytes, 60);
    assert_eq!(fs::metadata(&segment).unwrap().len(), 3 * FRAME);
    assert_eq!(outbox.append(rec(Priority::Alert, 4)).unwrap(), 4);
    drop(outbox);
    let outbox = Outbox::open(config(dir.path())).unwrap();
    assert_eq!(seqs(&outbox), [4, 1, 2, 3]);
    assert_eq!(outbox.stats().torn_tail_bytes, 0);
    assert_eq!(outbox.stats().quarantined_frames, 0);
}

#[test]
fn damage_in_the_middle_is_quarantined_and_later_records_survive() {
    // (what is damaged, byte offset within the second frame, xor mask)
    let cases: &[(&str, usize, u8)] = &[
        ("magic", 0, 0xFF),
        ("checksum", 5, 0x01),
        ("length made impossible", 11, 0x7F),
        ("length made too long", 9, 0x01),
        ("sequence number", 16, 0x01),
        ("payload", 70, 0x20),
    ];
    for &(what, at, mask) in cases {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(config(dir.path())).unwrap();
            for n in 0..5 {
                outbox.append(rec(Priority::Insight, n)).unwrap();
            }
            outbox.append(rec(Priority::Alert, 5)).unwrap();
        }
        let segment = segment_files(dir.path()).pop().unwrap();
        let mut bytes = fs::read(&segment).unwrap();
        bytes[FRAME as usize + at] ^= mask;
        fs::write(&segment, &bytes).unwrap();

        for open in 0..2 {
            let outbox = Outbox::open(config(dir.path())).unwrap();
            assert_eq!(seqs(&outbox), [6, 1, 3, 4, 5], "{what}, open {open}");
            let stats = outbox.stats();
            assert_eq!(
                (stats.quarantined_frames, stats.quarantined_bytes),
                (1, FRAME),
                "{what}, open {open}"
            );
            assert_eq!(stats.torn_tail_bytes, 0, "{what}");
            assert_eq!(
                quarantine_files(dir.path()),
                1,
                "{what}: nothing is quarantined twice"
            );
        }
        let quarantined = fs::read_dir(dir.path().join(QUARANTINE_DIR))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            fs::read(quarantined.path()).unwrap(),
            bytes[FRAME as usize..2 * FRAME as usize],
            "{what}"
        );
        let outbox = Outbox::open(config(dir.path())).unwrap();
        assert_eq!(outbox.append(rec(Priority::Alert, 6)).unwrap(), 7, "{what}");
    }
}

#[test]
fn damage_in_the_ack_log_means_redelivery_not_loss() {
    let dir = tempfile::tempdir().unwrap();
    {
        let outbox = Outbox::open(config(dir.path())).unwrap();
        for n in 0..4 {
            outbox.append(rec(Priority::Insight, n)).unwrap();
        }
        outbox.ack(&[1]).unwrap();
        outbox.ack(&[2]).unwrap();
        outbox.ack(&[3]).unwrap();
    }
    let path = dir.path().join(crate::acklog::FILE_NAME);
    let mut bytes = fs::read(&path).unwrap();
    bytes[40] ^= 1; // inside the first ack frame's payload
    fs::write(&path, &bytes).unwrap();
    for _ in 0..2 {
        let outbox = Outbox::open(config(dir.path())).unwrap();
        assert_eq!(
            seqs(&outbox),
            [1, 4],
            "the lost ack is redelivered, the others hold"
        );
        assert_eq!(outbox.stats().quarantined_frames, 1);
        assert_eq!(quarantine_files(dir.path()), 1);
    }
}

#[test]
fn a_record_damaged_while_open_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    for n in 0..3 {
        outbox.append(rec(Priority::Insight, n)).unwrap();
    }
    let segment = segment_files(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&segment).unwrap();
    bytes[FRAME as usize + 50] ^= 1;
    fs::write(&segment, &bytes).unwrap();
    assert_eq!(seqs(&outbox), [1, 3]);
    assert_eq!(outbox.stats().corrupt_reads, 1);
    drop(outbox);
    let outbox = Outbox::open(config(dir.path())).unwrap();
    assert_eq!(seqs(&outbox), [1, 3]);
    assert_eq!(outbox.stats().quarantined_frames, 1);
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    let err = Outbox::open(config(dir.path())).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains(&dir.path().display().to_string()));
    drop(outbox);
    Outbox::open(config(dir.path())).unwrap();
}

#[test]
fn invalid_config_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            Config {
                segment_bytes: 100,
                ..config(dir.path())
            },
            "segment_bytes",
        ),
        (
            Config {
                budget_bytes: 32,
                ..config(dir.path())
            },
            "budget_bytes",
        ),
    ];
    for (cfg, field) in cases {
        let err = Outbox::open(cfg).unwrap_err();
        assert!(
            matches!(err, Error::Config { field: f, .. } if f == field),
            "{err:?}"
        );
    }
}

#[test]
fn concurrent_appenders_get_distinct_seqs_and_all_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    let (threads, per_thread) = (16, 50);
    let appended: Vec<(u64, Vec<u8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let outbox = &outbox;
                s.spawn(move || {
                    (0..per_thread)
                        .map(|n| {
                            let record = rec(Priority::ALL[t % 3], (t * 1000 + n) as u64);
                            (outbox.append(record.clone()).unwrap(), record.payload)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let distinct: BTreeSet<u64> = appended.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(distinct.len(), threads * per_thread);
    assert_eq!(distinct.last(), Some(&((threads * per_thread) as u64)));
    drop(outbox);

    let outbox = Outbox::open(config(dir.path())).unwrap();
    let mut read: Vec<(u64, Vec<u8>)> = all(&outbox)
        .into_iter()
        .map(|r| (r.seq, r.payload))
        .collect();
    read.sort();
    let mut appended = appended;
    appended.sort();
    assert_eq!(read, appended);
}

const CRASH_DIR_VAR: &str = "OUTBOX_CRASH_TEST_DIR";

/// Not a test of its own: the body of the child process that
/// `survives_kill_9_at_a_random_moment` starts and kills. Appends from several
/// threads and acks from one, printing each seq only after its call returned.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR_VAR) else {
        return;
    };
    let outbox = Outbox::open(config(Path::new(&dir))).unwrap();
    let print = |line: String| {
        let mut out = std::io::stdout().lock();
        out.write_all(line.as_bytes()).unwrap();
        out.flush().unwrap();
    };
    // libtest has printed "test ... " without a newline: end that line.
    print("\n".into());
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (outbox, print) = (&outbox, &print);
            s.spawn(move || {
                for n in 0.. {
                    let batch = (0..1 + n % 3)
                        .map(|i| rec(Priority::ALL[(t % 3) as usize], i))
                        .collect();
                    for seq in outbox.append_batch(batch).unwrap() {
                        print(format!("seq {}\n", seq.unwrap()));
                    }
                }
            });
        }
        s.spawn(|| {
            loop {
                let batch: Vec<u64> = outbox
                    .pending(7, u64::MAX)
                    .unwrap()
                    .iter()
                    .map(|r| r.seq)
                    .collect();
                if batch.is_empty() {
                    std::thread::yield_now();
                    continue;
                }
                // Announce first: an ack may be durable before the kill
                // lands yet never reported as done.
                print(batch.iter().map(|seq| format!("acking {seq}\n")).collect());
                outbox.ack(&batch).unwrap();
                print(batch.iter().map(|seq| format!("acked {seq}\n")).collect());
            }
        });
    });
}

#[test]
fn survives_kill_9_at_a_random_moment() {
    let dir = tempfile::tempdir().unwrap();
    let mut reported = Reported::default();
    for round in 0..3 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let kill_after = 200 + (nanos % 3000) as usize;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::tests::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_DIR_VAR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut completed = 0;
        // Kill once the child has reported `kill_after` completed calls.
        for line in lines.by_ref() {
            completed += usize::from(reported.line(&line.unwrap()));
            if completed >= kill_after || Instant::now() > deadline {
                break;
            }
        }
        assert!(
            completed >= kill_after,
            "round {round}: child reported only {completed} calls"
        );
        child.kill().unwrap(); // SIGKILL
        // Lines printed before the kill are still in the pipe.
        for line in lines {
            let Ok(line) = line else { break };
            reported.line(&line);
        }
        child.wait().unwrap();

        let outbox = Outbox::open(config(dir.path())).unwrap();
        let pending: BTreeSet<u64> = seqs(&outbox).into_iter().collect();
        let lost: Vec<_> = reported
            .appended
            .iter()
            .filter(|s| !pending.contains(s) && !reported.acking.contains(s))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: appended, never acked, yet lost: {lost:?}"
        );
        let resurrected: Vec<_> = reported.acked.intersection(&pending).collect();
        assert!(
            resurrected.is_empty(),
            "round {round}: acked but pending: {resurrected:?}"
        );
        let stats = outbox.stats();
        assert!(stats.appended >= *reported.appended.last().unwrap());
        assert_eq!(
            stats.quarantined_frames, 0,
            "a crash tears at most the tail"
        );
    }
}

/// What the crash child reported before it was killed.
#[derive(Default)]
struct Reported {
    appended: BTreeSet<u64>,
    acking: BTreeSet<u64>,
    acked: BTreeSet<u64>,
}

impl Reported {
    /// Parses one line; true if it reports a completed call.
    fn line(&mut self, line: &str) -> bool {
        // A line cut by the kill has no newline and fails to parse: skip it.
        let parsed = |prefix| {
            line.strip_prefix(prefix)
                .and_then(|s| s.parse::<u64>().ok())
        };
        if let Some(seq) = parsed("seq ") {
            assert!(self.appended.insert(seq), "seq {seq} handed out twice");
            true
        } else if let Some(seq) = parsed("acking ") {
            self.acking.insert(seq);
            false
        } else if let Some(seq) = parsed("acked ") {
            self.acked.insert(seq)
        } else {
            false
        }
    }
}
