//! `vmcsnap-testnet bench-store`: the store over time, on real node processes.
//!
//! - **GC**: 10 snapshots of a churning cluster (2 VMs, a quarter of each VM's pages new in
//!   every snapshot), half of them deleted; the bytes on disk of every data directory (`du`)
//!   once garbage collection is done, against the bytes the remaining snapshots reference.
//! - **Repair**: R = 2 on 4 nodes, one removed; the time until every page has 2 copies again,
//!   and the bytes moved against the bytes of the copies lost.
//! - **Rebalance on join**: then a fifth node joins the 3 left; the fraction of the distinct
//!   pages it fetches (ideal: R/(N+1) = 2/4), the time until it holds them, and the time
//!   until the old copies are gone (every page on exactly 2 members again).
//! - **Scrub**: the read rate of a pass at the default throttle, and a snapshot's time while
//!   every node scrubs against the same snapshot with scrubbing off.

use crate::cluster::Cluster;
use crate::stats::median;
use anyhow::{bail, Context};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmcsnap_protocol::PAGE_SIZE;

/// What one run measured.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Figures {
    /// Bytes on disk (all data directories) before the deletions.
    pub gc_disk_before: u64,
    /// Bytes on disk after garbage collection.
    pub gc_disk_after: u64,
    /// Bytes of pages the remaining snapshots reference (all copies).
    pub gc_referenced: u64,
    /// From the deletions until every node's collector was done, in seconds.
    pub gc_seconds: f64,
    /// Seconds from `cluster remove` until every page had 2 copies again.
    pub repair_seconds: f64,
    /// Bytes repair sent.
    pub repair_bytes: u64,
    /// Bytes of the copies the removed node held.
    pub repair_lost_bytes: u64,
    /// Distinct pages of the snapshot.
    pub rebalance_distinct: u64,
    /// Pages the joining node fetched.
    pub rebalance_moved: u64,
    /// Seconds from the join until it held them.
    pub rebalance_seconds: f64,
    /// Seconds from the join until every page was on exactly 2 members again.
    pub rebalance_settled_seconds: f64,
    /// Bytes a second one scrub pass read at the default throttle.
    pub scrub_bytes_per_s: f64,
    /// A snapshot's seconds with scrubbing off, and while every node scrubs.
    pub snapshot_seconds_quiet: f64,
    /// ... while every node scrubs.
    pub snapshot_seconds_scrubbing: f64,
}

