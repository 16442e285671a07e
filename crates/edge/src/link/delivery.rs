//! Delivery of the outbox to the hub: batches of insights, highest priority
//! first, acknowledged (deleted on the device) only after the hub answered
//! that it committed them. A batch whose answer is lost is sent again; the
//! hub recognises the keys and stores nothing twice.

use std::sync::Arc;
use std::time::Duration;

use protocol::insight::MAX_BATCH_BYTES;

use super::{Backoff, Link};
use crate::insights::{Insights, render};
use crate::{Error, refused};

/// Longest a quiet outbox waits before looking again (appends wake it sooner).
const IDLE_POLL: Duration = Duration::from_secs(5);

impl Link {
    /// Delivers insights until the device is revoked.
    pub async fn delivery_loop(self, insights: Arc<Insights>, batch_max: usize) {
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        // Leave room for the envelope around the insights.
        let max_bytes = (MAX_BATCH_BYTES - 64 * 1024) as u64;
        while !self.status.is_revoked() {
            let outbox = Arc::clone(&insights);
            let pending =
                tokio::task::spawn_blocking(move || outbox.outbox().pending(batch_max, max_bytes))
                    .await;
            let records = match pending {
                Ok(Ok(records)) => records,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "outbox read task failed");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            if records.is_empty() {
                let _ = tokio::time::timeout(IDLE_POLL, insights.appended.notified()).await;
                continue;
            }

            let mut seqs = Vec::with_capacity(records.len());
            let mut texts = Vec::with_capacity(records.len());
            let mut unreadable = Vec::new();
            for r in &records {
                match render(insights.outbox_id(), r.seq, &r.payload) {
                    Ok(text) => {
                        seqs.push(r.seq);
                        texts.push(text);
                    }
                    Err(e) => {
                        // A record that passed its checksum but is not an
                        // insight cannot become one by waiting: drop it,
                        // counted, rather than block the queue behind it.
                        tracing::error!(error = %e, "dropping an unreadable insight");
                        insights.rejected();
                        unreadable.push(r.seq);
                    }
                }
            }
            if !unreadable.is_empty() {
                self.ack(&insights, unreadable).await;
            }
            if seqs.is_empty() {
                continue;
            }
            let body = format!(
                r#"{{"device_id":{},"insights":[{}]}}"#,
                serde_json::Value::String(self.status.enrolment().device_id.to_string()),
                texts.join(",")
            );
            let bytes = body.len() as u64;
            match self.send_batch(body).await {
                Ok(()) => {
                    let n = seqs.len() as u64;
                    self.ack(&insights, seqs).await;
                    insights.delivered(n, bytes);
                    backoff.reset();
                }
                Err(e) => {
                    if self.check_revoked(&e) {
                        return;
                    }
                    if let Some(i) = rejected_index(&e)
                        && let Some(&seq) = seqs.get(i)
                    {
                        tracing::error!(error = %e, seq, "hub refused an insight; dropping it");
                        insights.rejected();
                        self.ack(&insights, vec![seq]).await;
                        continue;
                    }
                    tracing::warn!(error = %e, pending = seqs.len(), "insight delivery failed; will retry");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    async fn send_batch(&self, body: String) -> Result<(), Error> {
        let response = self
            .client
            .post(format!("{}/insights", self.base))
            .timeout(self.config.request_timeout)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        if !response.status().is_success() {
            return Err(refused(response).await);
        }
        // The answer's body is informative only; success means committed.
        Ok(())
    }

    async fn ack(&self, insights: &Arc<Insights>, seqs: Vec<u64>) {
        let outbox = Arc::clone(insights);
        match tokio::task::spawn_blocking(move || outbox.outbox().ack(&seqs)).await {
            Ok(Ok(_)) => {}
            // The hub has the insights; failing to forget them only means
            // they are sent again and recognised as duplicates.
            Ok(Err(e)) => tracing::error!(error = %e, "cannot record delivered insights"),
            Err(e) => tracing::error!(error = %e, "outbox ack task failed"),
        }
    }
}

/// The index of the record a `malformed-insight` refusal names.
fn rejected_index(e: &Error) -> Option<usize> {
    match e {
        Error::Refused {
            status: 400,
            slug,
            detail,
        } if slug == "malformed-insight" => detail
            .strip_prefix("insight ")?
            .split(':')
            .next()?
            .parse()
            .ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_record() {
        let refusal = |status, slug: &str, detail: &str| Error::Refused {
            status,
            slug: slug.into(),
            detail: detail.into(),
        };
        let cases = [
            (
                refusal(400, "malformed-insight", "insight 7: value must be finite"),
                Some(7),
            ),
            (refusal(400, "malformed-body", "insight 7: x"), None),
            (refusal(413, "malformed-insight", "insight 7: x"), None),
            (refusal(400, "malformed-insight", "garbage"), None),
        ];
        for (e, want) in cases {
            assert_eq!(rejected_index(&e), want, "{e}");
        }
    }
}
