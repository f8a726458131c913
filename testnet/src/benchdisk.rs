//! `vmcsnap-testnet bench-disks`: disks in the cut, on real guests and node processes.
//!
//! Four guests, two on each of two hosts, whose disks are copies of the guest build's ext4
//! image, each with 1 MiB of its own written (and synced) before the snapshots. A third host
//! takes, in each run on a fresh cluster (R = 1, live mode):
//! 1. a snapshot with `--no-disks` (memory only), then
//! 2. one with the disks, then
//! 3. another memory-only one (what any later snapshot adds: memory the idle guests changed,
//!    device state, manifest chunks),
//!
//! then, once one guest wrote 10 MiB to its disk, 4. a snapshot with disks that reads only the
//! blocks their dirty bitmaps mark;
//!
//! and the figures are: the bytes the second snapshot added to the cluster less those the
//! third did (the disks' share) against one base image's non-zero
//! blocks plus the blocks the guests changed (counted from the disk files themselves), and
//! against default KVM (an external snapshot copies each VM's disk: `cp --sparse=always` of
//! every image, fsynced); each snapshot's longest pause; and the dedup between memory and
//! disks (distinct blocks of the disks that are also pages of the memory, from the snapshot's
//! memory and disks written back to files).

use crate::cluster::Cluster;
use crate::guest::{self, Guest};
use crate::stats::median;
use anyhow::Context;
use serde::Serialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmcsnap_protocol::PAGE_SIZE;

const GUESTS: usize = 4;
const MEM_MIB: u32 = 96;

/// What one run measured.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Figures {
    /// Non-zero 4 KiB blocks of the base image.
    pub base_blocks: u64,
    /// Distinct non-zero blocks of the four disks that the base image does not have.
    pub changed_blocks: u64,
    /// Bytes the snapshot with disks added to the cluster (after the memory-only one).
    pub stored_all_bytes: u64,
    /// Bytes a memory-only snapshot added right after it (memory changed, device state,
    /// manifest chunks: what any snapshot adds).
    pub stored_churn_bytes: u64,
    /// `stored_all_bytes - stored_churn_bytes`: the disks' share.
    pub stored_disk_bytes: u64,
    /// Bytes the memory-only snapshot added (the first of the run).
    pub stored_memory_bytes: u64,
    /// Default KVM: bytes of the four disk copies (allocated).
    pub kvm_copy_bytes: u64,
    /// Default KVM: seconds to copy and fsync them.
    pub kvm_copy_s: f64,
    /// Longest VM pause of the memory-only snapshot, ms.
    pub pause_no_disks_ms: f64,
    /// Longest VM pause of the snapshot with disks, ms.
    pub pause_disks_ms: f64,
    /// Seconds of each snapshot.
    pub snapshot_no_disks_s: f64,
    /// Seconds of the snapshot with disks.
    pub snapshot_disks_s: f64,
    /// Seconds of a snapshot with disks after 10 MiB were written to one disk.
    pub snapshot_incremental_s: f64,
    /// Bytes that snapshot read from all four disks.
    pub incremental_read_bytes: u64,
    /// Distinct non-zero blocks of the four disks, as restored.
    pub disk_distinct: u64,
    /// Of those, blocks that are also pages of the guests' memory.
    pub disk_in_memory: u64,
}

/// Non-zero 4 KiB blocks of a file, by BLAKE3.
fn block_set(path: &Path) -> anyhow::Result<HashSet<[u8; 32]>> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    let mut out = HashSet::new();
    for c in bytes.chunks(PAGE_SIZE) {
        let mut page = [0u8; PAGE_SIZE];
        page[..c.len()].copy_from_slice(c);
        if page.iter().any(|&b| b != 0) {
            out.insert(*blake3::hash(&page).as_bytes());
        }
    }
    Ok(out)
}

fn stored_bytes(c: &Cluster) -> anyhow::Result<u64> {
    let s = c.json(0, &["cluster", "status"])?;
    Ok(s["members"].as_array().context("members")?.iter().map(|m| m["bytes"].as_u64().unwrap_or(0)).sum())
}

