//! A real local vmcsnap cluster for demos, tests and benchmarks.
//!
//! - [`cluster`]: N real `vmcsnap node run` processes on loopback, each with its own data
//!   directory and port, driven through the real `vmcsnap` CLI.
//! - [`cpu`]: where a benchmark window's CPU went (the machine's, the nodes', the QEMUs').
//! - [`gen`]: synthetic VM memory images with realistic shares of zero, shared-image,
//!   intra-VM duplicate and private pages, from a seed.
//! - [`idle`]: what an idle cluster costs per node (CPU, RSS), and how fast joins and
//!   failures are seen, at a given cluster size.
//! - [`netns`]: network namespaces joined through a router namespace, for partition tests.
//! - [`pagestats`]: an independent count of the pages in images (total, zero, distinct),
//!   for tests to check the fabric's numbers against.
//! - [`sim`]: the placement simulation (balance and movement at 10 to 1,000 hosts).
//! - [`stats`]: the one `median` every published figure goes through.

pub mod bench;
pub mod benchdisk;
pub mod benchstore;
pub mod chart;
pub mod cluster;
pub mod cpu;
pub mod demovm;
pub mod gen;
pub mod guest;
pub mod idle;
pub mod netns;
pub mod pagestats;
pub mod reaper;
pub mod sim;
pub mod swimsim;
pub mod stats;

use std::path::PathBuf;

/// A crate's directory, for a test that reads files beside it: the running test's
/// `CARGO_MANIFEST_DIR` (cargo sets it when it runs tests), else `built`, the directory the
/// test was compiled in (`env!("CARGO_MANIFEST_DIR")`; a build directory shared by two
/// checkouts may run a test built in the other, which may be gone).
pub fn crate_dir(built: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(built))
}

/// Finds the `vmcsnap` binary: `$VMCSNAP_BIN`, else next to the running executable (or one
/// directory up, for test binaries in `deps/`), else `vmcsnap` on `PATH`.
pub fn vmcsnap_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VMCSNAP_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let cand = dir.join("vmcsnap");
            if cand.is_file() {
                return cand;
            }
        }
    }
    PathBuf::from("vmcsnap")
}
