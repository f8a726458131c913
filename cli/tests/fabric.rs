//! The fabric end to end, with real node processes on loopback: real libp2p membership, real
//! QUIC between nodes, real RocksDB stores, driven through the real `vmcsnap` CLI.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use vmcsnap_protocol::manifest::build_manifest;
use vmcsnap_protocol::{hash_page, PageHash, PAGE_SIZE};
use vmcsnap_testnet::cluster::Cluster;
use vmcsnap_testnet::gen::{self, GenConfig};
use vmcsnap_testnet::pagestats;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmcsnap"))
}

fn page_hashes(path: &Path) -> Vec<PageHash> {
    std::fs::read(path).expect("read image").chunks(PAGE_SIZE).map(hash_page).collect()
}

/// Distinct non-zero manifest chunk pages over these images: the fabric stores them like pages.
fn manifest_chunks(paths: &[PathBuf]) -> u64 {
    let mut chunks = HashSet::new();
    for p in paths {
        for (h, _) in build_manifest(&page_hashes(p)).chunks {
            chunks.insert(h);
        }
    }
    chunks.len() as u64
}

fn vm_args(paths: &[PathBuf]) -> Vec<String> {
    let mut a = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        a.push("--vm".into());
        a.push(format!("vm{i}=file:{}", p.display()));
    }
    a
}

fn fails(c: &Cluster, i: usize, args: &[&str], msg: &str) {
    fails_as(c, i, args, msg, None);
}

