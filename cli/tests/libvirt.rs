//! A VM under a real libvirtd (Debian's libvirt 9.0, started by `scripts/libvirt.sh`), set up
//! as docs/operations.md says: a second `-qmp` socket for vmcsnap through `<qemu:commandline>`.
//! vmcsnap snapshots it while libvirt holds its own monitor, libvirt's view of the domain stays
//! right (running, never crashed or paused for good), and after the domain is lost it is rolled
//! back on another host into a domain libvirt starts waiting for the incoming migration.
//!
//! Needs root (libvirtd as `qemu:///system`), `qemu-system-x86_64` and the guest build
//! (`scripts/test.sh` provides both; `scripts/libvirt.sh up` installs libvirt).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vmcsnap_testnet::cluster::Cluster;
use vmcsnap_testnet::guest::{self, md5_of, uptime_of, Guest};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmcsnap"))
}

const BOOT: Duration = Duration::from_secs(90);
const CONSOLE: Duration = Duration::from_secs(60);

fn script() -> PathBuf {
    vmcsnap_testnet::crate_dir(env!("CARGO_MANIFEST_DIR")).join("../scripts/libvirt.sh")
}

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh").arg("-c").arg("qemu:///system").args(args).output().expect("run virsh")
}

/// `virsh domstate NAME --reason`, e.g. "running (unpaused)".
fn domstate(name: &str) -> String {
    String::from_utf8_lossy(&virsh(&["domstate", name, "--reason"]).stdout).trim().to_string()
}

/// The test's libvirtd and domain: both gone when the test ends, also when it fails.
struct Libvirt {
    domain: String,
}

impl Libvirt {
    fn up(domain: &str) -> Self {
        let o = Command::new("bash").arg(script()).arg("up").output().expect("run scripts/libvirt.sh");
        assert!(o.status.success(), "scripts/libvirt.sh up: {}", String::from_utf8_lossy(&o.stderr));
        Self { domain: domain.to_string() }
    }

    /// Starts the domain from the repo's template (`extra` more QEMU arguments).
    fn create(&self, dir: &Path, xml_name: &str, extra: &[&str]) {
        let (kernel, initrd) = guest::guest_files().expect("guest build (scripts/build-guest.sh)");
        let template = std::fs::read_to_string(vmcsnap_testnet::crate_dir(env!("CARGO_MANIFEST_DIR")).join("../scripts/libvirt-guest.xml.in")).expect("template");
        let args: String = extra.iter().map(|a| format!("    <qemu:arg value='{a}'/>\n")).collect();
        let xml = template
            .replace("@NAME@", &self.domain)
            .replace("@MEM_MB@", "128")
            .replace("@KERNEL@", &kernel.display().to_string())
            .replace("@INITRD@", &initrd.display().to_string())
            .replace("@KARGS@", "console=ttyS0 quiet panic=-1 fill=16")
            .replace("@DIR@", &dir.display().to_string())
            .replace("  </qemu:commandline>", &format!("{args}  </qemu:commandline>"));
        let file = dir.join(xml_name);
        std::fs::write(&file, xml).expect("write the domain XML");
        let o = virsh(&["create", &file.display().to_string()]);
        assert!(o.status.success(), "virsh create: {}", String::from_utf8_lossy(&o.stderr));
    }

    fn destroy(&self) {
        let _ = virsh(&["destroy", &self.domain]);
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        self.destroy();
        let _ = Command::new("bash").arg(script()).arg("down").output();
    }
}

#[test]
fn a_libvirt_domain_is_snapshotted_through_its_second_monitor_and_rolled_back_into_a_domain_on_another_host() {
    if !guest::is_root() {
        eprintln!("skipped: libvirtd (qemu:///system) needs root; CI runs this as root");
        return;
    }
    let _slot = guest::slot();
    let tmp = tempfile::tempdir().expect("tmp");
    let vms = tmp.path().join("vms");
    std::fs::create_dir_all(&vms).expect("vms dir");
    let name = format!("vmcsnap-test-{}", std::process::id());
    let lv = Libvirt::up(&name);
    let ours = vms.join(format!("{name}-vmcsnap.qmp"));
    let _reaper = guest::Reaper(vec![ours.clone()]);
    let c = Cluster::start(&bin(), &tmp.path().join("cluster"), 3, 1, None).expect("cluster");

    // The domain, as docs/operations.md gives it: libvirt holds QEMU's monitor; vmcsnap gets
    // the second one.
    lv.create(&vms, "domain.xml", &["-qmp", &format!("unix:{},server=on,wait=off", ours.display())]);
    let g = Guest::paths(&vms, &name);
    let fill = md5_of(&g.wait_for("FILL-DONE", BOOT).expect("the domain's guest fills its memory"));
    assert!(domstate(&name).starts_with("running"), "{}", domstate(&name));
    c.json(0, &["vm", "add", "web1", "--qmp", &ours.display().to_string()]).expect("vm add through the second socket");
    let up1 = uptime_of(&g.console("vmcsnap-check", "CHECK", CONSOLE).expect("console"));

    // A live snapshot from another host: the domain pauses for the cut only; libvirt sees it
    // running again (QEMU's RESUME on libvirt's monitor), never crashed or shut off.
    let s = c.json(2, &["snapshot", "create", "nightly", "--vm", "web1"]).expect("snapshot of the libvirt domain");
    assert_eq!(s["hosts"], serde_json::json!(["n1"]), "{s}");
    let show = c.json(1, &["snapshot", "show", "nightly"]).expect("show");
    assert_eq!(show["vms"][0]["qemu"]["mode"], "Live", "{show}");
    assert_eq!(domstate(&name), "running (unpaused)", "libvirt followed the cut's pause and resume");
    let list = String::from_utf8_lossy(&virsh(&["list", "--name"]).stdout).to_string();
    assert!(list.lines().any(|l| l.trim() == name), "libvirt still lists the domain: {list}");
    let line = g.console("vmcsnap-check", "CHECK", CONSOLE).expect("console after the snapshot");
    assert!(uptime_of(&line) > up1, "the guest ran on");
    assert_eq!(md5_of(&line), fill);

    // The domain is lost. The manager starts it again on another host (n2) waiting for an
    // incoming migration, and vmcsnap feeds it the snapshot through its own socket there.
    lv.destroy();
    let incoming = vms.join("in.sock");
    lv.create(&vms, "domain-incoming.xml", &["-qmp", &format!("unix:{},server=on,wait=off", ours.display()), "-incoming", &format!("unix:{}", incoming.display())]);
    let r = c
        .json(1, &["snapshot", "restore", "nightly", "--vm", "web1", "--to", &format!("qemu:unix:{}", incoming.display()), "--qmp", &ours.display().to_string()])
        .expect("rollback into the libvirt domain");
    assert_eq!(r[0]["vm"], "web1", "{r}");
    let line = g.console("vmcsnap-check", "CHECK", CONSOLE).expect("console after the rollback");
    assert_eq!(md5_of(&line), fill, "the domain's memory after the rollback");
    assert!(uptime_of(&line) >= up1, "it runs on from the snapshot, not a fresh boot");
    assert!(domstate(&name).starts_with("running"), "libvirt sees the rolled-back domain running: {}", domstate(&name));
}

