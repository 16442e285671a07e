//! Join tokens: issued by an operator (over the API or on the hub machine with
//! `strata hub token create`), consumed once by a device at enrolment.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use protocol::{CreateTokenResponse, JoinToken, Labels};
use time::OffsetDateTime;

use crate::config::MAX_TOKEN_TTL;
use crate::store::{Store, StoredToken};
use crate::{Error, hash_secret, random_bytes};

/// Checks labels: keys are short identifiers, values short printable text.
pub fn validate_labels(labels: &Labels) -> Result<(), String> {
    if labels.len() > 32 {
        return Err(format!("at most 32 labels, got {}", labels.len()));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !key_ok {
            return Err(format!(
                "label key {k:?} must be 1-63 characters of letters, digits, '-', '_', '.', '/'"
            ));
        }
        if v.len() > 255 || v.chars().any(char::is_control) {
            return Err(format!(
                "label {k:?} value must be at most 255 printable characters"
            ));
        }
    }
    Ok(())
}

/// Issues a one-time join token for `hub_url`, pinned to `ca_fingerprint`.
pub async fn create(
    store: &Store,
    hub_url: &str,
    ca_fingerprint: &pki::Fingerprint,
    ttl: Duration,
    labels: Labels,
) -> Result<CreateTokenResponse, Error> {
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(Error::Config(format!(
            "token ttl must be between 1s and {}s, got {}s",
            MAX_TOKEN_TTL.as_secs(),
            ttl.as_secs()
        )));
    }
    validate_labels(&labels).map_err(Error::Config)?;
    let id = format!("tok-{}", hex::encode(random_bytes::<8>()));
    let secret = URL_SAFE_NO_PAD.encode(random_bytes::<32>());
    let expires_at = OffsetDateTime::now_utc() + ttl;
    store
        .add_token(StoredToken {
            id: id.clone(),
            secret_hash: hash_secret(&secret),
            labels: labels.clone(),
            expires_at,
            used_at: None,
        })
        .await?;
    store
        .audit("operator".into(), "token.create", Some(id.clone()), None)
        .await?;
    let token = JoinToken {
        hub: hub_url.to_owned(),
        ca: ca_fingerprint.to_string(),
        id: id.clone(),
        secret,
    };
    Ok(CreateTokenResponse {
        token: token.encode(),
        token_id: id,
        expires_at,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked() {
        let ok = Labels::from([("site".to_string(), "store-12".to_string())]);
        assert!(validate_labels(&ok).is_ok());
        let bad_key = Labels::from([("si te".to_string(), "x".to_string())]);
        assert!(validate_labels(&bad_key).unwrap_err().contains("si te"));
        let bad_value = Labels::from([("site".to_string(), "a\nb".to_string())]);
        assert!(validate_labels(&bad_value).is_err());
    }
}
