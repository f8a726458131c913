//! `vmcsnap-testnet`: a real local cluster, a VM memory generator, the demo and the benchmark.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmcsnap_testnet::cluster::{self, Cluster};
use vmcsnap_testnet::gen::{self, GenConfig};
use vmcsnap_testnet::{pagestats, vmcsnap_bin};
use vmcsnap_protocol::units::human_bytes;

#[derive(Parser)]
#[command(name = "vmcsnap-testnet", version, about = "A real local vmcsnap cluster: node processes on loopback, generated VM memory, demo and benchmark")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct GenArgs {
    /// Number of VMs.
    #[arg(long, default_value_t = 4)]
    vms: usize,
    /// Memory per VM (K, M, G suffixes; binary units), a multiple of 4 KiB.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    size: u64,
    /// Fraction of zero pages.
    #[arg(long, default_value_t = 0.61)]
    zero: f64,
    /// Fraction of non-zero pages shared by every VM of the image.
    #[arg(long, default_value_t = 0.25)]
    shared: f64,
    /// Fraction of non-zero pages that repeat a page of the same VM.
    #[arg(long, default_value_t = 0.15)]
    duplicate: f64,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl GenArgs {
    fn config(&self) -> anyhow::Result<GenConfig> {
        if self.size == 0 || !self.size.is_multiple_of(4096) {
            bail!("--size must be a positive multiple of 4 KiB");
        }
        let c = GenConfig { vms: self.vms, pages: self.size / 4096, zero: self.zero, shared: self.shared, duplicate: self.duplicate, seed: self.seed };
        c.validate()?;
        Ok(c)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Start N nodes on loopback in the background and print how to reach them.
    Up {
        /// Nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Directory for the nodes' data.
        #[arg(long, default_value = ".testnet/cluster")]
        dir: PathBuf,
        /// First port (node i listens on PORT+i); free ports are picked when omitted.
        #[arg(long)]
        base_port: Option<u16>,
        /// Replicas.
        #[arg(long, default_value_t = 2)]
        replicas: u8,
    },
    /// Stop the nodes started by `up`.
    Down {
        /// The directory given to `up`.
        #[arg(long, default_value = ".testnet/cluster")]
        dir: PathBuf,
    },
    /// Write synthetic VM memory images (vm0.img, vm1.img, ...).
    Gen {
        /// Output directory.
        #[arg(long, default_value = ".testnet/images")]
        out: PathBuf,
        #[command(flatten)]
        gen: GenArgs,
    },
    /// 3 nodes, 3 real QEMU guests on two of them: a live cut from the third, every guest
    /// killed and rolled back on another host, its memory checked from inside, the figures
    /// beside default KVM's. With --generated: 4 generated memory images instead, snapshot on
    /// one host, restore on another with the first stopped.
    Demo {
        /// Working directory (wiped first).
        #[arg(long, default_value = ".testnet/demo")]
        dir: PathBuf,
        /// The generated-memory demo (no guests; --vms, --size and the other generator
        /// options apply).
        #[arg(long)]
        generated: bool,
        #[command(flatten)]
        gen: GenArgs,
    },
    /// Real guests: VM pause, snapshot and restore times of vmcsnap against QEMU's own
    /// migration to a file and `-incoming` from it, same guests, same run.
    BenchVm {
        /// Working directory (wiped first).
        #[arg(long, default_value = ".testnet/bench-vm")]
        dir: PathBuf,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 256)]
        mem: u32,
        /// Runs per workload (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The cluster benchmark: real guests on several hosts, vmcsnap (R=1, R=2) against the
    /// default KVM way (QEMU migration to a file per VM, fsynced; + a copy on a second host),
    /// stop-copy and pre-copy, in one run; goals checked; an SVG chart; placement simulation.
    Bench {
        /// Working directory (wiped first).
        #[arg(long, default_value = ".testnet/bench")]
        dir: PathBuf,
        /// Hosts (node processes).
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Guests per host.
        #[arg(long, default_value_t = 2)]
        guests_per_host: usize,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 256)]
        mem: u32,
        /// MiB of random data / shared page cache in the guests that have them.
        #[arg(long, default_value_t = 48)]
        data: u32,
        /// Seconds from the first snapshot to the second.
        #[arg(long, default_value_t = 60)]
        interval: u64,
        /// Capture modes, comma-separated.
        #[arg(long, default_value = "stop-copy,pre-copy", value_delimiter = ',')]
        modes: Vec<String>,
        /// Where to write the chart.
        #[arg(long, default_value = ".testnet/bench/cluster.svg")]
        svg: PathBuf,
        /// Also write every number as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Keys per placement simulation.
        #[arg(long, default_value_t = 1_000_000)]
        sim_keys: u64,
        /// Back every guest's RAM with private huge pages from this hugetlbfs mount (both
        /// sides; as root: `mount -t hugetlbfs none /dev/hugepages`, and enough pages in
        /// /proc/sys/vm/nr_hugepages: twice the guests' memory).
        #[arg(long, value_name = "DIR")]
        hugepages: Option<PathBuf>,
    },
    /// What an idle cluster costs: per cluster size, the time until a joining node is listed
    /// by all, idle CPU and RSS per node process, and the time until a frozen node is listed
    /// down by all.
    BenchIdle {
        /// Working directory (wiped first).
        #[arg(long, default_value = ".testnet/bench-idle")]
        dir: PathBuf,
        /// Cluster sizes, comma-separated (one fresh cluster each).
        #[arg(long, value_delimiter = ',', default_value = "6,24,32")]
        nodes: Vec<usize>,
        /// Seconds to wait after the join before measuring (membership settles).
        #[arg(long, default_value_t = 40)]
        settle: u64,
        /// Seconds per measurement window.
        #[arg(long, default_value_t = 20)]
        window: u64,
        /// Windows per size (median and range are printed).
        #[arg(long, default_value_t = 3)]
        windows: usize,
        /// Skip freezing a node at the end.
        #[arg(long)]
        no_detect: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// SWIM membership simulated at sizes no machine here runs as processes: messages per
    /// host per second while idle, and how fast one failed host is known down by all (the
    /// nodes' own foca state machines and parameters, on a virtual clock).
    SwimSim {
        /// Cluster sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        hosts: Vec<u32>,
        /// Virtual seconds idle before counting.
        #[arg(long, default_value_t = 20)]
        warmup: u64,
        /// Virtual seconds counted.
        #[arg(long, default_value_t = 60)]
        window: u64,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Placement simulation for 10, 100 and 1,000 hosts: share balance, keys moved when one
    /// host joins or leaves; then what computing a key's owners costs against asking whether
    /// one host owns it (what repair and GC ask of every page).
    Placement {
        /// Keys per simulation.
        #[arg(long, default_value_t = 1_000_000)]
        keys: u64,
        /// Replicas.
        #[arg(long, default_value_t = 2)]
        replicas: usize,
    },
    /// Disks in the cut: 4 guests whose disks are copies of one image; bytes stored against
    /// one image plus what changed and against copying every disk (default KVM), the live
    /// cut's pause with and without disks, memory/disk dedup.
    BenchDisks {
        /// Working directory (wiped first).
        #[arg(long, default_value = ".testnet/bench-disks")]
        dir: PathBuf,
        /// Runs, each on a fresh cluster (medians reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also write every run's figures here as JSON.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// The store over time: bytes on disk after garbage collection against what the remaining
    /// snapshots reference, repair time and bytes after a removal, scrub rate and its cost.
    BenchStore {
        /// Working directory (wiped first).
        #[arg(long, default_value = ".testnet/bench-store")]
        dir: PathBuf,
        /// Runs (medians reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Memory of each of the two VMs, in MiB.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// Print every run as JSON.
        #[arg(long)]
        json: bool,
    },
    /// How long QEMUs take to start on this machine, all at once (the bench's command line,
    /// `-incoming defer`), until each answers on QMP: the floor under any rollback's "every VM
    /// running", default KVM's and vmcsnap's alike.
    QemuStart {
        /// Working directory (wiped first).
        #[arg(long, default_value = ".testnet/qemu-start")]
        dir: PathBuf,
        /// QEMUs started at once.
        #[arg(long, default_value_t = 6)]
        guests: usize,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 256)]
        mem: u32,
        /// Runs (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Fabric throughput on generated memory, 3 nodes: snapshot and restore GB/s, node RSS.
    BenchFabric {
        /// Working directory (wiped first).
        #[arg(long, default_value = ".testnet/bench-fabric")]
        dir: PathBuf,
        /// Fresh clusters to measure (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Replicas.
        #[arg(long, default_value_t = 2)]
        replicas: u8,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Where restores write in memory (tmpfs), as QEMU's `-incoming` would take them.
        #[arg(long, default_value = "/dev/shm")]
        mem_dir: PathBuf,
        #[command(flatten)]
        gen: GenArgs,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim().trim_end_matches("iB").trim_end_matches('B');
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().map(|n| n * mult).map_err(|_| format!("bad size {s:?} (examples: 4096, 64M, 1G)"))
}

fn main() {
    let cli = Cli::parse();
    vmcsnap_testnet::reaper::install();
    let r = run(cli);
    while vmcsnap_testnet::reaper::exiting() {
        std::thread::park(); // the handler exits
    }
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}


fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        if dir.join("testnet.json").exists() {
            bail!("{} holds a running testnet; run `vmcsnap-testnet down --dir {}` first", dir.display(), dir.display());
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    Ok(())
}

fn vm_args(paths: &[PathBuf]) -> Vec<String> {
    let mut a = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        a.push("--vm".to_string());
        a.push(format!("vm{i}=file:{}", p.display()));
    }
    a
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Up { nodes, dir, base_port, replicas } => {
            if dir.join("testnet.json").exists() {
                bail!("a testnet is already up in {}; `vmcsnap-testnet down --dir {}` first", dir.display(), dir.display());
            }
            let mut c = Cluster::start(&vmcsnap_bin(), &dir, nodes, replicas, base_port)?;
            c.detach = true;
            c.save_state()?;
            println!("{} nodes up (replicas {replicas}):", nodes);
            for (i, n) in c.nodes.iter().enumerate() {
                println!("  node {}  {}  data {}  pid {}", i + 1, n.addr, n.dir.display(), n.pid().unwrap_or(0));
            }
            let abs = std::fs::canonicalize(&c.nodes[0].dir)?;
            println!("\nTalk to node 1:\n  export VMCSNAP_NODE={}\n  vmcsnap cluster status", abs.display());
            println!("Stop them:\n  vmcsnap-testnet down --dir {}", dir.display());
            Ok(())
        }
        Cmd::Down { dir } => {
            let n = cluster::down(&dir)?;
            println!("stopped {n} node(s)");
            Ok(())
        }
        Cmd::Gen { out, gen } => {
            let cfg = gen.config()?;
            let t0 = Instant::now();
            let paths = gen::write_images(&cfg, &out)?;
            let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
            let s = pagestats::count(&refs)?;
            println!("wrote {} images of {} to {} in {:.1} s", paths.len(), human_bytes(gen.size), out.display(), t0.elapsed().as_secs_f64());
            print_stats(&s);
            Ok(())
        }
        Cmd::Demo { dir, generated: true, gen } => demo(&dir, &gen),
        Cmd::Demo { dir, generated: false, .. } => vmcsnap_testnet::demovm::run(&dir, &vmcsnap_bin()).map(|_| ()),
        Cmd::BenchVm { dir, mem, runs, json } => bench_vm(&dir, mem, runs, json),
        Cmd::BenchDisks { dir, runs, json } => {
            fresh_dir(&dir)?;
            let dir = std::path::absolute(&dir)?;
            vmcsnap_testnet::benchdisk::run(&dir, &vmcsnap_bin(), runs, json)
        }
        Cmd::BenchStore { dir, runs, mib, json } => {
            fresh_dir(&dir)?;
            vmcsnap_testnet::benchstore::run(&dir, &vmcsnap_bin(), runs, mib, json)
        }
        Cmd::QemuStart { dir, guests, mem, runs } => {
            fresh_dir(&dir)?;
            let dir = std::path::absolute(&dir)?;
            let accel = vmcsnap_testnet::guest::accel()?;
            let (mut secs, mut cpus) = (Vec::new(), Vec::new());
            for run in 0..runs.max(1) {
                let (s, c) = vmcsnap_testnet::bench::qemu_start(&dir, guests, mem, &accel)?;
                println!("run {run}: {guests} QEMU{} ({accel}, {mem} MiB) answering QMP after {s:.3} s; their CPU {c:.2} core-s", if guests == 1 { "" } else { "s" });
                secs.push(s);
                cpus.push(c);
            }
            let ((s0, s1), (c0, c1)) = (vmcsnap_testnet::stats::range(&secs), vmcsnap_testnet::stats::range(&cpus));
            let (s, c) = (vmcsnap_testnet::stats::median(secs), vmcsnap_testnet::stats::median(cpus));
            println!("median of {runs} runs: {s:.3} s [{s0:.3}–{s1:.3}], {c:.2} core-s [{c0:.2}–{c1:.2}]");
            Ok(())
        }
        Cmd::BenchFabric { dir, runs, replicas, json, mem_dir, gen } => bench(&dir, runs, replicas, json, &mem_dir, &gen),
        Cmd::Bench { dir, hosts, guests_per_host, mem, data, interval, modes, svg, json, sim_keys, hugepages } => {
            for m in &modes {
                if !["stop-copy", "pre-copy", "live"].contains(&m.as_str()) {
                    bail!("--modes takes stop-copy, pre-copy and/or live, not {m:?}");
                }
            }
            let opts = vmcsnap_testnet::bench::BenchOptions { dir, hosts, guests_per_host, mem_mib: mem, data_mib: data, interval_s: interval, modes, svg, sim_keys, hugepages };
            let out = vmcsnap_testnet::bench::run(&opts, &vmcsnap_bin())?;
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&out)?)?;
                println!("numbers: {}", p.display());
            }
            Ok(())
        }
        Cmd::BenchIdle { dir, nodes, settle, window, windows, no_detect, json } => {
            if windows == 0 || window == 0 {
                bail!("--window and --windows must be positive");
            }
            fresh_dir(&dir)?;
            let opts = vmcsnap_testnet::idle::IdleOptions { sizes: nodes, settle: Duration::from_secs(settle), window: Duration::from_secs(window), windows, detect: !no_detect };
            let results = vmcsnap_testnet::idle::run(&vmcsnap_bin(), &dir, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                print!("{}", vmcsnap_testnet::idle::table(&results, &opts));
            }
            Ok(())
        }
        Cmd::SwimSim { hosts, warmup, window, seed, json } => {
            if hosts.iter().any(|&h| h < 3) || window == 0 {
                bail!("--hosts must be at least 3 each and --window positive");
            }
            let mut results = Vec::new();
            for h in hosts {
                eprintln!("simulating {h} hosts...");
                results.push(vmcsnap_testnet::swimsim::simulate(h, Duration::from_secs(warmup), Duration::from_secs(window), Duration::from_secs(120), seed));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                print!("{}", vmcsnap_testnet::swimsim::table(&results));
            }
            Ok(())
        }
        Cmd::Placement { keys, replicas } => {
            let sims: Vec<_> = [10usize, 100, 1000].iter().map(|&h| vmcsnap_testnet::sim::simulate(h, replicas, keys, 1)).collect();
            print!("{}", vmcsnap_testnet::sim::table(&sims));
            print!("{}", vmcsnap_testnet::sim::cost_table(&[10, 100, 1000, 10_000], replicas, keys.min(1_000_000)));
            Ok(())
        }
    }
}

