//! The node's Prometheus metrics (`prometheus-client`): what the engines count as they work
//! (snapshots and restores by outcome, their durations, VM pauses, bytes captured and new),
//! and the figures read from the store, the membership and the data plane at each scrape
//! ([`crate::exporter`] fills those in and serves the text).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

/// A label: how a snapshot or restore ended (`committed`/`failed`, `done`/`failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// The outcome.
    pub outcome: String,
}

/// A label: a member's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Peer {
    /// Its name (`--name`).
    pub peer: String,
}

/// A label: a member's state (`up`, `down`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    /// The state.
    pub state: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric a node exports. Counters only grow while the node runs (a restart starts them
/// at zero, which Prometheus' `rate()` takes as a reset).
pub struct Metrics {
    registry: Registry,
    /// Snapshots this node drove, by outcome.
    pub snapshots: Family<Outcome, Counter>,
    /// Their durations (from the request to committed or failed).
    pub snapshot_seconds: Histogram,
    /// Each captured VM's pause.
    pub pause_seconds: Histogram,
    /// Bytes of non-zero memory and disk the snapshots this node drove captured.
    pub captured_bytes: Counter,
    /// Bytes of those that no owner had: what the snapshots added to the cluster.
    pub new_bytes: Counter,
    /// The last committed snapshot's dedup ratio: captured bytes over new bytes.
    pub last_dedup_ratio: FloatGauge,
    /// VM restores this node drove, by outcome.
    pub restores: Family<Outcome, Counter>,
    /// Their durations (until the VM runs, for a lazy restore until its memory is resident).
    pub restore_seconds: Histogram,
    /// Distinct pages this node stores.
    pub store_pages: Gauge,
    /// Their bytes.
    pub store_bytes: Gauge,
    /// Free bytes on the store's file system.
    pub store_free_bytes: Gauge,
    /// 1 while the store refuses new pages (less free than `--min-free`).
    pub store_full: Gauge,
    /// Bytes garbage collection can free (unreferenced pages past their grace).
    pub gc_reclaimable_bytes: Gauge,
    /// Bytes garbage collection freed since the store was created.
    pub gc_reclaimed_bytes: Gauge,
    /// Pages the scrubber checked, found corrupt and repaired, since the store was created.
    pub scrub_checked: Gauge,
    /// See `scrub_checked`.
    pub scrub_corrupt: Gauge,
    /// See `scrub_checked`.
    pub scrub_repaired: Gauge,
    /// Copies repair and rebalance made, and their bytes, since the store was created.
    pub repair_copies: Gauge,
    /// See `repair_copies`.
    pub repair_bytes: Gauge,
    /// Members by state, this node included.
    pub members: Family<State, Gauge>,
    /// Bytes this node sent to each member over the connections it opened to it.
    pub peer_sent: Family<Peer, Counter>,
    /// Bytes it received from each member over them.
    pub peer_received: Family<Peer, Counter>,
    /// Per member, the data-plane totals last seen (counters grow by the difference).
    traffic_seen: Mutex<std::collections::HashMap<String, (u64, u64)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered under the `vmcsnap_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vmcsnap");
        let m = Self {
            snapshots: Family::default(),
            snapshot_seconds: Histogram::new(exponential_buckets(0.25, 2.0, 14)),
            pause_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            captured_bytes: Counter::default(),
            new_bytes: Counter::default(),
            last_dedup_ratio: FloatGauge::default(),
            restores: Family::default(),
            restore_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            store_pages: Gauge::default(),
            store_bytes: Gauge::default(),
            store_free_bytes: Gauge::default(),
            store_full: Gauge::default(),
            gc_reclaimable_bytes: Gauge::default(),
            gc_reclaimed_bytes: Gauge::default(),
            scrub_checked: Gauge::default(),
            scrub_corrupt: Gauge::default(),
            scrub_repaired: Gauge::default(),
            repair_copies: Gauge::default(),
            repair_bytes: Gauge::default(),
            members: Family::default(),
            peer_sent: Family::default(),
            peer_received: Family::default(),
            traffic_seen: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register("snapshots", "Snapshots this node drove, by outcome", m.snapshots.clone());
        registry.register("snapshot_duration_seconds", "Time from a snapshot request to committed or failed", m.snapshot_seconds.clone());
        registry.register("vm_pause_seconds", "How long each captured VM was paused", m.pause_seconds.clone());
        registry.register("snapshot_captured_bytes", "Non-zero memory and disk bytes the snapshots this node drove captured", m.captured_bytes.clone());
        registry.register("snapshot_new_bytes", "Bytes of those no owner had yet (what the snapshots added)", m.new_bytes.clone());
        registry.register("snapshot_dedup_ratio", "Captured over new bytes of the last snapshot this node committed", m.last_dedup_ratio.clone());
        registry.register("restores", "VM restores this node drove, by outcome", m.restores.clone());
        registry.register("restore_duration_seconds", "Time of each VM restore", m.restore_seconds.clone());
        registry.register("store_pages", "Distinct pages this node stores", m.store_pages.clone());
        registry.register("store_bytes", "Bytes of the pages this node stores", m.store_bytes.clone());
        registry.register("store_free_bytes", "Free bytes on the store's file system", m.store_free_bytes.clone());
        registry.register("store_full", "1 while the store refuses new pages (less free than --min-free)", m.store_full.clone());
        registry.register("gc_reclaimable_bytes", "Bytes garbage collection can free now", m.gc_reclaimable_bytes.clone());
        registry.register("gc_reclaimed_bytes", "Bytes garbage collection freed since the store was created", m.gc_reclaimed_bytes.clone());
        registry.register("scrub_checked_pages", "Pages the scrubber checked since the store was created", m.scrub_checked.clone());
        registry.register("scrub_corrupt_pages", "Corrupt pages the scrubber found since the store was created", m.scrub_corrupt.clone());
        registry.register("scrub_repaired_pages", "Pages the scrubber repaired since the store was created", m.scrub_repaired.clone());
        registry.register("repair_copies", "Page copies repair and rebalance made since the store was created", m.repair_copies.clone());
        registry.register("repair_sent_bytes", "Bytes of those copies", m.repair_bytes.clone());
        registry.register("members", "Members this node knows, by state (this node included)", m.members.clone());
        registry.register("peer_sent_bytes", "Bytes sent to each member over the data-plane connections this node opened", m.peer_sent.clone());
        registry.register("peer_received_bytes", "Bytes received from each member over them", m.peer_received.clone());
        Self { registry, ..m }
    }

    /// Records a snapshot this node drove: its outcome, duration and, if committed, each VM's
    /// pause and the bytes it captured and added.
    pub fn snapshot(&self, elapsed: std::time::Duration, done: Option<(&[Option<u64>], u64, u64)>) {
        let outcome = if done.is_some() { "committed" } else { "failed" };
        self.snapshots.get_or_create(&Outcome { outcome: outcome.into() }).inc();
        self.snapshot_seconds.observe(elapsed.as_secs_f64());
        if let Some((pauses_ms, captured, new)) = done {
            for p in pauses_ms.iter().flatten() {
                self.pause_seconds.observe(*p as f64 / 1e3);
            }
            self.captured_bytes.inc_by(captured);
            self.new_bytes.inc_by(new);
            self.last_dedup_ratio.set(if new == 0 { 0.0 } else { captured as f64 / new as f64 });
        }
    }

    /// Records a VM restore this node drove.
    pub fn restore(&self, elapsed: std::time::Duration, ok: bool) {
        self.restores.get_or_create(&Outcome { outcome: if ok { "done" } else { "failed" }.into() }).inc();
        self.restore_seconds.observe(elapsed.as_secs_f64());
    }

    /// Brings the per-member byte counters up to `totals` (per member name: sent, received,
    /// as the data plane counts them since the node started).
    pub fn traffic(&self, totals: &[(String, u64, u64)]) {
        let mut seen = self.traffic_seen.lock().unwrap_or_else(|p| p.into_inner());
        for (peer, sent, received) in totals {
            let last = seen.entry(peer.clone()).or_default();
            let label = Peer { peer: peer.clone() };
            self.peer_sent.get_or_create(&label).inc_by(sent.saturating_sub(last.0));
            self.peer_received.get_or_create(&label).inc_by(received.saturating_sub(last.1));
            *last = ((*sent).max(last.0), (*received).max(last.1));
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
