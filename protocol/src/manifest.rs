//! Manifests and commit records.
//!
//! A VM's manifest is the hash (or zero mark) of every page, in page order across its RAM
//! blocks. It is stored in the fabric exactly like guest pages: the hash list is cut into
//! 4 KiB chunks of [`FANOUT`] hashes, each chunk is a page, and the chunk hashes form the next
//! level, until one level fits in [`FANOUT`] entries: the [`ManifestRoot`]. So
//! - a manifest dedups like memory does: an unchanged 512 KiB region of a VM gives the same
//!   chunk in the next snapshot, and an all-zero region gives a zero chunk, which is never stored;
//! - a commit record stays small (at most 4 KiB of root per VM) whatever the VM's size.
//!
//! The commit record (name → VMs → manifest roots, plus the placement view the pages were
//! written under) is written last, on every live member, so a snapshot is visible whole or not
//! at all.

use crate::codec::{self, CodecError};
use crate::{NodeId, PageHash, PAGE_SIZE, ZERO_HASH};
use serde::{Deserialize, Serialize};

/// Hashes per manifest chunk: one page of 32-byte hashes.
pub const FANOUT: usize = PAGE_SIZE / 32;
/// Deepest manifest tree accepted: 128^6 pages is far beyond any guest.
pub const MANIFEST_DEPTH_MAX: u8 = 6;
/// Most VMs in one snapshot.
pub const SNAPSHOT_VMS_MAX: usize = 1024;
/// Most RAM blocks in one VM.
pub const VM_BLOCKS_MAX: usize = 256;
/// Longest RAM block name (QEMU's stream gives it one length byte).
pub const BLOCK_NAME_BYTES_MAX: usize = 255;
/// Longest snapshot name or VM id, in bytes.
pub const NAME_BYTES_MAX: usize = 128;
/// Largest VM memory a snapshot records (1 TiB): a restore holds 32 bytes of hash per page
/// (8 GiB at this size), so a record claiming more is refused before anything is allocated.
pub const VM_BYTES_MAX: u64 = 1 << 40;
/// [`VM_BYTES_MAX`] in pages.
pub const VM_PAGES_MAX: u64 = VM_BYTES_MAX / PAGE_SIZE as u64;

const RECORD_MAGIC: [u8; 4] = *b"VMCR";
/// Version of the encoded [`CommitRecord`].
pub const RECORD_VERSION: u16 = 2;
const SIGNED_MAGIC: [u8; 4] = *b"VMCS";
/// Version of the encoded [`SignedRecord`].
pub const SIGNED_VERSION: u16 = 1;
/// What a committing member signs: this domain, then the encoded [`CommitRecord`].
pub const RECORD_SIGNING_DOMAIN: &[u8] = b"vmcsnap commit record 1\0";
/// Most versions of one snapshot name a node keeps (two or more are a conflict the operator
/// resolves; the bound keeps a misbehaving member from filling the catalog under one name).
pub const NAME_VERSIONS_MAX: usize = 8;
/// Longest certificate token carried with a record, in characters.
pub const CERTIFICATE_CHARS_MAX: usize = 4096;
/// Bytes of an ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
/// Shortest record-id prefix accepted in `NAME@ID`, in hex characters.
pub const RECORD_ID_PREFIX_MIN: usize = 4;

/// The top of a VM's manifest tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRoot {
    /// Pages covered.
    pub pages: u64,
    /// Levels of chunks between `top` and the page hashes; 0 means `top` lists page hashes.
    pub depth: u8,
    /// At most [`FANOUT`] hashes.
    pub top: Vec<PageHash>,
}

/// One block of a VM's state, in manifest order: its RAM blocks, then its disks.
///
/// A disk is a block named [`DISK_BLOCK_PREFIX`]`SIZE:ARG:DEVICE` (see [`DiskBlock`]): its
/// 4 KiB blocks are pages of the manifest like any other, so dedup, placement, replicas,
/// garbage collection, verify, scrub and repair cover disks without knowing of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Block name (`ram` for an image file; QEMU's RAMBlock id for a live VM; a disk's
    /// [`DiskBlock::name`]).
    pub name: String,
    /// Length in bytes, a multiple of [`PAGE_SIZE`].
    pub bytes: u64,
}

