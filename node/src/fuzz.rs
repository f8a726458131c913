//! Entry points for fuzzing: one per decoder that takes bytes from a peer, a disk, a QEMU or
//! a control client. Each takes arbitrary bytes and must return without panicking, aborting
//! or allocating more than its input justifies; where a decode succeeds it also checks a
//! round trip. The cargo-fuzz targets in `fuzz/` call these, and `tests/fuzz_corpus.rs`
//! replays the seed corpus through them in every test run.

use crate::qemu::qmp;
use crate::qemu::stream::{self, Rebuilder, StreamMeta};
use std::collections::BTreeMap;
use vmcsnap_dht::admission::{Certificate, Revocation, Trust};
use vmcsnap_protocol::codec::{self, decode_body, encode_body};
use vmcsnap_protocol::control::{decode_control, encode_control, ControlEvent, ControlRequest};
use vmcsnap_protocol::manifest::{expand_level, level_sizes, ManifestRoot, SignedRecord, SignedTombstone, FANOUT};
use vmcsnap_protocol::wire::{CutCommand, CutReport, DataRequest, DataResponse};
use vmcsnap_protocol::{hash_page, PageHash, PAGE_SIZE};

/// A fuzz target: its name and the function that takes one input.
pub type Target = (&'static str, fn(&[u8]));

/// The targets, by name (the name of the `fuzz/fuzz_targets/` file and the corpus folder).
pub const TARGETS: &[Target] = &[
    ("wire", wire),
    ("control", control),
    ("record", record),
    ("manifest", manifest),
    ("stream", stream),
    ("rebuild", rebuild),
    ("qmp", qmp),
];

fn round_trip<T>(v: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(bytes) = encode_body(v) {
        let back: T = decode_body(&bytes).unwrap_or_else(|e| panic!("re-decoding {v:?}: {e}"));
        assert_eq!(&back, v, "round trip changed the message");
    }
}

/// Data-plane frame bodies: requests, answers and the cut's conversation.
pub fn wire(data: &[u8]) {
    if let Ok(m) = decode_body::<DataRequest>(data) {
        round_trip(&m);
    }
    if let Ok(m) = decode_body::<DataResponse>(data) {
        round_trip(&m);
    }
    if let Ok(m) = decode_body::<CutCommand>(data) {
        round_trip(&m);
    }
    if let Ok(m) = decode_body::<CutReport>(data) {
        round_trip(&m);
    }
    if let Some(h) = data.first_chunk::<{ codec::FRAME_HEADER_BYTES }>() {
        let _ = codec::frame_len(*h);
    }
}

/// Control-socket frame bodies (what follows a frame's length header), both ways.
pub fn control(data: &[u8]) {
    if let Ok(m) = decode_control::<ControlRequest>(data) {
        // `encode_control` makes a whole frame: its body follows the length header.
        let again = encode_control(&m).expect("encode");
        assert_eq!(decode_control::<ControlRequest>(&again[codec::FRAME_HEADER_BYTES..]).expect("decode"), m);
    }
    let _ = decode_control::<ControlEvent>(data);
}

/// Persisted and transmitted records: signed commit records (and the legacy unsigned ones),
/// tombstones, certificates and revocations as tokens.
pub fn record(data: &[u8]) {
    if let Ok(r) = SignedRecord::decode(data) {
        r.validate().expect("a decoded record is valid");
        if r.is_signed() {
            let again = SignedRecord::decode(&r.encode().expect("encode")).expect("decode");
            assert_eq!(again, r);
        }
        // Checking a signature never panics, whatever the record holds.
        if let Ok(trust) = Trust::new(r.record.initiator) {
            let _ = trust.check_record(&r);
        }
    }
    if let Ok(t) = SignedTombstone::decode(data) {
        let again = SignedTombstone::decode(&t.encode().expect("encode")).expect("decode");
        assert_eq!(again, t);
        if let Ok(trust) = Trust::new(t.tombstone.deleted_by) {
            let _ = trust.check_tombstone(&t);
        }
    }
    let text = String::from_utf8_lossy(data);
    let _ = Certificate::from_token(&text);
    let _ = Revocation::from_token(&text);
}

/// Manifest expansion: a root (pages, depth, top) from the first bytes, chunk pages from the
/// rest; the tree is expanded level by level as a restore does.
pub fn manifest(data: &[u8]) {
    // A restore holds 32 bytes per page; the fuzzer explores shapes, not sizes.
    const PAGES_MAX: u64 = 1 << 20;
    if data.len() < 9 {
        return;
    }
    let pages = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8])) % PAGES_MAX;
    let depth = data[8];
    let rest = &data[9..];
    let top: Vec<PageHash> = rest.chunks_exact(32).take(FANOUT + 1).map(|c| PageHash(c.try_into().unwrap_or([0; 32]))).collect();
    let root = ManifestRoot { pages, depth, top };
    if root.validate().is_err() {
        return;
    }
    // Chunk pages: 4 KiB windows of the input, found by their hash.
    let mut chunks: BTreeMap<PageHash, Vec<u8>> = BTreeMap::new();
    for w in rest.chunks(PAGE_SIZE) {
        let mut page = w.to_vec();
        page.resize(PAGE_SIZE, 0);
        chunks.insert(hash_page(&page), page);
    }
    let sizes = level_sizes(pages);
    let mut level = root.top.clone();
    for d in (0..root.depth as usize).rev() {
        match expand_level(&level, sizes[d], |h| chunks.get(h).cloned().ok_or(())) {
            Ok(next) => level = next,
            Err(()) => return,
        }
    }
    assert!(level.len() as u64 <= pages);
}

