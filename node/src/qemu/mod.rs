//! Running QEMU VMs: capture through QEMU's own migration stream, and restore into a fresh
//! QEMU, with stock QEMU (no patches).
//!
//! - [`stream`]: the migration stream parser and rebuilder (pure over `Read`/`Write`).
//! - [`qmp`]: a small QMP client.
//! - [`capture`]: drive a VM's migration into the node and feed its pages to the snapshot.
//! - [`launch`]: start the recorded QEMU command line with `-incoming` and restore into it.

pub mod capture;
pub mod launch;
pub mod qmp;
pub mod stream;

use vmcsnap_protocol::manifest::BlobRef;
use vmcsnap_protocol::{hash_page, PAGE_SIZE};

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

/// The QMP socket named by a QEMU command line's `-qmp unix:PATH[,...]`, if any.
pub fn qmp_path_of(cmdline: &[String]) -> Option<String> {
    let i = cmdline.iter().position(|a| a == "-qmp")?;
    let v = cmdline.get(i + 1)?;
    let p = v.strip_prefix("unix:")?;
    Some(p.split(',').next().unwrap_or(p).to_string())
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
    fn finds_the_qmp_socket() {
        let c: Vec<String> = ["qemu", "-m", "256", "-qmp", "unix:/run/v1.qmp,server=on,wait=off"].iter().map(|s| s.to_string()).collect();
        assert_eq!(qmp_path_of(&c).as_deref(), Some("/run/v1.qmp"));
        assert_eq!(qmp_path_of(&c[..3]), None);
    }
}