/// `args` fails with `msg` on stderr; with `--json`, stdout carries the error's kind (`kind`
/// when given) and the same message.
fn fails_as(c: &Cluster, i: usize, args: &[&str], msg: &str, kind: Option<&str>) {
    let o = c.cli(i, args).expect("run");
    assert!(!o.status.success(), "{args:?} should fail");
    assert!(stderr(&o).contains(msg), "{args:?}: expected {msg:?} in {:?}", stderr(&o));
    let mut a = args.to_vec();
    a.push("--json");
    let o = c.cli(i, &a).expect("run");
    assert!(!o.status.success(), "{args:?} --json should fail");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?} --json: {e}: {:?}", String::from_utf8_lossy(&o.stdout)));
    let got = v["error"]["kind"].as_str().unwrap_or_else(|| panic!("{args:?} --json: no error kind in {v}"));
    const KINDS: &[&str] = &["invalid", "not_found", "conflict", "unavailable", "peer", "qemu", "storage", "aborted", "version_mismatch", "internal"];
    assert!(KINDS.contains(&got), "{args:?}: unknown kind {got}");
    if let Some(k) = kind {
        assert_eq!(got, k, "{args:?}: {v}");
    }
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains(msg)), "{args:?}: {v}");
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn snapshot_on_one_host_restore_on_another_with_the_first_down() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(&bin(), &tmp.path().join("cluster"), 3, 2, None).expect("cluster");
    // Two VMs of one image: 2 MiB each, sharing pages, with zero and duplicate pages.
    let cfg = GenConfig { vms: 2, pages: 512, seed: 42, ..Default::default() };
    let paths = gen::write_images(&cfg, &tmp.path().join("img")).expect("gen");
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let want = pagestats::count(&refs).expect("count");
    assert!(want.zero > 0 && want.distinct_nonzero < want.per_vm_distinct_nonzero, "images share pages: {want:?}");

    let mut args: Vec<String> = vec!["snapshot".into(), "create".into(), "s1".into()];
    args.extend(vm_args(&paths));
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let s1 = c.json(0, &a).expect("snapshot");
    let vms = s1["vms"].as_array().expect("vms");
    let sum = |k: &str| vms.iter().map(|v| v[1][k].as_u64().expect("counter")).sum::<u64>();
    assert_eq!(sum("pages_total"), want.total);
    assert_eq!(sum("pages_zero"), want.zero);
    assert_eq!(sum("pages_nonzero"), want.total - want.zero);
    assert_eq!(sum("pages_new"), want.distinct_nonzero, "each distinct page is new exactly once");
    assert_eq!(sum("pages_dedup"), want.total - want.zero - want.distinct_nonzero);

    // Exactly every distinct non-zero page (plus the manifest chunk pages) on 2 owners.
    let chunks = manifest_chunks(&paths);
    assert_eq!(c.stored_pages(0).expect("status"), (want.distinct_nonzero + chunks) * 2);

    // The same images again move no page bytes at all.
    args[2] = "s2".into();
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let s2 = c.json(0, &a).expect("second snapshot");
    assert_eq!(s2["bytes_sent"], 0);
    assert_eq!(s2["new_bytes"], 0);

    // The list sorts and filters.
    let names = |args: &[&str]| -> Vec<String> {
        let l = c.json(0, args).expect("list");
        l.as_array().expect("list").iter().map(|s| s["name"].as_str().unwrap_or("").to_string()).collect()
    };
    assert_eq!(names(&["snapshot", "list"]), ["s1", "s2"]);
    assert_eq!(names(&["snapshot", "list", "--sort", "name", "--reverse"]), ["s2", "s1"]);
    assert_eq!(names(&["snapshot", "list", "--vm", "vm1", "--since", "1h"]), ["s1", "s2"]);
    assert!(names(&["snapshot", "list", "--vm", "nobody"]).is_empty());
    assert_eq!(c.stored_pages(0).expect("status"), (want.distinct_nonzero + chunks) * 2);

    // Any node lists both.
    let list = c.json(2, &["snapshot", "list"]).expect("list");
    let names: Vec<&str> = list.as_array().expect("list").iter().map(|s| s["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["s1", "s2"]);

    // Stop the host that took the snapshot; restore both VMs on another.
    let node1 = c.json(0, &["cluster", "status"]).expect("status")["node"].clone();
    c.stop(0).expect("stop");
    for (i, p) in paths.iter().enumerate() {
        let out = tmp.path().join(format!("restored{i}.img"));
        let r = c
            .json(2, &["snapshot", "restore", "s1", "--vm", &format!("vm{i}"), "--to", &format!("file:{}", out.display())])
            .expect("restore with node 1 down");
        assert_eq!(r[0]["raw_bytes"], std::fs::metadata(p).expect("meta").len());
        assert!(std::fs::read(&out).expect("read") == std::fs::read(p).expect("read"), "vm{i} restored byte-identical");
    }

    // Node 1 comes back with its identity and its pages.
    let before = c.json(1, &["cluster", "status"]).expect("status");
    let pages_of = |v: &serde_json::Value, id: &serde_json::Value| {
        v["members"].as_array().expect("members").iter().find(|m| m["id"] == *id).map(|m| m["pages"].clone())
    };
    assert_eq!(pages_of(&before, &node1), Some(serde_json::Value::Null), "node 1 is down");
    c.restart(0).expect("restart");
    c.wait_converged(std::time::Duration::from_secs(30)).expect("converged");
    let after = c.json(0, &["cluster", "status"]).expect("status");
    assert_eq!(after["node"], node1, "same identity after restart");
    assert!(pages_of(&after, &node1).and_then(|p| p.as_u64()).unwrap_or(0) > 0, "its pages survived");
    assert_eq!(c.stored_pages(0).expect("status"), (want.distinct_nonzero + chunks) * 2);

    // What each snapshot holds uniquely (what deleting it would free): s1 and s2 hold the
    // same pages, so neither alone frees anything; s3, vm0 with 40 pages rewritten, frees
    // exactly its new pages and the manifest chunks only it has.
    let mut img = std::fs::read(&paths[0]).expect("read");
    for (i, page) in img.chunks_mut(PAGE_SIZE).take(40).enumerate() {
        page.fill(0x5a);
        page[..8].copy_from_slice(&(i as u64 + 0xfeed_0000).to_le_bytes());
    }
    let p3 = tmp.path().join("img").join("vm0-rewritten.img");
    std::fs::write(&p3, &img).expect("write");
    c.json(1, &["snapshot", "create", "s3", "--vm", &format!("vm0=file:{}", p3.display())]).expect("s3");
    let nonzero = |p: &Path| -> HashSet<PageHash> { std::fs::read(p).expect("read").chunks(PAGE_SIZE).filter(|d| d.iter().any(|&b| b != 0)).map(hash_page).collect() };
    let before: HashSet<PageHash> = paths.iter().flat_map(|p| nonzero(p)).collect();
    let new_pages = nonzero(&p3).difference(&before).count() as u64;
    assert_eq!(new_pages, 40);
    let old_chunks: HashSet<PageHash> = paths.iter().flat_map(|p| build_manifest(&page_hashes(p)).chunks.into_iter().map(|(h, _)| h)).collect();
    let new_chunks = build_manifest(&page_hashes(&p3)).chunks.into_iter().filter(|(h, _)| !old_chunks.contains(h)).count() as u64;
    let l = c.json(2, &["snapshot", "list", "--sort", "unique", "--reverse"]).expect("list --unique");
    let got: Vec<(String, u64)> = l.as_array().expect("list").iter().map(|s| (s["name"].as_str().unwrap_or("").to_string(), s["unique_bytes"].as_u64().expect("unique_bytes"))).collect();
    assert_eq!(got[0], ("s3".to_string(), (new_pages + new_chunks) * PAGE_SIZE as u64), "{l}");
    assert_eq!(got[1..], [("s2".to_string(), 0), ("s1".to_string(), 0)], "{l}");
    // Without --unique the list does not read manifests, and says nothing of it.
    assert!(c.json(2, &["snapshot", "list"]).expect("list")[0]["unique_bytes"].is_null());
}

#[test]
fn bad_input_is_refused_and_commits_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(&bin(), &tmp.path().join("cluster"), 3, 2, None).expect("cluster");
    let good = tmp.path().join("good.img");
    let mut data = vec![0u8; 64 * PAGE_SIZE];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    std::fs::write(&good, &data).expect("write");
    let odd = tmp.path().join("odd.img");
    std::fs::write(&odd, vec![1u8; PAGE_SIZE + 1]).expect("write");
    let gvm = format!("a=file:{}", good.display());

    fails_as(&c, 0, &["snapshot", "create", "x1", "--vm", "a=file:/nonexistent/mem.img"], "cannot read", Some("invalid"));
    fails(&c, 0, &["snapshot", "create", "x2", "--vm", &format!("a=file:{}", odd.display())], "whole number");
    fails(&c, 0, &["snapshot", "create", "x3", "--vm", "a"], "not registered on any live member");
    fails(&c, 0, &["snapshot", "create", "x4", "--vm", "a=qcow2:/x"], "unknown memory source");
    fails(&c, 0, &["snapshot", "create", "bad/name", "--vm", &gvm], "may only use");
    fails(&c, 0, &["snapshot", "create", "x5", "--vm", &gvm, "--vm", &gvm], "given twice");

    assert!(c.cli(0, &["snapshot", "create", "ok", "--vm", &gvm]).expect("run").status.success());
    fails_as(&c, 1, &["snapshot", "create", "ok", "--vm", &gvm], "already exists", Some("conflict"));
    // A member that was down when "late" was committed refuses the name too, before any VM is
    // paused ("already exists", not a lost claim at commit): from its own catalog if it has
    // caught up, else from the name's arbiters.
    c.stop(2).expect("stop");
    let t0 = std::time::Instant::now();
    while c.json(0, &["cluster", "members"]).expect("members")["members"].as_array().expect("members").iter().any(|m| m["name"] == "n3" && m["alive"] == true) {
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "n3 not seen down");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    // Pages of their own: "late" is placed on n1 and n2 only, and the pages of "ok" must not
    // come to be on n1 that way (a restore below needs some of them to be on n2 and n3 only).
    let late = tmp.path().join("late.img");
    std::fs::write(&late, data.iter().map(|b| b ^ 0x5a).collect::<Vec<u8>>()).expect("write");
    let lvm = format!("a=file:{}", late.display());
    let o = c.cli(0, &["snapshot", "create", "late", "--vm", &lvm]).expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    c.restart(2).expect("restart");
    c.wait_converged(std::time::Duration::from_secs(30)).expect("converged");
    fails_as(&c, 2, &["snapshot", "create", "late", "--vm", &lvm], "already exists", Some("conflict"));
    fails_as(&c, 2, &["snapshot", "restore", "nope", "--vm", "a", "--to", "file:/tmp/x"], "no snapshot named", Some("not_found"));
    fails_as(&c, 2, &["snapshot", "show", "nope"], "no snapshot named", Some("not_found"));
    fails(&c, 2, &["snapshot", "restore", "ok", "--vm", "b", "--to", "file:/tmp/x"], "has no VM");
    // An existing target is never overwritten without --force.
    let existing = tmp.path().join("existing.img");
    std::fs::write(&existing, b"keep me").expect("write");
    fails(&c, 2, &["snapshot", "restore", "ok", "--vm", "a", "--to", &format!("file:{}", existing.display())], "--force");
    assert_eq!(std::fs::read(&existing).expect("read"), b"keep me");
    // A link at the target is never written through: refused without --force (a dangling one
    // too, and its target is not created); with --force the link itself is replaced.
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"not yours").expect("write");
    let link = tmp.path().join("link.img");
    std::os::unix::fs::symlink(&victim, &link).expect("symlink");
    let dangling = tmp.path().join("dangling.img");
    let nowhere = tmp.path().join("created-through-link");
    std::os::unix::fs::symlink(&nowhere, &dangling).expect("symlink");
    for l in [&link, &dangling] {
        fails(&c, 2, &["snapshot", "restore", "ok", "--vm", "a", "--to", &format!("file:{}", l.display())], "--force");
    }
    assert!(!nowhere.exists());
    c.json(2, &["snapshot", "restore", "ok", "--vm", "a", "--to", &format!("file:{}", link.display()), "--force"]).expect("forced restore");
    assert!(!std::fs::symlink_metadata(&link).expect("link").file_type().is_symlink(), "the link was replaced by the restored file");
    assert_eq!(std::fs::read(&link).expect("read"), std::fs::read(&good).expect("read"));
    assert_eq!(std::fs::read(&victim).expect("read"), b"not yours");
    // No node there.
    let o = std::process::Command::new(bin())
        .args(["snapshot", "list", "--node", "/nonexistent/control.sock"])
        .output()
        .expect("run");
    assert!(!o.status.success() && stderr(&o).contains("no vmcsnap node"), "{}", stderr(&o));

    // Only one member left with replicas 2: refused before anything is written.
    c.kill(1);
    c.kill(2);
    c.wait_converged(std::time::Duration::from_secs(30)).expect("converged");
    fails_as(&c, 0, &["snapshot", "create", "x6", "--vm", &gvm], "replicas = 2 needs at least 2", Some("unavailable"));
    // Both owners of some pages are down: a clear error, and no partial target.
    let target = tmp.path().join("never.img");
    fails_as(&c, 0, &["snapshot", "restore", "ok", "--vm", "a", "--to", &format!("file:{}", target.display())], "unavailable", Some("unavailable"));
    assert!(!target.exists());
    assert!(std::fs::read_dir(tmp.path()).expect("dir").all(|e| !e.expect("entry").file_name().to_string_lossy().contains("partial")));

    let list = c.json(0, &["snapshot", "list"]).expect("list");
    let names: Vec<&str> = list.as_array().expect("list").iter().map(|s| s["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["ok", "late"], "failed snapshots are invisible");
}

/// One scrape of `http://addr/metrics`: the status line and the body.
fn scrape(addr: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("reply");
    let (head, body) = out.split_once("\r\n\r\n").expect("a reply head");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// A metric's value in a scrape's text (`name{labels} value`).
fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
        .parse()
        .expect("a number")
}

/// Every node with `--metrics`: scraped while a snapshot runs and after it, the counters match
/// what the snapshot reported and the store figures match `cluster status`.
#[test]
fn metrics_are_scraped_during_a_snapshot_and_match_cluster_status() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ports: Vec<u16> = (0..3).map(|_| vmcsnap_testnet::cluster::free_port().expect("port")).collect();
    let extra = ports.iter().map(|p| vec!["--metrics".to_string(), format!("127.0.0.1:{p}")]).collect();
    let c = Cluster::start_with_args(&bin(), &tmp.path().join("cluster"), 3, 2, None, extra).expect("cluster");
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let cfg = GenConfig { vms: 2, pages: 8192, seed: 7, ..Default::default() };
    let paths = gen::write_images(&cfg, &tmp.path().join("img")).expect("gen");
    let (status, body) = scrape(&addr(0));
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(metric(&body, "vmcsnap_members{state=\"up\"}"), 3.0, "{body}");

    // Scrapes while the snapshot runs: each answers.
    let mut args: Vec<String> = vec!["snapshot".into(), "create".into(), "m1".into(), "--node".into(), c.nodes[0].dir.display().to_string(), "--json".into()];
    args.extend(vm_args(&paths));
    let mut create = std::process::Command::new(bin())
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("create");
    let mut scrapes = 0;
    while create.try_wait().expect("wait").is_none() || scrapes == 0 {
        assert_eq!(scrape(&addr(scrapes % 3)).0, "HTTP/1.1 200 OK");
        scrapes += 1;
    }
    let out = create.wait_with_output().expect("create");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{scrapes} scrapes during the snapshot");
    // With --json, progress comes on stderr as one JSON object a line.
    let events: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stderr).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect();
    assert!(!events.is_empty() && events.iter().all(|e| e["progress"]["phase"].is_string() && e["progress"]["total"].is_u64()), "{events:?}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");

    let (_, body) = scrape(&addr(0));
    assert_eq!(metric(&body, "vmcsnap_snapshots_total{outcome=\"committed\"}"), 1.0);
    assert_eq!(metric(&body, "vmcsnap_snapshot_captured_bytes_total"), s["raw_bytes"].as_f64().expect("raw"));
    assert_eq!(metric(&body, "vmcsnap_snapshot_new_bytes_total"), s["new_bytes"].as_f64().expect("new"));
    assert_eq!(metric(&body, "vmcsnap_snapshot_duration_seconds_count"), 1.0);
    let sent: f64 = body.lines().filter(|l| l.starts_with("vmcsnap_peer_sent_bytes_total{")).map(|l| l.rsplit(' ').next().unwrap_or("0").parse::<f64>().unwrap_or(0.0)).sum();
    assert!(sent >= s["bytes_sent"].as_f64().expect("sent") / 2.0, "the pages went to peers over QUIC: {sent} bytes");
    let status = c.json(0, &["cluster", "status"]).expect("status");
    for (i, m) in status["members"].as_array().expect("members").iter().enumerate() {
        let name = m["name"].as_str().expect("name");
        let node = (0..3).find(|j| Cluster::name(*j) == name).unwrap_or_else(|| panic!("member {name}"));
        let (_, body) = scrape(&addr(node));
        assert_eq!(metric(&body, "vmcsnap_store_pages"), m["pages"].as_f64().expect("pages"), "member {i} ({name})");
        assert_eq!(metric(&body, "vmcsnap_store_bytes"), m["bytes"].as_f64().expect("bytes"), "member {i} ({name})");
    }
    let (status, _) = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr(2)).expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("reply");
        (out.lines().next().unwrap_or_default().to_string(), ())
    };
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}
