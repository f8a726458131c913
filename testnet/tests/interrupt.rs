//! A Ctrl-C ends the command and everything it started: the nodes run in process groups of
//! their own (the terminal's Ctrl-C does not reach them), so the command ends them itself.

use std::process::Command;
use std::time::{Duration, Instant};
use vmcsnap_testnet::reaper::{descendants, end_descendants};

/// The command under test; ended with all it started should the test fail first.
struct Run(std::process::Child);

impl Drop for Run {
    fn drop(&mut self) {
        // Only while it runs: a pid already waited for may belong to someone else now.
        if let Ok(None) = self.0.try_wait() {
            end_descendants(self.0.id());
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn a_ctrl_c_leaves_no_node_running() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut run = Run(Command::new(env!("CARGO_BIN_EXE_vmcsnap-testnet"))
        .args(["demo", "--generated", "--vms", "2", "--size", "256M", "--dir"])
        .arg(tmp.path().join("demo"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("vmcsnap-testnet"));
    let demo = &mut run.0;
    // Wait until its three nodes run (then it generates 512 MiB of images and snapshots
    // them: seconds, time enough for the signal to come while it works).
    let t0 = Instant::now();
    let started = loop {
        let d = descendants(demo.id());
        if d.len() >= 3 {
            break d;
        }
        if let Some(st) = demo.try_wait().expect("wait") {
            panic!("the demo ended ({st}) before its nodes were seen");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no nodes within 60 s: {d:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: kill(2) with SIGINT to the child this test started.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(demo.id() as libc::pid_t, libc::SIGINT);
    }
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = demo.try_wait().expect("wait") {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "the demo did not end on SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130), "{status}");
    // Every process it had started is gone (init reaps them; a zombie counts as gone).
    let alive = |pid: &u32| std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s[s.rfind(')').unwrap_or(0)..].starts_with(") Z"));
    // Those seen, and any started after: no process names the demo's directory.
    let dir = tmp.path().display().to_string();
    let naming_dir = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
            .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&dir)))
            .filter(|p| alive(p))
            .collect()
    };
    let t0 = Instant::now();
    while started.iter().any(alive) || !naming_dir().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "still running after the Ctrl-C: {:?} {:?}", started.iter().filter(|p| alive(p)).collect::<Vec<_>>(), naming_dir());
        std::thread::sleep(Duration::from_millis(20));
    }
}
