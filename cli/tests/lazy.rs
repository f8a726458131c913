//! Lazy restores: a guest rolled back with `--launch` runs before its memory has arrived
//! (QEMU postcopy, the node as its source), takes pages from whichever replica is up, and
//! waits, paused in postcopy, when its source dies, until the node is back.
//!
//! Needs `qemu-system-x86_64` and the guest build (`scripts/test.sh` provides both).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmcsnap_testnet::cluster::Cluster;
use vmcsnap_testnet::guest::{self, md5_of, Guest, Lab, QmpSync};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmcsnap"))
}

const BOOT: Duration = Duration::from_secs(120);
const CONSOLE: Duration = Duration::from_secs(60);

fn check(dir: &Path, vm: &str) -> String {
    Guest::paths(dir, vm).console("vmcsnap-check", "CHECK", CONSOLE).unwrap_or_else(|e| panic!("{vm}: {e:#}"))
}

/// The state of the incoming migration of the QEMU behind `qmp` (waits while another client,
/// the node's keeper, holds its monitor).
fn migration(qmp: &Path) -> String {
    QmpSync::connect(qmp)
        .and_then(|mut q| q.execute("query-migrate", serde_json::json!({})))
        .map(|m| m["status"].as_str().unwrap_or("none").to_string())
        .unwrap_or_else(|e| format!("unreachable: {e:#}"))
}

/// Waits until `f` holds, or panics with `what` after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<String>) {
    let t0 = Instant::now();
    let mut last = None;
    while t0.elapsed() < timeout {
        match f() {
            None => return,
            Some(s) => last = Some(s),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} within {timeout:?}; last seen: {last:?}");
}

/// A guest with 48 MiB of random data, snapshotted with two copies of every page, killed and
/// restored lazily on another host while one of the page owners is down: it runs before its
/// memory is all there, every page comes from this host or the other replica, and its data
/// checks out from inside.
#[test]
fn a_lazy_restore_runs_at_once_and_takes_pages_from_the_other_replica() {
    let lab = Lab::new();
    let mut c = Cluster::start(&bin(), &lab.dir().join("cluster"), 3, 2, None).expect("cluster");
    let vms = lab.vms.clone();
    let g = lab.guest("g", 128, "fill=48");
    let fill = md5_of(&g.wait_for("FILL-DONE", BOOT).expect("fill"));
    c.json(0, &["vm", "add", "g", "--qmp", &vms.join("g.qmp").display().to_string()]).expect("vm add");
    c.json(0, &["snapshot", "create", "s", "--vm", "g"]).expect("snapshot");
    guest::kill_by_qmp(&vms.join("g.qmp"));
    drop(g);

    // n2 goes down: a share of the pages has its other copy on n1 or n3 only.
    c.kill(1);
    let r = c.json(0, &["snapshot", "restore", "s", "--vm", "g", "--launch", "--on", "n3"]).expect("lazy restore");
    let r = &r[0];
    assert_eq!(r["lazy"], true, "{r}");
    assert_eq!(r["host"], "n3");
    assert_eq!(r["vm_status"], "running");
    let (running, resident) = (r["running_ms"].as_u64().expect("running"), r["elapsed_ms"].as_u64().expect("elapsed"));
    assert!(running < resident, "the guest ran ({running} ms) before its memory was all there ({resident} ms): {r}");
    assert!(r["bytes_fetched"].as_u64().expect("fetched") > 0 && r["pages_local"].as_u64().expect("local") > 0, "{r}");
    assert!(r["pages_needed"].as_u64().expect("pages") >= 48 * 256, "{r}");
    assert_eq!(migration(&vms.join("g.qmp")), "completed");
    assert_eq!(md5_of(&check(&vms, "g")), fill, "the guest's data after a lazy restore");
    // The restore leaves none of its capabilities on: the VM migrates on as any other (with
    // postcopy-ram left on, QEMU 7.2 never completes a pre-copy migration).
    let mut q = QmpSync::connect(&vms.join("g.qmp")).expect("the restored VM's monitor");
    let caps = q.execute("query-migrate-capabilities", serde_json::json!({})).expect("capabilities");
    let on: Vec<&str> = caps.as_array().expect("capabilities").iter().filter(|c| c["state"] == true).filter_map(|c| c["capability"].as_str()).collect();
    assert!(on.is_empty(), "capabilities left on: {on:?}");
    let sock = lab.dir().join("migrate.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let sink = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut c, _) = listener.accept()?;
        std::io::copy(&mut c, &mut std::io::sink())
    });
    q.execute("migrate", serde_json::json!({ "uri": format!("unix:{}", sock.display()) })).expect("migrate");
    q.wait_migrated().expect("a pre-copy migration of the restored VM completes");
    assert!(sink.join().expect("sink").expect("stream") > 48 << 20, "the whole guest went out");
    q.execute("cont", serde_json::json!({})).expect("cont");
    assert_eq!(md5_of(&check(&vms, "g")), fill, "the guest's data after migrating on");

    // The QEMU the restore launched runs in QEMU's seccomp sandbox (the node's default,
    // `--launch-sandbox on`): asked to start a program, it is killed and nothing runs.
    let qemu = guest::qemus_on(&vms.join("g.qmp"));
    assert_eq!(qemu.len(), 1, "one QEMU on the guest's monitor: {qemu:?}");
    assert!(guest::in_seccomp_filter(qemu[0]), "the restored QEMU is not in a seccomp filter");
    let ran = lab.dir().join("ran");
    let _ = q.execute("migrate", serde_json::json!({ "uri": format!("exec:touch {}", ran.display()) }));
    drop(q);
    wait_until("the sandboxed QEMU to be killed", Duration::from_secs(20), || {
        std::path::Path::new(&format!("/proc/{}", qemu[0])).exists().then(|| "still there".to_string())
    });
    assert!(!ran.exists(), "a restored QEMU started a program");
    guest::kill_by_qmp(&vms.join("g.qmp"));
}

