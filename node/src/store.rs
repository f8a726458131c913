//! The page store: one RocksDB per node.
//!
//! Column families:
//! - `pages`: page hash → 4096 bytes, in BlobDB blob files (half the write amplification of
//!   plain leveled storage for 4 KiB values, measured in `shared/research/crates-perf.md`);
//! - `present`: page hash → empty, written in the same batch as the page. Existence checks
//!   (`Have`) read only this small family and never touch the 4 KiB blobs;
//! - `catalog`: snapshot name, 0, record id → encoded [`SignedRecord`]. One name has one
//!   record, except when two members committed different records under it: both are kept
//!   (at most [`NAME_VERSIONS_MAX`]) and shown as a conflict for the operator to resolve;
//! - `meta`: node metadata (the member list, revocations, tombstones of deleted records
//!   under `tomb/NAME/0/ID`, the bytes garbage collection has freed).
//!
//! **Invariant:** a page is stored only under its own hash. [`Store::put_verified`] re-hashes
//! every page; [`Store::put_own`] is only for pages this node hashed itself.
//! Page writes skip RocksDB's write-ahead log: they sit in the memtable until [`Store::sync`]
//! flushes it to fsynced blob and table files. That writes each page once instead of twice
//! (measured: BlobDB without WAL, 1.05× write amplification against 2.05×). A crash loses only
//! pages not yet synced, and a snapshot commits only after every owner answered a sync, so no
//! committed snapshot can name a lost page; a page that `have` reported present but that was
//! not yet durable is flushed by that same sync. Commit records use the log with fsync.
//! A restart in between loses acknowledged pages, so each opening of the store draws a new
//! [`Store::incarnation`], and a sync asked under another incarnation is refused.
//!
//! **A full disk never leaves the store stuck.** RocksDB keeps a write that failed for lack of
//! space as a background error and refuses every later write until the database is reopened;
//! the store notes such an error and reopens the database in place before its next write
//! ([`Store::recover`]): the same as a restart, with a new incarnation.
//!
//! **Garbage collection** (`engine::gc`) removes pages with [`Store::delete_unwatched`] while a
//! watch is open ([`Store::watch_begin`]): every page `have` finds present or `put` stores
//! from then on is remembered, and is not deleted. A read lock held across each `have`
//! and a write lock held across each deletion batch make the two exclusive, so a page
//! reported present is never deleted under the snapshot that relies on it.

use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, Options, WriteBatch, DB};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vmcsnap_protocol::manifest::{SignedRecord, SignedTombstone, NAME_VERSIONS_MAX};
use vmcsnap_protocol::wire::{GcStats, PageSet, RepairStats, ScrubStats};
use vmcsnap_protocol::{hash_page, PageHash, PAGE_SIZE};

const CF_PAGES: &str = "pages";
const CF_PRESENT: &str = "present";
const CF_CATALOG: &str = "catalog";
const CF_META: &str = "meta";
const META_MEMBERS: &[u8] = b"members";
const META_RECLAIMED: &[u8] = b"gc/reclaimed";
const TOMB_PREFIX: &[u8] = b"tomb/";

fn tomb_key(name: &str, id: &PageHash) -> Vec<u8> {
    [TOMB_PREFIX, name.as_bytes(), &[0], &id.0].concat()
}

/// A metadata entry: its key and its value.
pub type MetaEntry = (Vec<u8>, Vec<u8>);

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the database.
    #[error("data directory {dir} is in use by another vmcsnap node")]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// RocksDB failed (disk full, IO error, corruption).
    #[error("page store: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// The database is being reopened after it ran out of space (or the reopen failed).
    #[error("page store: reopening after the disk ran full; try again")]
    Reopening,
    /// A page did not hash to the hash it came with.
    #[error("page hash mismatch: expected {expected}, got {actual}")]
    HashMismatch {
        /// Claimed hash.
        expected: PageHash,
        /// Real hash of the bytes.
        actual: PageHash,
    },
    /// A page of the wrong size.
    #[error("page of {0} bytes (pages are {PAGE_SIZE})")]
    BadPageSize(usize),
    /// A stored record did not decode.
    #[error("corrupt record in the store: {0}")]
    Corrupt(String),
    /// A different snapshot already has this name.
    #[error("a different snapshot named {0:?} already exists")]
    NameConflict(String),
    /// The store was reopened since the answers a sync was asked for: pages acknowledged then
    /// may be lost.
    #[error("this node restarted since it acknowledged the pages; they may be lost")]
    Restarted,
    /// New pages would leave less than the reserve free on the store's file system.
    #[error("disk nearly full: {} free, {} kept in reserve (--min-free); delete snapshots to free space", vmcsnap_protocol::units::human_bytes(*free), vmcsnap_protocol::units::human_bytes(*reserve))]
    NearlyFull {
        /// Bytes free.
        free: u64,
        /// Bytes kept free.
        reserve: u64,
    },
    /// Too many different records under one name.
    #[error("snapshot name {0:?} already has {NAME_VERSIONS_MAX} conflicting records; resolve them first")]
    TooManyVersions(String),
}

/// One page as [`Store::read`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Read {
    /// The page, checked against its hash.
    Page(Vec<u8>),
    /// Not stored here.
    Missing,
    /// Stored, but the bytes do not hash to the key: a damaged copy.
    Corrupt,
}

/// What [`Store::catalog_put`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// A record not held before (possibly a second one under a name: a conflict).
    New,
    /// Held already.
    Already,
    /// Held unsigned (from before admission); now signed.
    Signed,
    /// Deleted: a tombstone is kept for it, so it is not taken back.
    Deleted,
}

fn catalog_key(name: &str, id: &PageHash) -> Vec<u8> {
    [name.as_bytes(), &[0], &id.0].concat()
}

/// Hashes a `u64` that is already uniform (a page hash prefix) by passing it through.
#[derive(Default, Clone, Copy)]
struct PrefixHasher(u64);

impl std::hash::Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type PrefixSet = std::collections::HashSet<u64, std::hash::BuildHasherDefault<PrefixHasher>>;

/// The node's RocksDB.
pub struct Store {
    /// The database (`None` only while a reopen failed: every call then tries again).
    db: std::sync::RwLock<Option<Arc<DB>>>,
    /// Its directory (`DATA_DIR/db`).
    path: PathBuf,
    /// A write failed for lack of space: RocksDB stays read-only until the database is
    /// reopened, which the next write does ([`Store::recover`]).
    no_space: std::sync::atomic::AtomicBool,
    pages: AtomicU64,
    /// The first 8 bytes of every stored page's hash, in memory (about 16 bytes per page).
    /// A miss proves a page is absent without touching RocksDB, which is the common case
    /// while a snapshot sends new pages; a hit is confirmed in the `present` family.
    index: std::sync::RwLock<PrefixSet>,
    /// Serialises page writes so that the exact page count stays exact under concurrent puts.
    write_lock: Mutex<()>,
    /// Drawn at each opening: answers carry it, and a sync under another one is refused.
    incarnation: AtomicU64,
    /// Pages found present or stored since garbage collection's watch began (`None`: no watch).
    watched: Mutex<Option<std::collections::HashSet<PageHash>>>,
    /// Held shared across each `have`, exclusively across each deletion batch.
    gc_lock: std::sync::RwLock<()>,
    /// What garbage collection last published (its state, the bytes it found unreferenced,
    /// when its last whole cycle began, when a deletion last arrived).
    gc_published: Mutex<GcStats>,
    /// What the scrubber last published.
    scrub_published: Mutex<ScrubStats>,
    /// What repair last published.
    repair_published: Mutex<RepairStats>,
    /// Free bytes the file system must keep: new pages that would eat into them are refused.
    reserve: AtomicU64,
}

