//! A fault-injecting TCP proxy for loopback: it forwards connections to an
//! upstream address until told to [`FaultProxy::cut`] the link, which resets
//! every open connection and refuses new ones, as a pulled cable or a dead
//! uplink does; [`FaultProxy::restore`] lets traffic through again.
//!
//! It is how the demo takes a site offline and how the chaos tests cut the
//! network between agents and the hub. It works at the TCP level, so TLS
//! passes through it untouched. It can also [`FaultProxy::throttle`] the
//! link to a slow one, so that a transfer is still in flight when the cut
//! comes. It is not a general proxy: no latency shaping, loopback only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy. Dropping it stops the proxy and closes its connections.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    cut: AtomicBool,
    /// Bumped on every cut: connections opened before it close.
    epoch: watch::Sender<u64>,
    accepted: AtomicU64,
    refused: AtomicU64,
    /// Bytes per second each direction of each connection may carry (0: no limit).
    rate: AtomicU64,
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1` (a free port) forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            cut: AtomicBool::new(false),
            epoch: watch::channel(0).0,
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            rate: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(FaultProxy {
            addr,
            shared,
            accept,
        })
    }

    /// The address clients should dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the link: resets every open connection and refuses new ones
    /// until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.epoch.send_modify(|e| *e += 1);
        tracing::debug!(proxy = %self.addr, upstream = %self.shared.upstream, "link cut");
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
        tracing::debug!(proxy = %self.addr, upstream = %self.shared.upstream, "link restored");
    }

    /// Limits each direction of each connection to `bytes_per_sec`
    /// (`None`: no limit), as a slow uplink does; applies at once.
    pub fn throttle(&self, bytes_per_sec: Option<u64>) {
        self.shared
            .rate
            .store(bytes_per_sec.unwrap_or(0), Ordering::SeqCst);
    }

    /// True while the link is cut.
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections refused while cut.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Close the connections still open.
        self.shared.epoch.send_modify(|e| *e += 1);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "proxy accept failed");
                continue;
            }
        };
        if shared.cut.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            reset(client);
            continue;
        }
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let epoch = shared.epoch.subscribe();
        tokio::spawn(forward(client, Arc::clone(&shared), epoch));
    }
}

/// Closes a socket with a reset (RST) rather than an orderly FIN, as a
/// failed link looks to the peer.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Copies one direction, at most `shared.rate` bytes per second.
async fn pump<R, W>(mut from: R, mut to: W, shared: &Shared) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let rate = shared.rate.load(Ordering::SeqCst);
        // A slow link moves small pieces, about ten a second.
        let want = if rate == 0 {
            buf.len()
        } else {
            (rate / 10).clamp(1, buf.len() as u64) as usize
        };
        let n = from.read(&mut buf[..want]).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        if rate > 0 {
            tokio::time::sleep(std::time::Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
    }
}

async fn forward(mut client: TcpStream, shared: Arc<Shared>, mut epoch: watch::Receiver<u64>) {
    let mut server = match TcpStream::connect(shared.upstream).await {
        Ok(s) => s,
        Err(_) => {
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let cut = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        tokio::select! {
            _ = async {
                tokio::join!(
                    pump(client_read, server_write, &shared),
                    pump(server_read, client_write, &shared),
                )
            } => false,
            _ = epoch.changed() => true,
        }
    };
    if cut {
        reset(client);
        reset(server);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn echo(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn forwards_cuts_and_restores() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        assert_eq!(echo(proxy.addr()).await.unwrap(), b"ping");

        // An open connection dies with the cut.
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        open.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        open.read_exact(&mut buf).await.unwrap();
        proxy.cut();
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            open.read_to_end(&mut rest),
        )
        .await
        .expect("the cut closes open connections");
        assert!(ended.is_err() || rest.is_empty());
        assert!(echo(proxy.addr()).await.is_err(), "new connections refused");
        assert!(proxy.refused() >= 1);

        proxy.restore();
        assert_eq!(echo(proxy.addr()).await.unwrap(), b"ping");
    }
}
