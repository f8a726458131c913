//! The Prometheus endpoint (`node run --metrics IP:PORT`, off by default): `GET /metrics` over
//! plain HTTP/1.1 answers the OpenMetrics text of [`crate::metrics::Metrics`], its store,
//! membership and data-plane figures read at that moment (the same figures `cluster status`
//! shows for this node). Anything else gets 404. Bind it to a management address: it needs no
//! credentials and says nothing secret, but it is not meant for the world.

use crate::node::Node;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmcsnap_protocol::PAGE_SIZE;

/// Longest a scraper may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request read (its head).
pub const REQUEST_BYTES_MAX: usize = 8 << 10;
/// Scrapes served at once; more wait for their turn.
pub const SCRAPES_MAX: usize = 8;

/// Binds `addr` (a taken port fails the node's start, not later).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))
}

/// Serves scrapes until the task is aborted.
pub async fn serve(node: Arc<Node>, listener: tokio::net::TcpListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(SCRAPES_MAX));
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of descriptors, say: not a reason to spin.
                tracing::warn!(target: "vmcsnap::node", error = %e, "metrics endpoint cannot accept");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let node = node.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = answer(&node, conn).await {
                tracing::debug!(target: "vmcsnap::node", error = %e, "metrics request failed");
            }
        });
    }
}

async fn answer(node: &Arc<Node>, mut conn: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_BYTES_MAX {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read).await.map_err(|_| std::io::Error::other("request timed out"))??;
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let (status, kind, body) = if method == b"GET" && (path == b"/metrics" || path.starts_with(b"/metrics?")) {
        collect(node).await;
        ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", node.metrics.encode())
    } else {
        ("404 Not Found", "text/plain; charset=utf-8", "vmcsnap serves GET /metrics only\n".to_string())
    };
    let reply = format!("HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    conn.write_all(reply.as_bytes()).await?;
    conn.shutdown().await
}

/// Reads the figures that are state, not events, into the gauges.
async fn collect(node: &Arc<Node>) {
    let m = &node.metrics;
    let store = node.store.clone();
    let figures = tokio::task::spawn_blocking(move || {
        let pages = store.page_count();
        (pages, store.free_bytes(), store.is_full(), store.gc_stats().ok(), store.scrub_stats(), store.repair_stats())
    })
    .await;
    if let Ok((pages, free, full, gc, scrub, repair)) = figures {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        m.store_pages.set(g(pages));
        m.store_bytes.set(g(pages.saturating_mul(PAGE_SIZE as u64)));
        m.store_free_bytes.set(g(free));
        m.store_full.set(i64::from(full));
        if let Some(gc) = gc {
            m.gc_reclaimable_bytes.set(g(gc.reclaimable_bytes));
            m.gc_reclaimed_bytes.set(g(gc.reclaimed_bytes));
        }
        m.scrub_checked.set(g(scrub.pages_checked));
        m.scrub_corrupt.set(g(scrub.corrupt_found));
        m.scrub_repaired.set(g(scrub.repaired));
        m.repair_copies.set(g(repair.copies_made));
        m.repair_bytes.set(g(repair.bytes_sent));
    }
    let members = node.members();
    let up = members.iter().filter(|x| x.alive).count();
    let label = |s: &str| crate::metrics::State { state: s.into() };
    m.members.get_or_create(&label("up")).set(up as i64);
    m.members.get_or_create(&label("down")).set((members.len() - up) as i64);
    m.traffic(&node.traffic().await);
}
