//! The QUIC data plane (quinn).
//!
//! TLS on every connection is libp2p's TLS profile ([`crate::tls`], AES-GCM first): each side
//! presents a self-signed certificate carrying its ed25519 node key, and each side checks the
//! other's. The client names the node it expects (the connection fails if anyone else
//! answers); the server accepts only current members and closes any other connection at once.
//!
//! One request per bidirectional stream; many streams per connection; one connection per
//! peer, kept open and re-made after a failure. Every frame is length-checked against
//! [`MESSAGE_BYTES_MAX`] before it is read.

use crate::store::StoreError;
use libp2p::identity::Keypair;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use vmcsnap_dht::membership::{node_id_of_peer, peer_of_node_id};
use vmcsnap_protocol::codec::{self, CodecError, FRAME_HEADER_BYTES, MESSAGE_BYTES_MAX};
use vmcsnap_protocol::wire::{DataRequest, DataResponse, RemoteErrorKind, DATA_ALPN};
use vmcsnap_protocol::NodeId;

/// Time to set up a connection before the peer counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for one request and its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection this node opened is closed when no request has been waiting on it and no
/// stream data has moved for this long ([`DataClient::close_idle`]): a node holds connections
/// only to the peers it talked to lately, not to every member it ever met.
pub const CONNECTION_IDLE: Duration = Duration::from_secs(60);
/// Concurrent request streams one peer may open to us.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 128;
/// Attempts at a request whose connection broke (reconnecting in between).
pub const REQUEST_ATTEMPTS: usize = 3;
/// Application close code: the peer is not a member of this cluster.
pub const CLOSE_NOT_MEMBER: u32 = 1;
/// Application close code: the node is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 2;
/// QUIC close code: the peer already holds as many connections as it may.
pub const CLOSE_TOO_MANY: u32 = 3;
/// Application close code: the connection carried nothing for [`CONNECTION_IDLE`].
pub const CLOSE_IDLE: u32 = 4;
/// Connections being set up (handshakes) at once, from anyone.
pub const INCOMING_MAX: usize = 256;

/// Why a data-plane request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Could not reach the peer.
    #[error("peer {peer} at {addr} is unreachable: {reason}")]
    Unreachable {
        /// Peer id (short).
        peer: String,
        /// Its address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The connection or stream broke mid-request.
    #[error("request to peer {peer} failed: {reason}")]
    Transport {
        /// Peer id (short).
        peer: String,
        /// Why.
        reason: String,
    },
    /// The peer answered with an error.
    #[error("peer {peer} refused: {message}")]
    Remote {
        /// Peer id (short).
        peer: String,
        /// Kind of failure.
        kind: RemoteErrorKind,
        /// Its message.
        message: String,
    },
    /// The peer sent something that does not decode or breaks a limit.
    #[error("peer {peer} sent a bad message: {source}")]
    Codec {
        /// Peer id (short).
        peer: String,
        /// The decode error.
        source: CodecError,
    },
    /// The peer answered with the wrong kind of message.
    #[error("peer {peer} sent an unexpected answer to {request}")]
    Unexpected {
        /// Peer id (short).
        peer: String,
        /// The request kind.
        request: &'static str,
    },
    /// The peer speaks another data-plane version (the TLS handshake found no common ALPN).
    #[error("peer {peer} at {addr} runs another vmcsnap version (data plane {}); upgrade every node to the same version", String::from_utf8_lossy(DATA_ALPN))]
    VersionMismatch {
        /// Peer id (short).
        peer: String,
        /// Its address.
        addr: SocketAddr,
    },
    /// Local store error (for requests served locally).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// TLS alert `no_application_protocol` (RFC 7301), as a QUIC crypto error code.
const NO_APPLICATION_PROTOCOL: u8 = 120;

/// Whether a failed handshake means the two sides share no data-plane version.
pub fn is_version_mismatch(e: &quinn::ConnectionError) -> bool {
    let code = quinn::TransportErrorCode::crypto(NO_APPLICATION_PROTOCOL);
    match e {
        quinn::ConnectionError::TransportError(t) => t.code == code,
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code == code,
        _ => false,
    }
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(STREAMS_PER_CONNECTION_MAX.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    // Keeps a quiet conversation (a cut waiting on a capture) under the idle timeout; every
    // open connection sends one, so it is as rare as that allows.
    t.keep_alive_interval(Some(Duration::from_secs(10)));
    #[allow(clippy::unwrap_used)] // 30 s is within QUIC's varint range
    t.max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()));
    Arc::new(t)
}