/// The migration stream parser; a stream that parses is rebuilt from what was kept and must
/// parse again to the same blocks, device tail and pages.
pub fn stream(data: &[u8]) {
    let mut pages: BTreeMap<(usize, u64), Option<Vec<u8>>> = BTreeMap::new();
    let Ok(parsed) = stream::parse(data, |b, i, d| {
        pages.insert((b, i), d.map(<[u8]>::to_vec));
        Ok(())
    }) else {
        return;
    };
    let Ok(mut rb) = Rebuilder::start(Vec::new(), parsed.meta.clone()) else { return };
    for ((b, i), d) in &pages {
        if let Some(d) = d {
            rb.page(*b, *i, d).expect("a page the parser accepted is rebuilt");
        }
    }
    let rebuilt = rb.finish(&parsed.tail).expect("rebuild");
    let mut again: BTreeMap<(usize, u64), Vec<u8>> = BTreeMap::new();
    let re = stream::parse(rebuilt.as_slice(), |b, i, d| {
        if let Some(d) = d {
            again.insert((b, i), d.to_vec());
        }
        Ok(())
    })
    .expect("a rebuilt stream parses");
    assert_eq!(re.meta.blocks, parsed.meta.blocks);
    assert_eq!(re.tail, parsed.tail);
    let kept: BTreeMap<(usize, u64), Vec<u8>> = pages.into_iter().filter_map(|(k, d)| d.map(|d| (k, d))).collect();
    assert_eq!(again, kept);
}

/// The rebuilder fed with stream facts as a commit record gives them (decoded from the
/// input), and pages at the indexes the input names.
pub fn rebuild(data: &[u8]) {
    let Ok(meta) = decode_body::<StreamMeta>(data.get(..data.len().min(8192)).unwrap_or(data)) else { return };
    let Ok(mut rb) = Rebuilder::start(std::io::sink(), meta) else { return };
    let page = [0x5au8; PAGE_SIZE];
    for w in data.chunks_exact(9).take(64) {
        let block = w[0] as usize;
        let index = u64::from_le_bytes(w[1..9].try_into().unwrap_or([0; 8]));
        let _ = rb.page(block, index, &page);
    }
    let _ = rb.finish(&[]);
}

/// QMP messages as QEMU sends them, read as an answer to a command.
pub fn qmp(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = qmp::reply("query-status", v);
    }
}
