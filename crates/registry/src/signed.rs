//! The signature envelope, signing, and threshold signature checks.
//!
//! A signed document is one JSON object:
//!
//! ```json
//! {"signatures":[{"key_id":"<64 hex>","sig":"<128 hex>"}],
//!  "signed":{"_type":"targets","version":7,...}}
//! ```
//!
//! Each signature is Ed25519 over the canonical encoding (see the
//! `canonical` module) of the `signed` object, `_type` included. The
//! envelope itself need not be canonical; this crate writes it canonically
//! anyway, so signing is deterministic.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::keys::{KeyId, SignatureBytes, SigningKey};
use crate::metadata::{Kind, MetaRef, Metadata, Role, Root};
use crate::{Error, Sha256Digest, canonical};

/// The outer JSON object of a signed document.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    signatures: Vec<SignatureEntry>,
    signed: Value,
}

/// One signature in an envelope.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignatureEntry {
    key_id: KeyId,
    sig: SignatureBytes,
}

/// A parsed, validated, not yet trusted document.
pub(crate) struct Parsed<T> {
    pub(crate) body: T,
    /// The canonical bytes the signatures cover.
    canonical: Vec<u8>,
    /// SHA-256 of `canonical`.
    pub(crate) digest: Sha256Digest,
    signatures: Vec<SignatureEntry>,
}

impl<T: Metadata> Parsed<T> {
    /// The version and digest that pin this document.
    pub(crate) fn meta_ref(&self) -> MetaRef {
        MetaRef {
            version: self.body.version(),
            sha256: self.digest,
        }
    }

    /// Checks that a threshold of `root`'s keys for `T::SIGNER` signed it.
    pub(crate) fn check_signed_by(&self, root: &Root) -> Result<(), Error> {
        check_signatures(root, T::SIGNER, T::KIND, &self.canonical, &self.signatures)
    }
}

fn body_value<T: Metadata>(body: &T) -> Value {
    let mut value = serde_json::to_value(body).expect("metadata serialises to JSON");
    let object = value
        .as_object_mut()
        .expect("metadata serialises to an object");
    object.insert("_type".to_owned(), Value::from(T::KIND.as_str()));
    value
}

/// The SHA-256 of `body`'s canonical encoding (with `_type`): the digest
/// that [`crate::Targets`] lists for a manifest and [`MetaRef`] pins for
/// targets and snapshot metadata.
pub fn digest<T: Metadata>(body: &T) -> Sha256Digest {
    Sha256Digest::of(&canonical::to_vec(&body_value(body)))
}

/// Validates `body` and signs it with each of `keys`, returning the signed
/// document's bytes (canonical JSON).
pub fn sign<T: Metadata>(body: &T, keys: &[&SigningKey]) -> Result<Vec<u8>, Error> {
    body.validate()?;
    let signed = body_value(body);
    let message = canonical::to_vec(&signed);
    let signatures = keys
        .iter()
        .map(|key| SignatureEntry {
            key_id: key.key_id(),
            sig: key.sign(&message),
        })
        .collect();
    Ok(encode(&Envelope { signatures, signed }))
}

/// Adds `key`'s signature to an already signed document of kind `T`, for
/// thresholds whose keys live on different machines. A signature `key`
/// already made is replaced, not repeated.
pub fn cosign<T: Metadata>(signed_bytes: &[u8], key: &SigningKey) -> Result<Vec<u8>, Error> {
    // Parsing as `T` refuses to co-sign something that is not a valid `T`.
    let parsed = parse::<T>(signed_bytes)?;
    let mut envelope: Envelope =
        serde_json::from_slice(signed_bytes).map_err(|source| Error::Malformed {
            what: T::KIND.as_str(),
            source,
        })?;
    envelope.signatures.retain(|s| s.key_id != key.key_id());
    envelope.signatures.push(SignatureEntry {
        key_id: key.key_id(),
        sig: key.sign(&parsed.canonical),
    });
    Ok(encode(&envelope))
}