/// Allocated bytes of a file.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn one_run(dir: &Path, bin: &Path, accel: &str) -> anyhow::Result<Figures> {
    let vmdir = dir.join("vms");
    std::fs::create_dir_all(&vmdir)?;
    let names: Vec<String> = (1..=GUESTS).map(|i| format!("d{i}")).collect();
    let _reaper = guest::Reaper(names.iter().map(|n| vmdir.join(format!("{n}.qmp"))).collect());
    let launch = vec!["--launch-dir".to_string(), vmdir.display().to_string()];
    let c = Cluster::start_with_args(bin, &dir.join("cluster"), 3, 1, None, vec![launch; 3])?;
    let mut guests = Vec::new();
    let mut images = Vec::new();
    for n in &names {
        let (img, drive) = guest::disk_copy(&vmdir, n)?;
        let drive: Vec<&str> = drive.iter().map(String::as_str).collect();
        guests.push(Guest::start_with(&vmdir, n, MEM_MIB, "disk=1", accel, &drive)?);
        images.push(img);
    }
    for (i, g) in guests.iter().enumerate() {
        g.wait_for("DISK-OK", Duration::from_secs(120))?;
        g.console(&format!("vmcsnap-disk-write own{i} 1"), &format!("DISKWROTE own{i}"), Duration::from_secs(60))?;
        c.json(i % 2, &["vm", "add", &g.name, "--qmp", &g.qmp.display().to_string()])?;
    }
    let mut f = Figures::default();
    let base = block_set(&guest::guest_dir().join("disk.img"))?;
    f.base_blocks = base.len() as u64;
    let mut changed = HashSet::new();
    for img in &images {
        changed.extend(block_set(img)?.into_iter().filter(|b| !base.contains(b)));
    }
    f.changed_blocks = changed.len() as u64;

    // Default KVM: each VM's disk copied.
    let copies = dir.join("kvm");
    std::fs::create_dir_all(&copies)?;
    let t0 = Instant::now();
    for img in &images {
        let to = copies.join(img.file_name().context("name")?);
        let st = std::process::Command::new("cp").arg("--sparse=always").arg(img).arg(&to).status()?;
        anyhow::ensure!(st.success(), "cp failed");
        std::fs::File::open(&to)?.sync_all()?;
        f.kvm_copy_bytes += allocated(&to);
    }
    f.kvm_copy_s = t0.elapsed().as_secs_f64();

    let snap = |name: &str, extra: &[&str]| -> anyhow::Result<(u64, f64, f64)> {
        let before = stored_bytes(&c)?;
        let mut args = vec!["snapshot", "create", name, "--all", "--mode", "live"];
        args.extend_from_slice(extra);
        let t = Instant::now();
        let s = c.json(2, &args)?;
        let secs = t.elapsed().as_secs_f64();
        let pause = s["vms"].as_array().context("vms")?.iter().filter_map(|v| v[1]["pause_ms"].as_f64()).fold(0.0, f64::max);
        Ok((stored_bytes(&c)? - before, secs, pause))
    };
    let (mem_bytes, s0, p0) = snap("mem", &["--no-disks"])?;
    let (all_bytes, s1, p1) = snap("all", &[])?;
    // What a snapshot adds without disks, one after another (memory the idle guests changed,
    // device state, manifest chunks): taken off the one with disks.
    let (churn, _, _) = snap("mem2", &["--no-disks"])?;
    f.stored_memory_bytes = mem_bytes;
    f.stored_all_bytes = all_bytes;
    f.stored_churn_bytes = churn;
    f.stored_disk_bytes = all_bytes.saturating_sub(churn);
    f.snapshot_no_disks_s = s0;
    f.snapshot_disks_s = s1;
    f.pause_no_disks_ms = p0;
    f.pause_disks_ms = p1;
    // Incremental: 10 MiB written in one guest, then a snapshot with disks; the bytes every
    // capture read of its disk (the nodes' "disk read" lines).
    guests[0].console("vmcsnap-disk-write inc 10", "DISKWROTE inc", Duration::from_secs(120))?;
    let (_, s2, _) = snap("inc", &[])?;
    f.snapshot_incremental_s = s2;
    f.incremental_read_bytes = c
        .nodes
        .iter()
        .flat_map(|n| std::fs::read_to_string(n.dir.join("node.log")).unwrap_or_default().lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| l.contains("disk read") && l.contains("snapshot=\"inc\""))
        .filter_map(|l| l.split(" read=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    for mut g in guests {
        g.kill();
    }

    // Memory and disks written back, for the memory/disk dedup.
    let out = dir.join("restored");
    std::fs::create_dir_all(&out)?;
    let mut memory = HashSet::new();
    let mut disks = HashSet::new();
    for n in &names {
        let (m, d) = (out.join(format!("{n}.mem")), out.join(format!("{n}.disk")));
        c.json(0, &["snapshot", "restore", "all", "--vm", n, "--to", &format!("file:{}", m.display())])?;
        c.json(0, &["snapshot", "restore", "all", "--vm", n, "--disk", "virtio0", "--to", &format!("file:{}", d.display())])?;
        memory.extend(block_set(&m)?);
        disks.extend(block_set(&d)?);
        let _ = std::fs::remove_file(&m);
        let _ = std::fs::remove_file(&d);
    }
    f.disk_distinct = disks.len() as u64;
    f.disk_in_memory = disks.iter().filter(|b| memory.contains(*b)).count() as u64;
    Ok(f)
}

