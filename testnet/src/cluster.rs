//! Real node processes on loopback.

use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One node process.
pub struct NodeProc {
    /// Its data directory.
    pub dir: PathBuf,
    /// Its listen address.
    pub addr: SocketAddr,
    /// The network namespace it runs in (`None`: this one).
    pub netns: Option<String>,
    child: Option<Child>,
}

impl NodeProc {
    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the process runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// A cluster of node processes. Dropping it kills them.
pub struct Cluster {
    /// The cluster's directory (one subdirectory per node).
    pub dir: PathBuf,
    /// The `vmcsnap` binary.
    pub bin: PathBuf,
    /// Replicas the nodes use.
    pub replicas: u8,
    /// The nodes, in start order.
    pub nodes: Vec<NodeProc>,
    /// Keep the processes running when this value is dropped (for `testnet up`).
    pub detach: bool,
    /// Extra `node run` arguments per node (by index).
    pub extra_args: Vec<Vec<String>>,
}

/// How long [`Cluster::start`] and [`Cluster::add`] wait for `n` nodes to see each other:
/// checking asks every node for `cluster status`, which asks every member for its figures, so
/// one round of checks grows with the square of the cluster.
pub fn converge_limit(n: usize) -> Duration {
    Duration::from_secs(30 + n as u64)
}

/// A port free for both TCP (membership) and UDP (data plane) on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port found on 127.0.0.1")
}

impl Cluster {
    /// Starts `n` nodes under `dir` (node `i` in `dir/n{i+1}`), the first on its own and the
    /// rest joining through it, and waits until every node sees every other.
    pub fn start(bin: &Path, dir: &Path, n: usize, replicas: u8, base_port: Option<u16>) -> anyhow::Result<Self> {
        Self::start_with_args(bin, dir, n, replicas, base_port, vec![])
    }

    /// [`Cluster::start`], with extra `node run` arguments for node `i` in `extra_args[i]`.
    pub fn start_with_args(bin: &Path, dir: &Path, n: usize, replicas: u8, base_port: Option<u16>, extra_args: Vec<Vec<String>>) -> anyhow::Result<Self> {
        let mut places = Vec::new();
        for i in 0..n {
            let port = match base_port {
                Some(b) => b + i as u16,
                None => free_port()?,
            };
            places.push((format!("127.0.0.1:{port}").parse()?, None));
        }
        Self::start_at(bin, dir, places, replicas, extra_args)
    }

    /// Starts one node at each of `places` (its listen address, and the network namespace
    /// it runs in, if any), like [`Cluster::start_with_args`].
    pub fn start_at(bin: &Path, dir: &Path, places: Vec<(SocketAddr, Option<String>)>, replicas: u8, extra_args: Vec<Vec<String>>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut c = Cluster { dir: dir.to_path_buf(), bin: bin.to_path_buf(), replicas, nodes: Vec::new(), detach: false, extra_args };
        for (i, (addr, netns)) in places.into_iter().enumerate() {
            let loopback = netns.is_none() && addr.ip().is_loopback();
            c.nodes.push(NodeProc { dir: dir.join(format!("n{}", i + 1)), addr, netns, child: None });
            let mut tries = 0;
            while let Err(e) = c.spawn(i) {
                // A port found free can be taken before the node binds it (by another test's
                // outgoing connection): pick another.
                let log = std::fs::read_to_string(c.nodes[i].dir.join("node.log")).unwrap_or_default();
                tries += 1;
                if !loopback || tries > 3 || !log.contains("already in use") {
                    return Err(e);
                }
                c.nodes[i].addr.set_port(free_port()?);
            }
        }
        c.wait_converged(converge_limit(c.nodes.len()))?;
        Ok(c)
    }

    /// Admits and starts one more node (`extra` are its extra `node run` arguments), and waits
    /// until every node sees it. Returns its index.
    pub fn add(&mut self, extra: Vec<String>) -> anyhow::Result<usize> {
        let i = self.nodes.len();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        self.nodes.push(NodeProc { dir: self.dir.join(format!("n{}", i + 1)), addr, netns: None, child: None });
        self.extra_args.resize(i, vec![]);
        self.extra_args.push(extra);
        self.spawn(i)?;
        self.wait_converged(converge_limit(self.nodes.len()))?;
        Ok(i)
    }

