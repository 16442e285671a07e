//! Joining a hub: the device's one-time enrolment.

use std::path::Path;

use pki::{DeviceKey, Fingerprint};
use protocol::{EnrollRequest, EnrollResponse, JoinToken};

use crate::state::{DataDir, Enrolment, State};
use crate::{Error, chain, io_err, refused};

/// Joins the hub named in `token`, storing the device identity in `data_dir`.
///
/// The device key is generated here and written before anything is sent.
/// The TLS handshake accepts the hub only if it presents the CA the token
/// pins, and the CA returned in the response must be that CA too.
pub async fn join(token: &str, data_dir: &Path, name: Option<String>) -> Result<Enrolment, Error> {
    let token = JoinToken::decode(token)?;
    let pin: Fingerprint = token.ca.parse()?;
    let dir = DataDir::new(data_dir);
    durable::create_private_dir(dir.root()).map_err(io_err(dir.root()))?;
    let state = State::open(&dir.database())?;
    if let Some(existing) = state.enrolment()? {
        return Err(Error::AlreadyEnrolled {
            dir: data_dir.to_owned(),
            device_id: existing.device_id.to_string(),
        });
    }
    let identity = dir.identity();
    durable::create_private_dir(&identity).map_err(io_err(&identity))?;
    let key = DeviceKey::generate()?;
    durable::write_atomic(&dir.key(), key.to_pem().as_bytes(), durable::PRIVATE)
        .map_err(io_err(&dir.key()))?;
    let csr_pem = key.csr_pem(name.as_deref().unwrap_or("strata-device"))?;

    let (tls, pin_check) = pki::tls::pinned_client_config(pin)?;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| Error::Unreachable {
            url: token.hub.clone(),
            reason: chain(&e),
        })?;
    let url = format!("{}/v1/enroll", token.hub);
    let response = client
        .post(&url)
        .json(&EnrollRequest {
            token: token.encode(),
            csr_pem,
            name: name.clone(),
        })
        .send()
        .await
        .map_err(|e| {
            if pin_check.mismatched() {
                Error::PinMismatch {
                    hub: token.hub.clone(),
                    pin: pin.to_string(),
                }
            } else {
                Error::Unreachable {
                    url: token.hub.clone(),
                    reason: chain(&e),
                }
            }
        })?;
    if !response.status().is_success() {
        return Err(refused(response).await);
    }
    let enrolled: EnrollResponse = response.json().await.map_err(|e| Error::Unreachable {
        url: token.hub.clone(),
        reason: format!("unreadable enrolment response: {}", chain(&e)),
    })?;
    if pki::fingerprint_pem(&enrolled.ca_pem)? != pin {
        return Err(Error::PinMismatch {
            hub: token.hub,
            pin: pin.to_string(),
        });
    }
    durable::write_atomic(&dir.ca(), enrolled.ca_pem.as_bytes(), durable::PUBLIC)
        .map_err(io_err(&dir.ca()))?;
    durable::write_atomic(
        &dir.cert(),
        enrolled.certificate_pem.as_bytes(),
        durable::PUBLIC,
    )
    .map_err(io_err(&dir.cert()))?;
    // The database row is the commit point: an agent is enrolled only once
    // its key and certificates are safely on disk.
    let enrolment = Enrolment {
        device_id: enrolled.device_id.clone(),
        name: name.unwrap_or_else(|| enrolled.device_id.to_string()),
        hub_url: token.hub,
        labels: enrolled.labels,
    };
    state.save_enrolment(&enrolment)?;
    tracing::info!(device = %enrolment.device_id, hub = %enrolment.hub_url, "joined hub");
    Ok(enrolment)
}
