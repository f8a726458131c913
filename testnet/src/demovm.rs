//! The demo on real VMs (`vmcsnap-testnet demo`, the README's first command): three small
//! QEMU guests on two hosts of a local 3-node cluster, a live cut of all of them taken from the
//! third host (which runs none), every guest killed and rolled back on another host, each
//! guest's memory checked from inside (its data checksum over the serial console), and the
//! figures beside default KVM's in the same run (QEMU's own background snapshot of each VM to
//! its file, fsynced; its rollback: QEMU `-incoming` from that file). The guests share page
//! cache content, as VMs of one image do; each also holds random data of its own.

use crate::bench::{kill_all, kvm_restore, kvm_snapshot, vmcsnap_cluster, vmcsnap_restore, vmcsnap_snapshot, Vm};
use crate::cluster::Cluster;
use crate::guest::{self, md5_of, Guest};
use anyhow::{bail, Context};
use std::path::Path;
use std::time::Duration;

/// Guest memory, MiB.
pub const MEM_MIB: u32 = 128;
/// Time a guest's console may take to answer.
const CONSOLE: Duration = Duration::from_secs(60);

/// What the demo measured (it fails if a guest's memory does not check out).
#[derive(Debug, serde::Serialize)]
pub struct DemoFigures {
    /// Bytes default KVM's files hold (QEMU leaves zero pages out).
    pub kvm_bytes: u64,
    /// Bytes vmcsnap stores cluster-wide (replicas 1, manifests included).
    pub vmcsnap_bytes: u64,
    /// Until durable, s: default KVM, vmcsnap.
    pub kvm_snapshot_s: f64,
    /// See `kvm_snapshot_s`.
    pub vmcsnap_snapshot_s: f64,
    /// Longest VM pause, ms: default KVM, vmcsnap.
    pub kvm_pause_ms: f64,
    /// See `kvm_pause_ms`.
    pub vmcsnap_pause_ms: f64,
    /// Rollback until every VM runs, s: default KVM, vmcsnap.
    pub kvm_rollback_s: f64,
    /// See `kvm_rollback_s`.
    pub vmcsnap_rollback_s: f64,
    /// Guests whose memory checked out after the rollback, of all.
    pub guests_intact: usize,
    /// All guests.
    pub guests: usize,
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// Runs the demo in `dir` (wiped first) with the `vmcsnap` binary `bin`.
pub fn run(dir: &Path, bin: &Path) -> anyhow::Result<DemoFigures> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let dir = std::fs::canonicalize(dir)?;
    let accel = guest::accel()?;
    let vmdir = dir.join("vms");
    let hosts = 3;
    let vm = |name: &str, kargs: &str, host: usize| Vm { name: name.into(), kargs: kargs.into(), ready: "CACHE-DONE", host, data_md5: None };
    let mut vms = vec![vm("web1", "fill=16 cache=16", 0), vm("web2", "fill=8 cache=16", 0), vm("db1", "fill=8 cache=16", 1)];
    println!("== vmcsnap demo: 3 nodes, {} QEMU guests of {MEM_MIB} MiB ({accel}) ==", vms.len());
    let mut guests = Vec::new();
    for v in &vms {
        guests.push(Guest::start(&vmdir, &v.name, MEM_MIB, &v.kargs, &accel)?);
    }
    let _reaper = guest::Reaper(vms.iter().map(|v| vmdir.join(format!("{}.qmp", v.name))).collect());
    for (g, v) in guests.iter().zip(&mut vms) {
        let fill = g.wait_for("FILL-DONE", Duration::from_secs(300)).with_context(|| format!("guest {}", v.name))?;
        g.wait_for("CACHE-DONE", Duration::from_secs(300)).with_context(|| format!("guest {}", v.name))?;
        let sum = md5_of(&fill);
        println!("  {} on {}: random data md5 {sum}", v.name, Cluster::name(v.host));
        v.data_md5 = Some(sum);
    }

