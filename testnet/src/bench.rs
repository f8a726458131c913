//! The cluster benchmark: real guests on several node processes, snapshotted and rolled back
//! by vmcsnap (replicas 1 and 2) and by the default KVM way (each VM migrated by QEMU to its
//! own file, fsynced; optionally copied to a second host), in one run, for stop-copy and
//! pre-copy. Prints a table per mode with the goals checked, the reduction broken down, and a
//! placement simulation; writes the numbers as JSON and an SVG chart.

use crate::cluster::Cluster;
use crate::guest::{self, Guest, QmpSync};
use crate::chart::{self, Panel, Series};
use anyhow::{bail, Context};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmcsnap_protocol::{hash_page, PageHash, PAGE_SIZE};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Working directory (wiped first).
    pub dir: PathBuf,
    /// Node processes (hosts); each runs `guests_per_host` guests.
    pub hosts: usize,
    /// Guests per host.
    pub guests_per_host: usize,
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// MiB of random data (`fill`) and of shared page cache (`cache`) in the guests that have them.
    pub data_mib: u32,
    /// Seconds from the first snapshot to the second.
    pub interval_s: u64,
    /// Capture modes to measure.
    pub modes: Vec<String>,
    /// Where to write the SVG chart.
    pub svg: PathBuf,
    /// Keys per placement simulation.
    pub sim_keys: u64,
    /// A hugetlbfs mount to back every guest's RAM with (private huge pages), or `None` for
    /// QEMU's default anonymous memory.
    pub hugepages: Option<PathBuf>,
}

/// QEMU arguments that put a guest's `mem` MiB of RAM in private huge pages from the hugetlbfs
/// mount `dir` (none when `dir` is `None`).
pub fn memory_args(dir: Option<&Path>, mem: u32) -> Vec<String> {
    match dir {
        None => Vec::new(),
        Some(d) => vec![
            "-object".into(),
            format!("memory-backend-file,id=ram,mem-path={},size={mem}M,share=off", d.display()),
            "-machine".into(),
            "memory-backend=ram".into(),
        ],
    }
}

/// Checks that the hugetlbfs mount `dir` has `pages` free 2 MiB pages.
fn check_hugepages(dir: &Path, pages: u64) -> anyhow::Result<()> {
    let free: u64 = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .context("this kernel has no 2 MiB huge pages")?
        .trim()
        .parse()?;
    let is_hugetlbfs = std::fs::read_to_string("/proc/mounts")?.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(2) == Some(&"hugetlbfs") && f.get(1).map(Path::new) == Some(dir)
    });
    if !is_hugetlbfs {
        bail!("--hugepages {}: not a hugetlbfs mount (mount -t hugetlbfs none {0})", dir.display());
    }
    if free < pages {
        bail!("--hugepages: {free} free 2 MiB pages, the guests and their restores need {pages} (as root: echo {pages} > /proc/sys/vm/nr_hugepages)");
    }
    Ok(())
}

/// One column's numbers for one mode.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Bytes stored cluster-wide after the first snapshot.
    pub bytes: u64,
    /// Snapshot time until every byte is durable, s.
    pub durable_s: f64,
    /// Longest VM pause, ms.
    pub pause_max_ms: f64,
    /// Median VM pause, ms.
    pub pause_median_ms: f64,
    /// Time from one pause start to the last, ms (vmcsnap's one cut; `None` for default KVM).
    pub pause_skew_ms: Option<f64>,
    /// Rollback of every VM on other hosts, until all run, s.
    pub running_s: f64,
    /// Rollback of every VM on other hosts, until all memory is resident, s (default KVM:
    /// the same as `running_s`).
    pub restore_s: f64,
    /// Bytes written cluster-wide by the second snapshot.
    pub second_bytes: u64,
    /// The second snapshot's time until durable, s.
    pub second_s: f64,
    /// The second snapshot's longest VM pause, ms. QEMU's background snapshot of anonymous
    /// guest RAM pauses longer from the second time on (likely because the first leaves
    /// never-written memory mapped 4 KiB at a time, which later write protections walk;
    /// docs/benchmarks.md, "Guests in huge pages"): the first snapshot of fresh guests is
    /// default KVM's best case.
    pub second_pause_max_ms: f64,
    /// Each VM's pause in the first snapshot, ms, by VM name.
    pub pauses: Vec<(String, f64)>,
    /// vmcsnap: the first snapshot's stage marks on the initiator (ms since it began there).
    pub stages: Vec<(String, f64)>,
    /// Where the machine's CPU went during the rollback (until all memory was resident).
    pub rollback_cpu: crate::cpu::Cpu,
    /// The rolled-back guests, asked once the rollback was over.
    pub rollback_checked: Checked,
    /// vmcsnap: where the machine's CPU went during the first snapshot (until durable); the
    /// guests' own vCPUs are in the QEMUs' share. Not measured for default KVM (zero cores).
    pub snapshot_cpu: crate::cpu::Cpu,
}

/// The reduction of raw guest memory, by cause (pages).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Breakdown {
    /// Pages of guest RAM over all VMs.
    pub total: u64,
    /// All-zero pages.
    pub zero: u64,
    /// Non-zero pages repeating an earlier page of the same VM.
    pub dup_within_vm: u64,
    /// Non-zero pages held by another VM of the snapshot too (beyond the first copy).
    pub dup_across_vms: u64,
    /// Distinct non-zero pages (each stored once per replica): the content limit.
    pub unique: u64,
    /// Distinct non-zero chunk pages of the VMs' manifest trees (stored like guest pages).
    pub manifest_chunks: u64,
    /// The least any manifest naming each distinct page once by its 32-byte hash takes, in
    /// pages (`unique` × 32 bytes): a floor no layout of 32-byte references goes under.
    pub manifest_floor: u64,
    /// Distinct non-zero chunk pages the same trees would take with 16-byte references (256
    /// per chunk): what shorter references would save (not what vmcsnap stores).
    pub manifest_chunks_16: u64,
    /// Of the second snapshot's distinct pages: already stored by the first.
    pub second_unchanged: u64,
    /// The second snapshot's distinct non-zero pages.
    pub second_unique: u64,
}

#[derive(Clone)]
pub(crate) struct Vm {
    pub(crate) name: String,
    pub(crate) kargs: String,
    pub(crate) ready: &'static str,
    /// Index of the host it runs on now.
    pub(crate) host: usize,
    /// The md5 of the random data the guest wrote at boot (`fill`), which every rollback
    /// must give back; `None` for guests without it.
    pub(crate) data_md5: Option<String>,
}

