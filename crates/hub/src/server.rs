//! Starting the hub: first-start bootstrap (CA, server certificate, database,
//! operator credential) and the TLS accept loop that tells handlers which
//! client certificate a request came with.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::Request;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use pki::{CertificateAuthority, Fingerprint};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::api::{AppState, Peer};
use crate::config::Config;
use crate::metrics::HubMetrics;
use crate::store::Store;
use crate::{Error, hash_secret, random_bytes};

/// Files in the hub's data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// SQLite state.
    pub fn database(&self) -> PathBuf {
        self.root.join("hub.db")
    }
    /// CA certificate (PEM); give it to tools that call the hub API.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("tls").join("ca.crt")
    }
    /// CA private key (PEM, 0600).
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("tls").join("ca.key")
    }
    /// Server certificate (PEM), reissued at every start.
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("tls").join("server.crt")
    }
    /// Server private key (PEM, 0600).
    pub fn server_key(&self) -> PathBuf {
        self.root.join("tls").join("server.key")
    }
    /// The URL the running hub is reachable at, written at start.
    pub fn url_file(&self) -> PathBuf {
        self.root.join("hub.url")
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loads the CA from the data directory, creating it on first start.
pub fn load_or_create_ca(dir: &DataDir) -> Result<CertificateAuthority, Error> {
    let (cert_path, key_path) = (dir.ca_cert(), dir.ca_key());
    if cert_path.exists() && key_path.exists() {
        let cert = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        return Ok(CertificateAuthority::from_pem(&cert, &key)?);
    }
    let tls_dir = dir.root.join("tls");
    durable::create_private_dir(&tls_dir).map_err(io_err(&tls_dir))?;
    let ca = CertificateAuthority::generate("Strata hub CA")?;
    // Key first: a crash between the two writes leaves no certificate
    // without its key, and the next start simply creates a new CA.
    durable::write_atomic(&key_path, ca.key_pem().as_bytes(), durable::PRIVATE)
        .map_err(io_err(&key_path))?;
    durable::write_atomic(&cert_path, ca.cert_pem().as_bytes(), durable::PUBLIC)
        .map_err(io_err(&cert_path))?;
    tracing::info!(fingerprint = %ca.fingerprint(), "created hub certificate authority");
    Ok(ca)
}

/// The URL devices use, from config or the bound address.
fn hub_url(config: &Config, bound: SocketAddr) -> String {
    if let Some(url) = &config.advertise_url {
        return url.clone();
    }
    let ip = match bound.ip() {
        ip if ip.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
        ip => ip,
    };
    format!("https://{}", SocketAddr::new(ip, bound.port()))
}

/// Host part of an `https://host:port/...` URL.
fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().map(str::to_owned);
    }
    Some(
        authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .to_owned(),
    )
}

