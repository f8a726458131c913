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
//! # Codemap
//! - [`node`]: the [`node::Node`] that ties the pieces together, and [`node::run`].
//! - [`store`]: RocksDB page store and catalog.
//! - [`net`]: QUIC data plane (client side and framing); [`server`]: its request handler.
//! - [`engine`]: the snapshot and restore engines.
//! - [`source`]: VM memory sources (`file:` images, `qemu:` running VMs).
//! - [`qemu`]: QEMU migration stream parser and rebuilder, QMP, capture, launch.
//! - [`control`]: the local control socket the CLI talks to.
//! - [`identity`]: the persistent ed25519 identity.
//! - [`vms`]: this host's VM registry and the pause journal.

pub mod control;
pub mod engine;
pub mod identity;
pub mod net;
pub mod node;
pub mod qemu;
pub mod server;
pub mod source;
pub mod store;
pub mod vms;

pub use node::{run, Node, NodeConfig};