fn workloads(hosts: usize, per_host: usize, data: u32) -> Vec<Vm> {
    let kinds: [(&str, String, &'static str); 4] = [
        ("idle", String::new(), "BOOT-OK"),
        ("random", format!("fill={data}"), "FILL-DONE"),
        ("writer", "writer=1".into(), "WRITER-STARTED"),
        ("cache", format!("cache={data}"), "CACHE-DONE"),
    ];
    let mut out = Vec::new();
    for h in 0..hosts {
        for k in 0..per_host {
            // Every host gets one guest with the shared page cache; the others rotate.
            let (kind, kargs, ready) = if k == per_host - 1 { &kinds[3] } else { &kinds[(h + k) % 3] };
            out.push(Vm { name: format!("{kind}{}", out.len() + 1), kargs: kargs.clone(), ready, host: h, data_md5: None });
        }
    }
    out
}


fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

pub(crate) fn stored_bytes(c: &Cluster) -> anyhow::Result<u64> {
    let s = c.json(0, &["cluster", "status"])?;
    Ok(s["members"].as_array().context("members")?.iter().map(|m| m["bytes"].as_u64().unwrap_or(0)).sum())
}

/// Default KVM: every VM migrated by QEMU to its own file at once, then fsynced (and, for
/// "+ copy", copied to a second host's directory and fsynced). Returns (bytes, durable s,
/// pauses ms, copy s).
pub(crate) fn kvm_snapshot(vmdir: &Path, out: &Path, copy_to: Option<&Path>, vms: &[Vm], mode: &str) -> anyhow::Result<(u64, f64, Vec<f64>, f64)> {
    std::fs::create_dir_all(out)?;
    let t0 = Instant::now();
    let results: Vec<anyhow::Result<(u64, f64, f64)>> = std::thread::scope(|s| {
        let hs: Vec<_> = vms
            .iter()
            .map(|vm| {
                s.spawn(move || -> anyhow::Result<(u64, f64, f64)> {
                    kvm_snapshot_one(vmdir, out, vm, mode, t0).with_context(|| format!("default KVM's snapshot of {}", vm.name))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked")))).collect()
    });
    let mut bytes = 0;
    let mut durable: f64 = 0.0;
    let mut pauses = Vec::new();
    for r in results {
        let (b, d, p) = r?;
        bytes += b;
        durable = durable.max(d);
        pauses.push(p);
    }
    let mut copy_s = 0.0;
    if let Some(dst) = copy_to {
        std::fs::create_dir_all(dst)?;
        let t = Instant::now();
        std::thread::scope(|s| -> anyhow::Result<()> {
            let hs: Vec<_> = vms
                .iter()
                .map(|vm| {
                    s.spawn(move || -> anyhow::Result<()> {
                        let to = dst.join(format!("{}.save", vm.name));
                        std::fs::copy(out.join(format!("{}.save", vm.name)), &to)?;
                        std::fs::File::open(&to)?.sync_all()?;
                        Ok(())
                    })
                })
                .collect();
            for h in hs {
                h.join().map_err(|_| anyhow::anyhow!("copy thread panicked"))??;
            }
            Ok(())
        })?;
        copy_s = t.elapsed().as_secs_f64();
    }
    Ok((bytes, durable, pauses, copy_s))
}

/// One VM's snapshot by QEMU itself to `out/NAME.save` (see [`kvm_snapshot`]): bytes, seconds
/// since `t0` until the file was durable, the VM's pause in ms.
fn kvm_snapshot_one(vmdir: &Path, out: &Path, vm: &Vm, mode: &str, t0: Instant) -> anyhow::Result<(u64, f64, f64)> {
    let file = out.join(format!("{}.save", vm.name));
    let mut q = QmpSync::connect(&vmdir.join(format!("{}.qmp", vm.name))).context("its monitor")?;
    q.execute("migrate-set-parameters", serde_json::json!({"max-bandwidth": 64u64 << 30, "downtime-limit": 10}))?;
    let uri = format!("exec:cat > {}", file.display());
    let pause_ms = if mode == "live" {
        // QEMU's own background snapshot to its file: the VM runs on.
        let cap = |on: bool| serde_json::json!({ "capabilities": [{ "capability": "background-snapshot", "state": on }] });
        q.execute("migrate-set-capabilities", cap(true))?;
        q.execute("migrate", serde_json::json!({ "uri": uri }))?;
        let v = q.wait_migrated()?;
        q.execute("migrate-set-capabilities", cap(false))?;
        v["downtime"].as_f64().unwrap_or(f64::NAN)
    } else if mode == "stop-copy" {
        let t = Instant::now();
        q.execute("stop", serde_json::json!({}))?;
        q.execute("migrate", serde_json::json!({ "uri": uri }))?;
        q.wait_migrated()?;
        q.execute("cont", serde_json::json!({}))?;
        t.elapsed().as_secs_f64() * 1e3
    } else {
        q.execute("migrate", serde_json::json!({ "uri": uri }))?;
        let v = q.wait_migrated()?;
        let seen = Instant::now();
        // QEMU leaves the source paused after a migration: resume it.
        q.execute("cont", serde_json::json!({}))?;
        v["downtime"].as_f64().unwrap_or(f64::NAN) + seen.elapsed().as_secs_f64() * 1e3
    };
    std::fs::File::open(&file)?.sync_all()?;
    Ok((std::fs::metadata(&file)?.len(), t0.elapsed().as_secs_f64(), pause_ms))
}

/// Default KVM rollback: every VM's QEMU started with `-incoming` from its file, at once;
/// seconds until all run, the CPU spent meanwhile, and what the guests answered when asked
/// afterwards ([`check_guests`]). The guests are killed again after that.
pub(crate) fn kvm_restore(vmdir: &Path, files: &Path, vms: &[Vm], mem: u32, accel: &str, extra: &[String]) -> anyhow::Result<(f64, crate::cpu::Cpu, Checked)> {
    let cpu = crate::cpu::Sample::take();
    let t0 = Instant::now();
    let children: Vec<anyhow::Result<std::process::Child>> = std::thread::scope(|s| {
        let hs: Vec<_> = vms
            .iter()
            .map(|vm| {
                s.spawn(move || -> anyhow::Result<std::process::Child> {
                    let mut argv = Guest::command(vmdir, &vm.name, mem, &vm.kargs, accel)?;
                    argv.extend(extra.iter().cloned());
                    let qmp = vmdir.join(format!("{}.qmp", vm.name));
                    let log = vmdir.join(format!("{}.kvm-restore.log", vm.name));
                    Ok(guest::qemu_restore_from_file(&argv, &files.join(format!("{}.save", vm.name)), &qmp, &log)?.1)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked")))).collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu.until(&crate::cpu::Sample::take());
    let checked = if children.iter().all(|c| c.is_ok()) { check_guests(vmdir, vms, "kvm") } else { Checked::default() };
    let mut first_err = None;
    for c in children {
        match c {
            Ok(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok((secs, cpu, checked))
}

/// What a rollback's guests answered once it was over (outside its timing).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Checked {
    /// Guests that answered on their console, random data intact where they have it.
    pub ok: usize,
    /// The others: the VM and what went wrong (with the end of its console).
    pub failed: Vec<(String, String)>,
}

impl Checked {
    /// One line for the benchmark's output.
    pub fn line(&self) -> String {
        let mut s = format!("restored guests checked: {} of {} answered with their data intact", self.ok, self.ok + self.failed.len());
        for (vm, why) in &self.failed {
            s.push_str(&format!("\n  FAILED {vm}: {why}"));
        }
        s
    }
}

/// Time a restored guest has to answer on its console.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// Asks every guest of a rollback, in parallel, to answer `vmcsnap-check` on its console, and
/// compares the md5 of the random data of those that wrote some at boot. A guest that crashed
/// or lost memory after its restore reported success shows here; its console log is kept as
/// `NAME.LABEL.log` beside the guest's (the next restore reopens the guest's own log).
pub(crate) fn check_guests(vmdir: &Path, vms: &[Vm], label: &str) -> Checked {
    let answers: Vec<Result<(), String>> = std::thread::scope(|s| {
        let hs: Vec<_> = vms.iter().map(|vm| s.spawn(move || check_guest(vmdir, vm))).collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("the check's thread panicked".into()))).collect()
    });
    let mut checked = Checked::default();
    for (vm, a) in vms.iter().zip(answers) {
        match a {
            Ok(()) => checked.ok += 1,
            Err(why) => {
                let (kept, tail) = keep_console(vmdir, vm, label);
                checked.failed.push((vm.name.clone(), format!("{why}; its console ends {tail:?} (kept in {})", kept.display())));
            }
        }
    }
    checked
}

/// Copies a guest's console log to `NAME.LABEL.log` (a restore's QEMU reopens the guest's own
/// log, so the next rollback would overwrite it); returns the copy and the log's last 600
/// bytes.
fn keep_console(vmdir: &Path, vm: &Vm, label: &str) -> (PathBuf, String) {
    let log = vmdir.join(format!("{}.log", vm.name));
    let kept = vmdir.join(format!("{}.{label}.log", vm.name));
    let tail = std::fs::read(&log).map(|b| String::from_utf8_lossy(&b[b.len().saturating_sub(600)..]).into_owned()).unwrap_or_default();
    let _ = std::fs::copy(&log, &kept);
    (kept, tail)
}

/// For a rollback that failed: every guest's console kept (see [`keep_console`]), and the
/// end of each that shows a kernel crash.
fn consoles_after_failure(vmdir: &Path, vms: &[Vm], label: &str) -> String {
    let mut crashed = Vec::new();
    for vm in vms {
        let (_, tail) = keep_console(vmdir, vm, label);
        if ["Kernel panic", "BUG:", "Oops"].iter().any(|m| tail.contains(m)) {
            crashed.push(format!("{}'s console ends {tail:?}", vm.name));
        }
    }
    let mut s = format!("the guests' consoles are kept as NAME.{label}.log in {}", vmdir.display());
    if !crashed.is_empty() {
        s.push_str("; ");
        s.push_str(&crashed.join("; "));
    }
    s
}

fn check_guest(vmdir: &Path, vm: &Vm) -> Result<(), String> {
    let line = Guest::paths(vmdir, &vm.name).console("vmcsnap-check", "CHECK", CHECK_TIMEOUT).map_err(|e| format!("{e:#}"))?;
    match &vm.data_md5 {
        Some(want) if guest::md5_of(&line) != *want => Err(format!("its random data's md5 is {} after the rollback, {want} before", guest::md5_of(&line))),
        _ => Ok(()),
    }
}

/// The floor under "every VM running" on this machine: `guests` QEMUs with the bench's
/// command line and `-incoming defer`, started at once, as every restore (default KVM's and
/// vmcsnap's) starts its QEMUs before it can load anything. Seconds until each answers on
/// QMP, and the core-seconds they used until then. Every QEMU ends with the call.
pub fn qemu_start(dir: &Path, guests: usize, mem: u32, accel: &str) -> anyhow::Result<(f64, f64)> {
    struct Ended(Vec<std::process::Child>);
    impl Drop for Ended {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    std::fs::create_dir_all(dir)?;
    let mut qemus = Ended(Vec::new());
    let mut qmps = Vec::new();
    let t0 = Instant::now();
    for i in 0..guests {
        let name = format!("start{i}");
        let mut argv = Guest::command(dir, &name, mem, "", accel)?;
        argv.extend(["-incoming".to_string(), "defer".to_string()]);
        let qmp = dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&qmp);
        let child = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot start qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
        qemus.0.push(child);
        qmps.push(qmp);
    }
    for (i, qmp) in qmps.iter().enumerate() {
        while QmpSync::connect(qmp).is_err() {
            if let Ok(Some(st)) = qemus.0[i].try_wait() {
                bail!("QEMU {i} exited ({st}) before it answered on {}", qmp.display());
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("QEMU {i} did not answer on {} within 60 s", qmp.display());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let ticks: u64 = qemus.0.iter().filter_map(|c| crate::cpu::process_ticks(c.id())).sum();
    Ok((secs, ticks as f64 / crate::cpu::clock_ticks()))
}

pub(crate) fn kill_all(vmdir: &Path, vms: &[Vm]) {
    for vm in vms {
        guest::kill_by_qmp(&vmdir.join(format!("{}.qmp", vm.name)));
    }
    std::thread::sleep(Duration::from_millis(300));
}

/// A fresh vmcsnap cluster with every VM registered on its host (`also`: more directories a
/// rollback's QEMU may use, such as a hugetlbfs mount).
pub(crate) fn vmcsnap_cluster(bin: &Path, dir: &Path, hosts: usize, vmdir: &Path, vms: &[Vm], also: &[&Path]) -> anyhow::Result<Cluster> {
    // The guests' sockets and logs live in `vmdir`: a rollback may launch them there.
    let mut launch = vec!["--launch-dir".to_string(), vmdir.display().to_string()];
    for d in also {
        launch.extend(["--launch-dir".to_string(), d.display().to_string()]);
    }
    let c = Cluster::start_with_args(bin, dir, hosts, 1, None, vec![launch; hosts])?;
    for vm in vms {
        let qmp = vmdir.join(format!("{}.qmp", vm.name));
        c.json(vm.host, &["vm", "add", &vm.name, "--qmp", &qmp.display().to_string()])?;
    }
    Ok(c)
}

/// What one vmcsnap snapshot measured.
pub(crate) struct Taken {
    /// Bytes stored cluster-wide after it.
    pub(crate) stored: u64,
    /// Until durable, s.
    pub(crate) secs: f64,
    /// Each VM's pause, ms, by VM name.
    pub(crate) pauses: Vec<(String, f64)>,
    /// First pause to last, ms.
    pub(crate) skew: Option<f64>,
    /// The initiator's stage marks: ms since the snapshot began there, in order.
    pub(crate) stages: Vec<(String, f64)>,
    /// Where the machine's CPU went until the snapshot was durable.
    pub(crate) cpu: crate::cpu::Cpu,
}

/// vmcsnap's snapshot of every VM, from the last host.
pub(crate) fn vmcsnap_snapshot(c: &Cluster, hosts: usize, name: &str, mode: &str, replicas: u8) -> anyhow::Result<Taken> {
    let logs: Vec<PathBuf> = c.nodes.iter().map(|n| n.dir.join("node.log")).collect();
    let before: Vec<u64> = logs.iter().map(|l| std::fs::metadata(l).map(|m| m.len()).unwrap_or(0)).collect();
    let cpu = crate::cpu::Sample::take();
    let t = Instant::now();
    let s = c.json(hosts - 1, &["snapshot", "create", name, "--all", "--mode", mode, "--replicas", &replicas.to_string()])?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu.until(&crate::cpu::Sample::take());
    let mut initiator = Vec::new();
    for (i, (l, from)) in logs.iter().zip(before).enumerate() {
        let marks = stages(l, from);
        println!("  {name} R={replicas} stages on {}: {}", Cluster::name(i), marks.iter().map(|(vm, st, ms)| format!("{}{st} {ms:.0}", vm.as_deref().map(|v| format!("{v}:")).unwrap_or_default())).collect::<Vec<_>>().join(", "));
        if i == hosts - 1 {
            initiator = marks.into_iter().filter(|(vm, _, _)| vm.is_none()).map(|(_, st, ms)| (st, ms)).collect();
        }
    }
    let pauses: Vec<(String, f64)> =
        s["vms"].as_array().context("vms")?.iter().map(|v| (v[0].as_str().unwrap_or("?").to_string(), v[1]["pause_ms"].as_f64().unwrap_or(f64::NAN))).collect();
    println!("  {name} R={replicas} pauses: {}", pauses.iter().map(|(n, p)| format!("{n} {p:.0} ms")).collect::<Vec<_>>().join(", "));
    let skew = s["pause_skew_us"].as_f64().map(|u| u / 1000.0);
    println!("  {name} R={replicas} {}", cpu.line());
    Ok(Taken { stored: stored_bytes(c)?, secs, pauses, skew, stages: initiator, cpu })
}

impl Taken {
    /// The pauses alone, ms.
    pub(crate) fn pause_ms(&self) -> Vec<f64> {
        self.pauses.iter().map(|p| p.1).collect()
    }
}

/// The stage marks (`vmcsnap::stage` log lines) a node logged past byte `from` of its log:
/// (VM, stage, ms) — ms since the snapshot began on that node (for a VM's own marks, since its
/// migration began).
fn stages(log: &Path, from: u64) -> Vec<(Option<String>, String, f64)> {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or(&[]));
    let field = |l: &str, k: &str| {
        let at = l.find(&format!(" {k}="))? + k.len() + 2;
        let rest = &l[at..];
        let v = if let Some(q) = rest.strip_prefix('"') { q.split('"').next() } else { rest.split_whitespace().next() };
        v.map(str::to_string)
    };
    text.lines()
        .filter(|l| l.contains("vmcsnap::stage"))
        .filter_map(|l| Some((field(l, "vm"), field(l, "stage")?, field(l, "ms")?.parse().ok()?)))
        .collect()
}

/// vmcsnap's rollback of every VM, each on the next host (lazy). Returns seconds until all
/// run and until all memory is resident, and the CPU spent until then. "All run" is the
/// latest VM's time to running on its host plus what the command spent outside the hosts'
/// restores (finding the record, asking the hosts, answering).
pub(crate) fn vmcsnap_restore(c: &Cluster, hosts: usize, name: &str, vms: &mut [Vm]) -> anyhow::Result<(f64, f64, crate::cpu::Cpu)> {
    let mut args: Vec<String> = vec!["snapshot".into(), "restore".into(), name.into(), "--launch".into()];
    for vm in vms.iter() {
        args.push("--on".into());
        args.push(format!("{}={}", vm.name, Cluster::name((vm.host + 1) % hosts)));
    }
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let cpu = crate::cpu::Sample::take();
    let t = Instant::now();
    let r = c.json(0, &a)?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu.until(&crate::cpu::Sample::take());
    let (mut running, mut elapsed) = (0f64, 0f64);
    for s in r.as_array().context("restored")? {
        if s["vm_status"] != "running" {
            bail!("{} restored but {}", s["vm"], s["vm_status"]);
        }
        running = running.max(s["running_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        elapsed = elapsed.max(s["elapsed_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        println!(
            "  {} on {}: {} running after {:.2} s, resident after {:.2} s, {} pages asked for{}",
            s["vm"].as_str().unwrap_or("?"),
            s["host"].as_str().unwrap_or("?"),
            if s["lazy"] == true { "lazy" } else { "eager" },
            s["running_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0,
            s["elapsed_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0,
            s["pages_requested"].as_u64().unwrap_or(0),
            s["note"].as_str().map(|n| format!(" ({n})")).unwrap_or_default()
        );
    }
    for vm in vms.iter_mut() {
        vm.host = (vm.host + 1) % hosts;
    }
    Ok((running + (secs - elapsed).max(0.0), secs, cpu))
}

/// Page hashes of every VM of a snapshot, from raw restores into `tmp` (deleted after).
fn snapshot_hashes(c: &Cluster, name: &str, vms: &[Vm], tmp: &Path) -> anyhow::Result<Vec<Vec<PageHash>>> {
    std::fs::create_dir_all(tmp)?;
    let mut out = Vec::new();
    for vm in vms {
        let f = tmp.join(format!("{}.ram", vm.name));
        c.json(0, &["snapshot", "restore", name, "--vm", &vm.name, "--to", &format!("file:{}", f.display()), "--force"])?;
        let data = std::fs::read(&f)?;
        let _ = std::fs::remove_file(&f);
        out.push(data.chunks(PAGE_SIZE).map(hash_page).collect());
    }
    Ok(out)
}

/// Writes snapshots' page hashes to `path` (`VMCSNAP_BENCH_HASHES=FILE`), for offline study of
/// the manifest format: per snapshot the VM count, then per VM its page count and hashes
/// (counts as little-endian u32s).
fn write_hashes(path: &Path, snapshots: &[&Vec<Vec<PageHash>>]) -> anyhow::Result<()> {
    let mut out = Vec::new();
    for snap in snapshots {
        out.extend((snap.len() as u32).to_le_bytes());
        for vm in snap.iter() {
            out.extend((vm.len() as u32).to_le_bytes());
            vm.iter().for_each(|h| out.extend(h.0));
        }
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

fn breakdown(first: &[Vec<PageHash>], second: &[Vec<PageHash>]) -> Breakdown {
    let mut b = Breakdown::default();
    let mut all: HashSet<PageHash> = HashSet::new();
    let mut per_vm_distinct = 0u64;
    for vm in first {
        b.total += vm.len() as u64;
        let nz: Vec<&PageHash> = vm.iter().filter(|h| !h.is_zero()).collect();
        b.zero += (vm.len() - nz.len()) as u64;
        let own: HashSet<&PageHash> = nz.iter().copied().collect();
        b.dup_within_vm += (nz.len() - own.len()) as u64;
        per_vm_distinct += own.len() as u64;
        all.extend(own.into_iter().copied());
    }
    b.unique = all.len() as u64;
    b.dup_across_vms = per_vm_distinct - b.unique;
    let chunks: HashSet<PageHash> = first.iter().flat_map(|vm| vmcsnap_protocol::manifest::build_manifest(vm).chunks.into_iter().map(|(h, _)| h)).collect();
    b.manifest_chunks = chunks.len() as u64;
    b.manifest_floor = (b.unique * 32).div_ceil(PAGE_SIZE as u64);
    b.manifest_chunks_16 = short_reference_chunks(first, 16);
    let second_all: HashSet<&PageHash> = second.iter().flatten().filter(|h| !h.is_zero()).collect();
    b.second_unique = second_all.len() as u64;
    b.second_unchanged = second_all.iter().filter(|h| all.contains(**h)).count() as u64;
    b
}

/// Distinct non-zero chunk pages of manifest trees built as vmcsnap builds them (page order,
/// a zero region gives no chunk) but with references cut to `bytes` bytes, `PAGE_SIZE / bytes`
/// to a chunk.
fn short_reference_chunks(vms: &[Vec<PageHash>], bytes: usize) -> u64 {
    let fanout = PAGE_SIZE / bytes;
    let mut chunks: HashSet<PageHash> = HashSet::new();
    for vm in vms {
        let mut level: Vec<PageHash> = vm.clone();
        while level.len() > fanout {
            level = level
                .chunks(fanout)
                .map(|group| {
                    if group.iter().all(PageHash::is_zero) {
                        return PageHash([0; 32]);
                    }
                    let mut page: Vec<u8> = group.iter().flat_map(|h| h.0[..bytes].iter().copied()).collect();
                    page.resize(PAGE_SIZE, 0);
                    let h = hash_page(&page);
                    chunks.insert(h);
                    h
                })
                .collect();
        }
    }
    chunks.len() as u64
}

/// One mode's results.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ModeResult {
    /// `stop-copy` or `pre-copy`.
    pub mode: String,
    /// Default KVM, default KVM + copy, vmcsnap R=1, vmcsnap R=2.
    pub columns: Vec<Column>,
    /// The reduction by cause (from vmcsnap R=1's snapshots).
    pub breakdown: Breakdown,
}

/// Boots `vms` in `vmdir` with the QEMU arguments `mem_args` (see [`memory_args`]; `hugepages`
/// is their hugetlbfs mount, if any) and waits until each is ready.
fn boot_guests(vmdir: &Path, vms: &mut [Vm], mem: u32, accel: &str, mem_args: &[String], hugepages: Option<&Path>) -> anyhow::Result<Vec<Guest>> {
    if let Some(d) = hugepages {
        // Each guest, and each restored guest beside the ones still ending.
        check_hugepages(d, 2 * vms.len() as u64 * (mem as u64).div_ceil(2))?;
        println!("guest RAM in private huge pages from {}", d.display());
    }
    let mem_refs: Vec<&str> = mem_args.iter().map(String::as_str).collect();
    let mut guests = Vec::new();
    for vm in vms.iter() {
        guests.push(Guest::start_with(vmdir, &vm.name, mem, &vm.kargs, accel, &mem_refs)?);
    }
    for (g, vm) in guests.iter().zip(vms) {
        let line = g.wait_for(vm.ready, Duration::from_secs(300)).with_context(|| format!("guest {}", vm.name))?;
        vm.data_md5 = (vm.ready == "FILL-DONE").then(|| guest::md5_of(&line));
    }
    println!("guests ready");
    Ok(guests)
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions, bin: &Path) -> anyhow::Result<serde_json::Value> {
    if opts.hosts < 2 {
        bail!("--hosts must be at least 2 (restores go to other hosts)");
    }
    let _ = std::fs::remove_dir_all(&opts.dir);
    std::fs::create_dir_all(&opts.dir)?;
    let dir = std::fs::canonicalize(&opts.dir)?;
    let accel = guest::accel()?;
    let vmdir = dir.join("vms");
    let mut vms = workloads(opts.hosts, opts.guests_per_host, opts.data_mib);
    println!(
        "{} guests of {} MiB ({accel}) on {} hosts: {}",
        vms.len(),
        opts.mem_mib,
        opts.hosts,
        vms.iter().map(|v| format!("{} on {}", v.name, Cluster::name(v.host))).collect::<Vec<_>>().join(", ")
    );
    // Every guest ends with the run, also when it fails half-way (restores launch guests that
    // belong to no `Guest` handle).
    let _reaper = guest::Reaper(vms.iter().map(|v| vmdir.join(format!("{}.qmp", v.name))).collect());
    let hugepages = opts.hugepages.as_deref().map(std::fs::canonicalize).transpose()?;
    let mem_args = memory_args(hugepages.as_deref(), opts.mem_mib);
    let also: Vec<&Path> = hugepages.iter().map(PathBuf::as_path).collect();
    let mut guests = boot_guests(&vmdir, &mut vms, opts.mem_mib, &accel, &mem_args, hugepages.as_deref())?;
    let placed = vms.clone();
    let mut results = Vec::new();
    for (m, mode) in opts.modes.iter().enumerate() {
        let mode = mode.as_str();
        println!("\n== {mode} ==");
        if m > 0 {
            // Each mode starts from freshly booted guests where the first one placed them. The
            // last rollback's guests run in the seccomp sandbox a restore gives QEMU, which
            // kills a QEMU asked to `migrate exec:` (default KVM's snapshot to its file).
            kill_all(&vmdir, &vms);
            drop(std::mem::take(&mut guests));
            vms = placed.clone();
            guests = boot_guests(&vmdir, &mut vms, opts.mem_mib, &accel, &mem_args, hugepages.as_deref())?;
        }
        let mdir = dir.join(mode);
        // Default KVM.
        let t_first = Instant::now();
        let (kvm_bytes, kvm_s, kvm_pauses, copy_s) = kvm_snapshot(&vmdir, &mdir.join("kvm/first"), Some(&mdir.join("kvm/copy")), &vms, mode)?;
        println!("default KVM: {:.0} MiB in {kvm_s:.2} s (+ copy {copy_s:.2} s)", mib(kvm_bytes));
        // vmcsnap, R=1 and R=2, each in its own fresh cluster.
        let mut clusters = Vec::new();
        let mut firsts = Vec::new();
        for r in [1u8, 2] {
            let c = vmcsnap_cluster(bin, &mdir.join(format!("r{r}")), opts.hosts, &vmdir, &vms, &also)?;
            let f = vmcsnap_snapshot(&c, opts.hosts, "first", mode, r)?;
            println!("vmcsnap R={r}: {:.0} MiB stored in {:.2} s, pause max {:.0} ms", mib(f.stored), f.secs, f.pause_ms().iter().cloned().fold(0.0, f64::max));
            clusters.push(c);
            firsts.push(f);
        }
        // The second snapshot, an interval after the first.
        let wait = Duration::from_secs(opts.interval_s).saturating_sub(t_first.elapsed());
        println!("second snapshots in {:.0} s", wait.as_secs_f64());
        std::thread::sleep(wait);
        let (kvm2_bytes, kvm2_s, kvm2_pauses, _) = kvm_snapshot(&vmdir, &mdir.join("kvm/second"), None, &vms, mode)?;
        let _ = std::fs::remove_dir_all(mdir.join("kvm/second"));
        let mut seconds = Vec::new();
        for (c, (r, f)) in clusters.iter().zip([1u8, 2].iter().zip(&firsts)) {
            let s = vmcsnap_snapshot(c, opts.hosts, "second", mode, *r)?;
            println!("vmcsnap R={r} second: {:.1} MiB added in {:.2} s", mib(s.stored - f.stored), s.secs);
            seconds.push((s.stored - f.stored, s.secs, s.pause_ms().into_iter().fold(f64::NAN, f64::max)));
        }
        let h1 = snapshot_hashes(&clusters[0], "first", &vms, &dir.join("ram"))?;
        let h2 = snapshot_hashes(&clusters[0], "second", &vms, &dir.join("ram"))?;
        let bd = breakdown(&h1, &h2);
        if let Some(f) = std::env::var_os("VMCSNAP_BENCH_HASHES") {
            write_hashes(Path::new(&f), &[&h1, &h2])?;
        }
        drop((h1, h2));
        // Rollbacks: default KVM, then vmcsnap R=1, then R=2 (whose guests run on).
        kill_all(&vmdir, &vms);
        drop(std::mem::take(&mut guests));
        let (kvm_restore_s, kvm_cpu, kvm_checked) = kvm_restore(&vmdir, &mdir.join("kvm/copy"), &vms, opts.mem_mib, &accel, &mem_args)?;
        println!("default KVM rollback: {kvm_restore_s:.2} s; {}\n  {}", kvm_cpu.line(), kvm_checked.line());
        let restores = vmcsnap_rollbacks(&clusters, opts.hosts, &vmdir, &mut vms, mode)?;
        drop(clusters);
        // `VMCSNAP_BENCH_KEEP=1` keeps the nodes' directories (their `node.log`) for a look.
        if std::env::var_os("VMCSNAP_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&mdir);
        }
        let max = |v: &[f64]| v.iter().cloned().fold(f64::NAN, f64::max);
        let kvm = Column {
            name: "default KVM".into(),
            bytes: kvm_bytes,
            durable_s: kvm_s,
            pause_max_ms: max(&kvm_pauses),
            pause_median_ms: crate::stats::median(kvm_pauses.clone()),
            pause_skew_ms: None,
            running_s: kvm_restore_s,
            restore_s: kvm_restore_s,
            second_bytes: kvm2_bytes,
            second_s: kvm2_s,
            second_pause_max_ms: max(&kvm2_pauses),
            pauses: vms.iter().map(|v| v.name.clone()).zip(kvm_pauses.iter().copied()).collect(),
            stages: vec![],
            rollback_cpu: kvm_cpu,
            rollback_checked: kvm_checked,
            snapshot_cpu: Default::default(),
        };
        let kvm_copy = Column {
            name: "default KVM + copy".into(),
            bytes: 2 * kvm_bytes,
            durable_s: kvm_s + copy_s,
            second_bytes: 2 * kvm2_bytes,
            second_s: kvm2_s + copy_s,
            ..kvm.clone()
        };
        let mut columns = vec![kvm, kvm_copy];
        for (i, ((f, s), rs)) in firsts.iter().zip(&seconds).zip(&restores).enumerate() {
            columns.push(vmcsnap_column(i as u8 + 1, f, *s, rs.clone()));
        }
        let m = ModeResult { mode: mode.to_string(), columns, breakdown: bd };
        print!("{}", table(&m));
        results.push(m);
    }
    // The guests left running by the last rollback.
    kill_all(&vmdir, &vms);

    println!("\nplacement simulation (rendezvous hashing, R=2, {} keys):", opts.sim_keys);
    let sims: Vec<_> = [10usize, 100, 1000].iter().map(|&h| crate::sim::simulate(h, 2, opts.sim_keys, 1)).collect();
    print!("{}", crate::sim::table(&sims));

    let chart = chart::chart(
        &format!("vmcsnap vs default KVM: {} guests x {} MiB on {} hosts ({accel})", vms.len(), opts.mem_mib, opts.hosts),
        &panels(&results),
    )?;
    if let Some(p) = opts.svg.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&opts.svg, chart)?;
    println!("\nchart: {}", opts.svg.display());
    let sim_json: Vec<serde_json::Value> = sims
        .iter()
        .map(|s| {
            serde_json::json!({"hosts": s.hosts, "keys": s.keys, "share_min": s.share_min, "share_max": s.share_max,
                "share_stddev_rel": s.share_stddev_rel, "join_moved": s.join_moved, "join_moved_ideal": s.join_moved_ideal,
                "leave_moved": s.leave_moved, "leave_moved_ideal": s.leave_moved_ideal})
        })
        .collect();
    Ok(serde_json::json!({
        "guests": vms.len(), "mem_mib": opts.mem_mib, "hosts": opts.hosts, "accel": accel,
        "modes": results, "placement": sim_json,
    }))
}

/// vmcsnap's rollbacks of the first snapshot, one per cluster in turn (R=1, then R=2), each VM
/// on another host; the last one's guests run on. (every VM running, all memory resident)
/// in seconds, per cluster.
fn vmcsnap_rollbacks(clusters: &[Cluster], hosts: usize, vmdir: &Path, vms: &mut [Vm], mode: &str) -> anyhow::Result<Vec<Rollback>> {
    let mut restores = Vec::new();
    for (i, c) in clusters.iter().enumerate() {
        let label = format!("{mode}-r{}", i + 1);
        let (running, secs, cpu) = match vmcsnap_restore(c, hosts, "first", vms) {
            Ok(r) => r,
            Err(e) => return Err(e.context(consoles_after_failure(vmdir, vms, &label))),
        };
        let checked = check_guests(vmdir, vms, &label);
        println!("vmcsnap R={} rollback: every VM running after {running:.2} s, all memory resident after {secs:.2} s; {}\n  {}", i + 1, cpu.line(), checked.line());
        restores.push(Rollback { running_s: running, resident_s: secs, cpu, checked });
        if i + 1 < clusters.len() {
            kill_all(vmdir, vms);
            // The next rollback puts every VM where this one found it.
            for vm in vms.iter_mut() {
                vm.host = (vm.host + hosts - 1) % hosts;
            }
        }
    }
    Ok(restores)
}

/// One vmcsnap rollback of every VM.
#[derive(Clone)]
struct Rollback {
    /// Until every VM ran, s.
    running_s: f64,
    /// Until all memory was resident, s.
    resident_s: f64,
    /// The CPU spent until then.
    cpu: crate::cpu::Cpu,
    /// What the guests answered afterwards.
    checked: Checked,
}

/// vmcsnap's column at `replicas`: its first snapshot, its second (bytes, s, longest pause ms)
/// and its rollback.
fn vmcsnap_column(replicas: u8, f: &Taken, second: (u64, f64, f64), rollback: Rollback) -> Column {
    Column {
        name: format!("vmcsnap R={replicas}"),
        bytes: f.stored,
        durable_s: f.secs,
        pause_max_ms: f.pause_ms().into_iter().fold(f64::NAN, f64::max),
        pause_median_ms: crate::stats::median(f.pause_ms()),
        pause_skew_ms: f.skew,
        running_s: rollback.running_s,
        restore_s: rollback.resident_s,
        second_bytes: second.0,
        second_s: second.1,
        second_pause_max_ms: second.2,
        pauses: f.pauses.clone(),
        stages: f.stages.clone(),
        rollback_cpu: rollback.cpu,
        rollback_checked: rollback.checked,
        snapshot_cpu: f.cpu.clone(),
    }
}

fn panels(results: &[ModeResult]) -> Vec<Panel> {
    let groups: Vec<String> = results.first().map(|m| m.columns.iter().map(|c| c.name.clone()).collect()).unwrap_or_default();
    let panel = |title: &str, unit: &str, f: &dyn Fn(&Column) -> f64| Panel {
        title: title.into(),
        unit: unit.into(),
        groups: groups.clone(),
        series: results.iter().map(|m| Series { name: m.mode.clone(), values: m.columns.iter().map(f).collect() }).collect(),
    };
    let mut out = vec![
        panel("bytes stored", "MiB", &|c| mib(c.bytes)),
        panel("snapshot until durable", "s", &|c| c.durable_s),
        panel("longest VM pause", "ms", &|c| c.pause_max_ms),
        panel("rollback: every VM running", "s", &|c| c.running_s),
        panel("rollback: all memory resident", "s", &|c| c.restore_s),
        panel("second snapshot: bytes written", "MiB", &|c| mib(c.second_bytes)),
        panel("second snapshot: time", "s", &|c| c.second_s),
    ];
    // Raw guest memory by what became of it (the same guests in every mode: the first mode's).
    if let Some(b) = results.first().map(|m| &m.breakdown) {
        let pages = |n: u64| mib(n * PAGE_SIZE as u64);
        out.push(Panel {
            title: "raw guest memory, by cause".into(),
            unit: "MiB".into(),
            groups: ["zero", "duplicate within a VM", "duplicate across VMs", "distinct (stored)"].map(String::from).to_vec(),
            series: vec![Series { name: "first snapshot".into(), values: vec![pages(b.zero), pages(b.dup_within_vm), pages(b.dup_across_vms), pages(b.unique)] }],
        });
    }
    for m in results {
        // Each VM's pause: default KVM's and each vmcsnap column's ("+ copy" pauses as default KVM).
        let cols: Vec<&Column> = m.columns.iter().filter(|c| !c.name.ends_with("+ copy")).collect();
        out.push(named_panel(format!("VM pause per VM ({})", m.mode), &cols, |c| &c.pauses));
        // When each stage ended on the initiator, for each vmcsnap column.
        let cols: Vec<&Column> = m.columns.iter().filter(|c| !c.stages.is_empty()).collect();
        out.push(named_panel(format!("stage ends on the initiator ({})", m.mode), &cols, |c| &c.stages));
    }
    out
}

/// A panel in ms of named figures (`figures` of each column): one group per name, in the order
/// the columns first name them; a series per column.
fn named_panel(title: String, cols: &[&Column], figures: impl Fn(&Column) -> &Vec<(String, f64)>) -> Panel {
    let mut groups: Vec<String> = Vec::new();
    for (name, _) in cols.iter().flat_map(|c| figures(c)) {
        if !groups.contains(name) {
            groups.push(name.clone());
        }
    }
    let series = cols
        .iter()
        .map(|c| Series { name: c.name.clone(), values: groups.iter().map(|g| figures(c).iter().find(|f| f.0 == *g).map_or(f64::NAN, |f| f.1)).collect() })
        .collect();
    Panel { title, unit: "ms".into(), groups, series }
}

/// The table of one mode, with the goals checked.
pub fn table(m: &ModeResult) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let c = &m.columns;
    let _ = writeln!(o, "\n{} — same run, same guests", m.mode);
    let _ = write!(o, "{:<34}", "");
    for col in c {
        let _ = write!(o, " {:>19}", col.name);
    }
    let _ = writeln!(o);
    let row = |o: &mut String, label: &str, f: &dyn Fn(&Column) -> String| {
        let _ = write!(o, "{label:<34}");
        for col in c {
            let _ = write!(o, " {:>19}", f(col));
        }
        let _ = writeln!(o);
    };
    let kvm = &c[0];
    row(&mut o, "bytes stored cluster-wide", &|x| format!("{:.1} MiB", mib(x.bytes)));
    row(&mut o, "reduction vs default KVM", &|x| format!("{:+.1}%", (1.0 - x.bytes as f64 / kvm.bytes as f64) * 100.0));
    row(&mut o, "snapshot until durable", &|x| format!("{:.2} s", x.durable_s));
    row(&mut o, "time vs default KVM", &|x| format!("{:+.1}%", (1.0 - x.durable_s / kvm.durable_s) * 100.0));
    row(&mut o, "VM pause, max", &|x| format!("{:.0} ms", x.pause_max_ms));
    row(&mut o, "VM pause, median", &|x| format!("{:.0} ms", x.pause_median_ms));
    row(&mut o, "pause skew (one cut)", &|x| x.pause_skew_ms.map(|s| format!("{s:.1} ms")).unwrap_or_else(|| "-".into()));
    row(&mut o, "rollback: every VM running", &|x| format!("{:.2} s", x.running_s));
    row(&mut o, "rollback: all memory resident", &|x| format!("{:.2} s", x.restore_s));
    row(&mut o, "rollback: guests intact after", &|x| format!("{} of {}", x.rollback_checked.ok, x.rollback_checked.ok + x.rollback_checked.failed.len()));
    row(&mut o, "second snapshot: bytes written", &|x| format!("{:.1} MiB", mib(x.second_bytes)));
    row(&mut o, "second snapshot: time", &|x| format!("{:.2} s", x.second_s));
    row(&mut o, "second snapshot: VM pause, max", &|x| format!("{:.0} ms", x.second_pause_max_ms));
    let b = &m.breakdown;
    let pct = |n: u64| n as f64 * 100.0 / b.total.max(1) as f64;
    let _ = writeln!(
        o,
        "raw memory {} pages: zero {:.1}%, duplicate within a VM {:.1}%, duplicate across VMs {:.1}%, unique {:.1}%; \
second snapshot: {:.1}% of its {} distinct pages unchanged since the first",
        b.total,
        pct(b.zero),
        pct(b.dup_within_vm),
        pct(b.dup_across_vms),
        pct(b.unique),
        b.second_unchanged as f64 * 100.0 / b.second_unique.max(1) as f64,
        b.second_unique
    );
    for line in goals(m) {
        let _ = writeln!(o, "{line}");
    }
    o
}

/// The goals, each MET or MISSED with its numbers.
pub fn goals(m: &ModeResult) -> Vec<String> {
    let c = &m.columns;
    let (kvm, copy, r1, r2) = (&c[0], &c[1], &c[2], &c[3]);
    let verdict = |ok: bool| if ok { "MET   " } else { "MISSED" };
    let b = &m.breakdown;
    let stored = r1.bytes / PAGE_SIZE as u64;
    let over = stored as f64 / b.unique.max(1) as f64 - 1.0;
    let bytes_red = 1.0 - r1.bytes as f64 / kvm.bytes as f64;
    let time_red = 1.0 - r1.durable_s / kvm.durable_s;
    let mut out = vec![
        format!("{} R=1 stores >= 30% fewer bytes than default KVM: {:.1}% fewer", verdict(bytes_red >= 0.30), bytes_red * 100.0),
        format!("{} R=1 snapshot time >= 63% below default KVM: {:+.1}%", verdict(time_red >= 0.63), -time_red * 100.0),
        format!(
            "{} R=1 bytes within +1% of the content limit: {:+.2}% ({} pages stored for {} distinct non-zero pages: manifest chunks {}, other pages {} (device state; in pre-copy also page versions a later round replaced, referenced by nothing and left to GC); any manifest of 32-byte references takes at least {} pages, {:+.2}%; 16-byte references would take {} chunks, {:+.2}%)",
            verdict(over <= 0.01),
            over * 100.0,
            stored,
            b.unique,
            b.manifest_chunks,
            stored as i64 - b.unique as i64 - b.manifest_chunks as i64,
            b.manifest_floor,
            (stored as f64 - b.manifest_chunks as f64 + b.manifest_floor as f64) / b.unique.max(1) as f64 * 100.0 - 100.0,
            b.manifest_chunks_16,
            (stored as f64 - b.manifest_chunks as f64 + b.manifest_chunks_16 as f64) / b.unique.max(1) as f64 * 100.0 - 100.0
        ),
        format!(
            "{} R=2 beats default KVM + copy on bytes ({:.1} vs {:.1} MiB) and time ({:.2} vs {:.2} s)",
            verdict(r2.bytes < copy.bytes && r2.durable_s < copy.durable_s),
            mib(r2.bytes),
            mib(copy.bytes),
            r2.durable_s,
            copy.durable_s
        ),
    ];
    for r in [r1, r2] {
        out.push(format!(
            "{} {} longest pause no longer than default KVM's: {:.0} vs {:.0} ms",
            verdict(r.pause_max_ms <= kvm.pause_max_ms),
            r.name,
            r.pause_max_ms,
            kvm.pause_max_ms
        ));
        out.push(format!(
            "{} {} longest pause no longer than default KVM's at the second snapshot: {:.0} vs {:.0} ms",
            verdict(r.second_pause_max_ms <= kvm.second_pause_max_ms),
            r.name,
            r.second_pause_max_ms,
            kvm.second_pause_max_ms
        ));
        out.push(format!(
            "{} {} rollback, every VM running within 0.3x default KVM's: {:.2} vs {:.2} s ({:.2}x)",
            verdict(r.running_s <= 0.3 * kvm.running_s),
            r.name,
            r.running_s,
            kvm.running_s,
            r.running_s / kvm.running_s
        ));
        out.push(format!(
            "{} {} rollback, all memory resident within 1.5x default KVM's: {:.2} vs {:.2} s ({:.2}x)",
            verdict(r.restore_s <= 1.5 * kvm.restore_s),
            r.name,
            r.restore_s,
            kvm.restore_s,
            r.restore_s / kvm.restore_s
        ));
        let c = &r.snapshot_cpu;
        if c.cores > 0 {
            out.push(format!(
                "   {} first snapshot's CPU until durable: {:.2} core-s ({:.0}% of the machine; nodes {:.2}, QEMUs {:.2}, helpers {:.2})",
                r.name,
                c.busy_s,
                100.0 * c.busy_share(),
                c.nodes_s,
                c.qemus_s,
                c.helpers_s
            ));
        }
        let (c, k) = (&r.rollback_cpu, &kvm.rollback_cpu);
        if c.cores > 0 && k.cores > 0 {
            out.push(format!(
                "   {} rollback's CPU until resident: {:.2} core-s ({:.0}% of the machine; nodes {:.2}, helpers {:.2}, QEMUs {:.2} with \
                 their running guests) against default KVM's {:.2} ({:.0}%); the nodes' and helpers' work alone takes {} cores {:.2} s \
                 ({:.2}x default KVM's rollback)",
                r.name,
                c.busy_s,
                100.0 * c.busy_share(),
                c.nodes_s,
                c.helpers_s,
                c.qemus_s,
                k.busy_s,
                100.0 * k.busy_share(),
                c.cores,
                (c.nodes_s + c.helpers_s) / c.cores as f64,
                (c.nodes_s + c.helpers_s) / c.cores as f64 / kvm.restore_s
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_rollback_keeps_every_console_and_quotes_the_crashed_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vms = workloads(2, 1, 16);
        std::fs::write(dir.path().join(format!("{}.log", vms[0].name)), "[ 84.9] BUG: kernel NULL pointer dereference\n[ 84.9] Kernel panic - not syncing: Fatal exception in interrupt\n").expect("log");
        std::fs::write(dir.path().join(format!("{}.log", vms[1].name)), "CACHE-DONE\n").expect("log");
        let said = consoles_after_failure(dir.path(), &vms, "live-r1");
        assert!(said.contains(&format!("{}'s console ends", vms[0].name)) && said.contains("Kernel panic"), "{said}");
        assert!(!said.contains(&format!("{}'s console", vms[1].name)), "{said}");
        for vm in &vms {
            let kept = std::fs::read_to_string(dir.path().join(format!("{}.live-r1.log", vm.name))).expect("kept");
            assert_eq!(kept, std::fs::read_to_string(dir.path().join(format!("{}.log", vm.name))).expect("log"));
        }
    }

    #[test]
    fn every_host_has_a_cache_guest_and_names_are_unique() {
        let l: Vec<(String, usize)> = workloads(3, 2, 1).into_iter().map(|v| (v.name, v.host)).collect();
        assert_eq!(l.len(), 6);
        for h in 0..3 {
            assert!(l.iter().any(|(n, host)| *host == h && n.starts_with("cache")));
        }
        let names: HashSet<&String> = l.iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 6);
    }

    #[test]
    fn breakdown_counts_each_cause_once() {
        let h = |i: u8| PageHash([i; 32]);
        let z = PageHash([0; 32]);
        let first = vec![vec![h(1), h(1), z, h(2)], vec![h(2), h(3), z, z]];
        let second = vec![vec![h(1), h(4)]];
        let b = breakdown(&first, &second);
        assert_eq!((b.total, b.zero, b.dup_within_vm, b.dup_across_vms, b.unique), (8, 3, 1, 1, 3));
        assert_eq!((b.second_unique, b.second_unchanged), (2, 1));
        assert_eq!(b.manifest_chunks, 0, "a manifest of 4 pages is its root alone");
        // Two VMs of 200 pages: two leaf chunks each (128 + 72 hashes), the same in both;
        // a third VM of zero pages only has a zero chunk, never stored.
        let vm: Vec<PageHash> = (0..200u32).map(|i| PageHash(*blake3::hash(&i.to_le_bytes()).as_bytes())).collect();
        let b = breakdown(&[vm.clone(), vm, vec![z; 200]], &[]);
        assert_eq!(b.manifest_chunks, 2);
        // 200 distinct pages, 32 bytes each: 6,400 bytes, two pages at least; with 16-byte
        // references the 200 fit the root.
        assert_eq!((b.manifest_floor, b.manifest_chunks_16), (2, 0));
        // 300 pages: three chunks of 32-byte references (128, 128, 44), two of 16-byte ones.
        let vm: Vec<PageHash> = (0..300u32).map(|i| PageHash(*blake3::hash(&i.to_le_bytes()).as_bytes())).collect();
        let b = breakdown(&[vm.clone(), vm], &[]);
        assert_eq!((b.manifest_chunks, b.manifest_floor, b.manifest_chunks_16), (3, 3, 2));
    }
}