fn print_stats(s: &pagestats::PageStats) {
    let nonzero = s.total - s.zero;
    println!(
        "  {} pages: {:.1}% zero; {} non-zero, {} distinct within each VM, {} distinct over all VMs ({:.2}x dedup of non-zero pages)",
        s.total,
        s.zero as f64 * 100.0 / s.total.max(1) as f64,
        nonzero,
        s.per_vm_distinct_nonzero,
        s.distinct_nonzero,
        nonzero as f64 / s.distinct_nonzero.max(1) as f64
    );
}

fn demo(dir: &Path, gen: &GenArgs) -> anyhow::Result<()> {
    let cfg = gen.config()?;
    fresh_dir(dir)?;
    let bin = vmcsnap_bin();
    println!("== vmcsnap demo: 3 nodes on loopback, {} generated VMs of {} ==", cfg.vms, human_bytes(gen.size));
    let mut c = Cluster::start(&bin, &dir.join("cluster"), 3, 2, None)?;
    for (i, n) in c.nodes.iter().enumerate() {
        println!("node {} listening on {} (data in {})", i + 1, n.addr, n.dir.display());
    }
    let t = Instant::now();
    let paths = gen::write_images(&cfg, &dir.join("images"))?;
    println!("generated {} VM images in {:.1} s", paths.len(), t.elapsed().as_secs_f64());
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let stats = pagestats::count(&refs)?;
    print_stats(&stats);

    println!("\n$ vmcsnap snapshot create demo {} --node node1", vm_args(&paths).join(" "));
    let mut args = vec!["snapshot".to_string(), "create".into(), "demo".into()];
    args.extend(vm_args(&paths));
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let t = Instant::now();
    c.cli_visible(0, &a)?;
    let snap_s = t.elapsed().as_secs_f64();
    let stored = c.stored_pages(0)? * 4096;

    println!("\nstopping node 1 (the host that took the snapshot)");
    c.stop(0)?;
    let target = dir.join("restored-vm1.img");
    let to = format!("file:{}", std::fs::canonicalize(dir)?.join("restored-vm1.img").display());
    println!("$ vmcsnap snapshot restore demo --vm vm1 --to {to} --node node3");
    let t = Instant::now();
    c.cli_visible(2, &["snapshot", "restore", "demo", "--vm", "vm1", "--to", &to])?;
    let restore_s = t.elapsed().as_secs_f64();
    let identical = std::fs::read(&target)? == std::fs::read(&paths[1])?;

    let raw = stats.total * 4096;
    let unique = stats.distinct_nonzero * 4096;
    println!("\n{:<44} {:>12}", "raw VM memory (default KVM stores all of it)", human_bytes(raw));
    println!("{:<44} {:>12}", "distinct non-zero pages (one copy)", human_bytes(unique));
    println!("{:<44} {:>12}", "stored cluster-wide (replicas 2, + manifests)", human_bytes(stored));
    println!("{:<44} {:>11.1}%", "reduction vs raw, one copy", 100.0 * (1.0 - unique as f64 / raw as f64));
    println!("{:<44} {:>11.1}%", "reduction vs raw, with 2 replicas", 100.0 * (1.0 - stored as f64 / raw as f64));
    println!("{:<44} {:>10.2} s", "snapshot time (4 VMs, until durable)", snap_s);
    println!("{:<44} {:>10.2} s", "restore time (vm1 on node 3, node 1 down)", restore_s);
    println!("{:<44} {:>12}", "restored vm1 byte-identical", if identical { "yes" } else { "NO" });
    drop(c);
    if !identical {
        bail!("restored image differs from the original");
    }
    println!("\nall nodes stopped; files are in {}", dir.display());
    Ok(())
}


