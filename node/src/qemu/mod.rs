//! Running QEMU VMs: capture through QEMU's own migration stream, and restore into a fresh
//! QEMU, with stock QEMU (no patches).
//!
//! This module speaks QEMU's terms only: it knows nothing of snapshots, owners or cuts. The
//! engine drives it — it paces a capture through a [`crate::source::Pacer`] and takes its
//! pages through a [`crate::source::PageSink`].
//!
//! - [`stream`]: the migration stream parser and rebuilder (pure over `Read`/`Write`).
//! - [`qmp`]: a small QMP client, with the QEMU queries and waits vmcsnap needs.
//! - [`capture`]: drive a VM's migration into the node and hand its pages to a sink; then
//!   its disks, as they were in the pause ([`disks`]: QEMU's image fleecing; [`nbd`]: the
//!   client that reads the views).
//! - [`launch`]: start the recorded QEMU command line with `-incoming`.
//! - [`postcopy`]: the stream and return path of a lazy restore, the node as QEMU's source.
//! - [`relay`]: the process a live capture's stream connects to; it hands the connection
//!   to the node and, outliving it, drains what the node leaves.
//! - [`keeper`]: the process that holds a lazily restored QEMU's monitor, which outlives the
//!   node, so that a paused postcopy can always be recovered.
//! - [`recorded_state`] and [`stream_meta`]: the one conversion between a stream's metadata
//!   and what a snapshot records of it, each way.

pub mod capture;
pub mod disks;
pub mod keeper;
pub mod launch;
pub mod nbd;
pub mod postcopy;
pub mod qmp;
pub mod relay;
pub mod stream;

use stream::StreamMeta;
use vmcsnap_protocol::manifest::{BlobRef, Block, CaptureMode, QemuState};
use vmcsnap_protocol::{hash_page, PAGE_SIZE};

/// What QMP told about a VM at capture time, besides its stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuFacts {
    /// The QMP socket it was captured through.
    pub qmp: String,
    /// QEMU's version.
    pub qemu_version: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The QEMU process's command line.
    pub cmdline: Vec<String>,
    /// Capture mode.
    pub mode: CaptureMode,
    /// Whether the VM was running when the capture began.
    pub was_running: bool,
}

/// What a snapshot records of a captured stream: the QEMU state (the stream's head, machine,
/// RAM section and footers, the device state as a blob, and `facts`), and the RAM blocks.
pub fn recorded_state(meta: StreamMeta, device_state: BlobRef, facts: QemuFacts) -> (QemuState, Vec<Block>) {
    let state = QemuState {
        qmp: facts.qmp,
        head: meta.head,
        machine: meta.machine,
        ram_section: meta.ram_section,
        footers: meta.footers,
        device_state,
        qemu_version: facts.qemu_version,
        accel: facts.accel,
        cmdline: facts.cmdline,
        mode: facts.mode,
        was_running: facts.was_running,
    };
    (state, meta.blocks)
}

/// The stream metadata a restore rebuilds from a recorded state and its blocks (the inverse
/// of [`recorded_state`]; disk blocks are not part of the stream and are left out).
pub fn stream_meta(state: &QemuState, blocks: &[Block]) -> StreamMeta {
    StreamMeta {
        head: state.head.clone(),
        machine: state.machine.clone(),
        ram_section: state.ram_section,
        footers: state.footers,
        blocks: blocks.iter().filter(|b| !b.is_disk()).cloned().collect(),
    }
}

/// Migration capabilities vmcsnap turns off before capturing: each changes the stream into
/// something the parser refuses (or, for `return-path`, adds a back channel).
pub const CAPABILITIES_OFF: &[&str] =
    &["xbzrle", "compress", "postcopy-ram", "multifd", "x-ignore-shared", "return-path", "background-snapshot", "zero-blocks"];

/// Bandwidth limit set for the capture (bytes/s); QEMU's default of 128 MiB/s would make a
/// snapshot of a 1 GiB VM take 8 s.
pub const CAPTURE_BANDWIDTH: u64 = 64 << 30;

/// QEMU's `downtime-limit` during a capture, in ms (its default is 300 ms). It is as low as
/// QEMU allows above 0, so that QEMU does not end a pre-copy on its own (pausing the VM at a
/// moment of its choosing, before the other VMs of the cut are ready): vmcsnap pauses every
/// VM itself, at the cut's `Go`.
pub const CAPTURE_DOWNTIME_LIMIT_MS: u64 = 1;

/// Cuts `bytes` into page-sized chunks (the last zero-padded), as stored in the fabric.
pub fn blob_chunks(bytes: &[u8]) -> (BlobRef, Vec<Vec<u8>>) {
    let mut pages = Vec::new();
    let mut chunks = Vec::new();
    for c in bytes.chunks(PAGE_SIZE) {
        let mut p = vec![0u8; PAGE_SIZE];
        p[..c.len()].copy_from_slice(c);
        chunks.push(hash_page(&p));
        pages.push(p);
    }
    (BlobRef { len: bytes.len() as u64, chunks }, pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_chunk_and_pad() {
        let (r, pages) = blob_chunks(&vec![7u8; PAGE_SIZE + 10]);
        assert_eq!(r.len, PAGE_SIZE as u64 + 10);
        assert_eq!(pages.len(), 2);
        assert_eq!(&pages[1][..10], &[7u8; 10]);
        assert!(pages[1][10..].iter().all(|&b| b == 0));
        assert_eq!(r.chunks[0], hash_page(&pages[0]));
    }

    #[test]
    fn recorded_state_round_trips_to_stream_meta() {
        let meta = StreamMeta {
            head: vec![1, 2, 3],
            machine: "pc-i440fx-7.2".into(),
            ram_section: (2, 0, 4),
            footers: true,
            blocks: vec![Block { name: "pc.ram".into(), bytes: 8 * PAGE_SIZE as u64 }],
        };
        let facts = QemuFacts {
            qmp: "/run/v.qmp".into(),
            qemu_version: "7.2.22".into(),
            accel: "tcg".into(),
            cmdline: vec!["qemu-system-x86_64".into()],
            mode: CaptureMode::StopCopy,
            was_running: true,
        };
        let (state, blocks) = recorded_state(meta.clone(), BlobRef { len: 0, chunks: vec![] }, facts);
        assert_eq!(stream_meta(&state, &blocks), meta);
    }
}
