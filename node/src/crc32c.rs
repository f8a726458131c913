//! CRC32C (Castagnoli) on the CPU's own instruction, for RocksDB.
//!
//! RocksDB checksums every blob record it writes (each stored page, at every memtable flush)
//! with CRC32C, and Debian's `librocksdb` is built portable: its CRC32C is a table-driven
//! loop, not SSE4.2's `crc32` instruction. That loop was about half of a node's flush thread
//! in a profile of a cluster snapshot (`docs/benchmarks.md`). RocksDB offers no option to
//! skip blob record checksums, so the `vmcsnap` binary supplies the function itself: it
//! defines `rocksdb::crc32c::Extend` (the `cli` crate's `rocksdb_crc` module) and exports it,
//! and the dynamic linker binds the library's calls (through its PLT) to that definition.
//! The values are the same CRC32C; only how fast it is computed changes
//! ([`tests::the_same_values_as_rocksdbs_own`] compares it with the library's function).

/// The mangled name of `uint32_t rocksdb::crc32c::Extend(uint32_t crc, const char* buf,
/// size_t size)`: the CRC32C of `buf` continued from `crc` (0 to start).
pub const ROCKSDB_EXTEND_SYMBOL: &str = "_ZN7rocksdb6crc32c6ExtendEjPKcm";

/// The CRC32C of `data` continued from `crc` (RocksDB's `crc32c::Extend`: 0 starts a new
/// one), on SSE4.2; `None` on a CPU without it.
pub fn extend_hw(crc: u32, data: &[u8]) -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the CPU has SSE4.2 (checked just above).
            #[allow(unsafe_code)]
            return Some(unsafe { extend_sse42(crc, data) });
        }
    }
    let _ = (crc, data);
    None
}

/// [`extend_hw`] one bit at a time, on any CPU (slow: for CPUs without the instruction when
/// RocksDB's own function cannot be found, and to check the fast one).
pub fn extend_soft(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = (c >> 1) ^ (0x82F6_3B78 & 0u32.wrapping_sub(c & 1));
        }
    }
    !c
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn extend_sse42(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut c = u64::from(!crc);
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        c = _mm_crc32_u64(c, u64::from_le_bytes(b));
    }
    let mut c = c as u32;
    for &b in words.remainder() {
        c = _mm_crc32_u8(c, b);
    }
    !c
}

/// The address `rocksdb::crc32c::Extend` resolves to in this process (null without
/// RocksDB loaded): the `vmcsnap` binary's own function when its export took effect.
pub fn rocksdb_extend_in_use() -> *const std::ffi::c_void {
    let name = std::ffi::CString::new(ROCKSDB_EXTEND_SYMBOL).unwrap_or_default();
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
    #[allow(unsafe_code)]
    unsafe {
        libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()).cast_const()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(extend_soft(0, b"123456789"), 0xE306_9283);
        assert_eq!(extend_soft(extend_soft(0, b"1234"), b"56789"), 0xE306_9283);
        let Some(c) = extend_hw(0, b"123456789") else { return };
        assert_eq!(c, 0xE306_9283);
        // RocksDB's own test vectors (util/crc32c_test.cc).
        assert_eq!(extend_hw(0, &[0u8; 32]), Some(0x8a91_36aa));
        assert_eq!(extend_hw(0, &[0xffu8; 32]), Some(0x62a8_ab43));
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(extend_hw(0, &ascending), Some(0x46dd_794e));
        // Extending is the same as one pass.
        assert_eq!(extend_hw(extend_hw(0, b"hello ").expect("the CPU has SSE4.2"), b"world"), extend_hw(0, b"hello world"));
        assert_eq!(extend_hw(7, b""), Some(7));
    }

    /// Against the library's own function (this test binary does not export a replacement,
    /// so the symbol is RocksDB's), over lengths, alignments and starting values.
    #[test]
    fn the_same_values_as_rocksdbs_own() {
        // The library is loaded with this binary (the store links it).
        let f = rocksdb_extend_in_use();
        assert!(!f.is_null(), "rocksdb::crc32c::Extend not found");
        // SAFETY: the symbol is RocksDB's `uint32_t Extend(uint32_t, const char*, size_t)`.
        #[allow(unsafe_code)]
        let theirs: extern "C" fn(u32, *const std::ffi::c_char, usize) -> u32 = unsafe { std::mem::transmute(f) };
        let mut data = vec![0u8; 10_000];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for (start, len, init) in [(0, 0, 0), (0, 1, 0), (1, 7, 5), (3, 8, 0xffff_ffff), (5, 4096, 0), (0, 4096 + 33, 0x1234_5678), (7, 9_000, 42), (2, 63, 0)] {
            let s = &data[start..start + len];
            let want = theirs(init, s.as_ptr().cast(), s.len());
            assert_eq!(extend_soft(init, s), want, "start {start} len {len} init {init:#x}");
            if let Some(got) = extend_hw(init, s) {
                assert_eq!(got, want, "start {start} len {len} init {init:#x}");
            }
        }
    }
}
