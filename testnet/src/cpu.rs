//! Where a benchmark window's CPU went: the machine's busy time from `/proc/stat`, and each
//! process's from `/proc/PID/stat`, grouped as nodes, QEMUs and the node's helpers
//! (`qmp-keeper`, `stream-relay`). On a machine whose cores every simulated host shares, a
//! window that keeps them all busy cannot end sooner than its CPU time over the cores: this
//! is what tells such a bound from a wait.

use std::collections::HashMap;
use std::time::Instant;

/// CPU time of one window, in core-seconds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Cpu {
    /// The window's wall time, s.
    pub wall_s: f64,
    /// Cores the machine has.
    pub cores: usize,
    /// Every core's busy time over the window (everything that ran, processes that ended
    /// included).
    pub busy_s: f64,
    /// `vmcsnap node run` processes.
    pub nodes_s: f64,
    /// QEMU processes (their guests' vCPUs included).
    pub qemus_s: f64,
    /// The nodes' helper processes (`qmp-keeper`, `stream-relay`).
    pub helpers_s: f64,
}

impl Cpu {
    /// The window's share of the machine's CPU that was busy (0 to 1).
    pub fn busy_share(&self) -> f64 {
        self.busy_s / (self.wall_s * self.cores as f64)
    }

    /// One line for the benchmark's output.
    pub fn line(&self) -> String {
        format!(
            "CPU over {:.2} s: {:.2} of {:.2} core-s busy ({:.0}%): nodes {:.2}, QEMUs {:.2}, helpers {:.2}, other {:.2}",
            self.wall_s,
            self.busy_s,
            self.wall_s * self.cores as f64,
            100.0 * self.busy_share(),
            self.nodes_s,
            self.qemus_s,
            self.helpers_s,
            (self.busy_s - self.nodes_s - self.qemus_s - self.helpers_s).max(0.0)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Group {
    Node,
    Qemu,
    Helper,
}

/// The CPU counters at one instant; [`Sample::until`] another gives the window's [`Cpu`].
pub struct Sample {
    at: Instant,
    busy_ticks: u64,
    procs: HashMap<u32, (Group, u64)>,
}

impl Sample {
    /// Reads the counters now.
    pub fn take() -> Self {
        let busy_ticks = std::fs::read_to_string("/proc/stat").ok().and_then(|s| busy(&s)).unwrap_or(0);
        let mut procs = HashMap::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
            let Some(g) = group(&cmdline) else { continue };
            if let Some(t) = process_ticks(pid) {
                procs.insert(pid, (g, t));
            }
        }
        Self { at: Instant::now(), busy_ticks, procs }
    }

    /// The CPU spent from this sample until `end`. A process that started in between counts
    /// whole; one that ended in between is in `busy_s` only.
    pub fn until(&self, end: &Sample) -> Cpu {
        let mut by: HashMap<Group, u64> = HashMap::new();
        for (pid, (g, t)) in &end.procs {
            let before = self.procs.get(pid).filter(|(g0, _)| g0 == g).map_or(0, |(_, t0)| *t0);
            *by.entry(*g).or_default() += t.saturating_sub(before);
        }
        let hz = clock_ticks();
        let s = |g| by.get(&g).copied().unwrap_or(0) as f64 / hz;
        Cpu {
            wall_s: end.at.duration_since(self.at).as_secs_f64(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            busy_s: end.busy_ticks.saturating_sub(self.busy_ticks) as f64 / hz,
            nodes_s: s(Group::Node),
            qemus_s: s(Group::Qemu),
            helpers_s: s(Group::Helper),
        }
    }
}

/// All cores' busy ticks from `/proc/stat`'s `cpu` line (everything but idle and iowait).
fn busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    Some(v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum())
}

/// A process's CPU time (user + system) in clock ticks, from `/proc/PID/stat`.
pub(crate) fn process_ticks(pid: u32) -> Option<u64> {
    ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`; 100 where it cannot be read).
pub(crate) fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant; no memory is touched.
    #[allow(unsafe_code)]
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// A process's user + system ticks from its `/proc/PID/stat` (fields 14 and 15, counted after
/// the command name, which may hold spaces and parentheses).
fn ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn group(cmdline: &[u8]) -> Option<Group> {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
    let exe = std::path::Path::new(std::ffi::OsStr::new(std::str::from_utf8(args.first()?).ok()?)).file_name()?.to_str()?;
    if exe.starts_with("qemu-system") {
        return Some(Group::Qemu);
    }
    if exe != "vmcsnap" {
        return None;
    }
    match args.get(1).copied() {
        Some(b"node") if args.get(2).copied() == Some(b"run") => Some(Group::Node),
        Some(b"qmp-keeper" | b"stream-relay") => Some(Group::Helper),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 2 30 5000 40 6 7 8 90 1\ncpu0 50 1 15 2500 20 3 3 4 45 0\n";
        assert_eq!(busy(stat), Some(100 + 2 + 30 + 6 + 7 + 8));
    }

    #[test]
    fn ticks_read_past_a_command_name_with_spaces() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 5 0 99 0 0";
        assert_eq!(ticks(stat), Some(287));
    }

    #[test]
    fn processes_are_grouped_by_what_they_run() {
        assert_eq!(group(b"/usr/bin/qemu-system-x86_64\0-nodefaults\0"), Some(Group::Qemu));
        assert_eq!(group(b"/x/target/release/vmcsnap\0node\0run\0--data\0d\0"), Some(Group::Node));
        assert_eq!(group(b"/x/vmcsnap\0qmp-keeper\0--socket\0s\0"), Some(Group::Helper));
        assert_eq!(group(b"/x/vmcsnap\0snapshot\0restore\0first\0"), None);
        assert_eq!(group(b"/bin/bash\0"), None);
    }

    #[test]
    fn this_process_is_seen_in_the_machine_s_busy_time() {
        let a = Sample::take();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 200 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let c = a.until(&Sample::take());
        assert!(c.wall_s >= 0.2 && c.busy_s >= 0.1, "{c:?}");
    }
}