/// Name prefix of a disk's block. QEMU's RAM block ids never contain a colon.
pub const DISK_BLOCK_PREFIX: &str = "disk:";

/// A disk of a VM as its block name records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskBlock {
    /// The disk's exact size in bytes (its block is this, rounded up to a page).
    pub size: u64,
    /// Index of the QEMU command-line argument that names its image (`file=` of a `-drive`).
    pub arg: usize,
    /// QEMU's device name for it (`virtio0`, or the drive's `id`).
    pub device: String,
}

/// Longest disk device name.
pub const DEVICE_BYTES_MAX: usize = 128;

impl DiskBlock {
    /// The block name: `disk:SIZE:ARG:DEVICE`.
    pub fn name(&self) -> String {
        format!("{DISK_BLOCK_PREFIX}{}:{}:{}", self.size, self.arg, self.device)
    }

    /// Parses a block name; `None` for a RAM block (or a malformed disk name).
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(DISK_BLOCK_PREFIX)?;
        let mut it = rest.splitn(3, ':');
        let size = it.next()?.parse().ok()?;
        let arg = it.next()?.parse().ok()?;
        // A QEMU id (a letter, then letters, digits, '-', '.', '_'): it names the restored
        // image's file, so a record's device may not be a path.
        let device = it.next().filter(|d| d.len() <= DEVICE_BYTES_MAX && d.starts_with(|c: char| c.is_ascii_alphabetic()) && d.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))?;
        Some(Self { size, arg, device: device.to_string() })
    }
}

impl Block {
    /// Whether this block is a disk.
    pub fn is_disk(&self) -> bool {
        self.name.starts_with(DISK_BLOCK_PREFIX)
    }
}

/// What one VM's snapshot cost and saved.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    /// Pages in the VM's memory.
    pub pages_total: u64,
    /// All-zero pages (marked, never stored or sent).
    pub pages_zero: u64,
    /// Non-zero pages.
    pub pages_nonzero: u64,
    /// Non-zero pages the cluster did not hold before this snapshot (first copy of each).
    pub pages_new: u64,
    /// Non-zero pages already stored, or repeated earlier in this snapshot.
    pub pages_dedup: u64,
    /// Page bytes sent over the network to other owners (all replicas).
    pub bytes_sent: u64,
    /// Wall time from the first page read to the last page handed to the owners, in ms.
    pub capture_ms: u64,
    /// How long the VM was paused, in ms (QEMU sources only).
    pub pause_ms: Option<u64>,
    /// When the pause began, µs since the Unix epoch on its host's clock (QEMU sources only).
    pub paused_unix_us: Option<u64>,
}

/// How a running QEMU VM was captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaptureMode {
    /// Pause, copy all memory, resume.
    StopCopy,
    /// Copy while running (QEMU's live rounds), pause only for the last round.
    PreCopy,
    /// Pause only to save the device state, then copy every page exactly as it was at that
    /// instant while the VM runs (QEMU's `background-snapshot`: userfaultfd write protection).
    Live,
}

/// Bytes stored in the fabric as pages: cut into 4 KiB chunks (the last zero-padded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// Length in bytes.
    pub len: u64,
    /// Hash of each chunk, in order (zero mark for an all-zero chunk).
    pub chunks: Vec<PageHash>,
}

/// What a QEMU VM's snapshot needs beyond its pages to run again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuState {
    /// The QMP socket the VM was captured through.
    pub qmp: String,
    /// The migration stream's header and configuration, verbatim.
    #[serde(with = "serde_bytes")]
    pub head: Vec<u8>,
    /// Machine type (`pc-i440fx-7.2`).
    pub machine: String,
    /// The stream's RAM section id, instance and version.
    pub ram_section: (u32, u32, u32),
    /// Whether the stream used section footers.
    pub footers: bool,
    /// Device state: the stream from the first non-RAM section to its end.
    pub device_state: BlobRef,
    /// QEMU version (`7.2.22`).
    pub qemu_version: String,
    /// `kvm` or `tcg`; a snapshot restores only on the same accelerator.
    pub accel: String,
    /// The QEMU command line, from the running process.
    pub cmdline: Vec<String>,
    /// Capture mode.
    pub mode: CaptureMode,
    /// Whether the VM was running when captured (a restore leaves it running too).
    pub was_running: bool,
}