    /// The arguments that admit node `i` on its first start (none once its data directory
    /// holds its certificate): the cluster key (`DIR/cluster.key`, made on first use) admits
    /// it with the real CLI — `cluster init`, `node id`, `cluster admit` — as an operator would.
    fn admission_args(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let node = &self.nodes[i];
        if node.dir.join("certificate").exists() {
            return Ok(vec![]);
        }
        let key = self.dir.join("cluster.key");
        if !key.exists() {
            self.tool(&["cluster", "init", "--key", &key.display().to_string()])?;
        }
        let id = self.tool(&["node", "id", "--data-dir", &node.dir.display().to_string()])?;
        let name = format!("n{}", i + 1);
        let admit: serde_json::Value =
            serde_json::from_str(&self.tool(&["cluster", "admit", id.trim(), "--name", &name, "--key", &key.display().to_string(), "--json"])?)?;
        let field = |k: &str| admit[k].as_str().map(str::to_string).with_context(|| format!("`cluster admit` printed no {k}"));
        Ok(vec!["--cluster-key".into(), field("cluster_id")?, "--join".into(), field("token")?])
    }

    /// The last `lines` lines of a file in node `i`'s data directory (`node.log`, a launched
    /// QEMU's `launch-VM.log`), for a failing test to show.
    pub fn tail(&self, i: usize, file: &str, lines: usize) -> String {
        let s = std::fs::read_to_string(self.nodes[i].dir.join(file)).unwrap_or_else(|e| format!("({file}: {e})"));
        let all: Vec<&str> = s.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs the CLI without a node; returns its stdout.
    fn tool(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bin).args(args).stdin(Stdio::null()).output().with_context(|| format!("cannot run {}", self.bin.display()))?;
        if !out.status.success() {
            bail!("vmcsnap {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.nodes[i].dir)?;
        let admission = self.admission_args(i)?;
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(node.dir.join("node.log"))?;
        let mut cmd = match &node.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(["node", "run", "--data-dir"])
            .arg(&node.dir)
            .args(["--listen", &node.addr.to_string(), "--replicas", &self.replicas.to_string()])
            .args(["--name", &format!("n{}", i + 1)])
            .args(&admission)
            // A test cluster's guests live next to it: restores may launch them there.
            .args(["--launch-dir", &self.dir.parent().unwrap_or(&self.dir).display().to_string()])
            // ... and boot the kernel and initramfs of the guest build.
            .args(["--launch-dir", &std::path::absolute(crate::guest::guest_dir()).unwrap_or_default().display().to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(extra) = self.extra_args.get(i) {
            cmd.args(extra);
        }
        if i > 0 {
            cmd.args(["--peer", &self.nodes[0].addr.to_string()]);
        } else if self.nodes.len() > 1 {
            cmd.args(["--peer", &self.nodes[1].addr.to_string()]);
        }
        // Own process group: a Ctrl-C meant for the demo does not hit the nodes first.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.nodes[i].child = Some(child);
        // Wait for its control socket.
        let sock = self.nodes[i].dir.join("control.sock");
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Some(c) = self.nodes[i].child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    self.nodes[i].child = None;
                    // The log's tail too: a test's temporary directory is gone when it is read.
                    let log = self.nodes[i].dir.join("node.log");
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect();
                    bail!("node {} exited with {st}; see {}: {}", i + 1, log.display(), tail.join(" | "));
                }
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("node {} did not open its control socket", i + 1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits until every running node sees every running node as alive.
    pub fn wait_converged(&self, timeout: Duration) -> anyhow::Result<()> {
        let want = self.nodes.iter().filter(|n| n.running()).count();
        let t0 = Instant::now();
        loop {
            let mut ok = true;
            for (i, n) in self.nodes.iter().enumerate() {
                if !n.running() {
                    continue;
                }
                let v = self.json(i, &["cluster", "members"])?;
                let alive = v["members"].as_array().map(|m| m.iter().filter(|m| m["alive"] == true).count()).unwrap_or(0);
                if alive != want {
                    ok = false;
                }
            }
            if ok {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                bail!("cluster did not converge to {want} members within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Node `i`'s name in the cluster (`n1`, `n2`, ...).
    pub fn name(i: usize) -> String {
        format!("n{}", i + 1)
    }

    /// Stops node `i` (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut c) = self.nodes[i].child.take() {
            terminate(&mut c);
        }
        Ok(())
    }

    /// Stops node `i` as systemd would (SIGTERM) and waits up to `limit` for it to end; a node
    /// still running then is killed and that is an error. Returns how long it took and its
    /// exit status.
    pub fn terminate_within(&mut self, i: usize, limit: Duration) -> anyhow::Result<(Duration, std::process::ExitStatus)> {
        let Some(mut c) = self.nodes[i].child.take() else { bail!("node {} is not running", i + 1) };
        // SAFETY: kill(2) on a child we spawned and have not reaped; no memory is touched.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Some(status) = c.try_wait()? {
                return Ok((t0.elapsed(), status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!("node {} did not stop within {limit:?} of SIGTERM (killed)", i + 1)
    }

    /// Kills node `i` at once (SIGKILL), as a host crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes node `i` (SIGSTOP): it holds its sockets open and reads nothing from them.
    pub fn freeze(&self, i: usize) {
        if let Some(c) = &self.nodes[i].child {
            // SAFETY: kill(2) on a child this handle still owns (not yet waited for).
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(c.id() as i32, libc::SIGSTOP);
            }
        }
    }

    /// Starts node `i` again on its data directory.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        if self.nodes[i].running() {
            bail!("node {} is running", i + 1);
        }
        self.spawn(i)
    }

    /// Runs `vmcsnap ARGS --node <node i>` and returns its output (whatever the exit code).
    pub fn cli(&self, i: usize, args: &[&str]) -> anyhow::Result<Output> {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--node")
            .arg(&self.nodes[i].dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        Ok(out)
    }

    /// Runs `vmcsnap ARGS --json --node <node i>`, requires success, parses the JSON.
    pub fn json(&self, i: usize, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(i, &a)?;
        if !out.status.success() {
            bail!("vmcsnap {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Pages stored over all running nodes, from `cluster status` on node `i`.
    pub fn stored_pages(&self, i: usize) -> anyhow::Result<u64> {
        let v = self.json(i, &["cluster", "status"])?;
        Ok(v["members"].as_array().map(|m| m.iter().filter_map(|m| m["pages"].as_u64()).sum()).unwrap_or(0))
    }

    /// Writes `dir/testnet.json` describing the nodes (for `testnet down`).
    pub fn save_state(&self) -> anyhow::Result<()> {
        let nodes: Vec<serde_json::Value> = self
            .nodes
            .iter()
            .map(|n| serde_json::json!({"dir": n.dir, "addr": n.addr.to_string(), "pid": n.pid()}))
            .collect();
        std::fs::write(self.dir.join("testnet.json"), serde_json::to_vec_pretty(&serde_json::json!({"nodes": nodes}))?)?;
        Ok(())
    }
}

fn terminate(c: &mut Child) {
    let pid = c.id() as libc::pid_t;
    // SAFETY: kill(2) on a child we spawned and have not reaped; no memory is touched.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Stops processes listed in `dir/testnet.json` by a detached `testnet up`.
pub fn down(dir: &Path) -> anyhow::Result<usize> {
    let path = dir.join("testnet.json");
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("no testnet at {} (missing {})", dir.display(), path.display()))?,
    )?;
    let mut n = 0;
    for node in v["nodes"].as_array().cloned().unwrap_or_default() {
        if let Some(pid) = node["pid"].as_u64() {
            // SAFETY: kill(2) with a pid from our own state file; no memory is touched.
            #[allow(unsafe_code)]
            let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            if r == 0 {
                n += 1;
            }
        }
    }
    std::fs::remove_file(&path)?;
    Ok(n)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.detach {
            return;
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                terminate(&mut c);
            }
        }
    }
}

impl Cluster {
    /// Runs `vmcsnap ARGS --node <node i>` with the terminal attached (progress bars show);
    /// fails if it fails.
    pub fn cli_visible(&self, i: usize, args: &[&str]) -> anyhow::Result<()> {
        let st = Command::new(&self.bin).args(args).arg("--node").arg(&self.nodes[i].dir).stdin(Stdio::null()).status()?;
        if !st.success() {
            bail!("vmcsnap {} failed ({st})", args.join(" "));
        }
        Ok(())
    }

    /// Peak resident memory (VmHWM) of node `i`'s process, in bytes.
    pub fn peak_rss(&self, i: usize) -> Option<u64> {
        let pid = self.nodes[i].pid()?;
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}
