//! The vmcsnap node: the daemon every KVM host runs.
//!
//! # Goals
//! - Capture the memory of local VMs, hash every page, and store each distinct page once (times
//!   `replicas`) on the hosts that own its hash.
//! - Restore any snapshot on any host, fetching pages from their owners and verifying each.
//! - Commit a snapshot whole or not at all.
//!
//! # Non-goals (here)
//! - Deleting snapshots and collecting unreferenced pages (pages are only ever added).
//! - Moving pages when membership changes: each snapshot records the view it was placed over.
//!
//! # Codemap, in layers (a module imports only modules of a lower layer; `tests/layers.rs`
//! checks it)
//! 0. [`config`] (the validated configuration), [`identity`] (the ed25519 key), [`store`]
//!    (RocksDB pages, catalog, metadata), [`crc32c`] (RocksDB's checksum on the CPU's
//!    instruction), [`source`] (memory sources and the capture contract:
//!    pacing, page sink, result), [`tls`] (the data plane's TLS: libp2p's profile, AES-GCM
//!    first), [`sockbuf`] (socket buffers past the system's caps).
//! 1. [`admission`] (this node's certificate and the revocations it keeps), [`qemu`] (stream
//!    parser and rebuilder, QMP, capture, launch: QEMU's terms only), [`net`]
//!    (the QUIC data plane's client side and framing), [`answer`] (store requests, for peers
//!    and for this node alike).
//! 2. [`vms`]: this host's VM registry and the pause journal; [`fuzz`]: the fuzzing entry
//!    points (one per decoder of outside input); [`share`]: pages fetched from other members,
//!    shared by the fetches running at once.
//! 3. [`node`]: the [`Node`] API — members, calls, the peer fan-out, the catalog.
//! 4. [`engine`]: uploads, the cut (coordinator and participant state machines), snapshot,
//!    restore.
//! 5. [`server`] (the data plane's serving side) and [`control`] (the CLI's socket).
//! 6. [`daemon`]: [`run`] — builds the node and runs its background tasks.

pub mod admission;
pub mod answer;
pub mod config;
pub mod control;
pub mod crc32c;
pub mod daemon;
pub mod engine;
pub mod exporter;
pub mod fuzz;
pub mod identity;
pub mod metrics;
pub mod net;
pub mod node;
pub mod qemu;
pub mod server;
pub mod share;
pub mod sockbuf;
pub mod source;
pub mod store;
pub mod tls;
pub mod vms;

pub use config::NodeConfig;
pub use daemon::run;
pub use node::Node;
