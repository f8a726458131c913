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
//! - `meta`: node metadata (the member list).
//!
//! **Invariant:** a page is stored only under its own hash. [`Store::put_verified`] re-hashes
//! every page; [`Store::put_own`] is only for pages this node hashed itself.
//! Page writes skip RocksDB's write-ahead log: they sit in the memtable until [`Store::sync`]
//! flushes it to fsynced blob and table files. That writes each page once instead of twice
//! (measured: BlobDB without WAL, 1.05× write amplification against 2.05×). A crash loses only
//! pages not yet synced, and a snapshot commits only after every owner answered a sync, so no
//! committed snapshot can name a lost page; a page that `have` reported present but that was
//! not yet durable is flushed by that same sync. Commit records use the log with fsync.

use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, Options, WriteBatch, DB};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use vmcsnap_protocol::manifest::{SignedRecord, NAME_VERSIONS_MAX};
use vmcsnap_protocol::{hash_page, PageHash, PAGE_SIZE};

const CF_PAGES: &str = "pages";
const CF_PRESENT: &str = "present";
const CF_CATALOG: &str = "catalog";
const CF_META: &str = "meta";
const META_MEMBERS: &[u8] = b"members";

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
    /// Too many different records under one name.
    #[error("snapshot name {0:?} already has {NAME_VERSIONS_MAX} conflicting records; resolve them first")]
    TooManyVersions(String),
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
    db: DB,
    pages: AtomicU64,
    /// The first 8 bytes of every stored page's hash, in memory (about 16 bytes per page).
    /// A miss proves a page is absent without touching RocksDB, which is the common case
    /// while a snapshot sends new pages; a hit is confirmed in the `present` family.
    index: std::sync::RwLock<PrefixSet>,
    /// Serialises page writes so that the exact page count stays exact under concurrent puts.
    write_lock: Mutex<()>,
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
        o.set_enable_blob_gc(false);
        o.set_write_buffer_size(64 << 20);
    }
    o
}