/// One VM in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEntry {
    /// The operator's id for the VM.
    pub id: String,
    /// Where the memory came from (`file:/path`).
    pub source: String,
    /// The node that captured it.
    pub host: NodeId,
    /// That node's name (`--name`, by default its hostname).
    pub host_name: String,
    /// RAM layout, in manifest order.
    pub blocks: Vec<Block>,
    /// The manifest tree.
    pub manifest: ManifestRoot,
    /// Counters.
    pub stats: VmStats,
    /// For a running QEMU VM: what its restore needs.
    pub qemu: Option<QemuState>,
}

impl VmEntry {
    /// Pages of its memory: the manifest's first pages (its disks follow).
    pub fn ram_pages(&self) -> u64 {
        self.blocks.iter().filter(|b| !b.is_disk()).map(|b| b.bytes / PAGE_SIZE as u64).sum()
    }

    /// Its RAM blocks.
    pub fn ram_blocks(&self) -> Vec<Block> {
        self.blocks.iter().filter(|b| !b.is_disk()).cloned().collect()
    }

    /// Its disks, each with the manifest index of its first page and its page count.
    pub fn disks(&self) -> Vec<(DiskBlock, u64, u64)> {
        let mut at = 0u64;
        let mut out = Vec::new();
        for b in &self.blocks {
            let pages = b.bytes / PAGE_SIZE as u64;
            if let Some(d) = DiskBlock::parse(&b.name) {
                out.push((d, at, pages));
            }
            at += pages;
        }
        out
    }
}

/// A committed snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// Snapshot name, unique in the cluster.
    pub name: String,
    /// Milliseconds since the Unix epoch at commit.
    pub created_unix_ms: u64,
    /// Copies of every page.
    pub replicas: u8,
    /// The membership view the pages were placed over; restore computes owners from it.
    pub placement: Vec<NodeId>,
    /// The node that took the snapshot.
    pub initiator: NodeId,
    /// The VMs.
    pub vms: Vec<VmEntry>,
    /// Wall time of the whole snapshot, in milliseconds.
    pub elapsed_ms: u64,
    /// Time between the first and the last VM pause of the cut, in µs (`None` without
    /// running VMs). Host clocks are compared as they are, so this is only as good as NTP.
    pub pause_skew_us: Option<u64>,
}

/// A commit record as it is kept and travels: signed by the member that committed it.
///
/// The signature is by `record.initiator`'s node key over [`RECORD_SIGNING_DOMAIN`] and the
/// encoded record; `certificate` is that member's admission certificate (a token), so any
/// member can check that the signer was admitted to the cluster without having met it.
/// `vmcsnap_dht::admission::Trust::check_record` does the checking.
///
/// A record with an empty signature is one kept from before admission existed ([`legacy`]):
/// its node may restore from it, but no peer accepts it.
///
/// [`legacy`]: SignedRecord::is_signed
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRecord {
    /// The record.
    pub record: CommitRecord,
    /// The committing member's admission certificate, as a token.
    pub certificate: String,
    /// Ed25519 signature by `record.initiator` over [`SignedRecord::signed_bytes`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SignedRecord {
    /// What the committing member signs.
    pub fn signed_bytes(record: &CommitRecord) -> Result<Vec<u8>, CodecError> {
        Ok([RECORD_SIGNING_DOMAIN, &record.encode()?].concat())
    }

    /// The record's id: BLAKE3 of the encoded record (the same whoever signed or keeps it).
    pub fn id(&self) -> Result<PageHash, CodecError> {
        self.record.record_hash()
    }

    /// Whether it carries a signature (records from before admission do not).
    pub fn is_signed(&self) -> bool {
        !self.signature.is_empty()
    }

    /// Encodes for storage: magic `VMCS`, version, body.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode_record(SIGNED_MAGIC, SIGNED_VERSION, self)
    }

    /// Decodes and validates a kept record: a signed one, or an unsigned `VMCR` record from
    /// before admission (returned with no signature).
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.starts_with(&RECORD_MAGIC) {
            let record = CommitRecord::decode(bytes)?;
            return Ok(Self { record, certificate: String::new(), signature: Vec::new() });
        }
        let s: Self = codec::decode_record(SIGNED_MAGIC, "signed commit", SIGNED_VERSION, bytes)?;
        s.validate()?;
        Ok(s)
    }

    /// Checks the record's rules and the envelope's bounds (not the signature).
    pub fn validate(&self) -> Result<(), RecordError> {
        if self.certificate.len() > CERTIFICATE_CHARS_MAX || self.signature.len() > SIGNATURE_BYTES {
            return Err(RecordError::Invalid("oversized certificate or signature".into()));
        }
        self.record.validate()
    }
}