/// Where a name's claim is kept (meta family).
fn claim_key(name: &str) -> Vec<u8> {
    [b"claim/".as_slice(), name.as_bytes()].concat()
}

/// How long a reopen waits for calls that hold the old database.
const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // The four families are created at open; a missing one is a programming error.
    #[allow(clippy::expect_used)]
    db.cf_handle(name).expect("column family created at open")
}

fn open_db(path: &Path) -> Result<DB, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.increase_parallelism(2);
    // Two flushes at once (a sync's `pages` and `present`), one compaction: what
    // `max_background_jobs` would give only from 8 jobs on (a quarter of them flush).
    #[allow(deprecated)]
    opts.set_max_background_flushes(2);
    #[allow(deprecated)]
    opts.set_max_background_compactions(1);
    opts.set_max_total_wal_size(256 << 20);
    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_PAGES, cf_options(true)),
        ColumnFamilyDescriptor::new(CF_PRESENT, cf_options(false)),
        ColumnFamilyDescriptor::new(CF_CATALOG, cf_options(false)),
        ColumnFamilyDescriptor::new(CF_META, cf_options(false)),
    ];
    DB::open_cf_descriptors(&opts, path, cfs)
}

/// The hash prefixes of every stored page.
fn load_index(db: &DB) -> Result<PrefixSet, StoreError> {
    let mut index = PrefixSet::default();
    for kv in db.iterator_cf(cf(db, CF_PRESENT), rocksdb::IteratorMode::Start) {
        let (k, _) = kv?;
        if k.len() != 32 {
            return Err(StoreError::Corrupt(format!("page key of {} bytes", k.len())));
        }
        index.insert(prefix(&k));
    }
    Ok(index)
}

fn prefix(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[..8]);
    u64::from_be_bytes(b)
}

fn cf_options(blob: bool) -> Options {
    let mut o = Options::default();
    let mut t = BlockBasedOptions::default();
    t.set_bloom_filter(10.0, false);
    o.set_block_based_table_factory(&t);
    if blob {
        o.set_enable_blob_files(true);
        o.set_min_blob_size(1024);
        o.set_blob_file_size(256 << 20);
        // Live blobs move only in garbage collection's own compaction ([`Store::compact_pages`]):
        // a blob file whose pages are all deleted goes without it, and moving the oldest
        // quarter's live pages in every compaction rewrote a quarter of the store each time
        // (seen mid-snapshot: 17 MiB moved on a node that had flushed 80 MiB).
        o.set_enable_blob_gc(false);
        // Small memtables: pages reach their blob files while a snapshot is still sending
        // (background flushes), so the snapshot's closing `Sync` mostly writes the last one;
        // up to four in memory at once, so that writes do not wait for a flush.
        o.set_write_buffer_size(16 << 20);
        o.set_max_write_buffer_number(4);
    }
    o
}