/// Runs the benchmark `runs` times in `dir`; prints each run and the medians.
pub fn run(dir: &Path, bin: &Path, runs: usize, json: Option<PathBuf>) -> anyhow::Result<()> {
    let accel = guest::accel()?;
    let mut all = Vec::new();
    for r in 0..runs {
        let d = dir.join(format!("run{r}"));
        let f = one_run(&d, bin, &accel)?;
        // Kept (the next run of the benchmark wipes the directory): its node logs say what each capture read.
        println!("run {}: {}", r + 1, serde_json::to_string(&f)?);
        all.push(f);
    }
    let med = |g: &dyn Fn(&Figures) -> f64| -> (f64, f64, f64) {
        let v: Vec<f64> = all.iter().map(g).collect();
        (median(v.clone()), v.iter().cloned().fold(f64::INFINITY, f64::min), v.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
    };
    let mib = |b: f64| b / (1 << 20) as f64;
    let ideal = med(&|f| ((f.base_blocks + f.changed_blocks) * PAGE_SIZE as u64) as f64);
    let stored = med(&|f| f.stored_disk_bytes as f64);
    let ratio = med(&|f| f.stored_disk_bytes as f64 / ((f.base_blocks + f.changed_blocks) * PAGE_SIZE as u64) as f64);
    let kvm = med(&|f| f.kvm_copy_bytes as f64);
    let kvm_ratio = med(&|f| f.stored_disk_bytes as f64 / f.kvm_copy_bytes as f64);
    let p0 = med(&|f| f.pause_no_disks_ms);
    let p1 = med(&|f| f.pause_disks_ms);
    let extra = med(&|f| f.pause_disks_ms - f.pause_no_disks_ms);
    let s0 = med(&|f| f.snapshot_no_disks_s);
    let s1 = med(&|f| f.snapshot_disks_s);
    let inmem = med(&|f| f.disk_in_memory as f64 / f.disk_distinct.max(1) as f64);
    let snap_ratio = med(&|f| f.disk_distinct as f64 / (f.base_blocks + f.changed_blocks) as f64);
    println!("\n{GUESTS} guests ({MEM_MIB} MiB, TCG/KVM: {accel}), disks copied from one 64 MiB ext4 image, 1 MiB of their own each; medians of {runs} runs [min-max]");
    println!("| figure | median [range] | target |");
    println!("| --- | --- | --- |");
    let all_b = med(&|f| f.stored_all_bytes as f64);
    let churn = med(&|f| f.stored_churn_bytes as f64);
    println!("| bytes the snapshot with disks added (R=1) | {:.1} MiB [{:.1}-{:.1}] | - |", mib(all_b.0), mib(all_b.1), mib(all_b.2));
    println!("| bytes the memory-only snapshot after it added | {:.1} MiB [{:.1}-{:.1}] | - |", mib(churn.0), mib(churn.1), mib(churn.2));
    println!("| disk bytes stored (the difference) | {:.1} MiB [{:.1}-{:.1}] | - |", mib(stored.0), mib(stored.1), mib(stored.2));
    println!("| one base image's non-zero blocks + changed blocks | {:.1} MiB [{:.1}-{:.1}] | - |", mib(ideal.0), mib(ideal.1), mib(ideal.2));
    println!("| stored / (base + changed) | {:.2}x [{:.2}-{:.2}] | <= 1.1x |", ratio.0, ratio.1, ratio.2);
    println!("| distinct non-zero disk blocks in the snapshot / (base + changed) | {:.3}x [{:.3}-{:.3}] | - |", snap_ratio.0, snap_ratio.1, snap_ratio.2);
    println!("| default KVM: every disk copied (allocated bytes) | {:.1} MiB [{:.1}-{:.1}] | - |", mib(kvm.0), mib(kvm.1), mib(kvm.2));
    println!("| stored / default KVM | {:.2}x [{:.2}-{:.2}] | - |", kvm_ratio.0, kvm_ratio.1, kvm_ratio.2);
    println!("| longest pause, memory only | {:.0} ms [{:.0}-{:.0}] | - |", p0.0, p0.1, p0.2);
    println!("| longest pause, with disks | {:.0} ms [{:.0}-{:.0}] | <= memory only + 10 ms |", p1.0, p1.1, p1.2);
    println!("| difference (same run) | {:+.0} ms [{:+.0}-{:+.0}] | <= +10 ms |", extra.0, extra.1, extra.2);
    println!("| snapshot time, memory only / with disks | {:.2} s / {:.2} s | - |", s0.0, s1.0);
    let inc = med(&|f| f.incremental_read_bytes as f64);
    let inc_s = med(&|f| f.snapshot_incremental_s);
    println!("| next snapshot after 10 MiB written to one disk: bytes read from all 4 disks | {:.1} MiB [{:.1}-{:.1}] | <= 20 MiB (2x the dirty data) |", mib(inc.0), mib(inc.1), mib(inc.2));
    println!("| its time | {:.2} s [{:.2}-{:.2}] | - |", inc_s.0, inc_s.1, inc_s.2);
    println!("| disk blocks that are also memory pages | {:.1}% [{:.1}-{:.1}] | reported |", inmem.0 * 100.0, inmem.1 * 100.0, inmem.2 * 100.0);
    if let Some(p) = json {
        std::fs::write(&p, serde_json::to_string_pretty(&all)?)?;
        println!("numbers: {}", p.display());
    }
    Ok(())
}
