//! Turning a stream of token bytes into a stream of text.
//!
//! A token is a piece of bytes, not of text: one emoji can span two tokens,
//! and a stop sequence can span several. [`Utf8Stream`] holds back the bytes
//! of an unfinished character; [`StopFilter`] holds back text that could be
//! the start of a stop sequence, so that what has been streamed never has to
//! be taken back.

/// Decodes UTF-8 that arrives in arbitrary byte chunks.
#[derive(Debug, Default)]
pub(crate) struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds bytes and returns the text they complete. Invalid sequences
    /// become U+FFFD; an unfinished character at the end is kept for later.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is valid UTF-8 by construction.
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    /// Returns whatever is left (an unfinished character becomes U+FFFD).
    pub(crate) fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// What the stop filter decided about newly decoded text.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Released {
    /// Text that can be streamed now.
    pub(crate) text: String,
    /// The index of the stop sequence that was matched, if one was.
    pub(crate) stop: Option<usize>,
}

/// Holds back text that might be the beginning of a stop sequence.
#[derive(Debug)]
pub(crate) struct StopFilter {
    stops: Vec<String>,
    held: String,
}

impl StopFilter {
    /// A filter for the given stop sequences (empty ones are ignored).
    pub(crate) fn new(stops: &[String]) -> Self {
        StopFilter {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds decoded text; returns what can be released and whether a stop
    /// sequence was completed (in which case the text before it is released
    /// and the stop sequence itself and everything after it is dropped).
    pub(crate) fn push(&mut self, text: &str) -> Released {
        self.held.push_str(text);
        let earliest = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|pos| (pos, i)))
            .min();
        if let Some((pos, i)) = earliest {
            let text = self.held[..pos].to_owned();
            self.held.clear();
            return Released {
                text,
                stop: Some(i),
            };
        }
        // The longest suffix of the held text that is a proper prefix of a
        // stop sequence must stay held; everything before it can go.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let suffix = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(suffix))
            })
            .unwrap_or(self.held.len());
        let text = self.held[..keep_from].to_owned();
        self.held.replace_range(..keep_from, "");
        Released { text, stop: None }
    }

    /// Releases everything still held (generation ended without a stop).
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_chunks() {
        let text = "é😀 ok";
        let bytes = text.as_bytes();
        // Feed one byte at a time: no replacement characters, same text.
        let mut dec = Utf8Stream::default();
        let mut out = String::new();
        for b in bytes {
            out.push_str(&dec.push(std::slice::from_ref(b)));
        }
        out.push_str(&dec.finish());
        assert_eq!(out, text);
    }

    #[test]
    fn utf8_invalid_bytes_are_replaced() {
        let mut dec = Utf8Stream::default();
        assert_eq!(dec.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(dec.push(b"\xe2\x82"), "");
        assert_eq!(dec.finish(), "\u{fffd}");
    }

    /// Stop sequences, chunks fed in, expected released text, expected stop index.
    type StopCase<'a> = (&'a [&'a str], &'a [&'a str], &'a str, Option<usize>);

    #[test]
    fn stop_filter_cases() {
        let cases: &[StopCase] = &[
            (&[], &["Hello", " world"], "Hello world", None),
            (&["\n\n"], &["a\n", "\nb"], "a", Some(0)),
            (&["END"], &["foo E", "N", "D bar"], "foo ", Some(0)),
            (&["END"], &["foo E", "N", "x"], "foo ENx", None),
            (&["xyz", "y"], &["axyz"], "a", Some(0)),
            (&["y", "xyz"], &["axyz"], "a", Some(1)),
            (&["é!"], &["caf", "é", "?"], "café?", None),
        ];
        for (stops, chunks, expected, expected_stop) in cases {
            let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
            let mut f = StopFilter::new(&stops);
            let mut out = String::new();
            let mut stop = None;
            for c in *chunks {
                let r = f.push(c);
                out.push_str(&r.text);
                if r.stop.is_some() {
                    stop = r.stop;
                    break;
                }
            }
            if stop.is_none() {
                out.push_str(&f.finish());
            }
            assert_eq!(&out, expected, "stops {stops:?} chunks {chunks:?}");
            assert_eq!(&stop, expected_stop, "stops {stops:?} chunks {chunks:?}");
        }
    }

    #[test]
    fn stop_filter_holds_back_only_possible_prefixes() {
        let mut f = StopFilter::new(&["<end>".to_owned()]);
        assert_eq!(f.push("abc <e").text, "abc ");
        assert_eq!(f.push("x").text, "<ex");
    }
}
