//! A minimal Server-Sent Events decoder for the hub's event stream: enough of
//! the WHATWG event-stream format for `event`, `data`, `id` and comments.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, `message` when absent.
    pub event: String,
    /// The `data:` lines joined with newlines.
    pub data: String,
    /// The `id:` field, if the event had one.
    pub id: Option<String>,
}

/// Incremental decoder: feed bytes as they arrive, get whole events out.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    event: Option<String>,
    data: Vec<String>,
    id: Option<String>,
}

/// Longest line accepted; a hub never sends more, so more is a broken stream.
const MAX_LINE: usize = 1 << 20;

/// The stream broke the format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event stream line longer than {MAX_LINE} bytes or not UTF-8")]
pub struct SseError;

impl SseDecoder {
    /// Feeds bytes; returns the events they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8(line).map_err(|_| SseError)?;
            self.line(&line, &mut out);
        }
        if self.buf.len() > MAX_LINE {
            return Err(SseError);
        }
        Ok(out)
    }

    fn line(&mut self, line: &str, out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if !self.data.is_empty() || self.event.is_some() {
                out.push(SseEvent {
                    event: self.event.take().unwrap_or_else(|| "message".into()),
                    data: std::mem::take(&mut self.data).join("\n"),
                    id: self.id.take(),
                });
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => self.data.push(value.to_owned()),
            "id" => self.id = Some(value.to_owned()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_events_split_across_chunks() {
        let mut d = SseDecoder::default();
        let stream = b": keep-alive\n\nevent: hello\ndata: {\"a\":1}\n\nevent: message\nid: 5\r\ndata: x\ndata: y\n\n";
        let mut events = Vec::new();
        for chunk in stream.chunks(3) {
            events.extend(d.push(chunk).unwrap());
        }
        assert_eq!(
            events,
            vec![
                SseEvent {
                    event: "hello".into(),
                    data: "{\"a\":1}".into(),
                    id: None
                },
                SseEvent {
                    event: "message".into(),
                    data: "x\ny".into(),
                    id: Some("5".into())
                },
            ]
        );
    }

    #[test]
    fn an_endless_line_is_an_error() {
        let mut d = SseDecoder::default();
        assert!(d.push(&vec![b'a'; MAX_LINE + 1]).is_err());
    }
}
