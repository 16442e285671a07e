//! The join token: everything a device needs to find and trust its hub, in
//! one string an operator can paste.
//!
//! `strata1.<base64url(JSON)>` where the JSON holds the hub URL, the SHA-256
//! fingerprint of the hub CA (the pin, as `kubeadm join` uses a CA hash), the
//! token id and its secret. The hub stores only a hash of the secret.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "strata1.";

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The string does not start with `strata1.`.
    #[error("join token must start with `{PREFIX}`")]
    Prefix,
    /// The body is not base64url.
    #[error("join token body is not base64url")]
    Base64,
    /// The body is not the expected JSON.
    #[error("join token body is malformed: {0}")]
    Json(String),
}

/// A decoded join token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    /// Base URL of the hub API, e.g. `https://10.0.0.5:7443`.
    pub hub: String,
    /// Fingerprint of the hub CA certificate, `sha256:<hex>`.
    pub ca: String,
    /// Public id of the token.
    pub id: String,
    /// The secret, known only to the holder of the token.
    pub secret: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("hub", &self.hub)
            .field("ca", &self.ca)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl JoinToken {
    /// The token as the one string operators hand to devices.
    pub fn encode(&self) -> String {
        // Serialising a struct of strings cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Parses a token string. Surrounding whitespace is ignored.
    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let body = text.trim().strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Base64)?;
        serde_json::from_slice(&json).map_err(|e| TokenError::Json(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_inputs() {
        let token = JoinToken {
            hub: "https://127.0.0.1:7443".into(),
            ca: "sha256:00".into(),
            id: "tok1".into(),
            secret: "s3cret".into(),
        };
        let text = token.encode();
        assert!(text.starts_with("strata1."));
        assert_eq!(JoinToken::decode(&format!(" {text}\n")).unwrap(), token);
        assert_eq!(JoinToken::decode("kubeadm.xyz"), Err(TokenError::Prefix));
        assert_eq!(JoinToken::decode("strata1.!!!"), Err(TokenError::Base64));
        assert!(matches!(
            JoinToken::decode(&format!("strata1.{}", URL_SAFE_NO_PAD.encode("{}"))),
            Err(TokenError::Json(_))
        ));
        assert!(!format!("{token:?}").contains("s3cret"));
    }
}