/// Names in the server certificate.
fn server_names(config: &Config, bound: SocketAddr, url: &str) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if !bound.ip().is_unspecified() {
        names.push(bound.ip().to_string());
    }
    names.extend(url_host(url));
    names.extend(config.server_names.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// A started hub.
#[derive(Debug)]
pub struct RunningHub {
    /// The URL devices use.
    pub url: String,
    /// The bound address.
    pub addr: SocketAddr,
    /// Fingerprint of the hub CA (what join tokens pin).
    pub ca_fingerprint: Fingerprint,
    /// The operator credential, only on the first start (it is stored hashed
    /// and cannot be shown again).
    pub new_operator_token: Option<String>,
    /// Where the CA certificate is, for API clients.
    pub ca_cert_path: PathBuf,
    task: JoinHandle<()>,
    state: AppState,
}

impl RunningHub {
    /// Serves until the accept loop ends (it does not end on its own).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// Shared state, for embedding the hub in tests and tools.
    pub fn state(&self) -> &AppState {
        &self.state
    }
}

/// Creates or loads everything in the data directory, binds the listener and
/// starts serving.
pub async fn start(config: Config) -> Result<RunningHub, Error> {
    let dir = DataDir::new(&config.data_dir);
    durable::create_private_dir(dir.root()).map_err(io_err(dir.root()))?;
    let ca = load_or_create_ca(&dir)?;

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(io_err(Path::new(&config.listen.to_string())))?;
    let bound = listener.local_addr().map_err(io_err(dir.root()))?;
    let url = hub_url(&config, bound);

    let server = ca.issue_server(&server_names(&config, bound, &url))?;
    durable::write_atomic(
        &dir.server_key(),
        server.key_pem.as_bytes(),
        durable::PRIVATE,
    )
    .map_err(io_err(&dir.server_key()))?;
    durable::write_atomic(
        &dir.server_cert(),
        server.cert_pem.as_bytes(),
        durable::PUBLIC,
    )
    .map_err(io_err(&dir.server_cert()))?;
    let tls = pki::tls::server_config(ca.cert_pem(), &server)?;

    let store = Store::open(&dir.database())?;
    store.set_meta("hub_url", url.clone()).await?;
    store
        .set_meta("ca_fingerprint", ca.fingerprint().to_string())
        .await?;
    let new_operator_token = if store.operator_count().await? == 0 {
        let token = format!("sop_{}", URL_SAFE_NO_PAD.encode(random_bytes::<32>()));
        store
            .add_operator("admin".into(), hash_secret(&token))
            .await?;
        Some(token)
    } else {
        None
    };
    durable::write_atomic(
        &dir.url_file(),
        format!("{url}\n").as_bytes(),
        durable::PUBLIC,
    )
    .map_err(io_err(&dir.url_file()))?;

    let (metrics, registry) = HubMetrics::new();
    let ca_fingerprint = ca.fingerprint();
    let macro_config = config.macro_tier.clone();
    let macro_configured =
        !macro_config.catalogue.entries.is_empty() || macro_config.upstream.is_some();
    let state = AppState::new(
        store,
        ca,
        config,
        url.clone(),
        metrics,
        registry,
        macro_configured,
    );
    if macro_configured {
        // Loading a macro model takes seconds; the hub serves meanwhile
        // and its macro routes answer 503 until the tier is ready.
        let loading = state.clone();
        tokio::spawn(async move {
            match crate::macro_tier::MacroTier::start(&macro_config).await {
                Ok(Some(tier)) => loading.set_macro_tier(tier),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "the macro tier failed to start"),
            }
        });
    }
    let app = crate::api::router(state.clone());
    let task = tokio::spawn(accept_loop(listener, TlsAcceptor::from(tls), app));
    tokio::spawn(crate::rollouts::controller(state.clone()));
    tokio::spawn(crate::federated::controller(state.clone()));
    tracing::info!(%url, %bound, ca = %ca_fingerprint, "hub listening");
    Ok(RunningHub {
        url,
        addr: bound,
        ca_fingerprint,
        new_operator_token,
        ca_cert_path: dir.ca_cert(),
        task,
        state,
    })
}

/// How long a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, app: axum::Router) {
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Usually EMFILE; back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%addr, "tls handshake timed out");
                    return;
                }
            };
            let client_cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| Fingerprint::of_der(cert.as_ref()));
            let peer = Peer { addr, client_cert };
            let service = tower::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let served = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(
                    TokioIo::new(tls),
                    TowerToHyperService::new(service),
                )
                .await;
            if let Err(e) = served {
                tracing::debug!(%addr, error = %e, "connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts() {
        assert_eq!(
            url_host("https://10.0.0.5:7443").as_deref(),
            Some("10.0.0.5")
        );
        assert_eq!(
            url_host("https://hub.example:7443/x").as_deref(),
            Some("hub.example")
        );
        assert_eq!(url_host("https://[::1]:7443").as_deref(), Some("::1"));
        assert_eq!(url_host("https://hub").as_deref(), Some("hub"));
    }
}
