//! Digests, Ed25519 keys, key ids and the signing-key file format.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::Signer;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::Error;

/// The document type a signing-key file must declare.
const KEY_FILE_TYPE: &str = "strata-registry-signing-key";

/// A SHA-256 digest, written as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// The SHA-256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// The first eight hex digits and an ellipsis, for error messages.
    pub fn short(&self) -> String {
        format!("{}…", &hex::encode(&self.0[..4]))
    }
}

/// Parses exactly `N` bytes from lower- or upper-case hex.
fn parse_hex<const N: usize>(s: &str, what: &'static str) -> Result<[u8; N], Error> {
    // Lower case only, so every value has exactly one spelling.
    if let Some(bad) = s.chars().find(|c| !matches!(c, '0'..='9' | 'a'..='f')) {
        return Err(Error::Invalid {
            what,
            reason: format!("{bad:?} is not a lower-case hex digit"),
        });
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|e| Error::Invalid {
        what,
        reason: format!("expected {} hex digits: {e}", 2 * N),
    })?;
    Ok(out)
}

macro_rules! hex_newtype_impls {
    ($ty:ident, $len:literal, $what:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.as_bytes()))
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($ty))
            }
        }

        impl FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::from_bytes(parse_hex::<$len>(s, $what)?)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

impl Sha256Digest {
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    fn from_bytes(bytes: [u8; 32]) -> Result<Self, Error> {
        Ok(Self(bytes))
    }
}
hex_newtype_impls!(Sha256Digest, 32, "sha256 digest");

/// A key's id: the SHA-256 of its 32 public-key bytes, as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 32]);

impl KeyId {
    /// The first eight hex digits and an ellipsis, for error messages.
    pub fn short(&self) -> String {
        format!("{}…", &hex::encode(&self.0[..4]))
    }
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    fn from_bytes(bytes: [u8; 32]) -> Result<Self, Error> {
        Ok(Self(bytes))
    }
}
hex_newtype_impls!(KeyId, 32, "key id");

/// An Ed25519 public key, written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    /// This key's id: the SHA-256 of its 32 bytes.
    pub fn key_id(&self) -> KeyId {
        KeyId(Sha256Digest::of(self.0.as_bytes()).0)
    }

    fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    fn from_bytes(bytes: [u8; 32]) -> Result<Self, Error> {
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|e| Error::Invalid {
                what: "ed25519 public key",
                reason: e.to_string(),
            })
    }

    /// Whether `signature` is this key's signature of `message`.
    ///
    /// Uses strict verification, which refuses small-order keys and
    /// non-canonical signatures, so one message has one valid signature per
    /// key and a signature cannot be malleated into a second, different one.
    pub(crate) fn verifies(&self, message: &[u8], signature: &SignatureBytes) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.0.verify_strict(message, &signature).is_ok()
    }
}
hex_newtype_impls!(PublicKey, 32, "ed25519 public key");

/// An Ed25519 signature, written as 128 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignatureBytes(pub [u8; 64]);

impl SignatureBytes {
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    fn from_bytes(bytes: [u8; 64]) -> Result<Self, Error> {
        Ok(Self(bytes))
    }
}
hex_newtype_impls!(SignatureBytes, 64, "ed25519 signature");

