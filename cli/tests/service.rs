//! The node as a systemd service: the unit in `packaging/` passes `systemd-analyze verify`, and
//! its command line (`vmcsnap node run --config FILE`, the file from `node config-example`)
//! starts a node that tells the service manager it is ready and, on SIGTERM, that it stops,
//! and exits cleanly; `vmcsnap doctor` reads that node. (No systemd runs as PID 1 on the test machines: the test plays the
//! service manager's part, a `NOTIFY_SOCKET` and a SIGTERM.)

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmcsnap_testnet::cluster::free_port;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmcsnap"))
}

fn unit_file() -> PathBuf {
    vmcsnap_testnet::crate_dir(env!("CARGO_MANIFEST_DIR")).join("../packaging/vmcsnap-node.service")
}

fn tool(args: &[&str]) -> String {
    let o = Command::new(bin()).args(args).stdin(Stdio::null()).output().expect("run");
    assert!(o.status.success(), "vmcsnap {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The unit's `ExecStart=` command line, split on spaces (it has no quoting).
fn exec_start(unit: &str) -> Vec<String> {
    let line = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart=");
    line.split_whitespace().map(String::from).collect()
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(unit_file()).expect("unit file");
    let tmp = tempfile::tempdir().expect("tmp");
    // verify checks that ExecStart's binary exists: point it at the one built here.
    let path = tmp.path().join("vmcsnap-node.service");
    std::fs::write(&path, unit.replace("/usr/bin/vmcsnap", &bin().display().to_string())).expect("write");
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze (scripts/setup.sh installs systemd)");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    for key in ["Type=notify", "WatchdogSec=60s", "KillMode=process", "NoNewPrivileges=yes", "PrivateTmp=yes", "StateDirectory=vmcsnap", "ProtectHome=yes"] {
        assert!(unit.lines().any(|l| l == key), "the unit sets {key}");
    }
}

#[test]
fn the_units_command_line_notifies_ready_and_stops_cleanly_on_sigterm() {
    let unit = std::fs::read_to_string(unit_file()).expect("unit file");
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let key = tmp.path().join("cluster.key");
    let cluster_id = tool(&["cluster", "init", "--key", &key.display().to_string()]);
    let node_id = tool(&["node", "id", "--data-dir", &data.display().to_string()]);
    let token = tool(&["cluster", "admit", &node_id, "--name", "kvm-01", "--key", &key.display().to_string()]);
    // The example file, with this host's values filled in.
    let port = free_port().expect("port");
    let config = tool(&["node", "config-example"])
        .replace("data-dir = \"/var/lib/vmcsnap\"", &format!("data-dir = \"{}\"", data.display()))
        .replace("listen = \"10.0.0.1:7400\"", &format!("listen = \"127.0.0.1:{port}\""))
        .replace("# cluster-key = \"CLUSTER_ID\"", &format!("cluster-key = \"{cluster_id}\""))
        .replace("# join = \"TOKEN\"", &format!("join = \"{token}\""));
    let config_path = tmp.path().join("node.toml");
    std::fs::write(&config_path, config).expect("config");

    let notify_path = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let argv: Vec<String> = exec_start(&unit)
        .into_iter()
        .map(|a| if a == "/usr/bin/vmcsnap" { bin().display().to_string() } else { a })
        .map(|a| if a == "/etc/vmcsnap/node.toml" { config_path.display().to_string() } else { a })
        .collect();
    assert_eq!(argv[1..], ["node", "run", "--config", &config_path.display().to_string()]);
    // As systemd starts it with WatchdogSec=: a 1 s watchdog, for this test.
    let mut node = Command::new(&argv[0])
        .args(&argv[1..])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf);
    if n.is_err() {
        let _ = node.kill();
    }
    assert_eq!(&buf[..n.expect("READY=1 within 30 s")], b"READY=1");
    // Then the watchdog, every half second.
    let t0 = Instant::now();
    for _ in 0..3 {
        let n = notify.recv(&mut buf).expect("WATCHDOG=1");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "three watchdog pings took {:?}", t0.elapsed());
    // Ready means serving: the control socket answers.
    let status = tool(&["cluster", "status", "--json", "--node", &data.display().to_string()]);
    assert!(status.contains("kvm-01"), "{status}");

    // `doctor` against it: every check there, the node's membership read.
    let doc: serde_json::Value = serde_json::from_str(&tool(&["doctor", "--json", "--node", &data.display().to_string()])).expect("doctor json");
    let checks = doc["checks"].as_array().expect("checks");
    let verdict = |name: &str| checks.iter().find(|c| c["name"] == name).map(|c| c["verdict"].as_str().unwrap_or("").to_string()).unwrap_or_else(|| panic!("no {name} check: {doc}"));
    assert_eq!(verdict("qemu"), "ok", "{doc}");
    let kvm_usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    assert_eq!(verdict("kvm"), if kvm_usable { "ok" } else { "warn" }, "{doc}");
    assert_eq!(verdict("node"), "ok", "{doc}");
    assert!(checks.iter().any(|c| c["name"] == "node" && c["detail"].as_str().unwrap_or("").contains("1 of 1 members reachable")), "{doc}");
    // The binary's CRC32C is the one RocksDB calls (its export took effect), on this CPU's
    // instruction.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        assert_eq!(verdict("checksums"), "ok", "{doc}");
    }
    for name in ["userfaultfd", "clock", "disk"] {
        assert!(["ok", "warn", "fail"].contains(&verdict(name).as_str()), "{doc}");
    }

    // SAFETY: kill(2) on a child we spawned and have not reaped.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(node.id() as libc::pid_t, libc::SIGTERM);
    }
    let stopping = loop {
        let n = notify.recv(&mut buf).expect("STOPPING=1");
        if &buf[..n] != b"WATCHDOG=1" {
            break buf[..n].to_vec();
        }
    };
    assert_eq!(stopping, b"STOPPING=1");
    let t0 = Instant::now();
    let exit = loop {
        if let Some(s) = node.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = node.kill();
            panic!("the node did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "a clean stop: {exit}");
    assert!(!data.join("control.sock").exists(), "the control socket is removed");
}

#[test]
fn the_package_holds_the_binary_unit_config_man_pages_and_completions() {
    let tmp = tempfile::tempdir().expect("tmp");
    let script = vmcsnap_testnet::crate_dir(env!("CARGO_MANIFEST_DIR")).join("../scripts/package-deb.sh");
    let out = Command::new(&script).arg("--bin").arg(bin()).arg("--out").arg(tmp.path()).output().expect("package-deb.sh");
    assert!(out.status.success(), "package-deb.sh: {}", String::from_utf8_lossy(&out.stderr));
    let deb = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let contents = Command::new("dpkg-deb").arg("-c").arg(&deb).output().expect("dpkg-deb -c");
    let listing = String::from_utf8_lossy(&contents.stdout).to_string();
    for path in [
        "./usr/bin/vmcsnap",
        "./lib/systemd/system/vmcsnap-node.service",
        "./etc/vmcsnap/node.toml",
        "./usr/share/man/man1/vmcsnap.1.gz",
        "./usr/share/man/man1/vmcsnap-snapshot-create.1.gz",
        "./usr/share/man/man1/vmcsnap-node-run.1.gz",
        "./usr/share/bash-completion/completions/vmcsnap",
        "./usr/share/zsh/vendor-completions/_vmcsnap",
        "./usr/share/doc/vmcsnap/operations.md",
    ] {
        assert!(listing.lines().any(|l| l.ends_with(path)), "{path} in the package:\n{listing}");
    }
    assert!(!listing.contains("stream-relay.1") && !listing.contains("man-pages.1"), "hidden commands get no man page:\n{listing}");
    let field = |f: &str| String::from_utf8_lossy(&Command::new("dpkg-deb").args(["-f", &deb, f]).output().expect("dpkg-deb -f").stdout).trim().to_string();
    assert_eq!(field("Package"), "vmcsnap");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    let conffiles = Command::new("dpkg-deb").args(["--ctrl-tarfile", &deb]).output().expect("ctrl");
    assert!(!conffiles.stdout.is_empty());
    // The man page is the CLI's own help, and the packaged config the example that parses.
    let x = tmp.path().join("x");
    assert!(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x).status().expect("dpkg-deb -x").success());
    let man = Command::new("gzip").arg("-dc").arg(x.join("usr/share/man/man1/vmcsnap-snapshot-create.1.gz")).output().expect("gzip");
    assert!(String::from_utf8_lossy(&man.stdout).contains("one cut"), "the page says what the command does");
    assert_eq!(std::fs::read_to_string(x.join("etc/vmcsnap/node.toml")).expect("config"), tool(&["node", "config-example"]) + "\n");
}