/// What a deleting member signs: this domain, then the encoded [`Tombstone`].
pub const TOMBSTONE_SIGNING_DOMAIN: &[u8] = b"vmcsnap tombstone 1\0";
const TOMBSTONE_MAGIC: [u8; 4] = *b"VMCT";
const TOMBSTONE_VERSION: u16 = 1;

/// The deletion of one commit record: it leaves every catalog and never comes back (a node
/// that was down when it was deleted learns the tombstone at its next catalog sync, and a
/// peer that still offers the record is not listened to).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// The snapshot's name.
    pub name: String,
    /// The deleted record's id ([`SignedRecord::id`]).
    pub record: PageHash,
    /// The member that deleted it.
    pub deleted_by: NodeId,
    /// Milliseconds since the Unix epoch at deletion.
    pub deleted_unix_ms: u64,
}

/// A [`Tombstone`] signed by the member that deleted the record, with its admission
/// certificate (checked like a commit record's by `vmcsnap_dht::admission::Trust`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTombstone {
    /// The tombstone.
    pub tombstone: Tombstone,
    /// The deleting member's admission certificate, as a token.
    pub certificate: String,
    /// Ed25519 signature by `tombstone.deleted_by` over [`SignedTombstone::signed_bytes`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SignedTombstone {
    /// What the deleting member signs.
    pub fn signed_bytes(t: &Tombstone) -> Result<Vec<u8>, CodecError> {
        Ok([TOMBSTONE_SIGNING_DOMAIN, &codec::encode_body(t)?].concat())
    }

    /// Encodes for storage: magic `VMCT`, version, body.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode_record(TOMBSTONE_MAGIC, TOMBSTONE_VERSION, self)
    }

    /// Decodes a kept tombstone and checks its bounds.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let t: Self = codec::decode_record(TOMBSTONE_MAGIC, "tombstone", TOMBSTONE_VERSION, bytes)?;
        t.validate()?;
        Ok(t)
    }

    /// Checks the name and the envelope's bounds (not the signature).
    pub fn validate(&self) -> Result<(), RecordError> {
        if self.certificate.len() > CERTIFICATE_CHARS_MAX || self.signature.len() > SIGNATURE_BYTES {
            return Err(RecordError::Invalid("oversized certificate or signature".into()));
        }
        validate_name("snapshot name", &self.tombstone.name).map_err(RecordError::Invalid)
    }
}

/// Formats a record id as the operator sees it (`NAME@ID`): the first 12 hex characters.
pub fn short_record_id(id: &PageHash) -> String {
    id.to_string()[..12].to_string()
}

/// Splits `NAME@ID` (a pick among conflicting records) into the name and the id prefix.
pub fn split_pick(spec: &str) -> Result<(&str, Option<&str>), String> {
    match spec.split_once('@') {
        None => Ok((spec, None)),
        Some((name, id)) => {
            let hex = id.len() >= RECORD_ID_PREFIX_MIN && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit());
            if !hex {
                return Err(format!("{spec:?}: after '@' give at least {RECORD_ID_PREFIX_MIN} hex characters of a record id (see `vmcsnap snapshot list`)"));
            }
            Ok((name, Some(id)))
        }
    }
}

/// A commit record or manifest that breaks a rule.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Could not decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Decoded, but inconsistent.
    #[error("invalid commit record: {0}")]
    Invalid(String),
}

/// Checks a snapshot name or VM id: 1 to [`NAME_BYTES_MAX`] bytes of `A-Z a-z 0-9 . _ -`,
/// not starting with `.` or `-`.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(format!("{what} must be 1 to {NAME_BYTES_MAX} characters"));
    }
    if !name.chars().all(ok_char) || name.starts_with(['.', '-']) {
        return Err(format!(
            "{what} {name:?} may only use letters, digits, '.', '_' and '-' (not first)"
        ));
    }
    Ok(())
}

