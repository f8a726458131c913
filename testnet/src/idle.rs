//! What a cluster costs while it does nothing: real node processes on loopback, no snapshot
//! and no restore running, measured from `/proc`.
//!
//! For each cluster size `N`, [`measure`] starts `N - 1` nodes, then one more; waits for
//! membership to settle; reads the CPU time (user + system) and RSS of every node process over
//! `windows` back-to-back windows; and finally freezes one node (SIGSTOP: its sockets stay
//! open, nothing answers). Join and failure times come from the node logs ("member joined",
//! "member down" lines, timestamped by each node), not from polling `cluster status`, whose
//! cost grows with the square of the cluster: the join is from the new node's start to the
//! last node that logged it joined; the failure from the freeze to the last node that logged
//! it down. The figures go to `docs/benchmarks.md` (issue 15's table).

use crate::cluster::Cluster;
use crate::stats::median;
use anyhow::{bail, Context};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long to wait for the frozen node to be seen down by every other node before giving up.
pub const DOWN_LIMIT: Duration = Duration::from_secs(120);

/// What to measure.
#[derive(Clone, Debug)]
pub struct IdleOptions {
    /// Cluster sizes, one fresh cluster each.
    pub sizes: Vec<usize>,
    /// Wait after the join before the first window (membership settling).
    pub settle: Duration,
    /// Length of one measurement window.
    pub window: Duration,
    /// Windows per size (the median and range are reported).
    pub windows: usize,
    /// Freeze a node at the end and time until all others see it down.
    pub detect: bool,
}

/// The figures for one cluster size.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IdleResult {
    /// Nodes.
    pub nodes: usize,
    /// Seconds from the last node's start until every other node had logged it joined.
    pub join_s: f64,
    /// Idle CPU per node (percent of one core), the median over windows of the mean over nodes.
    pub cpu_pct_median: f64,
    /// Lowest and highest window means.
    pub cpu_pct_min: f64,
    /// See `cpu_pct_min`.
    pub cpu_pct_max: f64,
    /// The busiest single node over all windows.
    pub cpu_pct_node_max: f64,
    /// Mean RSS of the node processes at the end, MiB.
    pub rss_mib_mean: f64,
    /// Largest RSS, MiB.
    pub rss_mib_max: f64,
    /// Seconds from a node's freeze until every other node had logged it down (`None`: not
    /// measured).
    pub down_s: Option<f64>,
}

/// Resident set size of a process in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Seconds since midnight (UTC) of a node log line's timestamp
/// (`2026-12-04T13:28:39.802805Z  INFO ...`).
fn log_time(line: &str) -> Option<f64> {
    let hms = line.split_whitespace().next()?.split('T').nth(1)?.strip_suffix('Z')?;
    let mut it = hms.split(':');
    let (h, m, s): (f64, f64, f64) = (it.next()?.parse().ok()?, it.next()?.parse().ok()?, it.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Seconds since midnight (UTC) now, on the clock the node logs use.
fn now_of_day() -> f64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() % 86_400) as f64 + f64::from(d.subsec_micros()) / 1e6
}

/// From `from` (seconds of the day) to `to`, across midnight if need be.
fn since(from: f64, to: f64) -> f64 {
    if to >= from {
        to - from
    } else {
        to + 86_400.0 - from
    }
}

fn node_log(c: &Cluster, i: usize) -> String {
    std::fs::read_to_string(c.nodes[i].dir.join("node.log")).unwrap_or_default()
}

/// Node `i`'s short id (the one its peers' logs name it by), from its log.
fn short_id(c: &Cluster, i: usize) -> anyhow::Result<(String, f64)> {
    let log = node_log(c, i);
    let line = log.lines().rfind(|l| l.contains("node started node=")).context("no `node started` line in the node's log")?;
    let id = line.split("node started node=").nth(1).and_then(|r| r.get(..8)).context("no node id in the `node started` line")?;
    Ok((id.to_string(), log_time(line).context("no time on the `node started` line")?))
}

/// The latest, over every running node but `except`, of the first time after `after` that
/// its log says `what` (e.g. `member down`) of node `short`; `None` while some node has not.
fn all_logged(c: &Cluster, except: usize, what: &str, short: &str, after: f64) -> Option<f64> {
    let needle = format!("node={short}");
    let mut latest = after;
    for (i, n) in c.nodes.iter().enumerate() {
        if i == except || !n.running() {
            continue;
        }
        let t = node_log(c, i).lines().filter(|l| l.contains(what) && l.contains(&needle)).filter_map(log_time).find(|t| since(after, *t) < 43_200.0)?;
        if since(latest, t) < 43_200.0 {
            latest = t;
        }
    }
    Some(latest)
}