fn encode(envelope: &Envelope) -> Vec<u8> {
    canonical::to_vec(&serde_json::to_value(envelope).expect("envelope serialises"))
}

/// Parses a signed document of kind `T` without checking its signatures.
/// Reads the body of a signed document without checking any signature: for
/// a server that must know what it serves (its version, its expiry), never
/// for deciding whether to trust it.
pub fn read_unverified<T: Metadata>(bytes: &[u8]) -> Result<T, Error> {
    parse::<T>(bytes).map(|p| p.body)
}

pub(crate) fn parse<T: Metadata>(bytes: &[u8]) -> Result<Parsed<T>, Error> {
    let malformed = |source| Error::Malformed {
        what: T::KIND.as_str(),
        source,
    };
    let envelope: Envelope = serde_json::from_slice(bytes).map_err(malformed)?;
    let canonical = canonical::to_vec(&envelope.signed);
    let Value::Object(mut object) = envelope.signed else {
        return Err(Error::Invalid {
            what: T::KIND.as_str(),
            reason: "signed is not an object".into(),
        });
    };
    let found = object.remove("_type");
    let found = found.and_then(|v| serde_json::from_value::<Kind>(v).ok());
    if found != Some(T::KIND) {
        return Err(Error::WrongKind {
            expected: T::KIND,
            found: found.map(|k| k.to_string()),
        });
    }
    let body: T = serde_json::from_value(Value::Object(object)).map_err(malformed)?;
    body.validate()?;
    Ok(Parsed {
        body,
        digest: Sha256Digest::of(&canonical),
        canonical,
        signatures: envelope.signatures,
    })
}

/// The [`MetaRef`] of a signed document, for building the metadata that
/// pins it. Does not check signatures: the signer pins what it signed.
pub(crate) fn meta_ref<T: Metadata>(bytes: &[u8]) -> Result<MetaRef, Error> {
    Ok(parse::<T>(bytes)?.meta_ref())
}

/// Checks that at least `threshold` distinct keys of `role` signed `message`.
///
/// Signatures by keys outside the role are skipped, not refused: a new root
/// carries signatures by keys the old root does not know, and vice versa.
/// A signature that claims to be by a key of the role but does not verify is
/// refused outright, since it means the bytes or the signature were altered.
/// A key that signs twice counts once.
fn check_signatures(
    root: &Root,
    role: Role,
    kind: Kind,
    message: &[u8],
    signatures: &[SignatureEntry],
) -> Result<(), Error> {
    let role_keys = root.role(role);
    let mut valid: BTreeSet<KeyId> = BTreeSet::new();
    let mut foreign: Option<&SignatureEntry> = None;
    for entry in signatures {
        // `get` rather than indexing: a root read back from a device's disk
        // may not have been validated.
        let key = match root.keys.get(&entry.key_id) {
            Some(key) if role_keys.key_ids.contains(&entry.key_id) => key,
            _ => {
                foreign = foreign.or(Some(entry));
                continue;
            }
        };
        if !key.verifies(message, &entry.sig) {
            return Err(Error::BadSignature {
                kind,
                key_id: entry.key_id,
            });
        }
        valid.insert(entry.key_id);
    }
    let threshold = role_keys.threshold as usize;
    if valid.len() >= threshold {
        return Ok(());
    }
    // Nothing counted: name the first stranger, as that is usually the
    // whole story (a wrong or rotated key), rather than "0 of 2".
    match foreign {
        Some(entry) if valid.is_empty() && root.keys.contains_key(&entry.key_id) => {
            Err(Error::WrongRole {
                kind,
                role,
                key_id: entry.key_id,
            })
        }
        Some(entry) if valid.is_empty() => Err(Error::UnknownKey {
            kind,
            key_id: entry.key_id,
        }),
        _ => Err(Error::BelowThreshold {
            kind,
            role,
            valid: valid.len(),
            threshold,
        }),
    }
}