/// Builds the endpoint: a server for members and a client for our requests, on one UDP socket.
pub fn endpoint(keypair: &Keypair, listen: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let mut tls = crate::tls::server_config(keypair)?;
    tls.alpn_protocols = vec![DATA_ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(Arc::new(tls))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport_config());
    server.max_incoming(INCOMING_MAX);
    let socket = std::net::UdpSocket::bind(listen)
        .map_err(|e| anyhow::anyhow!("cannot bind the data plane on udp {listen}: {e}"))?;
    enlarge_receive_buffer(&socket);
    let ep = quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, Arc::new(quinn::TokioRuntime))
        .map_err(|e| anyhow::anyhow!("cannot start the data plane on udp {listen}: {e}"))?;
    Ok(ep)
}

/// The data plane's UDP receive buffer. Pages arrive in bursts (a restore asks every owner for
/// a window at once); a datagram the buffer cannot hold is dropped, found lost by QUIC and sent
/// again, and the sender's congestion window shrinks. Linux's default (208 KiB) overflowed about
/// 2,000 times in every 4-VM restore of `vmcsnap-testnet bench-fabric`; 4 MiB never did.
pub const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// Asks for [`UDP_RECEIVE_BUFFER`]. Linux grants at most `net.core.rmem_max` unless the process
/// may exceed it (`CAP_NET_ADMIN`, as a node run by root); short of that, a warning names the
/// sysctl. Returns the buffer granted.
fn enlarge_receive_buffer(socket: &std::net::UdpSocket) -> usize {
    let s = socket2::SockRef::from(socket);
    // Linux reports twice what it granted (the rest is its bookkeeping).
    let granted = |s: &socket2::SockRef<'_>| s.recv_buffer_size().map_or(0, |b| b / 2);
    let _ = s.set_recv_buffer_size(UDP_RECEIVE_BUFFER);
    if granted(&s) < UDP_RECEIVE_BUFFER {
        force_receive_buffer(socket, UDP_RECEIVE_BUFFER);
    }
    let got = granted(&s);
    if got < UDP_RECEIVE_BUFFER {
        tracing::warn!(
            target: "vmcsnap::net",
            granted_kib = got >> 10,
            wanted_kib = UDP_RECEIVE_BUFFER >> 10,
            "the data plane's UDP receive buffer is smaller than it should be: bursts of pages will be \
             dropped and sent again; raise it with `sysctl -w net.core.rmem_max={UDP_RECEIVE_BUFFER}`, \
             or run the node as root"
        );
    }
    got
}

/// `SO_RCVBUFFORCE`: the same as `SO_RCVBUF` past `net.core.rmem_max`, for a process with
/// `CAP_NET_ADMIN`; without it the call fails and nothing changes.
fn force_receive_buffer(socket: &std::net::UdpSocket, bytes: usize) {
    // asm-generic/socket.h (x86, Arm, RISC-V); the libc crate does not export it for glibc.
    const SO_RCVBUFFORCE: libc::c_int = 33;
    crate::sockbuf::force(std::os::fd::AsFd::as_fd(socket), SO_RCVBUFFORCE, bytes);
}

/// The node id the peer proved with its TLS certificate.
pub fn peer_node_id(conn: &quinn::Connection) -> Option<NodeId> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    let cert = libp2p::tls::certificate::parse(certs.first()?).ok()?;
    node_id_of_peer(&cert.peer_id())
}

/// Most bytes of a frame body read at once.
const FRAME_READ_CHUNK: usize = 64 << 10;