/// A lazy restore whose source (the restoring host's node) is killed mid-way: QEMU pauses the
/// guest in postcopy (it never runs on memory that is not the snapshot's); the node, started
/// again, resumes the stream from QEMU's own bitmap of the pages it has, and the guest's data
/// checks out.
#[test]
fn a_lazy_restore_whose_source_dies_waits_paused_and_recovers() {
    source_dies_and_recovers(false);
}

/// The same with the guest's RAM in huge pages: the restarted node resumes from QEMU's bitmap
/// and goes on sending whole host pages (the page sizes are journaled).
#[test]
fn a_lazy_restore_into_huge_pages_whose_source_dies_recovers() {
    source_dies_and_recovers(true);
}

/// Boots guest `g` (128 MiB, QEMU arguments `extra`) with `fill_mib` MiB of random data,
/// registers it on n1, snapshots it as `s` and kills it; returns its data's checksum.
fn snapshot_filled_guest(lab: &Lab, c: &Cluster, fill_mib: u32, extra: &[&str]) -> String {
    let qmp = lab.qmp("g");
    let g = lab.guest_with("g", 128, &format!("fill={fill_mib}"), extra);
    let fill = md5_of(&g.wait_for("FILL-DONE", BOOT).expect("fill"));
    c.json(0, &["vm", "add", "g", "--qmp", &qmp.display().to_string()]).expect("vm add");
    c.json(0, &["snapshot", "create", "s", "--vm", "g"]).expect("snapshot");
    guest::kill_by_qmp(&qmp);
    drop(g);
    fill
}

/// Starts `snapshot restore s --vm g --launch --on n2 --json` from n1, and returns it once n2
/// says the guest runs while its memory follows.
fn restore_on_n2_until_running(c: &Cluster) -> std::process::Child {
    let restore = std::process::Command::new(bin())
        .args(["snapshot", "restore", "s", "--vm", "g", "--launch", "--on", "n2", "--json", "--node"])
        .arg(c.nodes[0].dir.as_os_str())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let node_log = c.nodes[1].dir.join("node.log");
    wait_until("the guest runs while its memory follows", Duration::from_secs(60), || {
        (!std::fs::read_to_string(&node_log).unwrap_or_default().contains("guest running; memory follows")).then(|| "not yet".to_string())
    });
    restore
}