/// An Ed25519 private key of one registry role.
///
/// Its `Debug` shows the key id only; the secret leaves this type only
/// through [`SigningKey::to_key_file`]. The secret is zeroed on drop.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// A new key from 32 bytes of `rng`.
    ///
    /// Call sites pass an operating-system-seeded generator, for example
    /// `&mut rand::rng()` or `&mut rand::rngs::OsRng.unwrap_err()`; tests pass
    /// a seeded ChaCha generator.
    pub fn generate(rng: &mut impl rand_core::CryptoRng) -> Self {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let key = Self(ed25519_dalek::SigningKey::from_bytes(&seed));
        seed.fill(0);
        key
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The id of the public half.
    pub fn key_id(&self) -> KeyId {
        self.public_key().key_id()
    }

    /// Signs `message`.
    pub(crate) fn sign(&self, message: &[u8]) -> SignatureBytes {
        SignatureBytes(self.0.sign(message).to_bytes())
    }

    /// The key as a key file (see [`KeyFile`]): pretty JSON ending in a
    /// newline. The caller writes it with mode 0600.
    pub fn to_key_file(&self) -> String {
        let file = KeyFile {
            r#type: KEY_FILE_TYPE.to_owned(),
            algorithm: Algorithm::Ed25519,
            key_id: self.key_id(),
            public_key: self.public_key(),
            private_key: hex::encode(self.0.to_bytes()),
        };
        let mut text = serde_json::to_string_pretty(&file).expect("key file serialises");
        text.push('\n');
        text
    }

    /// Reads a key file written by [`SigningKey::to_key_file`], checking that
    /// its key id and public key belong to its private key.
    pub fn from_key_file(text: &str) -> Result<Self, Error> {
        let file: KeyFile = serde_json::from_str(text).map_err(|source| Error::Malformed {
            what: "key file",
            source,
        })?;
        if file.r#type != KEY_FILE_TYPE {
            return Err(Error::Invalid {
                what: "key file",
                reason: format!("type is {:?}, expected {KEY_FILE_TYPE:?}", file.r#type),
            });
        }
        let seed = parse_hex::<32>(&file.private_key, "key file private key")?;
        let key = Self(ed25519_dalek::SigningKey::from_bytes(&seed));
        if key.public_key() != file.public_key || key.key_id() != file.key_id {
            return Err(Error::Invalid {
                what: "key file",
                reason: format!(
                    "private key does not match its public key {} (key id {})",
                    file.public_key,
                    file.key_id.short()
                ),
            });
        }
        Ok(key)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.key_id())
    }
}

/// The signing-key file format, one JSON object:
///
/// ```json
/// {
///   "type": "strata-registry-signing-key",
///   "algorithm": "ed25519",
///   "key_id": "<64 hex: sha256 of the public key bytes>",
///   "public_key": "<64 hex: the 32 public key bytes>",
///   "private_key": "<64 hex: the 32-byte Ed25519 seed>"
/// }
/// ```
///
/// The public fields are redundant on purpose: a reader checks them against
/// the private key, which catches a truncated or hand-edited file, and an
/// operator can see which key a file holds without loading it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Always `strata-registry-signing-key`.
    #[serde(rename = "type")]
    pub r#type: String,
    /// The signature scheme.
    pub algorithm: Algorithm,
    /// The id of the public key.
    pub key_id: KeyId,
    /// The public key.
    pub public_key: PublicKey,
    /// The 32-byte Ed25519 seed, as hex.
    pub private_key: String,
}

/// Signature schemes a key file may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Ed25519 (RFC 8032).
    Ed25519,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn key_file_round_trips() {
        let key = SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(1));
        let text = key.to_key_file();
        let back = SigningKey::from_key_file(&text).unwrap();
        assert_eq!(back.public_key(), key.public_key());
        assert_eq!(back.key_id(), key.public_key().key_id());
        assert!(!format!("{key:?}").contains(&hex::encode(key.0.to_bytes())));
    }

    #[test]
    fn key_file_refuses_bad_documents() {
        let key = SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(1));
        let other = SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(2));
        let good: serde_json::Value = serde_json::from_str(&key.to_key_file()).unwrap();
        type Edit = fn(&mut serde_json::Value, &SigningKey);
        let edits: [(&str, Edit); 5] = [
            ("wrong type", |v, _| v["type"] = "pem".into()),
            ("unknown field", |v, _| v["comment"] = "hi".into()),
            ("other public key", |v, o| {
                v["public_key"] = o.public_key().to_string().into()
            }),
            ("other key id", |v, o| {
                v["key_id"] = o.key_id().to_string().into()
            }),
            ("short private key", |v, _| v["private_key"] = "abcd".into()),
        ];
        for (name, edit) in edits {
            let mut doc = good.clone();
            edit(&mut doc, &other);
            assert!(
                SigningKey::from_key_file(&doc.to_string()).is_err(),
                "{name}"
            );
        }
    }

    #[test]
    fn hex_types_parse_and_print() {
        let d = Sha256Digest::of(b"abc");
        assert_eq!(
            d.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_string().parse::<Sha256Digest>().unwrap(), d);
        assert_eq!(d.short(), "ba7816bf…");
        assert!("ba78".parse::<Sha256Digest>().is_err());
        assert!("zz".repeat(32).parse::<KeyId>().is_err());
        assert!(
            d.to_string()
                .to_uppercase()
                .parse::<Sha256Digest>()
                .is_err()
        );
    }
}