/// Reads one frame (length-checked before the body is read) and decodes it.
pub async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, FrameError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    recv.read_exact(&mut header).await.map_err(|e| FrameError::Io(e.to_string()))?;
    let len = codec::frame_len(header)?;
    // The body is kept as QUIC hands it over, in chunks (a header alone does not commit 4 MiB,
    // so a peer's open streams hold at most what the connection's receive window let it send),
    // and decoded from them: a page is copied once, into its own buffer.
    let mut chunks: Vec<bytes::Bytes> = Vec::new();
    let mut got = 0;
    while got < len {
        let want = (len - got).min(FRAME_READ_CHUNK);
        match recv.read_chunk(want, true).await.map_err(|e| FrameError::Io(e.to_string()))? {
            Some(chunk) => {
                got += chunk.bytes.len();
                chunks.push(chunk.bytes);
            }
            None => return Err(FrameError::Io(format!("stream ended {got} bytes into a {len}-byte frame"))),
        }
    }
    Ok(codec::decode_parts(&chunks)?)
}

/// Encodes and writes one frame, then finishes the stream.
pub async fn write_frame<T: serde::Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), FrameError> {
    let frame = codec::encode_frame(msg)?;
    send.write_chunk(frame.into()).await.map_err(|e| FrameError::Io(e.to_string()))?;
    send.finish().map_err(|e| FrameError::Io(e.to_string()))?;
    Ok(())
}

/// Encodes and writes one frame, leaving the stream open for more (a cut's conversation).
pub async fn write_frame_open<T: serde::Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), FrameError> {
    let frame = codec::encode_frame(msg)?;
    send.write_chunk(frame.into()).await.map_err(|e| FrameError::Io(e.to_string()))?;
    Ok(())
}

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed.
    #[error("{0}")]
    Io(String),
    /// The frame broke a limit or did not decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

fn frame_error(peer: NodeId, e: FrameError) -> NetError {
    match e {
        FrameError::Codec(source) => NetError::Codec { peer: peer.short(), source },
        FrameError::Io(reason) => NetError::Transport { peer: peer.short(), reason },
    }
}

/// Our side of the data plane: one cached connection per peer.
pub struct DataClient {
    endpoint: quinn::Endpoint,
    keypair: Keypair,
    alpn: &'static [u8],
    conns: Mutex<HashMap<NodeId, Pooled>>,
    /// Bytes sent and received per peer over connections that are gone.
    retired: std::sync::Mutex<HashMap<NodeId, (u64, u64)>>,
}

/// A cached connection and what tells whether it is idle.
struct Pooled {
    conn: quinn::Connection,
    /// Requests waiting on it now.
    busy: Arc<std::sync::atomic::AtomicUsize>,
    /// Stream frames it had sent and received at the last idle check, and since when that
    /// count has not moved.
    frames: u64,
    quiet_since: std::time::Instant,
}

/// A request in progress on a pooled connection (it is not closed as idle meanwhile).
struct Busy(Arc<std::sync::atomic::AtomicUsize>);

impl Busy {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn stream_frames(c: &quinn::Connection) -> u64 {
    let s = c.stats();
    s.frame_tx.stream + s.frame_rx.stream
}

/// Bytes a connection sent and received (QUIC's count of UDP payload).
fn bytes_of(c: &quinn::Connection) -> (u64, u64) {
    let s = c.stats();
    (s.udp_tx.bytes, s.udp_rx.bytes)
}

const _: () = assert!(MESSAGE_BYTES_MAX >= 2 << 20);

impl DataClient {
    /// A client on `endpoint`, proving `keypair`.
    pub fn new(endpoint: quinn::Endpoint, keypair: Keypair) -> Self {
        Self::with_alpn(endpoint, keypair, DATA_ALPN)
    }

    /// A client speaking data-plane version `alpn` (another version's, to check that peers
    /// of different versions refuse each other cleanly).
    pub fn with_alpn(endpoint: quinn::Endpoint, keypair: Keypair, alpn: &'static [u8]) -> Self {
        Self { endpoint, keypair, alpn, conns: Mutex::new(HashMap::new()), retired: Default::default() }
    }

