//! What a Ctrl-C (or a SIGTERM, as `timeout` sends) leaves behind: nothing. The nodes and
//! guests a command starts run in process groups of their own, so that a Ctrl-C meant for the
//! command does not reach them before the command stops them in order; but a command ended
//! by a signal stops nothing, and every guest it had started would go on eating a core. With
//! [`install`], such a signal ends every process descended from this one, then the command.

use std::collections::HashMap;

static EXITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a signal is ending the command: its own end (an error, as its nodes die) must then
/// wait for the handler's exit, which reports the signal.
pub fn exiting() -> bool {
    EXITING.load(std::sync::atomic::Ordering::SeqCst)
}

/// Ends this process's descendants and exits (130 after SIGINT, 143 after SIGTERM) when one
/// of those signals comes. Call once, early; commands whose processes must outlive them
/// (`up`) call it too: a signal while they run stops what they had started.
pub fn install() {
    let waiter = std::thread::Builder::new().name("reaper".into()).spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        let code = rt.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok()?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r.ok().map(|_| 130),
                _ = term.recv() => Some(143),
            }
        });
        if let Some(code) = code {
            EXITING.store(true, std::sync::atomic::Ordering::SeqCst);
            // The command goes on meanwhile and may start another process (or fail, its nodes
            // gone): scan until two scans 20 ms apart find nothing.
            let (mut ended, mut quiet) = (std::collections::HashSet::new(), 0);
            while quiet < 2 {
                let found = descendants(std::process::id());
                quiet = if found.is_empty() { quiet + 1 } else { 0 };
                kill_all(&found);
                ended.extend(found);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            eprintln!("\ninterrupted: ended the {} processes this command had started (nodes, guests)", ended.len());
            std::process::exit(code);
        }
    });
    if let Err(e) = waiter {
        eprintln!("warning: no Ctrl-C handler ({e}): an interrupted run leaves its nodes and guests running");
    }
}

/// Sends SIGKILL to every process descended from `root` (all of them found first: a node's
/// own children would otherwise go to init when it dies, and be missed). Returns how many.
pub fn end_descendants(root: u32) -> usize {
    let all = descendants(root);
    kill_all(&all);
    all.len()
}

fn kill_all(pids: &[u32]) {
    for pid in pids {
        // SAFETY: kill(2) on a pid just read from /proc as a descendant (see `descendants`).
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(*pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// Every live process descended from `root`, from /proc, parents before children (ended
/// ones not yet waited for, zombies, are left out).
pub fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some((state, ppid)) = state_and_parent(pid) {
                if state != 'Z' {
                    children.entry(ppid).or_default().push(pid);
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut next = vec![root];
    while let Some(p) = next.pop() {
        for c in children.get(&p).into_iter().flatten() {
            out.push(*c);
            next.push(*c);
        }
    }
    out
}

/// The state and the parent of `pid` (fields 3 and 4 of /proc/PID/stat, after the command
/// name in parentheses, which may hold spaces and parentheses itself).
fn state_and_parent(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    Some((state, rest.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shell waiting on its `sleep`: ending the shell's descendants ends the sleep, and
    /// the shell with it (it would otherwise wait 30 s).
    #[test]
    fn the_descendants_of_a_process_are_found_and_ended() {
        let mut sh = std::process::Command::new("sh").args(["-c", "sleep 30 & wait"]).spawn().expect("sh");
        let t0 = std::time::Instant::now();
        while descendants(sh.id()).is_empty() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(5), "sh started no sleep");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let found = descendants(sh.id());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(state_and_parent(found[0]).map(|(_, p)| p), Some(sh.id()));
        assert_eq!(end_descendants(sh.id()), 1);
        let t0 = std::time::Instant::now();
        while sh.try_wait().expect("wait").is_none() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(5), "the sleep outlived end_descendants");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
