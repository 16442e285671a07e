//! rustls configurations for every TLS endpoint of Strata.
//!
//! - [`server_config`]: the hub. Client certificates are verified against the
//!   hub CA when presented but not required at the handshake, because
//!   enrolment, health and operator calls come without one; the hub's
//!   handlers decide per route whether a device identity is needed.
//! - [`pinned_client_config`]: a device joining. It trusts nothing but a CA
//!   whose fingerprint equals the pin in its join token.
//! - [`device_client_config`]: an enrolled device, mutual TLS.
//! - [`ca_client_config`]: an operator tool that trusts the hub CA.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::{Error, Fingerprint, Result};

/// The crypto provider every Strata TLS endpoint uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Installs [`provider`] as the process default, for libraries that ask rustls
/// for the default provider. Calling it twice is harmless.
pub fn install_default_provider() {
    let _ = CryptoProvider::install_default((*provider()).clone());
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| Error::Pem { what })?;
    if certs.is_empty() {
        return Err(Error::Pem { what });
    }
    Ok(certs)
}

fn key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| Error::Pem { what })
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca_pem, "CA certificate")? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// The hub's server configuration: presents `[server, CA]` so that a joining
/// device can check the CA against its pin, and verifies optional client
/// certificates against the CA.
pub fn server_config(ca_pem: &str, server: &crate::CertifiedKey) -> Result<Arc<ServerConfig>> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::Verifier(e.to_string()))?;
    let mut chain = certs(&server.cert_pem, "server certificate")?;
    chain.extend(certs(ca_pem, "CA certificate")?);
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key(&server.key_pem, "server key")?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client that trusts only the given CA and presents no certificate.
pub fn ca_client_config(ca_pem: &str) -> Result<ClientConfig> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth())
}

/// A device's mutual-TLS client: trusts the hub CA, presents the device certificate.
pub fn device_client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<ClientConfig> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(
            certs(cert_pem, "device certificate")?,
            key(key_pem, "device key")?,
        )?)
}

/// A client for joining: accepts the hub only if the chain it presents
/// contains a CA whose fingerprint is `pin` and the server certificate
/// verifies against that CA for the name dialled.
///
/// The returned [`PinCheck`] tells, after a failed handshake, whether the
/// reason was a pin mismatch, so that the caller can say so plainly.
pub fn pinned_client_config(pin: Fingerprint) -> Result<(ClientConfig, PinCheck)> {
    let check = PinCheck::default();
    let verifier = PinnedCaVerifier {
        pin,
        provider: provider(),
        check: check.clone(),
    };
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok((config, check))
}

/// Records whether a pinned handshake failed because of the pin.
#[derive(Debug, Clone, Default)]
pub struct PinCheck(Arc<AtomicBool>);

impl PinCheck {
    /// True when a hub presented a CA that did not match the pin.
    pub fn mismatched(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct PinnedCaVerifier {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
    check: PinCheck,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| Fingerprint::of_der(c.as_ref()) == self.pin)
        else {
            self.check.0.store(true, Ordering::SeqCst);
            return Err(rustls::Error::General(format!(
                "hub CA does not match the pinned fingerprint {}",
                self.pin
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
