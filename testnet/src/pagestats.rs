//! An independent count of what images hold: the numbers a correct fabric must reproduce.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

/// Page counts over a set of images.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageStats {
    /// Pages in all images.
    pub total: u64,
    /// All-zero pages.
    pub zero: u64,
    /// Distinct non-zero pages over all images together.
    pub distinct_nonzero: u64,
    /// Sum over images of each image's distinct non-zero pages (dedup within a VM only).
    pub per_vm_distinct_nonzero: u64,
}

/// Counts pages of `paths`, hashing each non-zero page with BLAKE3.
pub fn count(paths: &[&Path]) -> anyhow::Result<PageStats> {
    let mut all = HashSet::new();
    let mut s = PageStats::default();
    let mut page = vec![0u8; 4096];
    for p in paths {
        let mut mine = HashSet::new();
        let mut f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(p)?);
        loop {
            match f.read_exact(&mut page) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
            s.total += 1;
            if page.iter().all(|&b| b == 0) {
                s.zero += 1;
                continue;
            }
            let h = *blake3::hash(&page).as_bytes();
            mine.insert(h);
            all.insert(h);
        }
        s.per_vm_distinct_nonzero += mine.len() as u64;
    }
    s.distinct_nonzero = all.len() as u64;
    Ok(s)
}
