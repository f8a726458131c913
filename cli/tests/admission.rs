//! Closed membership with real node processes: only nodes the operator's cluster key admitted
//! are members; a removed member is dropped everywhere, also by a member that was down, and
//! owns nothing of later snapshots; the control socket refuses other users.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmcsnap_protocol::PAGE_SIZE;
use vmcsnap_testnet::cluster::{free_port, Cluster};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmcsnap"))
}

/// Runs the CLI without a node; returns (success, stdout, stderr).
fn tool(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(bin()).args(args).stdin(Stdio::null()).output().expect("run");
    (o.status.success(), String::from_utf8_lossy(&o.stdout).trim().to_string(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A node process outside the test cluster; killed when dropped, also when the test fails.
struct Outsider(Child);

impl Drop for Outsider {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn member_ids(c: &Cluster, i: usize) -> Vec<String> {
    let v = c.json(i, &["cluster", "status"]).expect("status");
    v["members"].as_array().expect("members").iter().map(|m| m["id"].as_str().expect("id").to_string()).collect()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn start_outsider(dir: &Path, peer: std::net::SocketAddr) -> (Outsider, String) {
    let key = dir.join("other.key");
    let data = dir.join("outsider");
    assert!(tool(&["cluster", "init", "--key", &key.display().to_string()]).0);
    let (ok, id, err) = tool(&["node", "id", "--data-dir", &data.display().to_string()]);
    assert!(ok, "{err}");
    let (ok, admit, err) = tool(&["cluster", "admit", &id, "--name", "outsider", "--key", &key.display().to_string(), "--json"]);
    assert!(ok, "{err}");
    let admit: serde_json::Value = serde_json::from_str(&admit).expect("json");
    let listen = format!("127.0.0.1:{}", free_port().expect("port"));
    let log = std::fs::File::create(dir.join("outsider.log")).expect("log");
    let child = Command::new(bin())
        .args(["node", "run", "--data-dir", &data.display().to_string(), "--listen", &listen, "--replicas", "1"])
        .args(["--cluster-key", admit["cluster_id"].as_str().expect("id"), "--join", admit["token"].as_str().expect("token")])
        .args(["--peer", &peer.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn");
    (Outsider(child), id)
}

#[test]
fn only_admitted_nodes_are_members_and_removal_reaches_everyone() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(&bin(), &tmp.path().join("cluster"), 4, 2, None).expect("cluster");
    let key = c.dir.join("cluster.key").display().to_string();
    let ids: Vec<String> = (0..4).map(|i| c.json(i, &["cluster", "status"]).expect("status")["node"].as_str().expect("node").to_string()).collect();

    // A node refuses to start unadmitted, or with a token made for another node.
    let fresh = tmp.path().join("fresh");
    let cluster_id = std::fs::read_to_string(c.nodes[0].dir.join("cluster.id")).expect("cluster id");
    let port = free_port().expect("port").to_string();
    let listen = format!("127.0.0.1:{port}");
    let (ok, _, err) = tool(&["node", "run", "--data-dir", &fresh.display().to_string(), "--listen", &listen, "--cluster-key", cluster_id.trim()]);
    assert!(!ok && err.contains("not admitted"), "{err}");
    let n1_token = std::fs::read_to_string(c.nodes[0].dir.join("certificate")).expect("certificate");
    let (ok, _, err) = tool(&["node", "run", "--data-dir", &fresh.display().to_string(), "--listen", &listen, "--join", n1_token.trim()]);
    assert!(!ok && err.contains("certificate is for node"), "{err}");

    // A node of another cluster that dials in is never a member, and takes no one in.
    let (outsider, outsider_id) = start_outsider(tmp.path(), c.nodes[0].addr);
    std::thread::sleep(Duration::from_secs(5));
    for i in 0..4 {
        let m = member_ids(&c, i);
        assert_eq!(m.len(), 4, "node {i}: {m:?}");
        assert!(!m.contains(&outsider_id), "node {i} took the outsider in");
    }
    drop(outsider);

    // Removal needs --yes, then reaches every live member at once ...
    c.stop(2).expect("stop n3");
    let (ok, _, err) = tool(&["cluster", "remove", "n4", "--key", &key, "--node", &c.nodes[0].dir.display().to_string()]);
    assert!(!ok && err.contains("--yes"), "{err}");
    let r = c.json(0, &["cluster", "remove", "n4", "--key", &key, "--yes"]).expect("remove");
    assert_eq!(r["node_id"], ids[3]);
    for i in [0, 1] {
        wait_until(&format!("node {i} drops n4"), Duration::from_secs(10), || !member_ids(&c, i).contains(&ids[3]));
    }
    // ... and a member that was down learns it when it comes back.
    c.restart(2).expect("restart n3");
    wait_until("n3 drops n4", Duration::from_secs(30), || !member_ids(&c, 2).contains(&ids[3]));
    // Removing again says so.
    let r = c.json(1, &["cluster", "remove", &ids[3], "--key", &key, "--yes"]).expect("remove again");
    assert_eq!(r["already"], true);

    // A snapshot taken afterwards places nothing on the removed member.
    wait_until("n1 sees n2 and n3 up", Duration::from_secs(30), || {
        let v = c.json(0, &["cluster", "status"]).expect("status");
        v["members"].as_array().expect("members").iter().filter(|m| m["alive"] == true).count() == 3
    });
    let img = tmp.path().join("vm.img");
    let data: Vec<u8> = (0..64 * PAGE_SIZE).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(&img, &data).expect("write");
    c.json(0, &["snapshot", "create", "after", "--vm", &format!("a=file:{}", img.display())]).expect("snapshot");
    let show = c.json(0, &["snapshot", "show", "after"]).expect("show");
    let placement: Vec<&str> = show["placement"].as_array().expect("placement").iter().map(|p| p.as_str().expect("id")).collect();
    assert_eq!(placement.len(), 3, "{placement:?}");
    assert!(!placement.contains(&ids[3].as_str()), "the removed member owns pages: {placement:?}");

    // The control socket is the node's user's only.
    let uid = String::from_utf8_lossy(&Command::new("id").arg("-u").output().expect("id").stdout).trim().to_string();
    use std::os::unix::fs::PermissionsExt;
    let set_mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
    let as_nobody = || {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin())
            .args(["cluster", "status", "--node", &c.nodes[0].dir.display().to_string()])
            .output()
            .expect("setpriv")
    };
    if uid == "0" {
        // Everything above the data directory open to all: the data directory alone keeps
        // other users out ...
        set_mode(tmp.path(), 0o755);
        set_mode(&c.dir, 0o755);
        let o = as_nobody();
        assert!(!o.status.success(), "user nobody used the control socket: {}", String::from_utf8_lossy(&o.stdout));
        // ... and with the directory and socket opened by mistake, the node's peer-credential
        // check still does.
        set_mode(&c.nodes[0].dir, 0o711);
        set_mode(&c.nodes[0].dir.join("control.sock"), 0o666);
        let o = as_nobody();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("may not use this node"), "{err}");
        set_mode(&c.nodes[0].dir, 0o700);
        set_mode(&c.nodes[0].dir.join("control.sock"), 0o600);
    } else {
        eprintln!("not root: the other-user check of the control socket is skipped");
    }
    let mode = std::fs::metadata(&c.nodes[0].dir).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the data directory is owner-only");
    let mode = std::fs::metadata(c.nodes[0].dir.join("control.sock")).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is owner-only");
}
