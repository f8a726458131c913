//! Cluster snapshots as one cut: the initiating node (the coordinator) drives one
//! conversation per host that runs VMs of the snapshot (itself included), and each such
//! participant captures its own VMs and uploads their pages to the owners.
//!
//! The cut, for every participant at once (see [`vmcsnap_protocol::wire::CutBegin`]):
//! 1. **Prepare** each VM; with pre-copy, let QEMU run its live rounds until one full pass is
//!    done. Report `Ready`.
//! 2. On `Go` (sent once every participant is ready): pause each VM. With stop-copy QEMU then
//!    copies it; with pre-copy the pause makes the final round start now. Report `Paused`.
//! 3. On `Release` (sent once every VM of the cut is paused): resume each VM as soon as QEMU has
//!    sent all of it. So no VM runs on past the cut before every VM has reached it.
//! 4. Upload, seal manifests, sync owners; report `Done` with the VM entries. The coordinator
//!    commits one record for all of them.
//!
//! **Invariant:** a failure anywhere (a VM, a participant, a silent host) aborts every
//! participant: each resumes its VMs and reports; nothing is committed, because only the
//! coordinator commits and only after every `Done`.
//!
//! - [`machine`]: both sides as pure state machines (the rules above, unit-tested);
//! - [`transport`]: a participant as a session: in-process for this node, else a QUIC stream
//!   with heartbeats;
//! - [`participate`]: a participant's runtime (captures paced by its machine, then the seal);
//! - [`coordinate`]: the coordinator's runtime.

pub mod coordinate;
pub mod machine;
pub mod participate;
pub mod transport;

use std::time::Duration;

/// Longest a participant keeps its VMs prepared (pre-copy: live-copying, dirty-tracked)
/// waiting for the cut's `Go` after reporting `Ready`: long enough for the slowest host's
/// first pass over a large VM, short enough that no member can hold VMs in that state.
pub const GO_WAIT_MAX: Duration = Duration::from_secs(15 * 60);
/// Longest a participant keeps its VMs paused waiting for the cut's `Release` after `Go`.
pub const RELEASE_WAIT_MAX: Duration = Duration::from_secs(120);
/// How long an aborted cut waits for its participants to resume their VMs and end.
pub const ABORT_WAIT: Duration = Duration::from_secs(60);