impl Store {
    /// Opens (or creates) the store under `dir/db`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        opts.set_max_total_wal_size(256 << 20);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_PAGES, cf_options(true)),
            ColumnFamilyDescriptor::new(CF_PRESENT, cf_options(false)),
            ColumnFamilyDescriptor::new(CF_CATALOG, cf_options(false)),
            ColumnFamilyDescriptor::new(CF_META, cf_options(false)),
        ];
        let path = dir.join("db");
        let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(|e| {
            if e.to_string().contains("lock") {
                StoreError::Locked { dir: dir.to_path_buf() }
            } else {
                StoreError::Rocks(e)
            }
        })?;
        let store = Self { db, pages: AtomicU64::new(0), index: Default::default(), write_lock: Mutex::new(()) };
        let mut index = PrefixSet::default();
        for kv in store.db.iterator_cf(store.cf(CF_PRESENT), rocksdb::IteratorMode::Start) {
            let (k, _) = kv?;
            if k.len() != 32 {
                return Err(StoreError::Corrupt(format!("page key of {} bytes", k.len())));
            }
            index.insert(prefix(&k));
        }
        store.pages.store(index.len() as u64, Ordering::Relaxed);
        *store.index.write().unwrap_or_else(|p| p.into_inner()) = index;
        store.rekey_catalog()?;
        Ok(store)
    }

    /// Moves catalog entries of the layout before conflicts were kept (keyed by name alone)
    /// to `name, 0, id`.
    fn rekey_catalog(&self) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let mut moved = 0;
        for kv in self.db.iterator_cf(self.cf(CF_CATALOG), rocksdb::IteratorMode::Start) {
            let (k, v) = kv?;
            if k.contains(&0) {
                continue;
            }
            let rec = SignedRecord::decode(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let id = rec.id().map_err(|e| StoreError::Corrupt(e.to_string()))?;
            batch.delete_cf(self.cf(CF_CATALOG), &k);
            batch.put_cf(self.cf(CF_CATALOG), catalog_key(&rec.record.name, &id), &v);
            moved += 1;
        }
        if moved > 0 {
            let mut wo = rocksdb::WriteOptions::default();
            wo.set_sync(true);
            self.db.write_opt(batch, &wo)?;
            tracing::info!(target: "vmcsnap::store", moved, "catalog moved to the layout that keeps conflicting records");
        }
        Ok(())
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // The four families are created at open; a missing one is a programming error.
        #[allow(clippy::expect_used)]
        self.db.cf_handle(name).expect("column family created at open")
    }

    /// Distinct pages stored.
    pub fn page_count(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    /// For each hash, whether this store holds the page.
    pub fn have(&self, hashes: &[PageHash]) -> Result<Vec<bool>, StoreError> {
        let cf = self.cf(CF_PRESENT);
        let mut out = vec![false; hashes.len()];
        let maybe: Vec<usize> = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            (0..hashes.len()).filter(|&i| index.contains(&hashes[i].prefix_u64())).collect()
        };
        if !maybe.is_empty() {
            let got = self.db.batched_multi_get_cf(cf, maybe.iter().map(|&i| hashes[i].0), false);
            for (i, r) in maybe.into_iter().zip(got) {
                out[i] = r?.is_some();
            }
        }
        Ok(out)
    }

    /// Stores pages that came from a peer, after re-hashing each one. Returns
    /// `(stored, already_present)`. Nothing is written if any page fails its check.
    pub fn put_verified(&self, pages: &[(PageHash, &[u8])]) -> Result<(u32, u32), StoreError> {
        for (h, data) in pages {
            if data.len() != PAGE_SIZE {
                return Err(StoreError::BadPageSize(data.len()));
            }
            let actual = hash_page(data);
            if actual != *h || h.is_zero() {
                return Err(StoreError::HashMismatch { expected: *h, actual });
            }
        }
        self.put_own(pages)
    }

    /// Stores pages this node hashed itself. Returns `(stored, already_present)`.
    pub fn put_own(&self, pages: &[(PageHash, &[u8])]) -> Result<(u32, u32), StoreError> {
        let hashes: Vec<PageHash> = pages.iter().map(|(h, _)| *h).collect();
        #[allow(clippy::unwrap_used)] // a poisoned lock means a panic already happened
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let have = self.have(&hashes)?;
        let mut batch = WriteBatch::default();
        let mut stored = 0u32;
        let mut seen = std::collections::HashSet::new();
        for ((h, data), had) in pages.iter().zip(have) {
            debug_assert_eq!(data.len(), PAGE_SIZE);
            if had || !seen.insert(*h) {
                continue;
            }
            batch.put_cf(self.cf(CF_PAGES), h.0, data);
            batch.put_cf(self.cf(CF_PRESENT), h.0, []);
            stored += 1;
        }
        if stored > 0 {
            // No write-ahead log for pages: they become durable at the next `sync`, which
            // flushes the memtables (half the bytes written per page; see the module doc).
            let mut wo = rocksdb::WriteOptions::default();
            wo.disable_wal(true);
            self.db.write_opt(batch, &wo)?;
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            index.extend(seen.iter().map(|h| h.prefix_u64()));
            self.pages.fetch_add(stored as u64, Ordering::Relaxed);
        }
        Ok((stored, pages.len() as u32 - stored))
    }

    /// Reads pages; `None` where the store lacks one. Each page read is checked against its
    /// hash, so a corrupted disk is reported, not served.
    pub fn get(&self, hashes: &[PageHash]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        // RocksDB's own block and blob checksums are redundant here: every page is checked
        // against its BLAKE3 hash below, which catches everything a CRC would (10% of a
        // restore's CPU in a profile).
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_verify_checksums(false);
        let got = self.db.batched_multi_get_cf_opt(self.cf(CF_PAGES), hashes.iter().map(|h| h.0), false, &ro);
        let mut out = Vec::with_capacity(hashes.len());
        for (h, r) in hashes.iter().zip(got) {
            match r? {
                Some(p) => {
                    let actual = hash_page(&p);
                    if actual != *h {
                        return Err(StoreError::HashMismatch { expected: *h, actual });
                    }
                    out.push(Some(p.to_vec()));
                }
                None => out.push(None),
            }
        }
        Ok(out)
    }

    /// Makes every page written before this call durable: flushes the page memtables to
    /// (fsynced) blob and table files.
    pub fn sync(&self) -> Result<(), StoreError> {
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(true);
        self.db.flush_cf_opt(self.cf(CF_PAGES), &fo)?;
        self.db.flush_cf_opt(self.cf(CF_PRESENT), &fo)?;
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
        let corrupt = |e: vmcsnap_protocol::codec::CodecError| StoreError::Corrupt(e.to_string());
        let bytes = rec.encode().map_err(corrupt)?;
        let id = rec.id().map_err(corrupt)?;
        let name = &rec.record.name;
        #[allow(clippy::unwrap_used)]
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
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
        self.db.put_cf_opt(self.cf(CF_CATALOG), catalog_key(name, &id), bytes, &wo)?;
        Ok(kept)
    }

    /// Every record kept under `name` (one, or several in conflict), in record-id order.
    pub fn catalog_get(&self, name: &str) -> Result<Vec<SignedRecord>, StoreError> {
        let prefix = [name.as_bytes(), &[0]].concat();
        let mut out = Vec::new();
        let mode = rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward);
        for kv in self.db.iterator_cf(self.cf(CF_CATALOG), mode) {
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
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(self.cf(CF_CATALOG), rocksdb::IteratorMode::Start) {
            let (_, v) = kv?;
            out.push(SignedRecord::decode(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// Saves an opaque metadata value.
    pub fn meta_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.db.put_cf(self.cf(CF_META), key, value)?;
        Ok(())
    }

    /// Reads an opaque metadata value.
    pub fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_META), key)?)
    }

    /// Deletes a metadata value.
    pub fn meta_delete(&self, key: &[u8]) -> Result<(), StoreError> {
        self.db.delete_cf(self.cf(CF_META), key)?;
        Ok(())
    }

    /// Every metadata entry whose key starts with `prefix`, in key order.
    pub fn meta_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        let mode = rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward);
        for kv in self.db.iterator_cf(self.cf(CF_META), mode) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        p[0] = b;
        p[PAGE_SIZE - 1] = b.wrapping_mul(7);
        p
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

    fn record(name: &str, created: u64) -> SignedRecord {
        let mut record = vmcsnap_protocol::manifest::CommitRecord::minimal(vmcsnap_protocol::NodeId([1; 32]), name);
        record.created_unix_ms = created;
        SignedRecord { record, certificate: "cert".into(), signature: vec![7; 64] }
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
            store.db.put_cf(store.cf(CF_CATALOG), b"old", raw).expect("raw");
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
