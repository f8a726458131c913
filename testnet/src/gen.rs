//! Synthetic VM memory.
//!
//! Every page of a VM is, by a seeded draw:
//! - **zero** (`zero`, default 0.61: measured on idle 256 MiB Linux guests);
//! - otherwise non-zero, and then one of
//!   - **shared**: the next page of the VM image's common pool (kernel, libraries, page cache
//!     of the same files): every VM of the image holds the same pool pages;
//!   - **duplicate**: a copy of one of this VM's earlier private pages;
//!   - **private**: unique random data.
//!
//! The defaults (`shared` 0.25, `duplicate` 0.15 of non-zero pages) give about 1.5× dedup of
//! non-zero pages over 4 VMs, as measured on real guests in `shared/research/qemu-capture.md`.

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Page size of the images.
pub const PAGE: usize = 4096;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenConfig {
    /// Number of VMs.
    pub vms: usize,
    /// Pages per VM.
    pub pages: u64,
    /// Fraction of pages that are zero.
    pub zero: f64,
    /// Fraction of non-zero pages from the shared image pool.
    pub shared: f64,
    /// Fraction of non-zero pages that repeat an earlier private page of the same VM.
    pub duplicate: f64,
    /// Seed: same seed, same bytes.
    pub seed: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        Self { vms: 4, pages: 65_536, zero: 0.61, shared: 0.25, duplicate: 0.15, seed: 1 }
    }
}

impl GenConfig {
    /// Checks the fractions.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (n, v) in [("zero", self.zero), ("shared", self.shared), ("duplicate", self.duplicate)] {
            if !(0.0..=1.0).contains(&v) {
                anyhow::bail!("--{n} must be between 0 and 1, not {v}");
            }
        }
        if self.shared + self.duplicate > 1.0 {
            anyhow::bail!("--shared + --duplicate must not exceed 1");
        }
        if self.vms == 0 || self.pages == 0 {
            anyhow::bail!("need at least one VM of at least one page");
        }
        Ok(())
    }
}

fn fill(seed: u64, tag: u64, index: u64, page: &mut [u8]) {
    let mut r = SmallRng::seed_from_u64(seed ^ tag.rotate_left(40) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    r.fill_bytes(page);
    // Stamp the identity so that no two generated pages can be equal by accident.
    page[..8].copy_from_slice(&tag.to_le_bytes());
    page[8..16].copy_from_slice(&index.to_le_bytes());
    page[16..24].copy_from_slice(&seed.to_le_bytes());
}

/// Writes VM `vm`'s image to `w`.
pub fn write_vm(cfg: &GenConfig, vm: usize, w: &mut impl Write) -> std::io::Result<()> {
    let mut draw = SmallRng::seed_from_u64(cfg.seed.wrapping_mul(1_000_003) ^ vm as u64);
    let mut page = vec![0u8; PAGE];
    let (mut shared_next, mut private_next) = (0u64, 0u64);
    let private_tag = 2 + vm as u64;
    let mut buf = Vec::with_capacity(256 * PAGE);
    for _ in 0..cfg.pages {
        if draw.random::<f64>() < cfg.zero {
            page.fill(0);
        } else {
            let x: f64 = draw.random();
            if x < cfg.shared {
                fill(cfg.seed, 1, shared_next, &mut page);
                shared_next += 1;
            } else if x < cfg.shared + cfg.duplicate && private_next > 0 {
                let j = draw.random_range(0..private_next);
                fill(cfg.seed, private_tag, j, &mut page);
            } else {
                fill(cfg.seed, private_tag, private_next, &mut page);
                private_next += 1;
            }
        }
        buf.extend_from_slice(&page);
        if buf.len() >= 256 * PAGE {
            w.write_all(&buf)?;
            buf.clear();
        }
    }
    w.write_all(&buf)
}

/// Writes `vm0.img` .. `vm{n-1}.img` into `dir`.
pub fn write_images(cfg: &GenConfig, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    cfg.validate()?;
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for vm in 0..cfg.vms {
        let path = dir.join(format!("vm{vm}.img"));
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
        write_vm(cfg, vm, &mut f)?;
        f.flush()?;
        out.push(path);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_measured_guests() {
        let dir = tempfile::tempdir().expect("tmp");
        let cfg = GenConfig { pages: 4096, ..Default::default() };
        let paths = write_images(&cfg, dir.path()).expect("gen");
        let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let s = crate::pagestats::count(&refs).expect("count");
        assert_eq!(s.total, 4 * 4096);
        let zero = s.zero as f64 / s.total as f64;
        assert!((zero - 0.61).abs() < 0.02, "zero share {zero}");
        let dedup = (s.total - s.zero) as f64 / s.distinct_nonzero as f64;
        assert!((1.4..1.6).contains(&dedup), "non-zero dedup {dedup}");
        // Same seed, same bytes.
        let again = tempfile::tempdir().expect("tmp");
        let p2 = write_images(&cfg, again.path()).expect("gen");
        assert_eq!(std::fs::read(&paths[2]).expect("read"), std::fs::read(&p2[2]).expect("read"));
    }
}