    async fn connection(&self, peer: NodeId, addr: SocketAddr) -> Result<(quinn::Connection, Busy), NetError> {
        let mut conns = self.conns.lock().await;
        if let Some(p) = conns.get(&peer) {
            if p.conn.close_reason().is_none() {
                return Ok((p.conn.clone(), Busy::new(&p.busy)));
            }
            if let Some(p) = conns.remove(&peer) {
                self.retire(peer, &p.conn);
            }
        }
        let unreachable = |reason: String| NetError::Unreachable { peer: peer.short(), addr, reason };
        let peer_id = peer_of_node_id(&peer).ok_or_else(|| unreachable("not an ed25519 node id".into()))?;
        let mut tls = crate::tls::client_config(&self.keypair, peer_id).map_err(|e| unreachable(e.to_string()))?;
        tls.alpn_protocols = vec![self.alpn.to_vec()];
        let crypto = QuicClientConfig::try_from(Arc::new(tls)).map_err(|e| unreachable(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport_config());
        // The server name is not checked: libp2p's TLS profile authenticates the key instead.
        let connecting = self.endpoint.connect_with(cfg, addr, "vmcsnap").map_err(|e| unreachable(e.to_string()))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| {
                if is_version_mismatch(&e) {
                    NetError::VersionMismatch { peer: peer.short(), addr }
                } else {
                    unreachable(e.to_string())
                }
            })?;
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let guard = Busy::new(&busy);
        conns.insert(peer, Pooled { conn: conn.clone(), busy, frames: 0, quiet_since: std::time::Instant::now() });
        Ok((conn, guard))
    }

    /// Sends one request to `peer` and waits for its answer; retries on a broken connection.
    /// An `Error` answer becomes [`NetError::Remote`].
    pub async fn request(&self, peer: NodeId, addr: SocketAddr, req: &DataRequest) -> Result<DataResponse, NetError> {
        let mut last = None;
        for attempt in 0..REQUEST_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
            }
            match self.request_once(peer, addr, req).await {
                Ok(DataResponse::Error { kind, message }) => {
                    return Err(NetError::Remote { peer: peer.short(), kind, message })
                }
                Ok(r) => return Ok(r),
                Err(e @ (NetError::Transport { .. } | NetError::Unreachable { .. })) => {
                    tracing::debug!(target: "vmcsnap::net", peer = %peer.short(), attempt, error = %e, "request failed");
                    self.conns.lock().await.remove(&peer);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| NetError::Transport { peer: peer.short(), reason: "no attempt".into() }))
    }

    async fn request_once(&self, peer: NodeId, addr: SocketAddr, req: &DataRequest) -> Result<DataResponse, NetError> {
        let frame = codec::encode_frame(req).map_err(|source| NetError::Codec { peer: peer.short(), source })?;
        self.exchange(peer, addr, frame.into()).await
    }

    /// Sends `frame` as it is (header and body, however wrong) as one request and reads the
    /// answer frame, once: how tests play a peer that sends garbage.
    pub async fn request_raw(&self, peer: NodeId, addr: SocketAddr, frame: &[u8]) -> Result<DataResponse, NetError> {
        match self.exchange(peer, addr, bytes::Bytes::copy_from_slice(frame)).await? {
            DataResponse::Error { kind, message } => Err(NetError::Remote { peer: peer.short(), kind, message }),
            r => Ok(r),
        }
    }

