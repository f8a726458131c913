//! Real QEMU guests for tests, demos and benchmarks, booted from the repository's guest build
//! (`scripts/build-guest.sh`: Debian's cloud kernel and a busybox initramfs).
//!
//! Each guest gets, in its directory: `NAME.qmp` (QMP), `NAME.ser` (serial console socket),
//! `NAME.log` (everything the console printed).

use anyhow::{bail, Context};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The guest kernel and initramfs: `$VMCSNAP_GUEST_DIR`, else `guest/cache` in the repository
/// this was built from, else in the repository around the working directory (a build directory
/// shared by two checkouts keeps the path of the one that built this crate, which may be gone).
pub fn guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMCSNAP_GUEST_DIR") {
        return PathBuf::from(d);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/cache");
    if built.is_dir() {
        return built;
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    [cwd.join("guest/cache"), cwd.join("../guest/cache")].into_iter().find(|d| d.is_dir()).unwrap_or(built)
}

/// Checks the guest build is there.
pub fn guest_files() -> anyhow::Result<(PathBuf, PathBuf)> {
    let d = guest_dir();
    let (k, i) = (d.join("vmlinux"), d.join("initrd.gz"));
    if !k.is_file() || !i.is_file() {
        bail!("no guest build in {} (run scripts/build-guest.sh)", d.display());
    }
    Ok((k, i))
}

/// A copy of the guest build's ext4 disk image at `dir/NAME.img` (sparse), and the QEMU
/// arguments that attach it as `virtio0` (boot the guest with `disk=1` to mount it).
pub fn disk_copy(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, Vec<String>)> {
    let src = guest_dir().join("disk.img");
    if !src.is_file() {
        bail!("no guest disk image {} (run scripts/build-guest.sh)", src.display());
    }
    std::fs::create_dir_all(dir)?;
    let img = dir.join(format!("{name}.img"));
    let st = Command::new("cp").arg("--sparse=always").arg(&src).arg(&img).status()?;
    if !st.success() {
        bail!("cannot copy {} to {}", src.display(), img.display());
    }
    Ok((img.clone(), vec!["-drive".into(), format!("file={},if=virtio,format=raw", img.display())]))
}

