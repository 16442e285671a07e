//! The frame codec shared by segment files and the ack log. Pure: no I/O.
//!
//! A frame is a 32-byte little-endian header followed by the payload:
//!
//! ```text
//! offset size field
//!      0    4 magic        FB 4F 42 58 ("\xFBOBX"; 0xFB never occurs in UTF-8)
//!      4    4 crc32        CRC-32 (IEEE) of bytes 8..32+payload_len
//!      8    4 payload_len  u32, at most MAX_PAYLOAD_BYTES
//!     12    1 kind         1 record, 2 ack, 3 evict, 4 refuse, 5 totals, 6 removed
//!     13    1 priority     0 alert, 1 insight, 2 telemetry
//!     14    2 reserved     zero
//!     16    8 seq          u64
//!     24    8 time_ms      u64, unix milliseconds
//!     32    n payload
//! ```

use crate::Priority;

/// Bytes of framing before every payload; the budget counts them.
pub const FRAME_HEADER_BYTES: usize = 32;

/// The largest payload a frame may carry (16 MiB). A length field above this
/// is treated as damage, which bounds what a corrupt header can make recovery
/// read or skip.
pub const MAX_PAYLOAD_BYTES: usize = 16 << 20;

pub(crate) const MAGIC: [u8; 4] = [0xFB, b'O', b'B', b'X'];

/// What a frame is for. Segments hold only `Record`; the ack log holds the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Record = 1,
    Ack = 2,
    Evict = 3,
    Refuse = 4,
    Totals = 5,
    Removed = 6,
}

impl Kind {
    fn from_u8(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Record,
            2 => Kind::Ack,
            3 => Kind::Evict,
            4 => Kind::Refuse,
            5 => Kind::Totals,
            6 => Kind::Removed,
            _ => return None,
        })
    }
}

/// A decoded, checksum-verified frame borrowing its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    pub kind: Kind,
    pub priority: Priority,
    pub seq: u64,
    pub time_ms: u64,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Bytes this frame occupies on disk.
    pub fn len(&self) -> usize {
        FRAME_HEADER_BYTES + self.payload.len()
    }
}

/// The result of decoding at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded<'a> {
    /// A complete, valid frame.
    Frame(Frame<'a>),
    /// The buffer ends before the frame does (a torn write, or a damaged length).
    Incomplete,
    /// Not a valid frame: wrong magic, impossible length, bad checksum or
    /// unknown field values.
    Corrupt,
}