/// Measures one cluster of `n` nodes under `dir` (wiped by the caller).
pub fn measure(bin: &Path, dir: &Path, n: usize, opts: &IdleOptions) -> anyhow::Result<IdleResult> {
    if n < 2 {
        bail!("a cluster size must be at least 2");
    }
    eprintln!("{n} nodes: starting {} ...", n - 1);
    let mut c = Cluster::start(bin, dir, n - 1, 2, None)?;
    let last = c.add(vec![])?;
    // From the node logs: its start, and the last "member joined" about it elsewhere.
    let (short, started) = short_id(&c, last)?;
    let join_s = since(started, all_logged(&c, last, "member joined", &short, started - 1.0).context("a node did not log the join")?);
    eprintln!("{n} nodes: the last one was a member everywhere {join_s:.2} s after it started; settling {} s", opts.settle.as_secs());
    std::thread::sleep(opts.settle);
    let pids: Vec<u32> = c.nodes.iter().filter_map(|p| p.pid()).collect();
    if pids.len() != n {
        bail!("{} of {n} nodes are running", pids.len());
    }
    let hz = crate::cpu::clock_ticks();
    let mut means = Vec::new();
    let mut node_max: f64 = 0.0;
    for w in 0..opts.windows {
        let before: Vec<Option<u64>> = pids.iter().map(|p| crate::cpu::process_ticks(*p)).collect();
        let start = Instant::now();
        std::thread::sleep(opts.window);
        let secs = start.elapsed().as_secs_f64();
        let mut per = Vec::new();
        for (p, b) in pids.iter().zip(&before) {
            let (Some(b), Some(a)) = (b, crate::cpu::process_ticks(*p)) else { bail!("node process {p} went away during the measurement") };
            per.push((a - b) as f64 / hz / secs * 100.0);
        }
        let mean = per.iter().sum::<f64>() / per.len() as f64;
        node_max = per.iter().copied().fold(node_max, f64::max);
        eprintln!("{n} nodes: window {} of {}: {mean:.2}% of a core per node", w + 1, opts.windows);
        means.push(mean);
    }
    let rss: Vec<f64> = pids.iter().filter_map(|p| rss_bytes(*p)).map(|b| b as f64 / (1 << 20) as f64).collect();
    let down_s = if opts.detect {
        let (short, _) = short_id(&c, last)?;
        let frozen = now_of_day();
        c.freeze(last);
        let t = Instant::now();
        let seen = loop {
            if let Some(seen) = all_logged(&c, last, "member down", &short, frozen) {
                break seen;
            }
            if t.elapsed() > DOWN_LIMIT {
                c.kill(last);
                bail!("node {}, frozen, was not logged down by every node within {DOWN_LIMIT:?}", last + 1);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        c.kill(last);
        let s = since(frozen, seen);
        eprintln!("{n} nodes: the frozen node was down everywhere {s:.1} s after it froze");
        Some(s)
    } else {
        None
    };
    let min = means.iter().copied().fold(f64::INFINITY, f64::min);
    let max = means.iter().copied().fold(0.0, f64::max);
    Ok(IdleResult {
        nodes: n,
        join_s,
        cpu_pct_median: median(means),
        cpu_pct_min: min,
        cpu_pct_max: max,
        cpu_pct_node_max: node_max,
        rss_mib_mean: rss.iter().sum::<f64>() / rss.len().max(1) as f64,
        rss_mib_max: rss.iter().copied().fold(0.0, f64::max),
        down_s,
    })
}

/// Measures every size of `opts` in turn, each in `dir/nN`.
pub fn run(bin: &Path, dir: &Path, opts: &IdleOptions) -> anyhow::Result<Vec<IdleResult>> {
    let mut out = Vec::new();
    for &n in &opts.sizes {
        let d = dir.join(format!("n{n}"));
        out.push(measure(bin, &d, n, opts).with_context(|| format!("the {n}-node cluster"))?);
        let _ = std::fs::remove_dir_all(&d);
    }
    Ok(out)
}

/// The results as a Markdown table.
pub fn table(results: &[IdleResult], opts: &IdleOptions) -> String {
    let mut s = format!(
        "idle cluster, {} windows of {} s after {} s settling (CPU: % of one core per node; median of window means, range)\n\n",
        opts.windows,
        opts.window.as_secs(),
        opts.settle.as_secs()
    );
    s.push_str("| nodes | join seen by all | idle CPU per node | busiest node | RSS mean / max | frozen node down at all |\n");
    s.push_str("| ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for r in results {
        let down = r.down_s.map(|d| format!("{d:.1} s")).unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "| {} | {:.1} s | {:.2}% ({:.2}–{:.2}) | {:.2}% | {:.0} / {:.0} MiB | {} |\n",
            r.nodes, r.join_s, r.cpu_pct_median, r.cpu_pct_min, r.cpu_pct_max, r.cpu_pct_node_max, r.rss_mib_mean, r.rss_mib_max, down
        ));
    }
    s
}