    println!("\ndefault KVM: QEMU's own background snapshot of each VM to a file, fsynced");
    let (kvm_bytes, kvm_s, kvm_pauses, _) = kvm_snapshot(&vmdir, &dir.join("kvm"), None, &vms, "live")?;

    println!("\nvmcsnap: one live cut of every VM, taken from n3 (which runs none of them)");
    let c = vmcsnap_cluster(bin, &dir.join("cluster"), hosts, &vmdir, &vms, &[])?;
    let taken = vmcsnap_snapshot(&c, hosts, "demo", "live", 1)?;
    let (stored, snap_s, pauses, skew) = (taken.stored, taken.secs, taken.pause_ms(), taken.skew);

    println!("\nevery guest killed; rolled back with `vmcsnap snapshot restore demo --launch`, each on another host");
    kill_all(&vmdir, &vms);
    drop(guests);
    let (running_s, _, _) = vmcsnap_restore(&c, hosts, "demo", &mut vms)?;
    let mut intact = 0;
    for v in &vms {
        let line = Guest::paths(&vmdir, &v.name).console("vmcsnap-check", "CHECK", CONSOLE).with_context(|| format!("{}'s console", v.name))?;
        let ok = v.data_md5.as_deref() == Some(md5_of(&line).as_str());
        intact += usize::from(ok);
        println!("  {} now on {}: random data md5 {} {}", v.name, Cluster::name(v.host), md5_of(&line), if ok { "(intact)" } else { "(DIFFERS)" });
    }
    kill_all(&vmdir, &vms);
    let (kvm_rollback_s, _, kvm_checked) = kvm_restore(&vmdir, &dir.join("kvm"), &vms, MEM_MIB, &accel, &[])?;
    drop(c);

    let f = DemoFigures {
        kvm_bytes,
        vmcsnap_bytes: stored,
        kvm_snapshot_s: kvm_s,
        vmcsnap_snapshot_s: snap_s,
        kvm_pause_ms: max(&kvm_pauses),
        vmcsnap_pause_ms: max(&pauses),
        kvm_rollback_s,
        vmcsnap_rollback_s: running_s,
        guests_intact: intact,
        guests: vms.len(),
    };
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    println!("\n{:<46} {:>14} {:>14}", "", "default KVM", "vmcsnap");
    println!("{:<46} {:>14} {:>14}", "stored (KVM: what QEMU's files hold)", mib(f.kvm_bytes), mib(f.vmcsnap_bytes));
    println!("{:<46} {:>13.2}s {:>13.2}s", "snapshot until durable", f.kvm_snapshot_s, f.vmcsnap_snapshot_s);
    println!("{:<46} {:>12.0}ms {:>12.0}ms", "longest VM pause", f.kvm_pause_ms, f.vmcsnap_pause_ms);
    println!("{:<46} {:>14} {:>12.1}ms", "one cut: first to last pause start", "no cut", skew.unwrap_or(f64::NAN));
    println!("{:<46} {:>13.2}s {:>13.2}s", "rollback until every VM runs", f.kvm_rollback_s, f.vmcsnap_rollback_s);
    let kvm_intact = format!("{}/{}", kvm_checked.ok, kvm_checked.ok + kvm_checked.failed.len());
    println!("{:<46} {:>14} {:>14}", "guests intact after the rollback (checked inside)", kvm_intact, format!("{}/{}", f.guests_intact, f.guests));
    println!(
        "\nvmcsnap stores {:.0}% less than default KVM: the guests' shared page cache once, zero pages never.",
        100.0 * (1.0 - f.vmcsnap_bytes as f64 / f.kvm_bytes.max(1) as f64)
    );
    if f.guests_intact != f.guests {
        bail!("{} of {} guests came back with other memory", f.guests - f.guests_intact, f.guests);
    }
    if f.vmcsnap_bytes >= f.kvm_bytes {
        bail!("vmcsnap stored {} bytes, default KVM {}: no dedup", f.vmcsnap_bytes, f.kvm_bytes);
    }
    println!("all nodes stopped; files are in {}", dir.display());
    Ok(f)
}