/// Appends one encoded frame to `out`. The payload must not exceed
/// [`MAX_PAYLOAD_BYTES`]; callers check that first.
pub(crate) fn encode(
    out: &mut Vec<u8>,
    kind: Kind,
    priority: Priority,
    seq: u64,
    time_ms: u64,
    payload: &[u8],
) {
    debug_assert!(payload.len() <= MAX_PAYLOAD_BYTES);
    let start = out.len();
    out.reserve(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[kind as u8, priority as u8, 0, 0]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&time_ms.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes the frame at the start of `buf`. Never panics, whatever the bytes.
pub(crate) fn decode(buf: &[u8]) -> Decoded<'_> {
    let Some(header) = buf.get(..FRAME_HEADER_BYTES) else {
        // A prefix of the magic may be the start of a torn frame.
        let n = buf.len().min(MAGIC.len());
        return if buf[..n] == MAGIC[..n] {
            Decoded::Incomplete
        } else {
            Decoded::Corrupt
        };
    };
    if header[..4] != MAGIC {
        return Decoded::Corrupt;
    }
    let len = u32_at(header, 8) as usize;
    if len > MAX_PAYLOAD_BYTES {
        return Decoded::Corrupt;
    }
    let Some(frame) = buf.get(..FRAME_HEADER_BYTES + len) else {
        return Decoded::Incomplete;
    };
    if crc32fast::hash(&frame[8..]) != u32_at(header, 4) {
        return Decoded::Corrupt;
    }
    let (Some(kind), Some(priority), [0, 0]) = (
        Kind::from_u8(header[12]),
        Priority::from_u8(header[13]),
        [header[14], header[15]],
    ) else {
        return Decoded::Corrupt;
    };
    Decoded::Frame(Frame {
        kind,
        priority,
        seq: u64_at(header, 16),
        time_ms: u64_at(header, 24),
        payload: &frame[FRAME_HEADER_BYTES..],
    })
}

/// The offset of the next occurrence of the magic at or after `from`, where
/// recovery tries to resynchronise after damage.
pub(crate) fn next_magic(buf: &[u8], from: usize) -> Option<usize> {
    let rest = buf.get(from..)?;
    let mut at = 0;
    while let Some(i) = rest[at..].iter().position(|&b| b == MAGIC[0]) {
        let pos = at + i;
        if rest[pos..].starts_with(&MAGIC) {
            return Some(from + pos);
        }
        at = pos + 1;
    }
    None
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut bytes = [0; 4];
    bytes.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(bytes)
}

pub(crate) fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(kind: Kind, priority: Priority, seq: u64, time_ms: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, kind, priority, seq, time_ms, payload);
        out
    }

    #[test]
    fn roundtrips_a_table_of_frames() {
        let cases: &[(Kind, Priority, u64, u64, &[u8])] = &[
            (
                Kind::Record,
                Priority::Alert,
                1,
                1_700_000_000_000,
                b"{\"t\":1}",
            ),
            (Kind::Record, Priority::Telemetry, u64::MAX, 0, b""),
            (Kind::Ack, Priority::Alert, 0, 0, &[0xFB, b'O', b'B', b'X']),
            (Kind::Evict, Priority::Insight, 7, 9, &[0; 100]),
            (Kind::Totals, Priority::Alert, 42, 0, &[1; 56]),
        ];
        for &(kind, priority, seq, time_ms, payload) in cases {
            let bytes = encoded(kind, priority, seq, time_ms, payload);
            assert_eq!(bytes.len(), FRAME_HEADER_BYTES + payload.len());
            let Decoded::Frame(frame) = decode(&bytes) else {
                panic!("{kind:?} frame does not decode");
            };
            assert_eq!(
                frame,
                Frame {
                    kind,
                    priority,
                    seq,
                    time_ms,
                    payload
                }
            );
            assert_eq!(frame.len(), bytes.len());
        }
    }

    #[test]
    fn classifies_damage() {
        let good = encoded(Kind::Record, Priority::Insight, 5, 6, b"payload");
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = good.clone();
            f(&mut bytes);
            bytes
        };
        let too_long = ((MAX_PAYLOAD_BYTES + 1) as u32).to_le_bytes();
        let cases: Vec<(&str, Vec<u8>, Decoded)> = vec![
            ("empty", vec![], Decoded::Incomplete),
            ("magic prefix", MAGIC[..2].to_vec(), Decoded::Incomplete),
            (
                "header only",
                good[..FRAME_HEADER_BYTES].to_vec(),
                Decoded::Incomplete,
            ),
            (
                "missing last byte",
                good[..good.len() - 1].to_vec(),
                Decoded::Incomplete,
            ),
            ("zeros", vec![0; 64], Decoded::Corrupt),
            ("short garbage", vec![1, 2, 3], Decoded::Corrupt),
            ("flipped payload", with(&|b| b[35] ^= 1), Decoded::Corrupt),
            ("flipped seq", with(&|b| b[16] ^= 0x80), Decoded::Corrupt),
            ("flipped crc", with(&|b| b[4] ^= 1), Decoded::Corrupt),
            ("flipped magic", with(&|b| b[1] ^= 1), Decoded::Corrupt),
            (
                "impossible length",
                with(&|b| b[8..12].copy_from_slice(&too_long)),
                Decoded::Corrupt,
            ),
        ];
        for (name, bytes, expected) in cases {
            assert_eq!(decode(&bytes), expected, "{name}");
        }
    }

    #[test]
    fn unknown_kind_priority_or_reserved_bytes_are_corrupt_even_with_a_valid_crc() {
        for (at, value) in [(12, 0), (12, 9), (13, 3), (14, 1), (15, 1)] {
            let mut bytes = encoded(Kind::Record, Priority::Alert, 1, 1, b"x");
            bytes[at] = value;
            let crc = crc32fast::hash(&bytes[8..]);
            bytes[4..8].copy_from_slice(&crc.to_le_bytes());
            assert_eq!(decode(&bytes), Decoded::Corrupt, "byte {at} = {value}");
        }
    }

    #[test]
    fn finds_the_next_magic() {
        let mut buf = vec![0xFB, 0, b'O', 0xFB];
        buf.extend_from_slice(&MAGIC);
        buf.push(0);
        assert_eq!(next_magic(&buf, 0), Some(4));
        assert_eq!(next_magic(&buf, 4), Some(4));
        assert_eq!(next_magic(&buf, 5), None);
        assert_eq!(next_magic(&buf, 100), None);
    }

    fn priority() -> impl Strategy<Value = Priority> {
        prop_oneof![
            Just(Priority::Alert),
            Just(Priority::Insight),
            Just(Priority::Telemetry)
        ]
    }

    proptest! {
        #[test]
        fn encode_decode_roundtrip(
            priority in priority(),
            seq: u64,
            time_ms: u64,
            payload in proptest::collection::vec(any::<u8>(), 0..600),
            trailing in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut bytes = encoded(Kind::Record, priority, seq, time_ms, &payload);
            let len = bytes.len();
            bytes.extend_from_slice(&trailing);
            let Decoded::Frame(frame) = decode(&bytes) else {
                panic!("frame does not decode");
            };
            prop_assert_eq!(frame.len(), len);
            prop_assert_eq!((frame.kind, frame.priority, frame.seq, frame.time_ms), (Kind::Record, priority, seq, time_ms));
            prop_assert_eq!(frame.payload, &payload[..]);
            // Every strict prefix is incomplete, never a frame.
            for cut in [0, 1, FRAME_HEADER_BYTES - 1, FRAME_HEADER_BYTES, len - 1] {
                prop_assert_eq!(decode(&bytes[..cut.min(len - 1)]), Decoded::Incomplete);
            }
        }

        #[test]
        fn any_single_byte_change_is_detected(
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            at in any::<prop::sample::Index>(),
            xor in 1u8..,
        ) {
            let mut bytes = encoded(Kind::Record, Priority::Insight, 3, 4, &payload);
            let at = at.index(bytes.len());
            bytes[at] ^= xor;
            prop_assert!(!matches!(decode(&bytes), Decoded::Frame(_)));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
            let mut at = 0;
            while let Some(next) = next_magic(&bytes, at) {
                prop_assert!(next >= at);
                let _ = decode(&bytes[next..]);
                at = next + 1;
            }
        }
    }
}