    /// `frame` goes to QUIC as it is, not copied (1 MiB `Put`s and `Pages`).
    async fn exchange(&self, peer: NodeId, addr: SocketAddr, frame: bytes::Bytes) -> Result<DataResponse, NetError> {
        let (conn, _busy) = self.connection(peer, addr).await?;
        let transport = |reason: String| NetError::Transport { peer: peer.short(), reason };
        let fut = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| transport(e.to_string()))?;
            send.write_chunk(frame).await.map_err(|e| transport(e.to_string()))?;
            send.finish().map_err(|e| transport(e.to_string()))?;
            read_frame::<DataResponse>(&mut recv).await.map_err(|e| frame_error(peer, e))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| transport(format!("no answer within {REQUEST_TIMEOUT:?}")))?
    }

    /// Sends one request and waits up to `timeout` for its answer, without retrying: for work
    /// that must not run twice (starting a VM). An `Error` answer becomes [`NetError::Remote`].
    pub async fn request_within(&self, peer: NodeId, addr: SocketAddr, req: &DataRequest, timeout: Duration) -> Result<DataResponse, NetError> {
        let (conn, _busy) = self.connection(peer, addr).await?;
        let transport = |reason: String| NetError::Transport { peer: peer.short(), reason };
        let fut = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| transport(e.to_string()))?;
            write_frame(&mut send, req).await.map_err(|e| frame_error(peer, e))?;
            read_frame::<DataResponse>(&mut recv).await.map_err(|e| frame_error(peer, e))
        };
        match tokio::time::timeout(timeout, fut).await.map_err(|_| transport(format!("no answer within {timeout:?}")))?? {
            DataResponse::Error { kind, message } => Err(NetError::Remote { peer: peer.short(), kind, message }),
            r => Ok(r),
        }
    }

    /// Opens a stream to `peer` for a conversation (a cut) and sends `req` as its first frame.
    pub async fn open_session(&self, peer: NodeId, addr: SocketAddr, req: &DataRequest) -> Result<(quinn::SendStream, quinn::RecvStream), NetError> {
        // A session (a cut) reports every second: its stream frames keep the connection from
        // counting as idle.
        let (conn, _busy) = match self.connection(peer, addr).await {
            Ok(c) => c,
            Err(_) => {
                // A cached connection may have died with the peer's last run: make a fresh one.
                self.conns.lock().await.remove(&peer);
                self.connection(peer, addr).await?
            }
        };
        let (mut send, recv) = tokio::time::timeout(CONNECT_TIMEOUT, conn.open_bi())
            .await
            .map_err(|_| NetError::Transport { peer: peer.short(), reason: "cannot open a stream".into() })?
            .map_err(|e| NetError::Transport { peer: peer.short(), reason: e.to_string() })?;
        write_frame_open(&mut send, req).await.map_err(|e| frame_error(peer, e))?;
        Ok((send, recv))
    }

    /// Drops the cached connection to `peer` (it went away: a restarted peer would not know
    /// the old connection, and requests on it would wait for the idle timeout).
    pub async fn forget(&self, peer: &NodeId) {
        if let Some(p) = self.conns.lock().await.remove(peer) {
            p.conn.close(CLOSE_SHUTDOWN.into(), b"peer left");
            self.retire(*peer, &p.conn);
        }
    }

    /// Closes the connections that carried no stream data and no waiting request for
    /// `idle` (checked at each call; call it every few seconds). Returns how many it closed.
    pub async fn close_idle(&self, idle: Duration) -> usize {
        let now = std::time::Instant::now();
        let mut conns = self.conns.lock().await;
        let mut gone = Vec::new();
        for (peer, p) in conns.iter_mut() {
            let frames = stream_frames(&p.conn);
            if frames != p.frames || p.busy.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                p.frames = frames;
                p.quiet_since = now;
            } else if now.duration_since(p.quiet_since) >= idle {
                gone.push(*peer);
            }
        }
        for peer in &gone {
            if let Some(p) = conns.remove(peer) {
                p.conn.close(CLOSE_IDLE.into(), b"idle");
                self.retire(*peer, &p.conn);
            }
        }
        gone.len()
    }

    fn retire(&self, peer: NodeId, c: &quinn::Connection) {
        let (tx, rx) = bytes_of(c);
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        let t = retired.entry(peer).or_default();
        *t = (t.0 + tx, t.1 + rx);
    }

    /// Bytes sent to and received from each peer over the connections this client opened,
    /// since it was made.
    pub async fn traffic(&self) -> Vec<(NodeId, u64, u64)> {
        let mut totals = self.retired.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (peer, p) in self.conns.lock().await.iter() {
            let (tx, rx) = bytes_of(&p.conn);
            let t = totals.entry(*peer).or_default();
            *t = (t.0 + tx, t.1 + rx);
        }
        totals.into_iter().map(|(p, (tx, rx))| (p, tx, rx)).collect()
    }

    /// Closes every connection.
    pub async fn close(&self) {
        for (_, p) in self.conns.lock().await.drain() {
            p.conn.close(CLOSE_SHUTDOWN.into(), b"shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_plane_socket_gets_a_receive_buffer_for_bursts() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let got = enlarge_receive_buffer(&socket);
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        // Root (the effective uid, third on the line) may exceed the sysctl's cap.
        let root = std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
        if root {
            assert_eq!(got, UDP_RECEIVE_BUFFER);
        } else {
            assert_eq!(got, UDP_RECEIVE_BUFFER.min(cap));
        }
    }
}

