//! The device's client of the hub's macro tier: OpenAI-compatible calls
//! over the device's mutual-TLS identity, with a deadline for whole
//! answers and first bytes and an idle deadline inside streams, so that a
//! hub that dies mid-answer ends the stream with an error instead of a
//! hang.

use std::time::Duration;

use futures_util::StreamExt;
use protocol::route::MacroInfo;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::chain;
use crate::sse::SseDecoder;

/// Why a macro call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MacroError {
    /// The hub could not be reached or the connection broke.
    #[error("the hub's macro tier is unreachable: {0}")]
    Unreachable(String),
    /// No answer (or no next byte of a stream) within the deadline.
    #[error("the hub's macro tier did not answer within {0} ms")]
    Timeout(u128),
    /// The hub answered with an error status.
    #[error("the hub's macro tier answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The error's message, as the hub gave it.
        message: String,
    },
    /// The device's circuit breaker over macro calls is open: no call was
    /// made.
    #[error("the circuit breaker over macro calls is open")]
    BreakerOpen,
    /// The answer was not what an OpenAI-compatible server sends.
    #[error("the hub's macro tier sent a malformed answer: {0}")]
    Malformed(String),
}

impl MacroError {
    /// Whether this failure says the tier is unhealthy (the breaker counts
    /// it), as opposed to a request the tier rightly refused (a 4xx).
    pub fn is_tier_failure(&self) -> bool {
        match self {
            MacroError::Status { status, .. } => *status >= 500 || *status == 429,
            MacroError::BreakerOpen => false,
            _ => true,
        }
    }
}

/// One item of a streamed macro answer.
#[derive(Debug)]
pub enum StreamItem {
    /// A chunk (`data:` JSON).
    Chunk(Value),
    /// `data: [DONE]`.
    Done,
}

/// The macro tier, as the device reaches it.
#[derive(Debug, Clone)]
pub struct MacroClient {
    client: reqwest::Client,
    base: String,
    timeout: Duration,
    idle_timeout: Duration,
}

impl MacroClient {
    /// A client of the hub at `hub_url`, on the device's mTLS `client`.
    pub fn new(
        client: reqwest::Client,
        hub_url: &str,
        timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            client,
            base: hub_url.trim_end_matches('/').to_owned(),
            timeout,
            idle_timeout,
        }
    }

    /// The URL of a macro route, as written to the audit log.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// What the macro tier offers (`GET /v1/macro`).
    pub async fn info(&self) -> Result<MacroInfo, MacroError> {
        let response = self
            .client
            .get(self.url("/v1/macro"))
            .timeout(self.timeout.min(Duration::from_secs(10)))
            .send()
            .await
            .map_err(|e| unreachable(&e))?;
        let response = check(response).await?;
        response
            .json()
            .await
            .map_err(|e| MacroError::Malformed(chain(&e)))
    }

    fn post(&self, path: &str, body: &[u8], fleet: bool) -> reqwest::RequestBuilder {
        let request = self
            .client
            .post(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if fleet {
            request.header(protocol::route::CONTEXT_HEADER, "fleet")
        } else {
            request
        }
    }

    /// A whole answer from `path` (`/v1/chat/completions` or
    /// `/v1/embeddings`) to `body`; `fleet` asks the hub to answer with the
    /// fleet's figures.
    pub async fn call(&self, path: &str, body: &[u8], fleet: bool) -> Result<Value, MacroError> {
        let send = self.post(path, body, fleet).send();
        let answer = async {
            let response = check(send.await.map_err(|e| unreachable(&e))?).await?;
            let bytes = response.bytes().await.map_err(|e| unreachable(&e))?;
            serde_json::from_slice::<Value>(&bytes)
                .map_err(|e| MacroError::Malformed(e.to_string()))
        };
        tokio::time::timeout(self.timeout, answer)
            .await
            .map_err(|_| MacroError::Timeout(self.timeout.as_millis()))?
    }

    /// A streamed answer from `path` to `body`: waits for the response
    /// head (within the deadline), then yields items as they come. The
    /// receiver gets an `Err` and then nothing when the stream breaks,
    /// goes silent for longer than the idle deadline, or ends without
    /// `[DONE]`.
    pub async fn stream(
        &self,
        path: &str,
        body: &[u8],
        fleet: bool,
    ) -> Result<mpsc::Receiver<Result<StreamItem, MacroError>>, MacroError> {
        let send = self
            .post(path, body, fleet)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send();
        let response = tokio::time::timeout(self.timeout, send)
            .await
            .map_err(|_| MacroError::Timeout(self.timeout.as_millis()))?
            .map_err(|e| unreachable(&e))?;
        let response = check(response).await?;
        let (tx, rx) = mpsc::channel(64);
        let idle = self.idle_timeout;
        tokio::spawn(async move {
            let mut bytes = response.bytes_stream();
            let mut decoder = SseDecoder::default();
            loop {
                let next = match tokio::time::timeout(idle, bytes.next()).await {
                    Err(_) => Err(MacroError::Timeout(idle.as_millis())),
                    Ok(None) => Err(MacroError::Unreachable(
                        "the stream ended before [DONE]".into(),
                    )),
                    Ok(Some(Err(e))) => Err(unreachable(&e)),
                    Ok(Some(Ok(b))) => decoder
                        .push(&b)
                        .map_err(|e| MacroError::Malformed(e.to_string())),
                };
                let events = match next {
                    Ok(events) => events,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                for event in events {
                    if event.data == "[DONE]" {
                        let _ = tx.send(Ok(StreamItem::Done)).await;
                        return;
                    }
                    let item = match serde_json::from_str::<Value>(&event.data) {
                        Ok(v) if v.get("error").is_some() => Err(MacroError::Status {
                            status: 502,
                            message: error_message(&v),
                        }),
                        Ok(v) => Ok(StreamItem::Chunk(v)),
                        Err(e) => Err(MacroError::Malformed(e.to_string())),
                    };
                    let failed = item.is_err();
                    if tx.send(item).await.is_err() || failed {
                        // The client went away (dropping the response
                        // closes the hub connection), or the hub reported
                        // an error: either way the stream is over.
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

fn unreachable(e: &reqwest::Error) -> MacroError {
    if e.is_timeout() {
        return MacroError::Timeout(0);
    }
    MacroError::Unreachable(chain(e))
}

/// The message of an OpenAI error body or an RFC 9457 problem.
fn error_message(v: &Value) -> String {
    v.pointer("/error/message")
        .or_else(|| v.get("detail"))
        .or_else(|| v.get("title"))
        .and_then(Value::as_str)
        .unwrap_or("no message")
        .to_owned()
}

async fn check(response: reqwest::Response) -> Result<reqwest::Response, MacroError> {
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .map(|v| error_message(&v))
        .unwrap_or_else(|_| text.chars().take(200).collect());
    Err(MacroError::Status { status, message })
}
