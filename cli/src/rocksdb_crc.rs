//! `rocksdb::crc32c::Extend`, defined by this binary for the `librocksdb` it links: the same
//! CRC32C on the CPU's instruction instead of the library's table-driven loop (see
//! `vmcsnap_node::crc32c`). `build.rs` exports the symbol, so the library's calls, which go
//! through its PLT, bind here.

use std::ffi::{c_char, c_void};
use std::sync::OnceLock;
use vmcsnap_node::crc32c;

type Extend = extern "C" fn(u32, *const c_char, usize) -> u32;

/// RocksDB's `uint32_t crc32c::Extend(uint32_t crc, const char* buf, size_t size)`.
#[allow(unsafe_code)]
#[export_name = "_ZN7rocksdb6crc32c6ExtendEjPKcm"]
pub(crate) extern "C" fn rocksdb_crc32c_extend(crc: u32, buf: *const c_char, size: usize) -> u32 {
    if size == 0 || buf.is_null() {
        return crc;
    }
    // SAFETY: RocksDB passes `size` readable bytes at `buf`, unchanged during the call.
    let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), size) };
    if let Some(c) = crc32c::extend_hw(crc, data) {
        return c;
    }
    match library_own() {
        Some(f) => f(crc, buf, size),
        None => crc32c::extend_soft(crc, data),
    }
}

/// The library's own function (the next definition after this binary's), for a CPU without
/// SSE4.2.
fn library_own() -> Option<Extend> {
    static OWN: OnceLock<Option<Extend>> = OnceLock::new();
    *OWN.get_or_init(|| {
        let name = std::ffi::CString::new(crc32c::ROCKSDB_EXTEND_SYMBOL).ok()?;
        // SAFETY: dlsym only looks the symbol up; RTLD_NEXT starts after this binary.
        #[allow(unsafe_code)]
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
        // SAFETY: the symbol is the library's function of exactly this signature (the mangled
        // name spells it).
        #[allow(unsafe_code)]
        (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, Extend>(p) })
    })
}

/// Whether RocksDB's checksums in this process run on the CPU's instruction: this binary's
/// function is the one the symbol resolves to, and the CPU has SSE4.2. (A library linked with
/// `-Bsymbolic` would call its own definition whatever the symbol resolves to; Debian's 7.8
/// calls it through its PLT, as `objdump -d` shows, and a profile finds `extend_sse42` in its
/// flush thread.)
pub(crate) fn in_use() -> Result<(), &'static str> {
    if crc32c::extend_hw(0, b"").is_none() {
        return Err("this CPU has no SSE4.2: RocksDB's own table-driven CRC32C is used");
    }
    if crc32c::rocksdb_extend_in_use() != rocksdb_crc32c_extend as *const c_void {
        return Err("this binary's CRC32C is not the one RocksDB calls (not exported at link time?): RocksDB's own table-driven CRC32C is used");
    }
    Ok(())
}