fn source_dies_and_recovers(huge: bool) {
    let lab = Lab::new();
    let huge_dir = lab.vms.join("huge");
    let _pages = match huge.then(|| HugePages::reserve(&huge_dir, 2 * 64 + 16)) {
        Some(None) => return, // said why
        p => p.flatten(),
    };
    // n2 pushes slowly (4 MiB/s), so that it dies with most of the memory still to send.
    let slow = vec![vec![], vec!["--lazy-push-rate".to_string(), "4".to_string()]];
    let mut c = Cluster::start_with_args(&bin(), &lab.dir().join("cluster"), 2, 1, None, slow).expect("cluster");
    let vms = lab.vms.clone();
    let qmp = vms.join("g.qmp");
    let backend = format!("memory-backend-file,id=m0,mem-path={},size=128M,share=off", huge_dir.display());
    let extra: Vec<&str> = if huge { vec!["-object", &backend, "-machine", "memory-backend=m0"] } else { Vec::new() };
    let fill = snapshot_filled_guest(&lab, &c, 48, &extra);
    // Once the guest runs on n2, n2 dies. (QEMU's monitor is held by n2's keeper until the
    // restore completes: the node's log and QEMU's say what happens.)
    let restore = restore_on_n2_until_running(&c);
    let node_log = c.nodes[1].dir.join("node.log");
    let qemu_log = c.nodes[1].dir.join("launch-g.log");
    let log_has = |p: &Path, what: &str| std::fs::read_to_string(p).unwrap_or_default().contains(what);
    c.kill(1);
    let out = restore.wait_with_output().expect("wait");
    assert!(!out.status.success(), "the restore's source died: {}", String::from_utf8_lossy(&out.stdout));
    wait_until("QEMU pauses the postcopy", Duration::from_secs(30), || {
        (!log_has(&qemu_log, "Migration paused")).then(|| std::fs::read_to_string(&qemu_log).unwrap_or_default())
    });
    // Paused: the guest's shell does not answer (its vCPUs wait on missing pages).
    let answer = Guest::paths(&vms, "g").console("vmcsnap-check", "CHECK", Duration::from_secs(3));
    assert!(answer.is_err(), "a guest without its memory must not run on: {answer:?}");

    c.restart(1).expect("restart n2");
    wait_until("the restarted node completes the restore", Duration::from_secs(90), || {
        let m = migration(&qmp);
        (m != "completed").then_some(m)
    });
    assert_eq!(md5_of(&check(&vms, "g")), fill, "the guest's data after a recovered lazy restore");
    // The journal entry is gone: a second restart leaves the guest alone.
    let vmsl = c.json(1, &["vm", "list"]).expect("vm list");
    let log: String = std::fs::read_to_string(&node_log).unwrap_or_default().lines().filter(|l| l.contains("restore")).collect::<Vec<_>>().join("\n");
    assert!(vmsl.as_array().expect("vms").iter().any(|v| v["id"] == "g" && v["host"] == "n2"), "{vmsl}\n{log}");
    guest::kill_by_qmp(&qmp);
}

/// A lazy restore whose stream to QEMU breaks while its node lives on (QEMU's `migrate-pause`
/// on the destination shuts its end of the stream, as a failure to read or place a page
/// would): QEMU pauses the postcopy, the restore resumes it at once on a new connection with
/// the pages QEMU lacks, ends well and says what happened; the guest's data checks out.
#[test]
fn a_lazy_restore_whose_stream_breaks_resumes_at_once() {
    let lab = Lab::new();
    // n2 pushes slowly (8 MiB/s), so that the stream breaks with most of the memory to send.
    let slow = vec![vec![], vec!["--lazy-push-rate".to_string(), "8".to_string()]];
    let c = Cluster::start_with_args(&bin(), &lab.dir().join("cluster"), 2, 1, None, slow).expect("cluster");
    let vms = lab.vms.clone();
    let qmp = vms.join("g.qmp");
    let fill = snapshot_filled_guest(&lab, &c, 48, &[]);
    let restore = restore_on_n2_until_running(&c);
    // The monitor is the node's keeper's while the postcopy lasts: asked through it.
    let mut keeper = std::os::unix::net::UnixStream::connect(c.nodes[1].dir.join("qmp-keeper-g.sock")).expect("keeper");
    std::io::Write::write_all(&mut keeper, b"{\"exec-oob\": \"migrate-pause\"}\n").expect("migrate-pause");
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(keeper), &mut answer).expect("answer");
    assert!(answer.contains("return"), "migrate-pause: {answer}");

    let out = restore.wait_with_output().expect("wait");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the restore resumes its stream: {stdout}{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(r[0]["vm_status"], "running", "{r}");
    assert_eq!(r[0]["lazy"], true, "{r}");
    let note = r[0]["note"].as_str().unwrap_or_default();
    eprintln!("the restore's note: {note}");
    assert!(note.contains("broke off once") && note.contains("resumed"), "the restore says its stream broke and was resumed: {r}");
    assert_eq!(migration(&qmp), "completed");
    assert_eq!(md5_of(&check(&vms, "g")), fill, "the guest's data after a resumed lazy restore");
    guest::kill_by_qmp(&qmp);
}

