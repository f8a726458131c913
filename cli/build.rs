//! Exports `rocksdb::crc32c::Extend` from the `vmcsnap` binary (`src/rocksdb_crc.rs`), so
//! that the RocksDB library's calls bind to it.

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol=_ZN7rocksdb6crc32c6ExtendEjPKcm");
    println!("cargo:rerun-if-changed=build.rs");
}