impl Store {
    /// Opens (or creates) the store under `dir/db`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("db");
        let db = open_db(&path).map_err(|e| {
            if e.to_string().contains("lock") {
                StoreError::Locked { dir: dir.to_path_buf() }
            } else {
                StoreError::Rocks(e)
            }
        })?;
        let index = load_index(&db)?;
        let store = Self {
            db: std::sync::RwLock::new(Some(Arc::new(db))),
            path,
            no_space: Default::default(),
            pages: AtomicU64::new(index.len() as u64),
            index: std::sync::RwLock::new(index),
            write_lock: Mutex::new(()),
            incarnation: AtomicU64::new(rand::random()),
            watched: Mutex::new(None),
            gc_lock: Default::default(),
            gc_published: Mutex::new(GcStats { state: "idle".into(), ..Default::default() }),
            scrub_published: Mutex::new(ScrubStats { state: "idle".into(), ..Default::default() }),
            reserve: AtomicU64::new(0),
            repair_published: Mutex::new(RepairStats { state: "idle".into(), ..Default::default() }),
        };
        store.rekey_catalog()?;
        Ok(store)
    }

    /// The database, for one call.
    fn db(&self) -> Result<Arc<DB>, StoreError> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(StoreError::Reopening)
    }

    /// Notes a failed write: one for lack of space leaves RocksDB read-only until reopened.
    fn note(&self, e: rocksdb::Error) -> StoreError {
        if e.to_string().contains("No space left") {
            self.no_space.store(true, Ordering::Relaxed);
        }
        StoreError::Rocks(e)
    }

    /// After a write failed for lack of space, reopens the database in place before the next
    /// write, as a restart would (RocksDB keeps such an error and refuses every later write
    /// until reopened). Pages not yet synced are lost with the memtable, so the store draws a
    /// new incarnation: every `Sync` asked under the old one is refused, and no snapshot can
    /// commit a page that went. Waits for no more than [`REOPEN_WAIT`] for calls in flight.
    fn recover(&self) -> Result<(), StoreError> {
        if !self.no_space.load(Ordering::Relaxed) {
            return Ok(());
        }
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let _gc = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if !self.no_space.load(Ordering::Relaxed) {
            return Ok(()); // another call recovered meanwhile
        }
        if let Some(old) = slot.take() {
            let t0 = std::time::Instant::now();
            while Arc::strong_count(&old) > 1 {
                if t0.elapsed() > REOPEN_WAIT {
                    *slot = Some(old);
                    return Err(StoreError::Reopening);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            drop(old);
        }
        let db = open_db(&self.path)?;
        let index = load_index(&db)?;
        self.pages.store(index.len() as u64, Ordering::Relaxed);
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = index;
        self.incarnation.store(rand::random(), Ordering::Relaxed);
        *slot = Some(Arc::new(db));
        self.no_space.store(false, Ordering::Relaxed);
        tracing::warn!(target: "vmcsnap::store", "store reopened after running out of space; pages not yet synced are gone and every snapshot that relied on them fails");
        Ok(())
    }

    /// Moves catalog entries of the layout before conflicts were kept (keyed by name alone)
    /// to `name, 0, id`.
    fn rekey_catalog(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let mut batch = WriteBatch::default();
        let mut moved = 0;
        for kv in db.iterator_cf(cf(&db, CF_CATALOG), rocksdb::IteratorMode::Start) {
            let (k, v) = kv?;
            if k.contains(&0) {
                continue;
            }
            let rec = SignedRecord::decode(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let id = rec.id().map_err(|e| StoreError::Corrupt(e.to_string()))?;
            batch.delete_cf(cf(&db, CF_CATALOG), &k);
            batch.put_cf(cf(&db, CF_CATALOG), catalog_key(&rec.record.name, &id), &v);
            moved += 1;
        }
        if moved > 0 {
            let mut wo = rocksdb::WriteOptions::default();
            wo.set_sync(true);
            db.write_opt(batch, &wo).map_err(|e| self.note(e))?;
            tracing::info!(target: "vmcsnap::store", moved, "catalog moved to the layout that keeps conflicting records");
        }
        Ok(())
    }


    /// Distinct pages stored.
    pub fn page_count(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    /// For each hash, whether this store holds the page.
    pub fn have(&self, hashes: &[PageHash]) -> Result<Vec<bool>, StoreError> {
        Ok(self.have_at(hashes)?.0)
    }

    /// [`Store::have`], with the incarnation the answers belong to (read while the database
    /// they came from is held: a reopen, which draws the next incarnation, waits for it).
    pub fn have_at(&self, hashes: &[PageHash]) -> Result<(Vec<bool>, u64), StoreError> {
        let _gc = self.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        let _pin = self.db()?;
        let out = self.have_unwatched(hashes)?;
        self.watch(hashes.iter().zip(&out).filter(|(_, &h)| h).map(|(h, _)| *h));
        Ok((out, self.incarnation()))
    }

    /// Remembers pages for an open garbage-collection watch.
    fn watch(&self, hashes: impl Iterator<Item = PageHash>) {
        let mut w = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = w.as_mut() {
            set.extend(hashes);
        }
    }

    fn have_unwatched(&self, hashes: &[PageHash]) -> Result<Vec<bool>, StoreError> {
        let db = self.db()?;
        let cf = cf(&db, CF_PRESENT);
        let mut out = vec![false; hashes.len()];
        let maybe: Vec<usize> = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            (0..hashes.len()).filter(|&i| index.contains(&hashes[i].prefix_u64())).collect()
        };
        if !maybe.is_empty() {
            let got = db.batched_multi_get_cf(cf, maybe.iter().map(|&i| hashes[i].0), false);
            for (i, r) in maybe.into_iter().zip(got) {
                out[i] = r?.is_some();
            }
        }
        Ok(out)
    }

    /// Stores pages that came from a peer, after re-hashing each one. Returns
    /// `(stored, already_present)`. Nothing is written if any page fails its check.
    pub fn put_verified(&self, pages: &[(PageHash, &[u8])]) -> Result<(u32, u32), StoreError> {
        self.put_verified_at(pages).map(|(s, a, _)| (s, a))
    }

    /// [`Store::put_verified`], with the incarnation the pages were stored under.
    pub fn put_verified_at(&self, pages: &[(PageHash, &[u8])]) -> Result<(u32, u32, u64), StoreError> {
        for (h, data) in pages {
            if data.len() != PAGE_SIZE {
                return Err(StoreError::BadPageSize(data.len()));
            }
            let actual = hash_page(data);
            if actual != *h || h.is_zero() {
                return Err(StoreError::HashMismatch { expected: *h, actual });
            }
        }
        self.put_own_at(pages)
    }

    /// Stores pages this node hashed itself. Returns `(stored, already_present)`.
    pub fn put_own(&self, pages: &[(PageHash, &[u8])]) -> Result<(u32, u32), StoreError> {
        self.put_own_at(pages).map(|(s, a, _)| (s, a))
    }

    /// [`Store::put_own`], with the incarnation the pages were stored under (read while the
    /// database they went to is held).
    pub fn put_own_at(&self, pages: &[(PageHash, &[u8])]) -> Result<(u32, u32, u64), StoreError> {
        self.recover()?;
        let hashes: Vec<PageHash> = pages.iter().map(|(h, _)| *h).collect();
        #[allow(clippy::unwrap_used)] // a poisoned lock means a panic already happened
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let db = self.db()?;
        let have = self.have_unwatched(&hashes)?;
        self.watch(hashes.iter().copied());
        let mut batch = WriteBatch::default();
        let mut stored = 0u32;
        let mut seen = std::collections::HashSet::new();
        for ((h, data), had) in pages.iter().zip(have) {
            debug_assert_eq!(data.len(), PAGE_SIZE);
            if had || !seen.insert(*h) {
                continue;
            }
            batch.put_cf(cf(&db, CF_PAGES), h.0, data);
            batch.put_cf(cf(&db, CF_PRESENT), h.0, []);
            stored += 1;
        }
        if stored > 0 {
            // Page data, its index entry and the table and blob overhead: about 4.2 KiB a page.
            let need = u64::from(stored) * (PAGE_SIZE as u64 + 128);
            let (free, reserve) = (self.free_bytes(), self.reserve.load(Ordering::Relaxed));
            if free < need.saturating_add(reserve) {
                return Err(StoreError::NearlyFull { free, reserve });
            }
            // No write-ahead log for pages: they become durable at the next `sync`, which
            // flushes the memtables (half the bytes written per page; see the module doc).
            let mut wo = rocksdb::WriteOptions::default();
            wo.disable_wal(true);
            db.write_opt(batch, &wo).map_err(|e| self.note(e))?;
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            index.extend(seen.iter().map(|h| h.prefix_u64()));
            self.pages.fetch_add(stored as u64, Ordering::Relaxed);
        }
        Ok((stored, pages.len() as u32 - stored, self.incarnation()))
    }

    /// Reads pages; `None` where the store lacks one or holds a corrupt copy. Each page read
    /// is checked against its hash, so a corrupted disk is reported (logged, counted, and left
    /// for the scrubber to repair), never returned. (What a `Get` serves a peer is
    /// [`Store::get_for_peer`]'s, which the peer checks.)
    pub fn get(&self, hashes: &[PageHash]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        Ok(self.get_shared(hashes)?.into_iter().map(|p| p.map(|p| p.to_vec())).collect())
    }

    /// [`Store::get`] into one buffer: each page held (and hashing right) is a slice of it, not
    /// an allocation of its own.
    pub fn get_shared(&self, hashes: &[PageHash]) -> Result<Vec<Option<bytes::Bytes>>, StoreError> {
        let mut data = Vec::new();
        let mut at = vec![None; hashes.len()];
        self.read_each(hashes, |i, p| {
            if data.capacity() == 0 {
                // Room for every page from here on (`i` ascends), reserved once, not touched:
                // memory a page does not fill costs nothing.
                data.reserve_exact((hashes.len() - i) * PAGE_SIZE);
            }
            if p.len() == PAGE_SIZE && hash_page(p) == hashes[i] {
                at[i] = Some(data.len());
                data.extend_from_slice(p);
            } else {
                tracing::error!(target: "vmcsnap::store", page = %hashes[i], "a stored page does not match its hash; not served (the scrubber repairs it from a replica)");
            }
        })?;
        let data = bytes::Bytes::from(data);
        Ok(at.into_iter().map(|a| a.map(|a| data.slice(a..a + PAGE_SIZE))).collect())
    }

    /// Pages for a peer that checks each against its hash (a `Get`), read without hashing
    /// them here: a damaged copy is caught there (which then asks the page's next owner)
    /// and by this node's scrubber, so hashing it here too would only double the work
    /// (BLAKE3 was a tenth of an owner's CPU while it served a restore). A copy of the wrong
    /// length is not served.
    /// The pages go into one buffer, not one allocation each.
    pub fn get_for_peer(&self, hashes: &[PageHash]) -> Result<PageSet, StoreError> {
        let mut out = PageSet::with_capacity(hashes.len());
        // `read_each` goes in ascending order: the pages not held in between are pushed as such.
        self.read_each(hashes, |i, p| {
            while out.len() < i {
                out.push(None);
            }
            out.push(Some(p));
        })?;
        while out.len() < hashes.len() {
            out.push(None);
        }
        Ok(out)
    }

    /// Reads pages and tells a missing page from a corrupt one.
    pub fn read(&self, hashes: &[PageHash]) -> Result<Vec<Read>, StoreError> {
        let mut out: Vec<Read> = hashes.iter().map(|_| Read::Missing).collect();
        self.read_each(hashes, |i, p| {
            out[i] = if p.len() == PAGE_SIZE && hash_page(p) == hashes[i] { Read::Page(p.to_vec()) } else { Read::Corrupt };
        })?;
        Ok(out)
    }

    /// Calls `found(i, bytes)` for each of `hashes` this store holds, `i` ascending. Hashes whose prefix the
    /// index lacks are not looked up (during a restore, most of what one node asks for is
    /// held by others).
    fn read_each(&self, hashes: &[PageHash], mut found: impl FnMut(usize, &[u8])) -> Result<(), StoreError> {
        let maybe: Vec<usize> = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            (0..hashes.len()).filter(|&i| index.contains(&hashes[i].prefix_u64())).collect()
        };
        if maybe.is_empty() {
            return Ok(());
        }
        let db = self.db()?;
        // RocksDB's own block and blob checksums are redundant here: every page is checked
        // against its BLAKE3 hash (by `read`, or by the peer a `Get` serves), which catches
        // everything a CRC would (10% of a restore's CPU in a profile).
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_verify_checksums(false);
        let got = db.batched_multi_get_cf_opt(cf(&db, CF_PAGES), maybe.iter().map(|&i| hashes[i].0), false, &ro);
        for (i, r) in maybe.into_iter().zip(got) {
            if let Some(p) = r? {
                found(i, &p);
            }
        }
        Ok(())
    }

    /// Replaces a stored page's (corrupt) copy with `data`, which must hash to `hash`; synced.
    pub fn repair(&self, hash: PageHash, data: &[u8]) -> Result<(), StoreError> {
        self.recover()?;
        if data.len() != PAGE_SIZE {
            return Err(StoreError::BadPageSize(data.len()));
        }
        let actual = hash_page(data);
        if actual != hash {
            return Err(StoreError::HashMismatch { expected: hash, actual });
        }
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let db = self.db()?;
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        db.put_cf_opt(cf(&db, CF_PAGES), hash.0, data, &wo).map_err(|e| self.note(e))?;
        Ok(())
    }

    /// Drops a corrupt copy that no replica could repair, so that `have` stops claiming it
    /// (the next snapshot that needs the page stores it again). Returns whether it was held.
    pub fn drop_corrupt(&self, hash: PageHash) -> Result<bool, StoreError> {
        self.recover()?;
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let _gc = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let db = self.db()?;
        if !self.have_unwatched(&[hash])?[0] {
            return Ok(false);
        }
        let mut batch = WriteBatch::default();
        batch.delete_cf(cf(&db, CF_PAGES), hash.0);
        batch.delete_cf(cf(&db, CF_PRESENT), hash.0);
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(batch, &wo).map_err(|e| self.note(e))?;
        self.index.write().unwrap_or_else(|p| p.into_inner()).remove(&hash.prefix_u64());
        self.pages.fetch_sub(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Makes every page written before this call durable: flushes the page memtables to
    /// (fsynced) blob and table files.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.recover()?;
        let db = self.db()?;
        self.flush(&db)
    }

    fn flush(&self, db: &DB) -> Result<(), StoreError> {
        let t0 = std::time::Instant::now();
        // Both families' flushes are asked for first and waited for after (a second request
        // with `wait` waits for the memtables still being flushed): the small `present` one
        // runs beside the pages' instead of after them.
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(false);
        for name in [CF_PAGES, CF_PRESENT] {
            match db.flush_cf_opt(cf(db, name), &fo) {
                Ok(()) => {}
                // RocksDB refuses a request that does not wait while writes are stopped (a
                // write stall: memtables or level-0 files piled up behind flushes and
                // compactions under a burst of `Put`s); the waiting request below waits the
                // stall out instead. Before 2026-12-07 a `Sync` failed here, and its snapshot.
                Err(e) if e.kind() == rocksdb::ErrorKind::TryAgain => {
                    tracing::debug!(target: "vmcsnap::store", family = name, "writes stopped: the flush waits for them");
                }
                Err(e) => return Err(self.note(e)),
            }
        }
        fo.set_wait(true);
        for name in [CF_PAGES, CF_PRESENT] {
            db.flush_cf_opt(cf(db, name), &fo).map_err(|e| self.note(e))?;
        }
        tracing::debug!(target: "vmcsnap::store", ms = t0.elapsed().as_millis() as u64, "page memtables flushed");
        Ok(())
    }

    /// Keeps a commit record (and syncs). Keeping the same record again is a no-op (or signs
    /// an unsigned copy); a different record under a name already held is kept beside it, a
    /// conflict the operator sees and resolves.
    pub fn catalog_put(&self, rec: &SignedRecord) -> Result<Kept, StoreError> {
        self.put_record(rec, false)
    }

    /// Keeps a commit record under a name this node does not hold yet: the commit point of a
    /// snapshot taken here. A name already held is [`StoreError::NameConflict`].
    pub fn catalog_put_first(&self, rec: &SignedRecord) -> Result<Kept, StoreError> {
        self.put_record(rec, true)
    }

    fn put_record(&self, rec: &SignedRecord, first: bool) -> Result<Kept, StoreError> {
        self.recover()?;
        let corrupt = |e: vmcsnap_protocol::codec::CodecError| StoreError::Corrupt(e.to_string());
        let bytes = rec.encode().map_err(corrupt)?;
        let id = rec.id().map_err(corrupt)?;
        let name = &rec.record.name;
        #[allow(clippy::unwrap_used)]
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let db = self.db()?;
        if db.get_cf(cf(&db, CF_META), tomb_key(name, &id))?.is_some() {
            return Ok(Kept::Deleted);
        }
        let held = self.catalog_get(name)?;
        let mut kept = Kept::New;
        if let Some(old) = held.iter().find(|o| o.id().ok() == Some(id)) {
            if old.is_signed() || !rec.is_signed() {
                return Ok(Kept::Already);
            }
            kept = Kept::Signed;
        } else if first && !held.is_empty() {
            return Err(StoreError::NameConflict(name.clone()));
        } else if held.len() >= NAME_VERSIONS_MAX {
            return Err(StoreError::TooManyVersions(name.clone()));
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&db, CF_CATALOG), catalog_key(name, &id), bytes);
        // The record itself holds the name from now on.
        batch.delete_cf(cf(&db, CF_META), claim_key(name));
        db.write_opt(batch, &wo).map_err(|e| self.note(e))?;
        Ok(kept)
    }

    /// Grants snapshot name `name` to commit record `id` until `now_ms + ttl_ms`, durably, and
    /// returns `None`; or refuses, returning the holder: a record kept here under the name with
    /// another id, or another record's unexpired claim. Granting `id` again renews it. With
    /// `release`, drops `id`'s claim (if it holds one) and returns `None`.
    pub fn claim_name(&self, name: &str, id: PageHash, now_ms: u64, ttl_ms: u64, release: bool) -> Result<Option<PageHash>, StoreError> {
        self.recover()?;
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let db = self.db()?;
        let key = claim_key(name);
        let current = db.get_cf(cf(&db, CF_META), &key)?.and_then(|v| {
            let id: [u8; 32] = v.get(..32)?.try_into().ok()?;
            let until = u64::from_le_bytes(v.get(32..40)?.try_into().ok()?);
            Some((PageHash(id), until))
        });
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        if release {
            if current.is_some_and(|(h, _)| h == id) {
                db.delete_cf_opt(cf(&db, CF_META), &key, &wo).map_err(|e| self.note(e))?;
            }
            return Ok(None);
        }
        if let Some(other) = self.catalog_get(name)?.iter().filter_map(|r| r.id().ok()).find(|r| *r != id) {
            return Ok(Some(other));
        }
        if let Some((holder, _)) = current.filter(|&(h, until)| h != id && until > now_ms) {
            return Ok(Some(holder));
        }
        let value = [&id.0[..], &now_ms.saturating_add(ttl_ms).to_le_bytes()].concat();
        db.put_cf_opt(cf(&db, CF_META), &key, value, &wo).map_err(|e| self.note(e))?;
        Ok(None)
    }

    /// Every record kept under `name` (one, or several in conflict), in record-id order.
    pub fn catalog_get(&self, name: &str) -> Result<Vec<SignedRecord>, StoreError> {
        let db = self.db()?;
        let prefix = [name.as_bytes(), &[0]].concat();
        let mut out = Vec::new();
        let mode = rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward);
        for kv in db.iterator_cf(cf(&db, CF_CATALOG), mode) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(SignedRecord::decode(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// Every record kept here, by name then record id.
    pub fn catalog_all(&self) -> Result<Vec<SignedRecord>, StoreError> {
        let db = self.db()?;
        let mut out = Vec::new();
        for kv in db.iterator_cf(cf(&db, CF_CATALOG), rocksdb::IteratorMode::Start) {
            let (_, v) = kv?;
            out.push(SignedRecord::decode(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// Keeps `bytes` free on the store's file system: pages that would eat into them are
    /// refused ([`StoreError::NearlyFull`]) before RocksDB could fail for lack of space.
    pub fn set_reserve(&self, bytes: u64) {
        self.reserve.store(bytes, Ordering::Relaxed);
    }

    /// Bytes free for this store on its file system (`u64::MAX` if the file system cannot
    /// tell: an unknown is never a reason to refuse pages; RocksDB's own errors remain).
    pub fn free_bytes(&self) -> u64 {
        fs_free_bytes(&self.path)
    }

    /// Whether new pages are refused for lack of space now.
    pub fn is_full(&self) -> bool {
        self.free_bytes() < self.reserve.load(Ordering::Relaxed)
    }

    /// This opening's incarnation (random; a restart draws another).
    pub fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Relaxed)
    }

    /// Makes every page acknowledged under `incarnation` durable; refused (`Restarted`) if the
    /// store was reopened since, because pages acknowledged before may be lost.
    pub fn sync_incarnation(&self, incarnation: u64) -> Result<(), StoreError> {
        self.recover()?;
        // Holding the database: a reopen (which draws the next incarnation) waits for it.
        let db = self.db()?;
        if incarnation != self.incarnation() {
            return Err(StoreError::Restarted);
        }
        self.flush(&db)
    }

    /// Deletes a commit record for good: keeps `tombstone` (synced) and drops the record if
    /// held. Returns whether the tombstone is new here.
    pub fn tombstone_put(&self, tombstone: &SignedTombstone) -> Result<bool, StoreError> {
        self.recover()?;
        let t = &tombstone.tombstone;
        let bytes = tombstone.encode().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let db = self.db()?;
        let key = tomb_key(&t.name, &t.record);
        if db.get_cf(cf(&db, CF_META), &key)?.is_some() {
            return Ok(false);
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&db, CF_META), key, bytes);
        batch.delete_cf(cf(&db, CF_CATALOG), catalog_key(&t.name, &t.record));
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(batch, &wo).map_err(|e| self.note(e))?;
        Ok(true)
    }

    /// Every tombstone kept here, newest first.
    pub fn tombstones(&self) -> Result<Vec<SignedTombstone>, StoreError> {
        let mut out = Vec::new();
        for (_, v) in self.meta_prefix(TOMB_PREFIX)? {
            out.push(SignedTombstone::decode(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        out.sort_by_key(|t| std::cmp::Reverse(t.tombstone.deleted_unix_ms));
        Ok(out)
    }

    /// Opens garbage collection's watch: from now on every page `have` finds present or `put`
    /// stores is remembered until [`Store::watch_end`], and [`Store::delete_unwatched`] spares it.
    pub fn watch_begin(&self) {
        *self.watched.lock().unwrap_or_else(|p| p.into_inner()) = Some(Default::default());
    }

    /// Closes the watch.
    pub fn watch_end(&self) {
        *self.watched.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Deletes those of `hashes` that no `have` or `put` touched since the watch began (and
    /// none at all without a watch). Returns how many pages were deleted.
    pub fn delete_unwatched(&self, hashes: &[PageHash]) -> Result<u64, StoreError> {
        self.recover()?;
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let _gc = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let db = self.db()?;
        let doomed: Vec<PageHash> = {
            let w = self.watched.lock().unwrap_or_else(|p| p.into_inner());
            let Some(watched) = w.as_ref() else { return Ok(0) };
            hashes.iter().filter(|h| !watched.contains(h)).copied().collect()
        };
        let present = self.have_unwatched(&doomed)?;
        let doomed: Vec<PageHash> = doomed.into_iter().zip(present).filter(|(_, p)| *p).map(|(h, _)| h).collect();
        if doomed.is_empty() {
            return Ok(0);
        }
        let mut batch = WriteBatch::default();
        for h in &doomed {
            batch.delete_cf(cf(&db, CF_PAGES), h.0);
            batch.delete_cf(cf(&db, CF_PRESENT), h.0);
        }
        let n = doomed.len() as u64;
        let reclaimed = self.reclaimed_bytes()? + n * PAGE_SIZE as u64;
        batch.put_cf(cf(&db, CF_META), META_RECLAIMED, reclaimed.to_le_bytes());
        db.write(batch).map_err(|e| self.note(e))?;
        // A prefix shared with a page that stays only makes `have` look in RocksDB (2^-64).
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        for h in &doomed {
            index.remove(&h.prefix_u64());
        }
        self.pages.fetch_sub(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Up to `limit` stored pages' hashes in hash order, starting after `after` (from the
    /// first without it): a walk over the store that never holds more than one batch.
    pub fn stored_hashes(&self, after: Option<PageHash>, limit: usize) -> Result<Vec<PageHash>, StoreError> {
        let db = self.db()?;
        let mut out = Vec::with_capacity(limit.min(self.page_count() as usize));
        let mode = match &after {
            Some(h) => rocksdb::IteratorMode::From(&h.0, rocksdb::Direction::Forward),
            None => rocksdb::IteratorMode::Start,
        };
        for kv in db.iterator_cf(cf(&db, CF_PRESENT), mode) {
            let (k, _) = kv?;
            let mut h = [0u8; 32];
            if k.len() != 32 {
                return Err(StoreError::Corrupt(format!("page key of {} bytes", k.len())));
            }
            h.copy_from_slice(&k);
            if Some(PageHash(h)) == after {
                continue;
            }
            out.push(PageHash(h));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Whether the store may hold `hash` (an in-memory check; false means it does not).
    pub fn may_hold(&self, hash: &PageHash) -> bool {
        self.index.read().unwrap_or_else(|p| p.into_inner()).contains(&hash.prefix_u64())
    }

    /// Rewrites the page files so that deleted pages' space goes back to the file system
    /// (every blob file is eligible for blob garbage collection during this compaction, and
    /// only then).
    pub fn compact_pages(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let pages = cf(&db, CF_PAGES);
        db.set_options_cf(pages, &[("enable_blob_garbage_collection", "true"), ("blob_garbage_collection_age_cutoff", "1.0")])?;
        let mut o = rocksdb::CompactOptions::default();
        o.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        db.compact_range_cf_opt(pages, None::<&[u8]>, None::<&[u8]>, &o);
        db.compact_range_cf_opt(cf(&db, CF_PRESENT), None::<&[u8]>, None::<&[u8]>, &o);
        db.set_options_cf(pages, &[("enable_blob_garbage_collection", "false")])?;
        Ok(())
    }

    /// Publishes garbage collection's state and the bytes it found unreferenced (for `Stats`).
    pub fn gc_publish(&self, state: &str, reclaimable_bytes: Option<u64>) {
        let mut g = self.gc_published.lock().unwrap_or_else(|p| p.into_inner());
        g.state = state.to_string();
        if let Some(b) = reclaimable_bytes {
            g.reclaimable_bytes = b;
        }
    }

    /// Publishes that a GC cycle begun at `began_unix_ms` ran to its end (for `Stats`).
    pub fn gc_cycle_done(&self, began_unix_ms: u64) {
        self.gc_published.lock().unwrap_or_else(|p| p.into_inner()).done_began_unix_ms = began_unix_ms;
    }

    /// Publishes that a deletion arrived at `unix_ms` (for `Stats`).
    pub fn gc_changed(&self, unix_ms: u64) {
        self.gc_published.lock().unwrap_or_else(|p| p.into_inner()).changed_unix_ms = unix_ms;
    }

    /// Publishes the scrubber's figures (for `Stats`).
    pub fn scrub_publish(&self, f: impl FnOnce(&mut ScrubStats)) {
        f(&mut self.scrub_published.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Publishes repair's figures (for `Stats`).
    pub fn repair_publish(&self, f: impl FnOnce(&mut RepairStats)) {
        f(&mut self.repair_published.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Repair's figures.
    pub fn repair_stats(&self) -> RepairStats {
        self.repair_published.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The scrubber's figures.
    pub fn scrub_stats(&self) -> ScrubStats {
        self.scrub_published.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Garbage collection's figures.
    pub fn gc_stats(&self) -> Result<GcStats, StoreError> {
        let published = self.gc_published.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(GcStats { reclaimed_bytes: self.reclaimed_bytes()?, disk_bytes: self.disk_bytes(), ..published })
    }

    /// Bytes freed by garbage collection since the store was created.
    pub fn reclaimed_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.meta_get(META_RECLAIMED)?.and_then(|v| v.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0))
    }

    /// Bytes of the store's files on disk.
    pub fn disk_bytes(&self) -> u64 {
        fn walk(dir: &Path) -> u64 {
            let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self.path)
    }

    /// Saves an opaque metadata value.
    pub fn meta_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.recover()?;
        let db = self.db()?;
        db.put_cf(cf(&db, CF_META), key, value).map_err(|e| self.note(e))?;
        Ok(())
    }

    /// Reads an opaque metadata value.
    pub fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db()?;
        Ok(db.get_cf(cf(&db, CF_META), key)?)
    }

    /// Deletes a metadata value.
    pub fn meta_delete(&self, key: &[u8]) -> Result<(), StoreError> {
        self.recover()?;
        let db = self.db()?;
        db.delete_cf(cf(&db, CF_META), key).map_err(|e| self.note(e))?;
        Ok(())
    }

    /// Every metadata entry whose key starts with `prefix`, in key order.
    pub fn meta_prefix(&self, prefix: &[u8]) -> Result<Vec<MetaEntry>, StoreError> {
        let db = self.db()?;
        let mut out = Vec::new();
        let mode = rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward);
        for kv in db.iterator_cf(cf(&db, CF_META), mode) {
            let (k, v) = kv?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Saves the member list (encoded by the caller).
    pub fn save_members(&self, bytes: &[u8]) -> Result<(), StoreError> {
        self.meta_put(META_MEMBERS, bytes)
    }

    /// Loads the member list saved by [`Store::save_members`].
    pub fn load_members(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.meta_get(META_MEMBERS)
    }
}

/// Bytes free to unprivileged users on the file system of `path` (`u64::MAX` if it cannot
/// tell).
#[allow(unsafe_code)]
pub fn fs_free_bytes(path: &Path) -> u64 {
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return u64::MAX };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: statvfs(3) writes the struct for a NUL-terminated path; read only on success.
    unsafe {
        if libc::statvfs(path.as_ptr(), st.as_mut_ptr()) != 0 {
            return u64::MAX;
        }
        let st = st.assume_init();
        st.f_bavail.saturating_mul(st.f_frsize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        p[0] = b;
        p[PAGE_SIZE - 1] = b.wrapping_mul(7);
        p
    }

    /// The read path's cost per page, by step: `cargo test --release -p vmcsnap-node --lib
    /// store::tests::read_speed -- --ignored --nocapture`. A benchmark, not a timed test.
    #[test]
    #[ignore]
    fn read_speed() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path()).expect("open");
        let n = 32768usize;
        let mut hashes = Vec::with_capacity(n);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..n / 1024 {
            let pages: Vec<Vec<u8>> = (0..1024)
                .map(|_| {
                    let mut p = vec![0u8; PAGE_SIZE];
                    for w in p.chunks_mut(8) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        w.copy_from_slice(&x.to_le_bytes());
                    }
                    p
                })
                .collect();
            let refs: Vec<(PageHash, &[u8])> = pages.iter().map(|p| (hash_page(p), p.as_slice())).collect();
            hashes.extend(refs.iter().map(|(h, _)| *h));
            s.put_own(&refs).expect("put");
        }
        s.sync().expect("sync");
        let db = s.db().expect("db");
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_verify_checksums(false);
        for round in 0..3 {
            let t = std::time::Instant::now();
            let mut bytes = 0usize;
            for c in hashes.chunks(512) {
                for r in db.batched_multi_get_cf_opt(cf(&db, CF_PAGES), c.iter().map(|h| h.0), false, &ro) {
                    bytes += r.expect("get").map(|p| p.len()).unwrap_or(0);
                }
            }
            let multi_get = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            assert_eq!(bytes, n * PAGE_SIZE);
            let t = std::time::Instant::now();
            for c in hashes.chunks(512) {
                for r in db.batched_multi_get_cf_opt(cf(&db, CF_PAGES), c.iter().map(|h| h.0), false, &ro) {
                    let p = r.expect("get").expect("present");
                    assert_eq!(p.len(), PAGE_SIZE);
                    std::hint::black_box(hash_page(&p));
                }
            }
            let hashed = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            let mut crc = rocksdb::ReadOptions::default();
            crc.set_verify_checksums(true);
            let t = std::time::Instant::now();
            for c in hashes.chunks(512) {
                for r in db.batched_multi_get_cf_opt(cf(&db, CF_PAGES), c.iter().map(|h| h.0), false, &crc) {
                    assert_eq!(r.expect("get").map(|p| p.len()), Some(PAGE_SIZE));
                }
            }
            let crc = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            let t = std::time::Instant::now();
            for c in hashes.chunks(512) {
                assert!(s.get(c).expect("get").iter().all(|p| p.is_some()));
            }
            let get = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            let t = std::time::Instant::now();
            for c in hashes.chunks(512) {
                std::hint::black_box(s.have(c).expect("have"));
            }
            let have = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            println!("round {round}: {n} pages, µs per page: multi_get {multi_get:.2}, + BLAKE3 {hashed:.2}, with RocksDB's CRCs {crc:.2}, Store::get {get:.2}; have {have:.2}");
        }
    }

    #[test]
    fn a_sync_while_writes_are_stopped_succeeds() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path()).expect("open");
        // One memtable of pages waiting for its flush stops every write to the database
        // (RocksDB's memtable limit), as several do under a burst of `Put`s: a flush asked of
        // the `present` family right after one of `pages` meets writes stopped.
        let stopped = {
            let db = s.db().expect("db");
            db.set_options_cf(cf(&db, CF_PAGES), &[("max_write_buffer_number", "1")]).expect("options");
            s.put_own(&[(hash_page(&page(1)), &page(1))]).expect("put");
            let mut fo = rocksdb::FlushOptions::default();
            fo.set_wait(false);
            db.flush_cf_opt(cf(&db, CF_PAGES), &fo).expect("flush pages");
            db.flush_cf_opt(cf(&db, CF_PRESENT), &fo).expect_err("writes are stopped")
        };
        assert_eq!(stopped.kind(), rocksdb::ErrorKind::TryAgain, "{stopped}");
        for b in 2..10u8 {
            s.put_own(&[(hash_page(&page(b)), &page(b))]).expect("put");
            s.sync().expect("a sync while writes are stopped");
        }
        let want: Vec<PageHash> = (1..10u8).map(|b| hash_page(&page(b))).collect();
        assert_eq!(s.get(&want).expect("get"), (1..10u8).map(|b| Some(page(b))).collect::<Vec<_>>());
    }

    #[test]
    fn pages_round_trip_and_count_exactly() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path()).expect("open");
        let (a, b) = (page(1), page(2));
        let (ha, hb) = (hash_page(&a), hash_page(&b));
        assert_eq!(s.put_verified(&[(ha, &a), (hb, &b), (ha, &a)]).expect("put"), (2, 1));
        assert_eq!(s.put_verified(&[(ha, &a)]).expect("put"), (0, 1));
        assert_eq!(s.page_count(), 2);
        assert_eq!(s.have(&[ha, hash_page(&page(3)), hb]).expect("have"), vec![true, false, true]);
        assert_eq!(s.get(&[hb, hash_page(&page(3))]).expect("get"), vec![Some(b.clone()), None]);
        s.sync().expect("sync");
        drop(s);
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.page_count(), 2, "count survives a restart");
        assert!(matches!(Store::open(dir.path()), Err(StoreError::Locked { .. })));
    }

    #[test]
    fn a_peer_gets_pages_unhashed_and_this_node_gets_them_checked() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path()).expect("open");
        let (a, b) = (page(1), page(2));
        let (ha, hc, hd) = (hash_page(&a), hash_page(&page(3)), hash_page(&page(4)));
        // A damaged copy: page 2's bytes under page 3's hash (own pages are not re-hashed).
        s.put_own(&[(ha, &a), (hc, &b)]).expect("put");
        assert_eq!(s.read(&[ha, hc, hd]).expect("read"), vec![Read::Page(a.clone()), Read::Corrupt, Read::Missing]);
        assert_eq!(s.get(&[ha, hc, hd]).expect("get"), vec![Some(a.clone()), None, None]);
        // The same, each page a slice of one buffer.
        let shared = s.get_shared(&[hd, ha, hc, ha]).expect("get shared");
        assert_eq!(shared.iter().map(|p| p.as_deref()).collect::<Vec<_>>(), vec![None, Some(&a[..]), None, Some(&a[..])]);
        // The peer hashes what it gets, and asks the next owner for page 3; the gaps stay
        // where they are whatever is held around them.
        assert_eq!(s.get_for_peer(&[ha, hc, hd]).expect("get"), PageSet::of([Some(&a), Some(&b), None]));
        assert_eq!(s.get_for_peer(&[hd, hd, hc, hd, ha]).expect("get"), PageSet::of([None, None, Some(&b), None, Some(&a)]));
        assert_eq!(s.get_for_peer(&[hd]).expect("get"), PageSet::of([None::<&[u8]>]));
        assert_eq!(s.get_for_peer(&[]).expect("get"), PageSet::default());
    }

    #[test]
    fn a_page_under_the_wrong_hash_is_refused_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path()).expect("open");
        let (a, b) = (page(1), page(2));
        let err = s.put_verified(&[(hash_page(&a), &a), (hash_page(&a), &b)]).expect_err("mismatch");
        assert!(matches!(err, StoreError::HashMismatch { .. }));
        assert_eq!(s.page_count(), 0, "nothing of the batch was written");
        let short = vec![1u8; 100];
        assert!(matches!(s.put_verified(&[(hash_page(&short), &short)]), Err(StoreError::BadPageSize(100))));
    }

    #[test]
    fn pages_that_would_eat_into_the_reserve_are_refused_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path()).expect("open");
        assert!(s.free_bytes() > 0);
        s.set_reserve(s.free_bytes() + (1 << 40));
        assert!(s.is_full());
        let (a, b) = (page(1), page(2));
        let err = s.put_verified(&[(hash_page(&a), &a), (hash_page(&b), &b)]).expect_err("full");
        assert!(matches!(err, StoreError::NearlyFull { .. }), "{err}");
        assert!(err.to_string().contains("disk nearly full"), "{err}");
        assert_eq!(s.page_count(), 0);
        s.set_reserve(0);
        assert_eq!(s.put_verified(&[(hash_page(&a), &a)]).expect("room again"), (1, 0));
    }

    #[test]
    fn a_restart_changes_the_incarnation_and_a_sync_under_the_old_one_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path()).expect("open");
        let first = s.incarnation();
        let a = page(1);
        s.put_verified(&[(hash_page(&a), &a)]).expect("put");
        s.sync_incarnation(first).expect("same incarnation");
        drop(s);
        let s = Store::open(dir.path()).expect("reopen");
        assert_ne!(s.incarnation(), first);
        assert!(matches!(s.sync_incarnation(first), Err(StoreError::Restarted)));
    }

    #[test]
    fn deletion_spares_watched_pages_and_space_comes_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path()).expect("open");
        // 8 MiB of distinct pages, synced: blob files on disk.
        let pages: Vec<Vec<u8>> = (0..2048u32)
            .map(|i| {
                let mut p = vec![0u8; PAGE_SIZE];
                p[..4].copy_from_slice(&i.to_le_bytes());
                p[PAGE_SIZE - 4..].copy_from_slice(&(i ^ 0xdead_beef).to_le_bytes());
                p
            })
            .collect();
        let hashes: Vec<PageHash> = pages.iter().map(|p| hash_page(p)).collect();
        let refs: Vec<(PageHash, &[u8])> = hashes.iter().zip(&pages).map(|(h, p)| (*h, p.as_slice())).collect();
        s.put_verified(&refs).expect("put");
        s.sync().expect("sync");
        let full = s.disk_bytes();
        assert!(full > 8 << 20, "{full} bytes on disk");
        // No watch: nothing is deleted.
        assert_eq!(s.delete_unwatched(&hashes).expect("delete"), 0);
        s.watch_begin();
        // A snapshot asks for page 0 and stores page 1 again: both are spared.
        assert_eq!(s.have(&hashes[..1]).expect("have"), vec![true]);
        s.put_verified(&refs[1..2]).expect("put");
        assert_eq!(s.delete_unwatched(&hashes).expect("delete"), 2046);
        s.watch_end();
        assert_eq!(s.page_count(), 2);
        assert_eq!(s.have(&hashes[..3]).expect("have"), vec![true, true, false]);
        assert_eq!(s.reclaimed_bytes().expect("reclaimed"), 2046 * PAGE_SIZE as u64);
        s.compact_pages().expect("compact");
        let after = s.disk_bytes();
        assert!(after < full / 4, "{after} bytes on disk after deleting 2046 of 2048 pages (was {full})");
        drop(s);
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.page_count(), 2, "deletions survive a restart");
        assert_eq!(s.get(&hashes[..2]).expect("get"), vec![Some(pages[0].clone()), Some(pages[1].clone())]);
    }

    fn record(name: &str, created: u64) -> SignedRecord {
        let mut record = vmcsnap_protocol::manifest::CommitRecord::minimal(vmcsnap_protocol::NodeId([1; 32]), name);
        record.created_unix_ms = created;
        SignedRecord { record, certificate: "cert".into(), signature: vec![7; 64] }
    }

    fn tombstone(r: &SignedRecord) -> SignedTombstone {
        let t = vmcsnap_protocol::manifest::Tombstone { name: r.record.name.clone(), record: r.id().expect("id"), deleted_by: vmcsnap_protocol::NodeId([1; 32]), deleted_unix_ms: 9 };
        SignedTombstone { tombstone: t, certificate: "cert".into(), signature: vec![7; 64] }
    }

    #[test]
    fn a_name_is_granted_to_one_record_until_its_claim_lapses_or_is_released() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path()).expect("open");
        let (a, b) = (PageHash([1; 32]), PageHash([2; 32]));
        assert_eq!(s.claim_name("n", a, 1000, 100, false).expect("claim"), None);
        assert_eq!(s.claim_name("n", a, 1050, 100, false).expect("renew"), None, "the same record again");
        assert_eq!(s.claim_name("n", b, 1100, 100, false).expect("claim"), Some(a), "held until 1150");
        drop(s);
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.claim_name("n", b, 1149, 100, false).expect("claim"), Some(a), "a grant survives a restart");
        assert_eq!(s.claim_name("n", b, 1151, 100, false).expect("claim"), None, "lapsed");
        assert_eq!(s.claim_name("n", b, 1152, 100, true).expect("release"), None);
        assert_eq!(s.claim_name("n", a, 1153, 100, false).expect("claim"), None, "released");
        // A record kept under the name holds it for good, and clears the claim.
        let r = record("n", 1);
        let id = r.id().expect("id");
        s.catalog_put(&r).expect("put");
        assert_eq!(s.claim_name("n", a, 1154, 100, false).expect("claim"), Some(id));
        assert_eq!(s.claim_name("n", id, 1155, 100, false).expect("claim"), None, "its own record");
    }

    #[test]
    fn a_tombstone_removes_its_record_for_good() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path()).expect("open");
        let (a, b) = (record("s", 1), record("s", 2));
        s.catalog_put(&a).expect("put");
        s.catalog_put(&b).expect("put");
        assert!(s.tombstone_put(&tombstone(&a)).expect("tomb"));
        assert!(!s.tombstone_put(&tombstone(&a)).expect("again"));
        assert_eq!(s.catalog_get("s").expect("get"), vec![b.clone()], "only the other record stays");
        assert_eq!(s.catalog_put(&a).expect("back"), Kept::Deleted, "a peer cannot bring it back");
        assert_eq!(s.catalog_get("s").expect("get").len(), 1);
        drop(s);
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.tombstones().expect("list"), vec![tombstone(&a)]);
        assert_eq!(s.catalog_put(&a).expect("back"), Kept::Deleted);
    }

    #[test]
    fn conflicting_records_are_kept_side_by_side_and_legacy_ones_are_moved_and_signed() {
        let dir = tempfile::tempdir().expect("tmp");
        let (a, b) = (record("s", 1), record("s", 2));
        {
            let store = Store::open(dir.path()).expect("open");
            assert_eq!(store.catalog_put_first(&a).expect("put"), Kept::New);
            assert_eq!(store.catalog_put_first(&a).expect("again"), Kept::Already);
            assert!(matches!(store.catalog_put_first(&b), Err(StoreError::NameConflict(_))));
            // From a peer: kept beside the first, visibly.
            assert_eq!(store.catalog_put(&b).expect("conflict"), Kept::New);
            assert_eq!(store.catalog_get("s").expect("get").len(), 2);
            assert!(store.catalog_get("t").expect("get").is_empty());
            for i in 0..NAME_VERSIONS_MAX as u64 - 2 {
                store.catalog_put(&record("s", 10 + i)).expect("more");
            }
            assert!(matches!(store.catalog_put(&record("s", 99)), Err(StoreError::TooManyVersions(_))));
            // A record of the layout before conflicts: keyed by its name, unsigned.
            let legacy = record("old", 5);
            let raw = legacy.record.encode().expect("encode");
            let db = store.db().expect("db");
            db.put_cf(cf(&db, CF_CATALOG), b"old", raw).expect("raw");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let old = store.catalog_get("old").expect("get");
        assert_eq!(old.len(), 1);
        assert!(!old[0].is_signed());
        assert_eq!(store.catalog_all().expect("all").len(), NAME_VERSIONS_MAX + 1);
        // Its signed copy replaces it; an unsigned one changes nothing.
        assert_eq!(store.catalog_put(&record("old", 5)).expect("sign"), Kept::Signed);
        assert!(store.catalog_get("old").expect("get")[0].is_signed());
        assert_eq!(store.catalog_put(&old[0]).expect("unsigned"), Kept::Already);
    }
}