/// Two VMs of one image (the same 16 MiB of text in their page caches, the same kernel)
/// restored at once on one host: the pages both need are fetched from their owners for one
/// and taken from that fetch by the other (`pages_shared`), and both guests check out.
#[test]
fn clones_restored_at_once_on_one_host_share_their_fetches() {
    let lab = Lab::new();
    let c = Cluster::start(&bin(), &lab.dir().join("cluster"), 3, 1, None).expect("cluster");
    let vms = lab.vms.clone();
    let g1 = lab.guest("c1", 128, "cache=16");
    let g2 = lab.guest("c2", 128, "cache=16");
    let text = md5_of(&g1.wait_for("CACHE-DONE", BOOT).expect("c1 cache"));
    assert_eq!(md5_of(&g2.wait_for("CACHE-DONE", BOOT).expect("c2 cache")), text, "both guests hold the same text");
    for (node, vm) in [(0, "c1"), (1, "c2")] {
        c.json(node, &["vm", "add", vm, "--qmp", &vms.join(format!("{vm}.qmp")).display().to_string()]).expect("vm add");
    }
    c.json(1, &["snapshot", "create", "s", "--vm", "c1", "--vm", "c2"]).expect("snapshot");
    for vm in ["c1", "c2"] {
        guest::kill_by_qmp(&vms.join(format!("{vm}.qmp")));
    }
    drop((g1, g2));

    let r = c.json(0, &["snapshot", "restore", "s", "--launch", "--on", "c1=n3", "--on", "c2=n3"]).expect("both on n3 at once");
    let list = r.as_array().expect("summaries");
    assert_eq!(list.len(), 2, "{r}");
    let sum = |k: &str| list.iter().map(|s| s[k].as_u64().unwrap_or_else(|| panic!("{k} in {s}"))).sum::<u64>();
    let (shared, local, fetched) = (sum("pages_shared"), sum("pages_local"), sum("bytes_fetched"));
    eprintln!("two clones on n3: {shared} pages shared, {local} local, {} MiB fetched", fetched >> 20);
    assert!(list.iter().all(|s| s["lazy"] == true && s["host"] == "n3"), "{r}");
    // 16 MiB of identical text is 4096 pages; n3 holds about a third of them itself (R = 1 over
    // three members): most of the rest came to one restore from the other's fetch.
    assert!(shared >= 1024, "only {shared} pages shared: {r}");
    for vm in ["c1", "c2"] {
        // The marker is made by the guest's shell, so that the echo of the typed line lacks it.
        let line = Guest::paths(&vms, vm).console("echo SUM$((1+1)) $(md5sum < /tmp/cache)", "SUM2", CONSOLE).unwrap_or_else(|e| {
            panic!("console: {e:#}\n--- n3's QEMU log:\n{}\n--- n3's log:\n{}", c.tail(2, &format!("launch-{vm}.log"), 20), c.tail(2, "node.log", 60))
        });
        assert_eq!(md5_of(&line), text, "{vm}'s page cache after the restore");
        guest::kill_by_qmp(&vms.join(format!("{vm}.qmp")));
    }
}

/// Huge pages reserved and a hugetlbfs mount for one test; both undone when dropped. One test
/// at a time holds them (the count is the host's).
struct HugePages {
    mount: PathBuf,
    nr: PathBuf,
    before: u64,
    _one: std::sync::MutexGuard<'static, ()>,
}

impl HugePages {
    fn reserved(nr: &Path) -> u64 {
        std::fs::read_to_string(nr).expect("nr_hugepages").trim().parse().expect("a number")
    }

