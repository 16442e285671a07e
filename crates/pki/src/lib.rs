//! Strata's public-key infrastructure: the hub's certificate authority, device
//! keys and certificate signing requests, CA fingerprints (the pin a join token
//! carries), and the rustls configurations every TLS endpoint of Strata uses.
//!
//! This crate does no I/O: it turns PEM text into keys and configurations and
//! back. Reading and writing the files is the job of the hub and the agent.
//! All cryptography comes from `rcgen`, `rustls` and `ring`.
//!
//! Start reading at [`CertificateAuthority`]; the TLS side is in [`tls`].

pub mod tls;

use std::fmt;
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

/// Errors of the PKI layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A certificate or key could not be generated or signed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// PEM text did not hold the expected object.
    #[error("{what} is not valid PEM")]
    Pem {
        /// What the PEM text was supposed to hold.
        what: &'static str,
    },
    /// A certificate signing request was malformed or its signature did not verify.
    #[error("certificate signing request is not valid: {0}")]
    Csr(rcgen::Error),
    /// A fingerprint string was not `sha256:` followed by 64 hex digits.
    #[error("fingerprint {0:?} is not of the form sha256:<64 hex digits>")]
    Fingerprint(String),
    /// rustls refused a configuration.
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// SHA-256 fingerprint of a DER certificate: the pin a join token carries and
/// the key under which the hub knows a device certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Fingerprint of DER bytes.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// The 64 lower-case hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let digits = s.strip_prefix("sha256:").unwrap_or(s);
        let mut out = [0u8; 32];
        hex::decode_to_slice(digits, &mut out).map_err(|_| Error::Fingerprint(s.to_owned()))?;
        Ok(Self(out))
    }
}

/// Fingerprint of the first certificate in a PEM text.
pub fn fingerprint_pem(cert_pem: &str) -> Result<Fingerprint> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| Error::Pem {
        what: "certificate",
    })?;
    Ok(Fingerprint::of_der(&der))
}

/// A certificate together with its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// How long certificates last.
const CA_VALIDITY: Duration = Duration::days(3650);
const SERVER_VALIDITY: Duration = Duration::days(397);
/// Clock skew tolerated between hub and device when a certificate starts.
const BACKDATE: Duration = Duration::minutes(5);

/// The hub's certificate authority: signs the hub's server certificate and
/// every device certificate.
pub struct CertificateAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // A random 127-bit serial, as RFC 5280 and the CA/B baseline recommend.
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .ok();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

impl CertificateAuthority {
    /// Creates a new CA with a fresh ECDSA P-256 key.
    pub fn generate(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Strata");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).map_err(|_| Error::Pem { what: "CA key" })?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| Error::Pem {
            what: "CA certificate",
        })?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            issuer: Issuer::from_ca_cert_der(&der, key)?,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate's fingerprint: what join tokens pin.
    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint_pem(&self.cert_pem).unwrap_or(Fingerprint([0; 32]))
    }

    /// Issues a TLS server certificate for the given DNS names and IP addresses.
    pub fn issue_server(&self, names: &[String]) -> Result<CertifiedKey> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map_or("strata-hub", String::as_str),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + SERVER_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a device's certificate signing request.
    ///
    /// The request proves possession of the key; everything else in it is
    /// ignored: the hub alone decides the subject (`CN=<device_id>`, URI SAN
    /// `urn:strata:device:<device_id>`), the usage (TLS client only) and the
    /// validity.
    pub fn sign_device_csr(
        &self,
        csr_pem: &str,
        device_id: &str,
        validity: Duration,
    ) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(Error::Csr)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device_id);
        dn.push(DnType::OrganizationName, "Strata device");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            format!("urn:strata:device:{device_id}").try_into()?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }
}

/// A device's private key, generated on the device; it never leaves it.
pub struct DeviceKey {
    key: KeyPair,
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(..)")
    }
}

impl DeviceKey {
    /// Generates a fresh ECDSA P-256 key.
    pub fn generate() -> Result<Self> {
        Ok(Self {
            key: KeyPair::generate()?,
        })
    }

    /// Loads a key from PKCS#8 PEM.
    pub fn from_pem(pem: &str) -> Result<Self> {
        Ok(Self {
            key: KeyPair::from_pem(pem).map_err(|_| Error::Pem { what: "device key" })?,
        })
    }

    /// The key as PKCS#8 PEM.
    pub fn to_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate signing request for this key, PEM.
    pub fn csr_pem(&self, requested_name: &str) -> Result<String> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, requested_name);
        params.distinguished_name = dn;
        Ok(params.serialize_request(&self.key)?.pem()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trips_through_text() {
        let fp = Fingerprint::of_der(b"strata");
        let parsed: Fingerprint = fp.to_string().parse().unwrap();
        assert_eq!(parsed, fp);
        assert!(fp.to_string().starts_with("sha256:"));
        assert!("sha256:zz".parse::<Fingerprint>().is_err());
        assert!("sha256:abcd".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn ca_reloads_with_the_same_fingerprint_and_still_signs() {
        let ca = CertificateAuthority::generate("test ca").unwrap();
        let again = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
        let key = DeviceKey::generate().unwrap();
        let csr = key.csr_pem("anything").unwrap();
        let cert = again
            .sign_device_csr(&csr, "dev-1", Duration::days(1))
            .unwrap();
        assert!(cert.contains("BEGIN CERTIFICATE"));
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let key = DeviceKey::generate().unwrap();
        let csr = key.csr_pem("device").unwrap();
        let ca = CertificateAuthority::generate("test ca").unwrap();
        // Flip one character inside the base64 body: the signature no longer verifies
        // or the structure no longer parses; either way the CA must refuse it.
        let mut bytes = csr.into_bytes();
        let i = bytes.len() / 2;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert!(
            ca.sign_device_csr(&tampered, "dev-1", Duration::days(1))
                .is_err()
        );
        assert!(
            ca.sign_device_csr("not a csr", "dev-1", Duration::days(1))
                .is_err()
        );
    }
}
