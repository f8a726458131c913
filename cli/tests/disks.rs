//! Disks in the cut: a VM's writable disks are captured as they were in the cut's pause
//! (QEMU's image fleecing, read over NBD), stored like pages (deduplicated with everything
//! else), and a rollback with `--launch` starts the VM on new images of them.
//!
//! Needs `qemu-system-x86_64`, the guest build and e2fsprogs (`scripts/test.sh` provides them).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vmcsnap_testnet::cluster::Cluster;
use vmcsnap_testnet::guest::{self, Guest, Lab, QmpSync};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmcsnap"))
}

const BOOT: Duration = Duration::from_secs(120);
const CONSOLE: Duration = Duration::from_secs(60);

/// The md5 field of "DISKWROTE NAME MD5" / "DISKCHECK NAME MD5|missing".
fn third(line: &str) -> String {
    line.split_whitespace().nth(2).unwrap_or("").to_string()
}

fn md5_hex(bytes: &[u8]) -> String {
    let out = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(bytes)?;
            c.wait_with_output()
        })
        .expect("md5sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
}

/// A file of an (unmounted) ext4 image, read with e2fsprogs' debugfs; `None` if absent.
fn file_in_image(img: &Path, name: &str) -> Option<Vec<u8>> {
    let stat = Command::new("debugfs").arg("-R").arg(format!("stat /{name}")).arg(img).output().expect("debugfs");
    if !stat.status.success() || String::from_utf8_lossy(&stat.stderr).contains("not found") {
        return None;
    }
    Some(Command::new("debugfs").arg("-R").arg(format!("cat /{name}")).arg(img).output().expect("debugfs").stdout)
}

/// Non-zero 4 KiB blocks of `files`: (distinct hashes, count per file).
fn blocks(files: &[&Path]) -> (HashSet<[u8; 32]>, Vec<usize>) {
    let mut all = HashSet::new();
    let mut per = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let mut n = 0;
        for p in bytes.chunks(4096) {
            let mut page = [0u8; 4096];
            page[..p.len()].copy_from_slice(p);
            if page.iter().any(|&b| b != 0) {
                n += 1;
                all.insert(*blake3::hash(&page).as_bytes());
            }
        }
        per.push(n);
    }
    (all, per)
}

/// Boots guest `name` in `vms` on a copy of the guest build's disk image, mounted; returns it
/// and its image.
fn disk_guest(vms: &Path, name: &str, mem_mib: u32, accel: &str) -> (Guest, PathBuf) {
    let (img, drive) = guest::disk_copy(vms, name).expect("disk");
    let drive: Vec<&str> = drive.iter().map(String::as_str).collect();
    let g = Guest::start_with(vms, name, mem_mib, "disk=1", accel, &drive).expect("guest");
    g.wait_for("DISK-OK", BOOT).expect("the guest mounts its disk");
    (g, img)
}

/// The vmcsnap block nodes, jobs and exports in the QEMU behind `qmp`.
fn leftovers(qmp: &Path) -> Vec<String> {
    let mut q = QmpSync::connect(qmp).expect("qmp");
    let mut out = Vec::new();
    for (cmd, key, args) in [
        ("query-block-jobs", "device", serde_json::json!({})),
        ("query-block-exports", "id", serde_json::json!({})),
        ("query-named-block-nodes", "node-name", serde_json::json!({ "flat": true })),
    ] {
        let v = q.execute(cmd, args).expect(cmd);
        out.extend(v.as_array().into_iter().flatten().filter_map(|e| e[key].as_str()).filter(|s| s.starts_with("vmcsnap-")).map(str::to_string));
    }
    out
}