/// Restores every VM of `snap` on node `node` into `out_dir`, checks each against its image,
/// deletes it, and returns (seconds, bytes fetched from peers).
fn restore_all(c: &Cluster, node: usize, snap: &str, paths: &[PathBuf], out_dir: &Path) -> anyhow::Result<(f64, u64)> {
    std::fs::create_dir_all(out_dir)?;
    let out_dir = std::fs::canonicalize(out_dir)?;
    let mut secs = 0.0;
    let mut fetched = 0u64;
    for (i, p) in paths.iter().enumerate() {
        let out = out_dir.join(format!("r{i}.img"));
        let to = format!("file:{}", out.display());
        let t = Instant::now();
        let r = c.json(node, &["snapshot", "restore", snap, "--vm", &format!("vm{i}"), "--to", &to])?;
        secs += t.elapsed().as_secs_f64();
        fetched += r[0]["bytes_fetched"].as_u64().unwrap_or(0);
        if std::fs::read(&out)? != std::fs::read(p)? {
            bail!("restored vm{i} differs from the original");
        }
        std::fs::remove_file(&out)?;
    }
    Ok((secs, fetched))
}

fn bench(dir: &Path, runs: usize, replicas: u8, json: bool, mem_dir: &Path, gen: &GenArgs) -> anyhow::Result<()> {
    let cfg = gen.config()?;
    fresh_dir(dir)?;
    let bin = vmcsnap_bin();
    let paths = gen::write_images(&cfg, &dir.join("images"))?;
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let stats = pagestats::count(&refs)?;
    let raw = stats.total * 4096;
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for run in 0..runs.max(1) {
        let cdir = dir.join(format!("run{run}"));
        let c = Cluster::start(&bin, &cdir, 3, replicas, None)?;
        let mut args = vec!["snapshot".to_string(), "create".into(), "s1".into()];
        args.extend(vm_args(&paths));
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let t = Instant::now();
        let s1 = c.json(0, &a)?;
        let snap1 = t.elapsed().as_secs_f64();
        args[2] = "s2".into();
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let t = Instant::now();
        let s2 = c.json(0, &a)?;
        let snap2 = t.elapsed().as_secs_f64();
        let mem_out = mem_dir.join(format!("vmcsnap-bench-{}", std::process::id()));
        let (restore, fetched) = restore_all(&c, 1, "s1", &paths, &mem_out)?;
        let _ = std::fs::remove_dir_all(&mem_out);
        let (restore_disk, _) = restore_all(&c, 2, "s1", &paths, &cdir.join("restored"))?;
        let rss = (0..3).filter_map(|i| c.peak_rss(i)).max().unwrap_or(0);
        let row = serde_json::json!({
            "run": run,
            "snapshot_s": snap1,
            "snapshot_gbps": raw as f64 / snap1 / 1e9,
            "unique_mbps": s1["new_bytes"].as_u64().unwrap_or(0) as f64 / snap1 / 1e6,
            "sent_mbps": s1["bytes_sent"].as_u64().unwrap_or(0) as f64 / snap1 / 1e6,
            "second_snapshot_s": snap2,
            "second_snapshot_sent": s2["bytes_sent"],
            "restore_s": restore,
            "restore_gbps": raw as f64 / restore / 1e9,
            "restore_fetched": fetched,
            "restore_disk_s": restore_disk,
            "restore_disk_gbps": raw as f64 / restore_disk / 1e9,
            "peak_node_rss": rss,
        });
        if !json {
            println!(
                "run {run}: snapshot {:.2} s ({:.2} GB/s raw, {:.0} MB/s unique), again {:.2} s, restore to memory {:.2} s ({:.2} GB/s), to disk {:.2} s ({:.2} GB/s), peak node RSS {}",
                snap1, row["snapshot_gbps"].as_f64().unwrap_or(0.0), row["unique_mbps"].as_f64().unwrap_or(0.0), snap2, restore,
                row["restore_gbps"].as_f64().unwrap_or(0.0), restore_disk, row["restore_disk_gbps"].as_f64().unwrap_or(0.0), human_bytes(rss)
            );
        }
        rows.push(row);
        drop(c);
        let _ = std::fs::remove_dir_all(&cdir);
    }
    let col = |k: &str| vmcsnap_testnet::stats::median(rows.iter().filter_map(|r| r[k].as_f64()).collect());
    let summary = serde_json::json!({
        "raw_bytes": raw,
        "vms": cfg.vms,
        "replicas": replicas,
        "distinct_nonzero_pages": stats.distinct_nonzero,
        "zero_pages": stats.zero,
        "median": {
            "snapshot_s": col("snapshot_s"), "snapshot_gbps": col("snapshot_gbps"), "unique_mbps": col("unique_mbps"),
            "sent_mbps": col("sent_mbps"), "second_snapshot_s": col("second_snapshot_s"), "restore_s": col("restore_s"),
            "restore_gbps": col("restore_gbps"), "restore_disk_s": col("restore_disk_s"),
            "restore_disk_gbps": col("restore_disk_gbps"), "peak_node_rss": col("peak_node_rss"),
        },
        "runs": rows,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let m = &summary["median"];
        let g = |k: &str| m[k].as_f64().unwrap_or(0.0);
        println!("\nmedian of {} runs, {} raw over {} VMs, 3 nodes, replicas {replicas}:", rows.len(), human_bytes(raw), cfg.vms);
        println!("  snapshot         {:>6.2} s   {:>5.2} GB/s raw   {:>6.0} MB/s unique   {:>6.0} MB/s sent", g("snapshot_s"), g("snapshot_gbps"), g("unique_mbps"), g("sent_mbps"));
        println!("  second snapshot  {:>6.2} s   (no page bytes move)", g("second_snapshot_s"));
        println!("  restore, memory  {:>6.2} s   {:>5.2} GB/s raw   (all VMs on node 2, into tmpfs)", g("restore_s"), g("restore_gbps"));
        println!("  restore, disk    {:>6.2} s   {:>5.2} GB/s raw   (all VMs on node 3, files fsynced)", g("restore_disk_s"), g("restore_disk_gbps"));
        println!("  peak node RSS    {}", human_bytes(g("peak_node_rss") as u64));
    }
    let _ = std::fs::remove_dir_all(dir.join("images"));
    Ok(())
}

/// One workload's measurements in one run (seconds unless named).
#[derive(Default, serde::Serialize, Clone)]
struct VmRow {
    qemu_stop_pause_ms: f64,
    qemu_file_bytes: u64,
    qemu_file_durable_s: f64,
    qemu_live_downtime_ms: f64,
    qemu_restore_s: f64,
    vmcsnap_stop_pause_ms: f64,
    vmcsnap_stop_durable_s: f64,
    vmcsnap_new_bytes: u64,
    vmcsnap_live_downtime_ms: f64,
    vmcsnap_restore_s: f64,
}

fn bench_vm(dir: &Path, mem: u32, runs: usize, json: bool) -> anyhow::Result<()> {
    use vmcsnap_testnet::guest::{self, Guest, QmpSync};
    fresh_dir(dir)?;
    let accel = guest::accel()?;
    let bin = vmcsnap_bin();
    let c = Cluster::start(&bin, &dir.join("cluster"), 3, 2, None)?;
    let vmdir = std::fs::canonicalize(dir)?.join("vms");
    let workloads = [("idle", "", "BOOT-OK"), ("random-64M", "fill=64", "FILL-DONE"), ("writer", "writer=1", "WRITER-STARTED")];
    let mut out = serde_json::Map::new();
    for (wl, kargs, ready) in workloads {
        let mut rows = Vec::new();
        for run in 0..runs.max(1) {
            let name = format!("b{run}{}", wl.replace('-', ""));
            let mut g = Guest::start(&vmdir, &name, mem, kargs, &accel)?;
            g.wait_for(ready, Duration::from_secs(120))?;
            let mut row = VmRow::default();
            let file = vmdir.join(format!("{name}.qemu-save"));
            {
                // Default KVM: stop, migrate to a file, cont (what `virsh save` does, plus fsync).
                let mut q = QmpSync::connect(&g.qmp)?;
                q.execute("migrate-set-parameters", serde_json::json!({"max-bandwidth": 64u64 << 30}))?;
                let t = Instant::now();
                q.execute("stop", serde_json::json!({}))?;
                q.execute("migrate", serde_json::json!({"uri": format!("exec:cat > {}", file.display())}))?;
                q.wait_migrated()?;
                q.execute("cont", serde_json::json!({}))?;
                row.qemu_stop_pause_ms = t.elapsed().as_secs_f64() * 1e3;
                std::fs::File::open(&file)?.sync_all()?;
                row.qemu_file_durable_s = t.elapsed().as_secs_f64();
                row.qemu_file_bytes = std::fs::metadata(&file)?.len();
                // Default KVM, live: migrate to a file while running.
                let live = vmdir.join(format!("{name}.qemu-live"));
                q.execute("migrate", serde_json::json!({"uri": format!("exec:cat > {}", live.display())}))?;
                let v = q.wait_migrated()?;
                row.qemu_live_downtime_ms = v["downtime"].as_f64().unwrap_or(f64::NAN);
                q.execute("cont", serde_json::json!({}))?;
                let _ = std::fs::remove_file(&live);
            }
            let qmp = format!("{name}=qemu:{}", g.qmp.display());
            let t = Instant::now();
            let s = c.json(0, &["snapshot", "create", &format!("{name}-stop"), "--mode", "stop-copy", "--vm", &qmp])?;
            row.vmcsnap_stop_durable_s = t.elapsed().as_secs_f64();
            row.vmcsnap_stop_pause_ms = s["vms"][0][1]["pause_ms"].as_f64().unwrap_or(f64::NAN);
            row.vmcsnap_new_bytes = s["new_bytes"].as_u64().unwrap_or(0);
            let s = c.json(0, &["snapshot", "create", &format!("{name}-live"), "--mode", "pre-copy", "--vm", &qmp])?;
            row.vmcsnap_live_downtime_ms = s["vms"][0][1]["pause_ms"].as_f64().unwrap_or(f64::NAN);
            let argv = Guest::command(&vmdir, &name, mem, kargs, &accel)?;
            g.kill();
            // Default KVM restore: -incoming from the file.
            let (secs, mut child) = guest::qemu_restore_from_file(&argv, &file, &g.qmp, &vmdir.join(format!("{name}.restore.log")))?;
            row.qemu_restore_s = secs;
            let _ = child.kill();
            let _ = child.wait();
            // vmcsnap: launch on another host, stream from the owners, resume (eager: this
            // table compares loading a whole VM with QEMU's own `-incoming`; the cluster
            // benchmark measures the lazy rollback).
            let t = Instant::now();
            let r = c.json(1, &["snapshot", "restore", &format!("{name}-stop"), "--vm", &name, "--launch", "--eager", "--on", "n2"])?;
            row.vmcsnap_restore_s = t.elapsed().as_secs_f64();
            if r[0]["vm_status"] != "running" {
                bail!("{wl}: restored guest is {}", r[0]["vm_status"]);
            }
            Guest::paths(&vmdir, &name).console("vmcsnap-check", "CHECK", Duration::from_secs(30))?;
            guest::kill_by_qmp(&g.qmp);
            let _ = std::fs::remove_file(&file);
            if !json {
                println!(
                    "{wl} run {run}: pause {:.0} ms (QEMU {:.0} ms), live downtime {:.0} ms (QEMU {:.0} ms), durable {:.2} s (QEMU file {:.2} s), restore {:.2} s (QEMU {:.2} s), stored {} new (QEMU file {})",
                    row.vmcsnap_stop_pause_ms, row.qemu_stop_pause_ms, row.vmcsnap_live_downtime_ms, row.qemu_live_downtime_ms,
                    row.vmcsnap_stop_durable_s, row.qemu_file_durable_s, row.vmcsnap_restore_s, row.qemu_restore_s,
                    human_bytes(row.vmcsnap_new_bytes), human_bytes(row.qemu_file_bytes)
                );
            }
            rows.push(row);
        }
        let med = |f: fn(&VmRow) -> f64| vmcsnap_testnet::stats::median(rows.iter().map(f).collect());
        let m = serde_json::json!({
            "qemu_stop_pause_ms": med(|r| r.qemu_stop_pause_ms),
            "vmcsnap_stop_pause_ms": med(|r| r.vmcsnap_stop_pause_ms),
            "qemu_live_downtime_ms": med(|r| r.qemu_live_downtime_ms),
            "vmcsnap_live_downtime_ms": med(|r| r.vmcsnap_live_downtime_ms),
            "qemu_file_durable_s": med(|r| r.qemu_file_durable_s),
            "vmcsnap_stop_durable_s": med(|r| r.vmcsnap_stop_durable_s),
            "qemu_restore_s": med(|r| r.qemu_restore_s),
            "vmcsnap_restore_s": med(|r| r.vmcsnap_restore_s),
            "qemu_file_bytes": med(|r| r.qemu_file_bytes as f64),
            "vmcsnap_new_bytes": med(|r| r.vmcsnap_new_bytes as f64),
        });
        if !json {
            let g = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
            println!("\n{wl} ({mem} MiB, {accel}), median of {}:", rows.len());
            println!("  {:<34} {:>12} {:>12} {:>8}", "", "QEMU (file)", "vmcsnap", "ratio");
            for (label, a, b) in [
                ("stop-copy pause, ms", "qemu_stop_pause_ms", "vmcsnap_stop_pause_ms"),
                ("pre-copy downtime, ms", "qemu_live_downtime_ms", "vmcsnap_live_downtime_ms"),
                ("snapshot until durable, s", "qemu_file_durable_s", "vmcsnap_stop_durable_s"),
                ("restore until running, s", "qemu_restore_s", "vmcsnap_restore_s"),
            ] {
                println!("  {label:<34} {:>12.3} {:>12.3} {:>7.2}x", g(a), g(b), g(b) / g(a));
            }
            println!("  {:<34} {:>12} {:>12}", "bytes stored (vmcsnap: new, 1 copy)", human_bytes(g("qemu_file_bytes") as u64), human_bytes(g("vmcsnap_new_bytes") as u64));
            println!();
        }
        out.insert(wl.to_string(), serde_json::json!({"median": m, "runs": rows}));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"mem_mib": mem, "accel": accel, "workloads": out}))?);
    }
    Ok(())
}