impl CommitRecord {
    /// Encodes for storage: magic, version, body.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode_record(RECORD_MAGIC, RECORD_VERSION, self)
    }

    /// Decodes and validates a stored record.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let rec: Self = codec::decode_record(RECORD_MAGIC, "commit", RECORD_VERSION, bytes)?;
        rec.validate()?;
        Ok(rec)
    }

    /// BLAKE3 of the encoded record: two records with one name conflict unless this matches.
    pub fn record_hash(&self) -> Result<PageHash, CodecError> {
        Ok(PageHash(*blake3::hash(&self.encode()?).as_bytes()))
    }

    /// Checks the rules a record from a peer or disk must follow.
    pub fn validate(&self) -> Result<(), RecordError> {
        let bad = |m: String| Err(RecordError::Invalid(m));
        validate_name("snapshot name", &self.name).map_err(RecordError::Invalid)?;
        if self.replicas == 0 || self.replicas as usize > self.placement.len() {
            return bad(format!(
                "replicas {} with {} placement members",
                self.replicas,
                self.placement.len()
            ));
        }
        if self.vms.is_empty() || self.vms.len() > SNAPSHOT_VMS_MAX {
            return bad(format!("{} VMs", self.vms.len()));
        }
        for vm in &self.vms {
            validate_name("VM id", &vm.id).map_err(RecordError::Invalid)?;
            if vm.blocks.is_empty() || vm.blocks.len() > VM_BLOCKS_MAX {
                return bad(format!("VM {} has {} blocks", vm.id, vm.blocks.len()));
            }
            // Checked: block sizes come from a peer or a disk and may be built to overflow.
            let bytes = vm.blocks.iter().try_fold(0u64, |a, b| a.checked_add(b.bytes)).filter(|b| *b <= VM_BYTES_MAX);
            let Some(bytes) = bytes else {
                return bad(format!("VM {} has more than {VM_BYTES_MAX} bytes of RAM", vm.id));
            };
            if vm.blocks.iter().any(|b| b.name.is_empty() || b.name.len() > BLOCK_NAME_BYTES_MAX) {
                return bad(format!("VM {} has a RAM block name of 0 or over {BLOCK_NAME_BYTES_MAX} bytes", vm.id));
            }
            if let Some(first_disk) = vm.blocks.iter().position(Block::is_disk) {
                let disks = &vm.blocks[first_disk..];
                if first_disk == 0 || !disks.iter().all(|b| DiskBlock::parse(&b.name).is_some_and(|d| d.size.div_ceil(PAGE_SIZE as u64).checked_mul(PAGE_SIZE as u64) == Some(b.bytes))) {
                    return bad(format!("VM {} has a malformed disk block, or one before its RAM", vm.id));
                }
            }
            if vm.blocks.iter().any(|b| b.bytes % PAGE_SIZE as u64 != 0)
                || bytes / PAGE_SIZE as u64 != vm.manifest.pages
            {
                return bad(format!("VM {} block layout does not match its manifest", vm.id));
            }
            vm.manifest.validate().map_err(RecordError::Invalid)?;
            if let Some(q) = &vm.qemu {
                if q.device_state.len.div_ceil(PAGE_SIZE as u64) != q.device_state.chunks.len() as u64 {
                    return bad(format!("VM {} device state length does not match its chunks", vm.id));
                }
            }
        }
        Ok(())
    }

    /// The VM with this id.
    pub fn vm(&self, id: &str) -> Option<&VmEntry> {
        self.vms.iter().find(|v| v.id == id)
    }

    /// The smallest valid record: one VM `vm` of one zero page, placed on `initiator` alone.
    /// For tests and fuzz seeds that need a record and do not care what it holds.
    pub fn minimal(initiator: NodeId, name: &str) -> Self {
        CommitRecord {
            name: name.into(),
            created_unix_ms: 1,
            replicas: 1,
            placement: vec![initiator],
            initiator,
            vms: vec![VmEntry {
                id: "vm".into(),
                source: "file:/x".into(),
                host: initiator,
                host_name: "kvm-01".into(),
                blocks: vec![Block { name: "ram".into(), bytes: PAGE_SIZE as u64 }],
                manifest: ManifestRoot { pages: 1, depth: 0, top: vec![ZERO_HASH] },
                stats: VmStats::default(),
                qemu: None,
            }],
            elapsed_ms: 1,
            pause_skew_us: None,
        }
    }
}