    /// [`HugePages::reserve_sized`] of 2 MiB pages.
    fn reserve(mount: &Path, pages: u64) -> Option<Self> {
        Self::reserve_sized(mount, 2 << 20, pages)
    }

    /// Mounts hugetlbfs (pages of `size` bytes) at `mount` and reserves `pages` more; `None`
    /// (and a note why the test is skipped) when this host cannot: not root, a kernel without
    /// hugetlbfs, or memory too fragmented to give the pages. Those are the host's limits, not the
    /// restore's.
    fn reserve_sized(mount: &Path, size: u64, pages: u64) -> Option<Self> {
        if !guest::is_root() {
            eprintln!("skipped: mounting hugetlbfs and reserving huge pages need root; CI runs this as root");
            return None;
        }
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let one = ONE.lock().unwrap_or_else(|p| p.into_inner());
        let nr = PathBuf::from(format!("/sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages", size >> 10));
        if !nr.is_file() {
            eprintln!("skipped: this kernel has no huge pages of {} KiB", size >> 10);
            return None;
        }
        let before = Self::reserved(&nr);
        std::fs::create_dir_all(mount).expect("mount point");
        let ok = std::process::Command::new("mount").args(["-t", "hugetlbfs", "-o", &format!("pagesize={}K", size >> 10), "none"]).arg(mount).status().expect("mount");
        if !ok.success() {
            eprintln!("skipped: cannot mount hugetlbfs at {} (a kernel without it?)", mount.display());
            return None;
        }
        let me = Self { mount: mount.to_path_buf(), nr: nr.clone(), before, _one: one };
        std::fs::write(&nr, format!("{}", before + pages)).expect("reserve huge pages");
        let now = Self::reserved(&nr);
        if now < before + pages {
            eprintln!("skipped: the kernel gave {} of {pages} huge pages (memory too fragmented?)", now.saturating_sub(before));
            return None; // dropping `me` unmounts and gives back what was given
        }
        Some(me)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        // Lazily: a QEMU still ending keeps its pages until it has gone.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = std::fs::write(&self.nr, format!("{}", self.before));
    }
}

/// A guest whose RAM is huge pages (private hugetlbfs memory, as many production hosts run
/// guests): its live snapshot pauses it briefly, and its lazy restore on another host sends
/// every 2 MiB host page whole, as QEMU's postcopy demands (a 4 KiB page of one alone, or its
/// zero pages left out, would leave the guest waiting for ever); the guest runs before its
/// memory has arrived and its data checks out from inside.
#[test]
fn a_guest_in_huge_pages_restores_lazily() {
    let lab = Lab::new();
    let huge = lab.vms.join("huge");
    let Some(_pages) = HugePages::reserve(&huge, 2 * 64 + 16) else { return };
    let c = Cluster::start(&bin(), &lab.dir().join("cluster"), 3, 1, None).expect("cluster");
    let vms = lab.vms.clone();
    let backend = format!("memory-backend-file,id=m0,mem-path={},size=128M,share=off", huge.display());
    let g = lab.guest_with("g", 128, "fill=48", &["-object", &backend, "-machine", "memory-backend=m0"]);
    let fill = md5_of(&g.wait_for("FILL-DONE", BOOT).expect("fill"));
    c.json(0, &["vm", "add", "g", "--qmp", &vms.join("g.qmp").display().to_string()]).expect("vm add");
    let s = c.json(0, &["snapshot", "create", "s", "--vm", "g"]).expect("snapshot");
    let pause = s["vms"][0][1]["pause_ms"].as_u64().expect("pause");
    assert!(pause < 1000, "a live snapshot pauses the guest briefly ({pause} ms): {s}");
    guest::kill_by_qmp(&vms.join("g.qmp"));
    drop(g);

    let r = c.json(0, &["snapshot", "restore", "s", "--vm", "g", "--launch", "--on", "n3"]).expect("lazy restore");
    let r = &r[0];
    assert_eq!(r["lazy"], true, "{r}");
    assert!(r["note"].is_null(), "{r}");
    assert_eq!(r["vm_status"], "running");
    let (running, resident) = (r["running_ms"].as_u64().expect("running"), r["elapsed_ms"].as_u64().expect("elapsed"));
    assert!(running < resident, "the guest ran ({running} ms) before its memory was all there ({resident} ms): {r}");
    assert_eq!(migration(&vms.join("g.qmp")), "completed");
    assert_eq!(md5_of(&check(&vms, "g")), fill, "the guest's data after a lazy restore into huge pages");
    guest::kill_by_qmp(&vms.join("g.qmp"));
}

