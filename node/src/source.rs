//! VM memory sources.
//!
//! `file:PATH` is a raw guest-memory image (what `pmemsave` or a mapped memory file holds): a
//! whole number of 4 KiB pages, read as one RAM block named `ram`.

use std::path::PathBuf;
use vmcsnap_protocol::PAGE_SIZE;

/// A parsed memory source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A raw memory image.
    File(PathBuf),
    /// A running QEMU VM, through its QMP socket.
    Qemu(PathBuf),
}

/// A parsed restore target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Write the VM's RAM as a raw image.
    File(PathBuf),
    /// Write a migration stream into a QEMU listening with `-incoming unix:PATH`.
    QemuIncoming(PathBuf),
}

fn abs_path(kind: &str, p: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(p);
    if p.is_empty() {
        return Err(format!("{kind}: empty path"));
    }
    if !path.is_absolute() {
        return Err(format!("{kind}:{p}: the node needs an absolute path (the CLI makes paths absolute)"));
    }
    Ok(path)
}

impl Source {
    /// Parses `file:/abs/path`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("file", p)) => Ok(Source::File(abs_path("file", p)?)),
            Some(("qemu", p)) => Ok(Source::Qemu(abs_path("qemu", p)?)),
            Some((kind, _)) => Err(format!("unknown memory source kind {kind:?} (supported: file:PATH, qemu:QMP_SOCKET)")),
            None => Err(format!("memory source {s:?} must look like file:PATH or qemu:QMP_SOCKET")),
        }
    }

    /// Checks the source can be read and returns its size in bytes (0 for a QEMU VM, whose
    /// size is known once its stream arrives).
    pub fn probe(&self) -> Result<u64, String> {
        match self {
            Source::Qemu(p) => {
                std::os::unix::net::UnixStream::connect(p)
                    .map_err(|e| format!("cannot reach QMP socket {}: {e} (is the VM running?)", p.display()))?;
                Ok(0)
            }
            Source::File(p) => {
                let meta = std::fs::metadata(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                if !meta.is_file() {
                    return Err(format!("{} is not a regular file", p.display()));
                }
                let len = meta.len();
                if len == 0 || len % PAGE_SIZE as u64 != 0 {
                    return Err(format!(
                        "{} is {len} bytes, not a whole number of {PAGE_SIZE}-byte pages",
                        p.display()
                    ));
                }
                // Opening proves permission, not just existence.
                std::fs::File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()))?;
                Ok(len)
            }
        }
    }
}

impl Target {
    /// Parses `file:/abs/path` or `qemu:unix:/abs/path`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("file", p)) => Ok(Target::File(abs_path("file", p)?)),
            Some(("qemu", rest)) => match rest.split_once(':') {
                Some(("unix", p)) => Ok(Target::QemuIncoming(abs_path("qemu:unix", p)?)),
                _ => Err(format!("restore target {s:?}: QEMU targets look like qemu:unix:PATH (QEMU started with -incoming unix:PATH)")),
            },
            Some((kind, _)) => Err(format!("unknown restore target kind {kind:?} (supported: file:PATH, qemu:unix:PATH, or --launch)")),
            None => Err(format!("restore target {s:?} must look like file:PATH or qemu:unix:PATH")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_probe() {
        assert!(Source::parse("file:relative").is_err());
        assert!(Source::parse("qcow:/x").is_err());
        assert!(Source::parse("/x").is_err());
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 3 * PAGE_SIZE + 1]).expect("write");
        let s = Source::parse(&format!("file:{}", p.display())).expect("parse");
        assert!(s.probe().expect_err("odd size").contains("whole number"));
        std::fs::write(&p, vec![0u8; 3 * PAGE_SIZE]).expect("write");
        assert_eq!(s.probe().expect("probe"), 3 * PAGE_SIZE as u64);
        let missing = Source::parse("file:/nonexistent/vmcsnap").expect("parse");
        assert!(missing.probe().expect_err("missing").contains("cannot read"));
    }
}