/// Entries at each level of a tree over `pages` leaves: `[pages, chunks, chunks of chunks, ..]`,
/// ending with the first level of at most [`FANOUT`] entries.
pub fn level_sizes(pages: u64) -> Vec<u64> {
    let mut sizes = vec![pages];
    while *sizes.last().unwrap_or(&0) > FANOUT as u64 {
        let n = *sizes.last().unwrap_or(&0);
        sizes.push(n.div_ceil(FANOUT as u64));
    }
    sizes
}

impl ManifestRoot {
    /// Checks depth and width against the page count.
    pub fn validate(&self) -> Result<(), String> {
        if self.pages > VM_PAGES_MAX {
            return Err(format!("manifest of {} pages (at most {VM_PAGES_MAX})", self.pages));
        }
        let sizes = level_sizes(self.pages);
        if self.depth > MANIFEST_DEPTH_MAX || self.depth as usize + 1 != sizes.len() {
            return Err(format!("manifest depth {} for {} pages", self.depth, self.pages));
        }
        if self.top.len() as u64 != sizes[self.depth as usize] {
            return Err(format!("manifest root of {} entries for {} pages", self.top.len(), self.pages));
        }
        Ok(())
    }
}

/// Packs up to [`FANOUT`] hashes into one chunk page (zero-padded).
pub fn encode_chunk(hashes: &[PageHash]) -> Vec<u8> {
    debug_assert!(hashes.len() <= FANOUT);
    let mut page = vec![0u8; PAGE_SIZE];
    for (i, h) in hashes.iter().enumerate() {
        page[i * 32..(i + 1) * 32].copy_from_slice(&h.0);
    }
    page
}

/// Unpacks a chunk page into its [`FANOUT`] hashes.
pub fn decode_chunk(page: &[u8]) -> Vec<PageHash> {
    page.chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            PageHash(h)
        })
        .collect()
}

/// A manifest tree built from a VM's page hashes: the root, plus every non-zero chunk page
/// that must be stored (as `(hash, bytes)`).
#[derive(Debug)]
pub struct BuiltManifest {
    /// The root for the commit record.
    pub root: ManifestRoot,
    /// Chunk pages to store like guest pages.
    pub chunks: Vec<(PageHash, Vec<u8>)>,
}

/// Builds the manifest tree of a VM from its page hashes, in page order.
pub fn build_manifest(hashes: &[PageHash]) -> BuiltManifest {
    let mut chunks = Vec::new();
    let mut level: Vec<PageHash> = hashes.to_vec();
    let mut depth = 0u8;
    while level.len() > FANOUT {
        let mut next = Vec::with_capacity(level.len().div_ceil(FANOUT));
        for group in level.chunks(FANOUT) {
            let page = encode_chunk(group);
            let h = crate::hash_page(&page);
            if h != ZERO_HASH {
                chunks.push((h, page));
            }
            next.push(h);
        }
        level = next;
        depth += 1;
    }
    BuiltManifest { root: ManifestRoot { pages: hashes.len() as u64, depth, top: level }, chunks }
}