fn noise(seed: u64, bytes: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(bytes);
    while out.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn du(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn members(c: &Cluster) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(c.json(0, &["cluster", "status"])?["members"].as_array().context("members")?.clone())
}

fn create(c: &Cluster, i: usize, name: &str, images: &[PathBuf]) -> anyhow::Result<f64> {
    let mut args: Vec<String> = vec!["snapshot".into(), "create".into(), name.into()];
    for (k, p) in images.iter().enumerate() {
        args.push("--vm".into());
        args.push(format!("vm{k}=file:{}", p.display()));
    }
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let t0 = Instant::now();
    c.json(i, &a)?;
    Ok(t0.elapsed().as_secs_f64())
}

/// One run of every figure, in `dir` (wiped by the caller).
pub fn run_once(dir: &Path, bin: &Path, mib: usize) -> anyhow::Result<Figures> {
    let mut f = Figures::default();
    let pages = mib << 20 >> 12;

    // GC.
    let args = vec!["--snapshot-deadline".to_string(), "5s".to_string()];
    let c = Cluster::start_with_args(bin, &dir.join("gc"), 3, 2, None, vec![args; 3])?;
    let mut vms: Vec<Vec<u8>> = (0..2).map(|v| noise(1000 + v, pages * PAGE_SIZE)).collect();
    let images: Vec<PathBuf> = (0..2).map(|v| dir.join(format!("vm{v}.img"))).collect();
    for s in 0..10u64 {
        for (v, mem) in vms.iter_mut().enumerate() {
            if s > 0 {
                // A quarter of the pages, spread over the VM, get new content.
                let fresh = noise(s * 7 + v as u64, pages / 4 * PAGE_SIZE);
                for (k, chunk) in fresh.chunks(PAGE_SIZE).enumerate() {
                    let at = ((k * 4 + s as usize) % pages) * PAGE_SIZE;
                    mem[at..at + PAGE_SIZE].copy_from_slice(chunk);
                }
            }
            std::fs::write(&images[v], &*mem)?;
        }
        create(&c, 0, &format!("s{s}"), &images)?;
    }
    std::thread::sleep(Duration::from_secs(1));
    f.gc_disk_before = (0..3).map(|i| du(&c.nodes[i].dir.join("db"))).sum();
    let t0 = Instant::now();
    let doomed: Vec<String> = (0..10).step_by(2).map(|s| format!("s{s}")).collect();
    let mut a = vec!["snapshot", "delete"];
    a.extend(doomed.iter().map(|s| s.as_str()));
    a.push("--yes");
    c.json(0, &a)?;
    std::thread::sleep(Duration::from_secs(2));
    loop {
        let m = members(&c)?;
        let done = m.iter().all(|m| m["gc"]["state"] == "idle" && m["gc"]["reclaimed_bytes"].as_u64().unwrap_or(0) > 0);
        if done {
            f.gc_referenced = m.iter().filter_map(|m| m["pages"].as_u64()).sum::<u64>() * PAGE_SIZE as u64;
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("garbage collection did not finish in 5 min");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    f.gc_seconds = t0.elapsed().as_secs_f64();
    f.gc_disk_after = (0..3).map(|i| du(&c.nodes[i].dir.join("db"))).sum();
    drop(c);

    // Repair.
    // Short GC timing: the old copies go within seconds of the rebalance.
    let gc_args = ["--snapshot-deadline", "2s", "--gc-interval", "2s"].map(String::from).to_vec();
    let mut c = Cluster::start_with_args(bin, &dir.join("repair"), 4, 2, None, vec![gc_args.clone(); 4])?;
    for (v, img) in images.iter().enumerate() {
        std::fs::write(img, noise(5000 + v as u64, pages * PAGE_SIZE))?;
    }
    create(&c, 0, "r", &images)?;
    let total: u64 = members(&c)?.iter().filter_map(|m| m["pages"].as_u64()).sum();
    f.repair_lost_bytes = members(&c)?.iter().find(|m| m["name"] == "n4").and_then(|m| m["pages"].as_u64()).unwrap_or(0) * PAGE_SIZE as u64;
    let key = dir.join("repair/cluster.key");
    let t0 = Instant::now();
    c.json(0, &["cluster", "remove", "n4", "--key", &key.display().to_string(), "--yes"])?;
    loop {
        let m = members(&c)?;
        let stored: u64 = m.iter().filter(|m| m["name"] != "n4").filter_map(|m| m["pages"].as_u64()).sum();
        if stored == total && f.repair_seconds == 0.0 {
            f.repair_seconds = t0.elapsed().as_secs_f64();
        }
        // Each node publishes what it sent when its cycle ends.
        if f.repair_seconds > 0.0 && m.iter().all(|m| m["repair"]["state"] == "idle") {
            f.repair_bytes = m.iter().filter_map(|m| m["repair"]["bytes_sent"].as_u64()).sum();
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("repair did not finish in 5 min");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Rebalance: a fifth node joins the three left (the removed one is stopped, as its
    // operator would).
    c.stop(3)?;
    f.rebalance_distinct = total / 2;
    let t0 = Instant::now();
    c.add(gc_args)?;
    loop {
        let m = members(&c)?;
        let n5 = m.iter().find(|m| m["name"] == "n5").context("n5 not listed")?;
        let copies = n5["repair"]["copies_made"].as_u64().unwrap_or(0);
        if f.rebalance_seconds == 0.0 && copies > 0 && n5["repair"]["state"] == "idle" {
            f.rebalance_seconds = t0.elapsed().as_secs_f64();
            f.rebalance_moved = copies;
        }
        let stored: u64 = m.iter().filter(|m| m["name"] != "n4").filter_map(|m| m["pages"].as_u64()).sum();
        if f.rebalance_seconds > 0.0 && stored == total {
            f.rebalance_settled_seconds = t0.elapsed().as_secs_f64();
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("rebalance did not finish in 5 min");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(c);

    // Scrub: the same snapshot on a quiet cluster and on one where every node scrubs.
    for (scrubbing, name) in [(false, "quiet"), (true, "scrub")] {
        let interval = if scrubbing { "1s" } else { "24h" };
        let args = vec!["--scrub-interval".to_string(), interval.to_string()];
        let c = Cluster::start_with_args(bin, &dir.join(name), 3, 2, None, vec![args; 3])?;
        for (v, img) in images.iter().enumerate() {
            std::fs::write(img, noise(7000 + v as u64, pages * PAGE_SIZE))?;
        }
        create(&c, 0, "base", &images)?;
        if scrubbing {
            // The read rate of the passes over what is stored.
            let checked = |c: &Cluster| -> anyhow::Result<u64> { Ok(members(c)?.iter().filter(|m| m["name"] == "n1").filter_map(|m| m["scrub"]["pages_checked"].as_u64()).sum()) };
            std::thread::sleep(Duration::from_secs(2));
            let (a, t0) = (checked(&c)?, Instant::now());
            std::thread::sleep(Duration::from_secs(5));
            f.scrub_bytes_per_s = (checked(&c)? - a) as f64 * PAGE_SIZE as f64 / t0.elapsed().as_secs_f64();
        }
        for (v, img) in images.iter().enumerate() {
            std::fs::write(img, noise(9000 + v as u64, pages * PAGE_SIZE))?;
        }
        let secs = create(&c, 1, "next", &images)?;
        if scrubbing {
            f.snapshot_seconds_scrubbing = secs;
        } else {
            f.snapshot_seconds_quiet = secs;
        }
    }
    Ok(f)
}

/// Runs `runs` times and prints the medians (and every run).
pub fn run(dir: &Path, bin: &Path, runs: usize, mib: usize, json: bool) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for r in 0..runs {
        let d = dir.join(format!("run{r}"));
        std::fs::create_dir_all(&d)?;
        let f = run_once(&d, bin, mib)?;
        eprintln!("run {}: {f:?}", r + 1);
        all.push(f);
        let _ = std::fs::remove_dir_all(&d);
    }
    let med = |g: fn(&Figures) -> f64| median(all.iter().map(g).collect());
    let range = |g: fn(&Figures) -> f64| {
        let v: Vec<f64> = all.iter().map(g).collect();
        (v.iter().cloned().fold(f64::INFINITY, f64::min), v.iter().cloned().fold(0.0, f64::max))
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let mib_f = |b: f64| b / (1u64 << 20) as f64;
    println!("bench-store: {runs} runs, VMs of {mib} MiB; median [min, max]");
    let ratio = |f: &Figures| f.gc_disk_after as f64 / f.gc_referenced as f64;
    let (lo, hi) = range(ratio);
    println!("GC: on disk after / referenced by the remaining snapshots  {:.3} [{lo:.3}, {hi:.3}]  (target <= 1.10)", med(ratio));
    println!("    on disk before {:.0} MiB, after {:.0} MiB, referenced {:.0} MiB; done {:.1} s after the deletions (grace 15 s)",
        mib_f(med(|f| f.gc_disk_before as f64)), mib_f(med(|f| f.gc_disk_after as f64)), mib_f(med(|f| f.gc_referenced as f64)), med(|f| f.gc_seconds));
    let moved = |f: &Figures| f.repair_bytes as f64 / f.repair_lost_bytes.max(1) as f64;
    let (lo, hi) = range(|f| f.repair_seconds);
    println!("repair: every page at 2 copies {:.2} s [{lo:.2}, {hi:.2}] after `cluster remove`; moved / lost {:.3}  (target <= 1.1)", med(|f| f.repair_seconds), med(moved));
    let share = |f: &Figures| f.rebalance_moved as f64 / f.rebalance_distinct.max(1) as f64;
    let (lo, hi) = range(share);
    println!("rebalance: a 4th member joins (R = 2): it fetches {:.3} [{lo:.3}, {hi:.3}] of the pages (ideal R/(N+1) = 0.500; moved / ideal {:.3}) in {:.2} s; old copies gone {:.1} s after the join (GC grace 12 s)",
        med(share), med(share) / 0.5, med(|f| f.rebalance_seconds), med(|f| f.rebalance_settled_seconds));
    println!("scrub: {:.1} MiB/s at the default throttle (32 MiB/s); a snapshot takes {:.2} s quiet, {:.2} s while every node scrubs",
        mib_f(med(|f| f.scrub_bytes_per_s)), med(|f| f.snapshot_seconds_quiet), med(|f| f.snapshot_seconds_scrubbing));
    Ok(())
}