/// A guest writes file A to its disk and syncs; a snapshot is taken; it writes file B. It is
/// killed and rolled back on another host: A is there (in the guest and in the new image), B
/// is not, the guest writes on, and the new image's file system is clean once unmounted. The
/// original disk is never written by the restore.
#[test]
fn a_rollback_brings_the_disk_back_as_it_was_at_the_cut() {
    let lab = Lab::new();
    let c = Cluster::start(&bin(), &lab.dir().join("cluster"), 2, 1, None).expect("cluster");
    let vms = lab.vms.clone();
    let qmp = vms.join("g.qmp");
    lab.reap(qmp.clone());
    let (g, orig) = disk_guest(&vms, "g", 128, &lab.accel);
    let a = third(&g.console("vmcsnap-disk-write A 4", "DISKWROTE A", CONSOLE).expect("write A"));
    c.json(0, &["vm", "add", "g", "--qmp", &qmp.display().to_string()]).expect("vm add");
    // QEMU 7.2 deactivates a VM's disks at the end of a stop-copy or pre-copy migration, which
    // the disk views forbid: such a snapshot with disks is refused, clearly, before the VM is
    // touched (and works with --no-disks).
    let refused = c.cli(0, &["snapshot", "create", "x", "--vm", "g", "--mode", "stop-copy"]).expect("cli");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("--mode live") && err.contains("--no-disks"), "{err}");
    c.json(0, &["snapshot", "create", "x", "--vm", "g", "--mode", "pre-copy", "--no-disks"]).expect("memory only");
    assert_eq!(QmpSync::connect(&qmp).and_then(|mut q| q.status()).expect("status"), "running");
    c.json(0, &["snapshot", "create", "s", "--vm", "g"]).expect("snapshot");
    g.console("vmcsnap-disk-write B 2", "DISKWROTE B", CONSOLE).expect("write B");
    let show = c.json(0, &["snapshot", "show", "s"]).expect("show");
    let blocks = show["vms"][0]["blocks"].as_array().expect("blocks").clone();
    assert!(blocks.iter().any(|b| b["name"].as_str().is_some_and(|n| n.starts_with("disk:") && n.ends_with(":virtio0")) && b["bytes"] == 64 << 20), "{blocks:?}");
    let orig_len = std::fs::metadata(&orig).expect("orig").len();
    guest::kill_by_qmp(&qmp);
    drop(g);

    let r = c.json(0, &["snapshot", "restore", "s", "--launch", "--on", "n2"]).expect("restore");
    let r = &r[0];
    let disks = r["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 1, "{r}");
    let img = PathBuf::from(disks[0].as_str().expect("disk").strip_prefix("virtio0=").expect("virtio0=PATH"));
    assert!(img.starts_with(c.nodes[1].dir.join("disks").join("g")), "{}", img.display());
    assert_eq!(std::fs::metadata(&img).expect("image").len(), 64 << 20);

    let g = Guest::paths(&vms, "g");
    assert_eq!(third(&g.console("vmcsnap-disk-check A", "DISKCHECK A", CONSOLE).expect("check A")), a, "A as written before the cut");
    assert_eq!(third(&g.console("vmcsnap-disk-check B", "DISKCHECK B", CONSOLE).expect("check B")), "missing", "B was written after the cut");
    let c_md5 = third(&g.console("vmcsnap-disk-write C 1", "DISKWROTE C", CONSOLE).expect("the restored guest writes on"));
    g.console("vmcsnap-umount", "UMOUNTED", CONSOLE).expect("umount");
    guest::kill_by_qmp(&qmp);

    let fsck = Command::new("e2fsck").arg("-fn").arg(&img).output().expect("e2fsck");
    assert!(fsck.status.success(), "the restored file system is clean: {}", String::from_utf8_lossy(&fsck.stdout));
    assert_eq!(md5_hex(&file_in_image(&img, "A").expect("A in the restored image")), a);
    assert_eq!(md5_hex(&file_in_image(&img, "C").expect("C in the restored image")), c_md5);
    assert!(file_in_image(&img, "B").is_none(), "B is not in the restored image");
    assert_eq!(std::fs::metadata(&orig).expect("orig").len(), orig_len, "the original disk is left alone");

    // In place, on n1: refused without --yes; with it, the VM's own image is the snapshot's.
    let no = c.cli(0, &["snapshot", "restore", "s", "--launch", "--on", "n1", "--in-place"]).expect("cli");
    assert!(!no.status.success() && String::from_utf8_lossy(&no.stderr).contains("--yes"), "{}", String::from_utf8_lossy(&no.stderr));
    let r = c.json(0, &["snapshot", "restore", "s", "--launch", "--on", "n1", "--in-place", "--yes"]).expect("restore in place");
    assert_eq!(r[0]["disks"][0].as_str(), Some(format!("virtio0={}", orig.display()).as_str()), "{r}");
    let g = Guest::paths(&vms, "g");
    assert_eq!(third(&g.console("vmcsnap-disk-check A", "DISKCHECK A", CONSOLE).expect("check A")), a);
    assert_eq!(third(&g.console("vmcsnap-disk-check B", "DISKCHECK B", CONSOLE).expect("check B")), "missing");
    g.console("vmcsnap-umount", "UMOUNTED", CONSOLE).expect("umount");
    guest::kill_by_qmp(&qmp);
    assert!(file_in_image(&orig, "B").is_none() && file_in_image(&orig, "A").is_some_and(|d| md5_hex(&d) == a), "the image itself rolled back");
    let fsck = Command::new("e2fsck").arg("-fn").arg(&orig).output().expect("e2fsck");
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
}