/// Guest tests of one test binary that may run at once (`$VMCSNAP_GUEST_TESTS`, default 2).
/// Each TCG guest wants a core: on a 2-core machine, five tests with two guests and three
/// nodes each starve one another until timeouts fire.
pub fn slot() -> Slot {
    static TAKEN: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
    static FREED: std::sync::Condvar = std::sync::Condvar::new();
    let max = std::env::var("VMCSNAP_GUEST_TESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2usize).max(1);
    let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
    while *taken >= max {
        taken = FREED.wait(taken).unwrap_or_else(|p| p.into_inner());
    }
    *taken += 1;
    Slot { release: || {
        *TAKEN.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        FREED.notify_one();
    } }
}

/// A running guest test's place (see [`slot`]); freed when dropped, also by a panic.
pub struct Slot {
    release: fn(),
}

impl Drop for Slot {
    fn drop(&mut self) {
        (self.release)();
    }
}

/// The accelerator guests use: `$VMCSNAP_ACCEL`, else KVM if a guest really boots under it
/// (a short boot probe, cached in the guest directory), else TCG. `/dev/kvm` opening is not
/// enough: on nested hosts without hardware virtualisation stock guests crash under it.
pub fn accel() -> anyhow::Result<String> {
    if let Ok(a) = std::env::var("VMCSNAP_ACCEL") {
        return Ok(a);
    }
    let cache = guest_dir().join("accel");
    if let Ok(a) = std::fs::read_to_string(&cache) {
        return Ok(a.trim().to_string());
    }
    let a = if Path::new("/dev/kvm").exists() && probe_kvm()? { "kvm" } else { "tcg" };
    let _ = std::fs::write(&cache, a);
    Ok(a.to_string())
}

fn probe_kvm() -> anyhow::Result<bool> {
    let dir = tempfile_dir("kvm-probe")?;
    let g = Guest::start(&dir, "probe", 128, "", "kvm");
    let ok = match g {
        Ok(mut g) => {
            let r = g.wait_for("BOOT-OK", Duration::from_secs(15)).is_ok();
            g.kill();
            r
        }
        Err(_) => false,
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ok)
}

fn tempfile_dir(tag: &str) -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("vmcsnap-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// The md5 field of a guest's "FILL-DONE <md5> ..." or "CHECK <md5> uptime=..." console line
/// (empty when the guest has no /tmp/fill).
pub fn md5_of(line: &str) -> String {
    match line.split_whitespace().nth(1) {
        Some(t) if !t.starts_with("uptime=") => t.to_string(),
        _ => String::new(),
    }
}

/// The uptime field of a "CHECK ... uptime=<s>" console line (0 when absent).
pub fn uptime_of(line: &str) -> f64 {
    line.split("uptime=").nth(1).and_then(|u| u.split_whitespace().next()).and_then(|u| u.parse().ok()).unwrap_or(0.0)
}

/// A running guest.
pub struct Guest {
    /// Its name.
    pub name: String,
    /// Its QMP socket.
    pub qmp: PathBuf,
    /// Its serial console socket.
    pub serial: PathBuf,
    /// What its console printed.
    pub log: PathBuf,
    child: Option<Child>,
}

impl Guest {
    /// The QEMU command line for a guest (also what a snapshot records and `--launch` reruns).
    pub fn command(dir: &Path, name: &str, mem_mb: u32, kargs: &str, accel: &str) -> anyhow::Result<Vec<String>> {
        let (kernel, initrd) = guest_files()?;
        let p = |ext: &str| dir.join(format!("{name}.{ext}")).display().to_string();
        Ok(vec![
            "qemu-system-x86_64".into(),
            "-name".into(),
            name.into(),
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            "max".into(),
            "-m".into(),
            format!("{mem_mb}"),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-nic".into(),
            "none".into(),
            "-kernel".into(),
            kernel.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            format!("console=ttyS0 quiet panic=-1 {kargs}"),
            "-chardev".into(),
            format!("socket,id=ser0,path={},server=on,wait=off,logfile={}", p("ser"), p("log")),
            "-serial".into(),
            "chardev:ser0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p("qmp")),
        ])
    }

    /// Boots a guest in `dir`; returns once its QMP socket answers.
    pub fn start(dir: &Path, name: &str, mem_mb: u32, kargs: &str, accel: &str) -> anyhow::Result<Self> {
        Self::start_with(dir, name, mem_mb, kargs, accel, &[])
    }

    /// [`Guest::start`] with more QEMU arguments.
    pub fn start_with(dir: &Path, name: &str, mem_mb: u32, kargs: &str, accel: &str, extra: &[&str]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut argv = Self::command(dir, name, mem_mb, kargs, accel)?;
        argv.extend(extra.iter().map(|a| a.to_string()));
        let mut g = Self::paths(dir, name);
        let _ = std::fs::remove_file(&g.log);
        let err = std::fs::File::create(dir.join(format!("{name}.qemu.log")))?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().context("cannot start qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
        g.child = Some(child);
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&g.qmp).is_err() {
            if let Some(c) = g.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    g.child = None;
                    let e = std::fs::read_to_string(dir.join(format!("{name}.qemu.log"))).unwrap_or_default();
                    bail!("QEMU for {name} exited ({st}): {}", e.trim());
                }
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("QEMU for {name} did not open its QMP socket");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(g)
    }

    /// A handle on a guest that someone else started (e.g. `vmcsnap snapshot restore --launch`).
    pub fn paths(dir: &Path, name: &str) -> Self {
        let p = |ext: &str| dir.join(format!("{name}.{ext}"));
        Self { name: name.into(), qmp: p("qmp"), serial: p("ser"), log: p("log"), child: None }
    }

    /// Waits until a console line contains `pattern`; returns the line.
    pub fn wait_for(&self, pattern: &str, timeout: Duration) -> anyhow::Result<String> {
        let t0 = Instant::now();
        loop {
            let s = std::fs::read(&self.log).unwrap_or_default();
            let s = String::from_utf8_lossy(&s);
            if let Some(l) = s.lines().rev().find(|l| l.contains(pattern)) {
                return Ok(l.trim().to_string());
            }
            if t0.elapsed() > timeout {
                bail!("guest {}: no {pattern:?} on the console within {timeout:?}; it printed: {}", self.name, s.chars().rev().take(400).collect::<String>().chars().rev().collect::<String>());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `line` on the serial console and waits for a new console line containing
    /// `expect` after it; returns that line.
    pub fn console(&self, line: &str, expect: &str, timeout: Duration) -> anyhow::Result<String> {
        let before = std::fs::read(&self.log).map(|b| b.len()).unwrap_or(0);
        let mut s = std::os::unix::net::UnixStream::connect(&self.serial)
            .with_context(|| format!("cannot open the serial console of {}", self.name))?;
        // What the guest prints is read from the log file, but QEMU writes it to this socket
        // first and logs only what the socket took: a socket nobody reads fills after a few
        // hundred bytes (QEMU sends a byte at a time, and each costs a socket buffer's worth
        // of overhead), and then the guest's console stalls mid-line. So it is drained.
        s.set_read_timeout(Some(Duration::from_millis(1)))?;
        let mut sink = [0u8; 4096];
        let t0 = Instant::now();
        let mut last_write = None::<Instant>;
        loop {
            while matches!(std::io::Read::read(&mut s, &mut sink), Ok(n) if n > 0) {}
            // Re-type the line now and then: a guest just resumed may miss the first. Not too
            // often: a busy guest's answer could come out mixed with the echo of a retype.
            if last_write.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                if let Err(e) = s.write_all(format!("{line}\n").as_bytes()) {
                    // QEMU dropped this connection (seen once as a broken pipe): connect
                    // again and type the line on the new one.
                    if t0.elapsed() > timeout {
                        return Err(e).with_context(|| format!("the serial console of {} ({})", self.name, self.diagnose()));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    s = std::os::unix::net::UnixStream::connect(&self.serial).with_context(|| {
                        // Seen once in CI: the socket was gone, so QEMU had exited. What the
                        // guest printed last says whether it panicked.
                        let all = std::fs::read(&self.log).unwrap_or_default();
                        let tail = String::from_utf8_lossy(&all[all.len().saturating_sub(800)..]).into_owned();
                        format!("cannot open the serial console of {} again after {e} ({}); the console's last output: {tail:?}", self.name, self.diagnose())
                    })?;
                    s.set_read_timeout(Some(Duration::from_millis(1)))?;
                    continue;
                }
                last_write = Some(Instant::now());
            }
            let all = std::fs::read(&self.log).unwrap_or_default();
            // The echo of a retyped line can land anywhere, in the middle of the answer too
            // (seen: an md5 cut in two by it, and the line ending there): it is taken out,
            // with the line end it brought.
            let new = String::from_utf8_lossy(all.get(before..).unwrap_or(&[])).replace(&format!("{line}\r\n"), "").replace(&format!("{line}\n"), "").replace(line, "");
            // Only whole lines: the guest may be half-way through printing the answer.
            let whole = &new[..new.rfind('\n').map_or(0, |i| i + 1)];
            // The answer starts at `expect`.
            if let Some(l) = whole.lines().find_map(|l| l.find(expect).map(|i| &l[i..])) {
                return Ok(l.trim().to_string());
            }
            if t0.elapsed() > timeout {
                let tail: String = new.chars().rev().take(600).collect::<String>().chars().rev().collect();
                bail!("guest {} ({}): no {expect:?} within {timeout:?} after typing {line:?}; the console printed: {tail:?}", self.name, self.diagnose());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What QEMU says of a guest that does not answer: its run state, its migration's, where
    /// its vCPU is (twice, a second apart: a guest spinning moves, a halted one does not), and
    /// the end of QEMU's own log.
    pub fn diagnose(&self) -> String {
        let qemu = || -> anyhow::Result<String> {
            let mut q = QmpSync::connect(&self.qmp)?;
            let status = q.status()?;
            let migration = q.execute("query-migrate", serde_json::json!({}))?["status"].as_str().unwrap_or("none").to_string();
            let mut rip = || -> anyhow::Result<String> {
                let regs = q.execute("human-monitor-command", serde_json::json!({ "command-line": "info registers" }))?;
                let regs = regs.as_str().unwrap_or("");
                let field = |k: &str| regs.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or("?").to_string();
                Ok(format!("RIP={} HLT={}", field("RIP="), field("HLT=")))
            };
            let first = rip()?;
            std::thread::sleep(Duration::from_secs(1));
            Ok(format!("{status}, migration {migration}, vCPU {first} then {}", rip()?))
        };
        let state = qemu().unwrap_or_else(|e| format!("QMP unreachable: {e:#}"));
        let log = std::fs::read_to_string(self.log.with_extension("qemu.log")).unwrap_or_default();
        let log: String = log.trim().lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
        if log.is_empty() {
            state
        } else {
            format!("{state}; QEMU's log: {log}")
        }
    }

    /// The process id, if this handle started it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the guest's QEMU.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills whatever QEMU serves `qmp` (for guests started by a restore's `--launch`), and waits
/// (a few seconds at most) until it is gone: a restore that launches a QEMU on the same socket
/// next must not find the old one still listening there.
pub fn kill_by_qmp(qmp: &Path) {
    let pids = qemus_on(qmp);
    if let Ok(mut s) = std::os::unix::net::UnixStream::connect(qmp) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
        // Read until QEMU closes the connection on its way out: QEMU drops the commands it has
        // not run yet of a client that hangs up.
        let mut buf = [0u8; 4096];
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) && matches!(std::io::Read::read(&mut s, &mut buf), Ok(n) if n > 0) {}
    }
    // Gone, or a zombie its parent has not reaped yet (a test's own guest, reaped on drop).
    let running = |p: &u32| std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|st| st.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')));
    let t0 = Instant::now();
    while pids.iter().any(running) && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a test with real guests starts from: the guest build checked, a [`slot`] taken, the
/// accelerator picked, a temporary directory (its `vms/` for the guests' files), and, however
/// the test ends, every QEMU of the guests it started (also those a restore launched in their
/// place, on the same QMP socket) or of the sockets it was told to [`Lab::reap`] ended before
/// the directory goes. Panics where a test would (no guest build).
pub struct Lab {
    /// The accelerator the guests use ([`accel`]).
    pub accel: String,
    /// Where [`Lab::guest`] puts its guests' sockets, consoles and logs.
    pub vms: PathBuf,
    reap: std::cell::RefCell<Vec<PathBuf>>,
    tmp: tempfile::TempDir,
    _slot: Slot,
}

impl Lab {
    /// Waits for a [`slot`], then sets the lab up.
    pub fn new() -> Self {
        guest_files().expect("guest build (scripts/build-guest.sh)");
        let slot = slot();
        let accel = accel().expect("accelerator");
        let tmp = tempfile::tempdir().expect("tmp");
        Self { accel, vms: tmp.path().join("vms"), reap: Default::default(), tmp, _slot: slot }
    }

    /// The test's temporary directory.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Guest `name`'s QMP socket.
    pub fn qmp(&self, name: &str) -> PathBuf {
        self.vms.join(format!("{name}.qmp"))
    }

    /// Boots guest `name` (`mem_mb` MiB, kernel arguments `kargs`) in [`Lab::vms`].
    pub fn guest(&self, name: &str, mem_mb: u32, kargs: &str) -> Guest {
        self.guest_with(name, mem_mb, kargs, &[])
    }

    /// [`Lab::guest`] with more QEMU arguments.
    pub fn guest_with(&self, name: &str, mem_mb: u32, kargs: &str, extra: &[&str]) -> Guest {
        self.reap(self.qmp(name));
        Guest::start_with(&self.vms, name, mem_mb, kargs, &self.accel, extra).unwrap_or_else(|e| panic!("guest {name}: {e:#}"))
    }

    /// Ends, with the test, whatever QEMU the QMP socket `qmp` names.
    pub fn reap(&self, qmp: PathBuf) {
        self.reap.borrow_mut().push(qmp);
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        drop(Reaper(std::mem::take(self.reap.get_mut())));
        // `VMCSNAP_TEST_KEEP=1` keeps a failed test's directory (nodes' logs, QEMU's
        // `launch-*.log`, consoles) for a look.
        if std::thread::panicking() && std::env::var_os("VMCSNAP_TEST_KEEP").is_some() {
            self.tmp.disable_cleanup(true);
            eprintln!("kept the failed test's directory {}", self.tmp.path().display());
        }
    }
}

/// Quits, when dropped, every QEMU whose QMP socket it names: guests that a restore launched
/// belong to no [`Guest`] handle, and a test that fails half-way must not leave them running.
pub struct Reaper(pub Vec<PathBuf>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for qmp in &self.0 {
            kill_by_qmp(qmp);
            // A monitor held by another client (a lazy restore's keeper) never reads the
            // `quit`: whatever process names the socket goes too (QEMU, keeper).
            kill_naming(&qmp.display().to_string());
        }
    }
}

/// Whether this process runs as root (`id -u`): tests that mount file systems, reserve huge
/// pages or drive the system's libvirtd need it, and skip with a note otherwise.
pub fn is_root() -> bool {
    let o = Command::new("id").arg("-u").output();
    o.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// SIGKILLs every process whose command line contains `needle`.
pub fn kill_naming(needle: &str) {
    for pid in pids_naming(needle) {
        // SAFETY: kill(2) on a pid read from /proc; at worst it names a process that
        // already exited.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

/// The QEMU processes whose command line names the monitor socket `qmp`.
pub fn qemus_on(qmp: &Path) -> Vec<u32> {
    pids_naming(&qmp.display().to_string())
        .into_iter()
        .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("qemu-system")))
        .collect()
}

/// Whether process `pid` runs under a seccomp filter (`Seccomp: 2` in its status).
pub fn in_seccomp_filter(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| s.lines().any(|l| l.split_whitespace().eq(["Seccomp:", "2"])))
}

/// Every process but this one whose command line contains `needle`.
pub fn pids_naming(needle: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return vec![] };
    let me = std::process::id();
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(c) = std::fs::read(e.path().join("cmdline")) else { continue };
        if String::from_utf8_lossy(&c).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// A blocking QMP client, for benchmarks and tests that drive QEMU directly.
pub struct QmpSync {
    r: std::io::BufReader<std::os::unix::net::UnixStream>,
    w: std::os::unix::net::UnixStream,
    /// The events QEMU sent on this monitor, in order, as read so far (each command's
    /// answer reads those that came before it).
    pub events: Vec<serde_json::Value>,
}

impl QmpSync {
    /// Connects and negotiates.
    pub fn connect(path: &Path) -> anyhow::Result<Self> {
        let s = std::os::unix::net::UnixStream::connect(path).with_context(|| format!("QMP {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Self { r: std::io::BufReader::new(s.try_clone()?), w: s, events: vec![] };
        q.read()?;
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> anyhow::Result<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            bail!("QEMU closed the monitor");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command; returns its `return`.
    pub fn execute(&mut self, cmd: &str, args: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let msg = if args.as_object().is_some_and(|o| o.is_empty()) {
            serde_json::json!({ "execute": cmd })
        } else {
            serde_json::json!({ "execute": cmd, "arguments": args })
        };
        writeln!(self.w, "{msg}")?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QEMU refused {cmd}: {e}");
            }
            return Ok(v.get("return").cloned().unwrap_or_default());
        }
    }

    /// The run state.
    pub fn status(&mut self) -> anyhow::Result<String> {
        Ok(self.execute("query-status", serde_json::json!({}))?["status"].as_str().unwrap_or("").to_string())
    }

    /// Polls `query-migrate` until `completed`; returns its answer.
    pub fn wait_migrated(&mut self) -> anyhow::Result<serde_json::Value> {
        let t0 = Instant::now();
        loop {
            let v = self.execute("query-migrate", serde_json::json!({}))?;
            match v["status"].as_str() {
                Some("completed") => return Ok(v),
                Some("failed") | Some("cancelled") => bail!("migration {}", v["status"]),
                _ if t0.elapsed() > Duration::from_secs(120) => bail!("migration did not finish"),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

/// Starts `argv` (a guest command line) with `-incoming exec:cat FILE`, as QEMU restores a
/// saved VM, and waits until the guest runs. Returns (seconds, child).
pub fn qemu_restore_from_file(argv: &[String], file: &Path, qmp: &Path, log: &Path) -> anyhow::Result<(f64, Child)> {
    let _ = std::fs::remove_file(qmp);
    let t0 = Instant::now();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .arg("-incoming")
        .arg(format!("exec:cat {}", file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn()?;
    match wait_restored(&mut child, qmp, log, t0) {
        Ok(secs) => Ok((secs, child)),
        Err(e) => {
            // Never leave a guest behind on an error.
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Waits until the QEMU `child` restoring from a file runs; returns seconds since `t0`.
fn wait_restored(child: &mut Child, qmp: &Path, log: &Path, t0: Instant) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileTypeExt;
    while !std::fs::metadata(qmp).map(|m| m.file_type().is_socket()).unwrap_or(false) {
        if child.try_wait()?.is_some() {
            bail!("QEMU exited: {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // The socket file exists from QEMU's bind; connections are refused until its listen.
    let mut q = loop {
        match QmpSync::connect(qmp) {
            Ok(q) => break q,
            Err(e) if t0.elapsed() > Duration::from_secs(30) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    loop {
        match q.status()?.as_str() {
            "inmigrate" => std::thread::sleep(Duration::from_millis(2)),
            "paused" => {
                q.execute("cont", serde_json::json!({}))?;
            }
            "running" => break,
            other => bail!("restored QEMU is {other}"),
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}