/// A guest whose RAM is 1 GiB huge pages: QEMU's postcopy would place such a page whole, and
/// one is larger than the lazy restore's push windows, so the restore goes eagerly, says why,
/// and the guest's data checks out.
#[test]
fn a_guest_in_1g_pages_restores_eagerly_and_says_why() {
    let lab = Lab::new();
    let huge = lab.vms.join("huge1g");
    // One for the guest, one for its restore should the first be slow to be given back.
    let Some(_pages) = HugePages::reserve_sized(&huge, 1 << 30, 2) else { return };
    let c = Cluster::start(&bin(), &lab.dir().join("cluster"), 2, 1, None).expect("cluster");
    let vms = lab.vms.clone();
    let backend = format!("memory-backend-file,id=m0,mem-path={},size=1G,share=off", huge.display());
    let g = lab.guest_with("g", 1024, "fill=48", &["-object", &backend, "-machine", "memory-backend=m0"]);
    let fill = md5_of(&g.wait_for("FILL-DONE", BOOT).expect("fill"));
    c.json(0, &["vm", "add", "g", "--qmp", &vms.join("g.qmp").display().to_string()]).expect("vm add");
    c.json(0, &["snapshot", "create", "s", "--vm", "g"]).expect("snapshot");
    guest::kill_by_qmp(&vms.join("g.qmp"));
    drop(g);

    let r = c.json(0, &["snapshot", "restore", "s", "--vm", "g", "--launch", "--on", "n2"]).expect("restore");
    let r = &r[0];
    assert_ne!(r["lazy"], true, "{r}");
    let note = r["note"].as_str().unwrap_or_default();
    assert!(note.contains("restored eagerly") && note.contains("1048576 KiB"), "the output says why: {r}");
    assert_eq!(r["vm_status"], "running");
    eprintln!("{note}");
    assert_eq!(md5_of(&check(&vms, "g")), fill, "the guest's data after an eager restore into 1 GiB pages");
    guest::kill_by_qmp(&vms.join("g.qmp"));
}

/// A guest whose kernel used memory between 1 and 2 MiB (56 MiB of random data in 128 MiB:
/// the allocator reaches into its lowest zone) restores lazily in one stream. The early pages
/// (the first MiB) are written before that range is registered with userfaultfd; were
/// transparent huge pages still on in QEMU's RAM then, the first of them would fault in the
/// whole 2 MiB as zeros and the push of a non-zero page at 1–2 MiB fail (`File exists`).
#[test]
fn a_guest_that_used_its_low_memory_restores_lazily_in_one_stream() {
    let lab = Lab::new();
    let c = Cluster::start(&bin(), &lab.dir().join("cluster"), 2, 1, None).expect("cluster");
    let qmp = lab.qmp("g");
    let fill = snapshot_filled_guest(&lab, &c, 56, &[]);
    // What the test is about: pages at 1–2 MiB that are not zero (seen in every run here; said
    // when not, since the guest's allocator decides).
    let raw = lab.dir().join("g.ram");
    c.json(1, &["snapshot", "restore", "s", "--vm", "g", "--to", &format!("file:{}", raw.display())]).expect("raw restore");
    let ram = std::fs::read(&raw).expect("read");
    let low = (256..512).filter(|i| ram[i * 4096..(i + 1) * 4096].iter().any(|b| *b != 0)).count();
    eprintln!("non-zero pages at 1-2 MiB: {low}");

    let r = c.json(0, &["snapshot", "restore", "s", "--vm", "g", "--launch", "--on", "n2"]).expect("restore");
    assert_eq!(r[0]["lazy"], true, "{r}");
    assert!(r[0]["note"].is_null(), "one stream, nothing resumed: {r}");
    assert_eq!(md5_of(&check(&lab.vms, "g")), fill, "the guest's data after a lazy restore");
    let log = std::fs::read_to_string(c.nodes[1].dir.join("launch-g.log")).unwrap_or_default();
    assert!(!log.contains("File exists") && !log.contains("paused"), "QEMU's log: {log}");
    guest::kill_by_qmp(&qmp);
}