/// Two guests whose disks are copies of one image, snapshotted together: every distinct
/// non-zero block of their memory and disks is stored once. Counted independently from the
/// snapshot's memory and disks written back to files.
#[test]
fn disks_cloned_from_one_image_are_stored_once() {
    let lab = Lab::new();
    let c = Cluster::start(&bin(), &lab.dir().join("cluster"), 2, 1, None).expect("cluster");
    let vms = lab.vms.clone();
    lab.reap(lab.qmp("g1"));
    lab.reap(lab.qmp("g2"));
    let mut guests = Vec::new();
    for name in ["g1", "g2"] {
        let (_img, drive) = guest::disk_copy(&vms, name).expect("disk");
        let drive: Vec<&str> = drive.iter().map(String::as_str).collect();
        let g = Guest::start_with(&vms, name, 96, "disk=1", &lab.accel, &drive).expect("guest");
        guests.push(g);
    }
    for g in &guests {
        g.wait_for("DISK-OK", BOOT).expect("disk mounted");
        c.json(0, &["vm", "add", &g.name, "--qmp", &g.qmp.display().to_string()]).expect("vm add");
    }
    // A little private data on each disk.
    guests[0].console("vmcsnap-disk-write P1 1", "DISKWROTE P1", CONSOLE).expect("write");
    guests[1].console("vmcsnap-disk-write P2 1", "DISKWROTE P2", CONSOLE).expect("write");
    c.json(0, &["snapshot", "create", "s", "--vm", "g1", "--vm", "g2"]).expect("snapshot");
    for mut g in guests {
        g.kill();
    }
    let show = c.json(0, &["snapshot", "show", "s"]).expect("show");
    let new: u64 = show["vms"].as_array().expect("vms").iter().map(|v| v["stats"]["pages_new"].as_u64().expect("pages_new")).sum();

    let out = lab.dir().join("out");
    std::fs::create_dir_all(&out).expect("out");
    let mut files = Vec::new();
    for vm in ["g1", "g2"] {
        let mem = out.join(format!("{vm}.mem"));
        let disk = out.join(format!("{vm}.disk"));
        c.json(0, &["snapshot", "restore", "s", "--vm", vm, "--to", &format!("file:{}", mem.display())]).expect("memory to a file");
        c.json(0, &["snapshot", "restore", "s", "--vm", vm, "--disk", "virtio0", "--to", &format!("file:{}", disk.display())]).expect("disk to a file");
        assert_eq!(std::fs::metadata(&disk).expect("disk").len(), 64 << 20);
        files.push(mem);
        files.push(disk);
    }
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (distinct, _) = blocks(&refs);
    assert_eq!(new, distinct.len() as u64, "every distinct non-zero block of memory and disks is stored once");
    // Each disk holds 1 MiB (256 blocks) of its own; nearly all of the rest is the image's.
    let (disk_distinct, per) = blocks(&[&files[1], &files[3]]);
    let shared = per[0] + per[1] - disk_distinct.len();
    assert!(shared * 10 >= (per[0] - 256) * 9, "the two disks share their image's blocks: {} distinct of {} + {}", disk_distinct.len(), per[0], per[1]);
    // Both disk files are whole ext4 file systems of their own.
    for d in [&files[1], &files[3]] {
        assert!(file_in_image(d, "base.txt").is_some(), "{}", d.display());
    }
}