/// Expands one level of a manifest tree: given the entries of level `k` and the chunk pages
/// they name (a lookup that returns the page for a non-zero hash), returns the entries of
/// level `k - 1`, cut to `want` entries.
pub fn expand_level<E>(
    level: &[PageHash],
    want: u64,
    mut chunk: impl FnMut(&PageHash) -> Result<Vec<u8>, E>,
) -> Result<Vec<PageHash>, E> {
    let mut out = Vec::with_capacity(want as usize);
    for h in level {
        if h.is_zero() {
            out.extend(std::iter::repeat_n(ZERO_HASH, FANOUT));
        } else {
            out.extend(decode_chunk(&chunk(h)?));
        }
    }
    out.truncate(want as usize);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn h(i: u64) -> PageHash {
        if i.is_multiple_of(3) {
            return ZERO_HASH;
        }
        PageHash(*blake3::hash(&i.to_le_bytes()).as_bytes())
    }

    fn unfold(m: &BuiltManifest) -> Vec<PageHash> {
        let store: HashMap<PageHash, Vec<u8>> = m.chunks.iter().cloned().collect();
        let sizes = level_sizes(m.root.pages);
        let mut level = m.root.top.clone();
        for d in (0..m.root.depth as usize).rev() {
            level = expand_level::<()>(&level, sizes[d], |h| Ok(store[h].clone())).expect("chunk");
        }
        level
    }

    proptest! {
        #[test]
        fn manifest_tree_round_trips(n in 0u64..40_000) {
            let hashes: Vec<PageHash> = (0..n).map(h).collect();
            let m = build_manifest(&hashes);
            prop_assert!(m.root.validate().is_ok());
            prop_assert!(m.root.top.len() <= FANOUT);
            prop_assert_eq!(unfold(&m), hashes);
        }
    }

    #[test]
    fn zero_regions_make_no_chunks() {
        let hashes = vec![ZERO_HASH; FANOUT * 10];
        let m = build_manifest(&hashes);
        assert!(m.chunks.is_empty());
        assert_eq!(m.root.top, vec![ZERO_HASH; 10]);
        assert_eq!(unfold(&m), hashes);
    }

    #[test]
    fn absurd_sizes_are_refused_not_allocated() {
        let m = build_manifest(&[PageHash([1; 32])]);
        let vm = VmEntry {
            id: "a".into(),
            source: String::new(),
            host: NodeId([1; 32]),
            host_name: String::new(),
            blocks: vec![Block { name: "ram".into(), bytes: PAGE_SIZE as u64 }],
            manifest: m.root.clone(),
            stats: VmStats::default(),
            qemu: None,
        };
        let rec = CommitRecord {
            name: "s".into(),
            created_unix_ms: 0,
            replicas: 1,
            placement: vec![NodeId([1; 32])],
            initiator: NodeId([1; 32]),
            vms: vec![vm],
            elapsed_ms: 0,
            pause_skew_us: None,
        };
        assert!(rec.validate().is_ok());
        // 2^49 pages.
        let mut huge = rec.clone();
        huge.vms[0].manifest = ManifestRoot { pages: 1 << 49, depth: 5, top: vec![ZERO_HASH; 4] };
        huge.vms[0].blocks = vec![Block { name: "ram".into(), bytes: (1u64 << 49) * PAGE_SIZE as u64 }];
        assert!(huge.validate().is_err());
        // Block sizes that overflow when summed to look small.
        let mut wrap = rec.clone();
        wrap.vms[0].blocks = vec![Block { name: "a".into(), bytes: u64::MAX - 4095 }, Block { name: "b".into(), bytes: 8192 }];
        assert!(wrap.validate().is_err());
    }

    #[test]
    fn disk_blocks_follow_ram_and_round_trip() {
        let d = DiskBlock { size: 10_000, arg: 31, device: "virtio0".into() };
        assert_eq!(DiskBlock::parse(&d.name()), Some(d.clone()));
        assert_eq!(DiskBlock::parse("pc.ram"), None);
        assert_eq!(DiskBlock::parse("disk:1:2:"), None);
        for bad in ["disk:1:2:x/../../etc/cron.d/y", "disk:1:2:../y", "disk:1:2:-y", "disk:1:2:a b", "disk:1:2:a:b"] {
            assert_eq!(DiskBlock::parse(bad), None, "{bad}");
        }
        assert!(DiskBlock::parse("disk:1:2:drive-virtio-disk0.x_1").is_some());
        let mut rec = CommitRecord::minimal(NodeId([1; 32]), "s");
        let pages = 10_000u64.div_ceil(PAGE_SIZE as u64);
        rec.vms[0].blocks.push(Block { name: d.name(), bytes: pages * PAGE_SIZE as u64 });
        rec.vms[0].manifest = build_manifest(&vec![ZERO_HASH; 1 + pages as usize]).root;
        assert!(rec.validate().is_ok());
        assert_eq!(rec.vms[0].ram_pages(), 1);
        assert_eq!(rec.vms[0].disks(), vec![(d.clone(), 1, pages)]);
        // A disk first, or a size that does not match the block: refused.
        let mut first = rec.clone();
        first.vms[0].blocks.reverse();
        assert!(first.validate().is_err());
        let mut size = rec.clone();
        size.vms[0].blocks[1].name = DiskBlock { size: 99_999, ..d }.name();
        assert!(size.validate().is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("n", "nightly-2026.11_25").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_name("n", bad).is_err(), "{bad:?}");
        }
    }
}