/// A snapshot whose capturing node dies while it reads a disk: the guest runs on, nothing is
/// committed, and once the node is back nothing of the snapshot is left in QEMU (fleecing
/// job, filter, export, temporary target) or on disk.
#[test]
fn a_snapshot_that_dies_reading_a_disk_leaves_nothing_behind() {
    let lab = Lab::new();
    let mut c = Cluster::start(&bin(), &lab.dir().join("cluster"), 2, 1, None).expect("cluster");
    let vms = lab.vms.clone();
    std::fs::create_dir_all(&vms).expect("vms");
    let qmp = vms.join("g.qmp");
    lab.reap(qmp.clone());
    // A raw disk of random data (the guest does not mount it): long enough to read that the
    // node dies in the middle.
    let img = vms.join("g.img");
    let st = Command::new("dd").arg("if=/dev/urandom").arg(format!("of={}", img.display())).args(["bs=1M", "count=160", "status=none"]).status().expect("dd");
    assert!(st.success());
    let drive = format!("file={},if=virtio,format=raw", img.display());
    let g = lab.guest_with("g", 96, "", &["-drive", &drive]);
    g.wait_for("BOOT-OK", BOOT).expect("boot");
    c.json(0, &["vm", "add", "g", "--qmp", &qmp.display().to_string()]).expect("vm add");

    // Taken from n2; n1 (the guest's host) dies once it reads the disk.
    let create = Command::new(bin())
        .args(["snapshot", "create", "s", "--vm", "g", "--json", "--node"])
        .arg(c.nodes[1].dir.as_os_str())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let log = c.nodes[0].dir.join("node.log");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("reading the disks as they were in the pause") {
        assert!(t0.elapsed() < Duration::from_secs(120), "the capture never read the disk");
        std::thread::sleep(Duration::from_millis(5));
    }
    c.kill(0);
    let out = create.wait_with_output().expect("wait");
    assert!(!out.status.success(), "the snapshot lost its capturing node: {}", String::from_utf8_lossy(&out.stdout));
    let left = leftovers(&qmp);
    assert!(!left.is_empty(), "the disk view was in place when the node died");
    assert_eq!(QmpSync::connect(&qmp).and_then(|mut q| q.status()).expect("status"), "running", "the guest runs on");

    c.restart(0).expect("restart n1");
    let t0 = Instant::now();
    loop {
        let left = leftovers(&qmp);
        if left.is_empty() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the restarted node removes the disk views: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(QmpSync::connect(&qmp).and_then(|mut q| q.status()).expect("status"), "running");
    for i in 0..2 {
        let list = c.json(i, &["snapshot", "list"]).expect("list");
        assert_eq!(list.as_array().map(Vec::len), Some(0), "nothing committed: {list}");
        let stray: Vec<_> = std::fs::read_dir(&c.nodes[i].dir).expect("dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("fleece-") || n.starts_with("nbd-")).collect();
        assert!(stray.is_empty(), "{stray:?}");
    }
    // The guest's console still answers.
    g.console("echo alive", "alive", CONSOLE).expect("the guest runs");
}

/// The `read=` figures of the "disk read" lines node `log` wrote for VM `vm`, in order.
fn disk_reads(log: &Path, vm: &str) -> Vec<(u64, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("disk read") && (l.contains(&format!("vm={vm} ")) || l.contains(&format!("vm=\"{vm}\""))))
        .map(|l| {
            let field = |k: &str| l.split(&format!(" {k}=")).nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or("").trim_matches('"').to_string();
            (field("read").parse().unwrap_or(u64::MAX), field("since"))
        })
        .collect()
}

/// Snapshots after the first read only the blocks the disk's dirty bitmap marks since the
/// last one, and still restore the whole disk: after three snapshots (the last once the guest
/// unmounted), the third's disk written back is byte-identical to the image itself.
#[test]
fn later_snapshots_read_only_what_changed_and_restore_whole() {
    let lab = Lab::new();
    let c = Cluster::start(&bin(), &lab.dir().join("cluster"), 2, 1, None).expect("cluster");
    let vms = lab.vms.clone();
    let qmp = vms.join("g.qmp");
    lab.reap(qmp.clone());
    let (mut g, orig) = disk_guest(&vms, "g", 96, &lab.accel);
    c.json(0, &["vm", "add", "g", "--qmp", &qmp.display().to_string()]).expect("vm add");
    c.json(0, &["snapshot", "create", "s1", "--vm", "g"]).expect("s1");
    let d = third(&g.console("vmcsnap-disk-write D 4", "DISKWROTE D", CONSOLE).expect("write D"));
    c.json(1, &["snapshot", "create", "s2", "--vm", "g"]).expect("s2");
    g.console("vmcsnap-umount", "UMOUNTED", CONSOLE).expect("umount");
    c.json(0, &["snapshot", "create", "s3", "--vm", "g"]).expect("s3");
    g.kill();

    let reads = disk_reads(&c.nodes[0].dir.join("node.log"), "g");
    assert_eq!(reads.len(), 3, "{reads:?}");
    assert_eq!(reads[0].0, 64 << 20, "the first snapshot reads the whole disk: {reads:?}");
    assert_eq!(reads[1].1, "s1", "{reads:?}");
    assert!(reads[1].0 >= 4 << 20 && reads[1].0 <= 8 << 20, "4 MiB written: the second reads at most twice that: {reads:?}");
    assert_eq!(reads[2].1, "s2", "{reads:?}");
    assert!(reads[2].0 < 4 << 20, "the third reads what the unmount wrote: {reads:?}");

    let out = lab.dir().join("s3.disk");
    c.json(1, &["snapshot", "restore", "s3", "--vm", "g", "--disk", "virtio0", "--to", &format!("file:{}", out.display())]).expect("disk to a file");
    assert!(std::fs::read(&out).expect("restored") == std::fs::read(&orig).expect("image"), "the third snapshot's disk is the image, byte for byte");
    assert_eq!(md5_hex(&file_in_image(&out, "D").expect("D")), d);
    let fsck = Command::new("e2fsck").arg("-fn").arg(&out).output().expect("e2fsck");
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
}

/// A paused VM's disks are read as they are (no views: QEMU deactivates them at the end of
/// the stop-copy migration a paused VM gets); it stays paused, and the disk written back is
/// the image byte for byte.
#[test]
fn a_paused_vm_is_captured_with_its_disk_and_stays_paused() {
    let lab = Lab::new();
    let c = Cluster::start(&bin(), &lab.dir().join("cluster"), 2, 1, None).expect("cluster");
    let vms = lab.vms.clone();
    let qmp = vms.join("g.qmp");
    lab.reap(qmp.clone());
    let (mut g, orig) = disk_guest(&vms, "g", 96, &lab.accel);
    g.console("vmcsnap-disk-write A 2", "DISKWROTE A", CONSOLE).expect("write A");
    QmpSync::connect(&qmp).and_then(|mut q| q.execute("stop", serde_json::json!({}))).expect("stop");
    c.json(0, &["vm", "add", "g", "--qmp", &qmp.display().to_string()]).expect("vm add");
    c.json(1, &["snapshot", "create", "s", "--vm", "g"]).expect("snapshot of a paused VM with its disk");
    let status = QmpSync::connect(&qmp).and_then(|mut q| q.status()).expect("status");
    assert!(status == "paused" || status == "postmigrate", "it stays paused: {status}");
    assert!(leftovers(&qmp).is_empty());
    let out = lab.dir().join("s.disk");
    c.json(1, &["snapshot", "restore", "s", "--vm", "g", "--disk", "virtio0", "--to", &format!("file:{}", out.display())]).expect("disk to a file");
    assert!(std::fs::read(&out).expect("restored") == std::fs::read(&orig).expect("image"), "the paused VM's disk, byte for byte");
    g.kill();
}
