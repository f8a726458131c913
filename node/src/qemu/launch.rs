//! Starting a VM's recorded QEMU command line on this host, waiting for a stream.
//!
//! The command line is the one read from the captured QEMU process, adjusted: any
//! `-incoming` and `-daemonize` are dropped, and `-incoming unix:SOCK` (a socket in the node's
//! data directory) is added. QEMU runs in its own process group with its output in
//! `DIR/launch-VM.log`, so it outlives the node. Every other path (kernel, disks, QMP and
//! serial sockets) is used as recorded, so it must exist on this host.
//!
//! What may be launched is this host's decision ([`LaunchPolicy`]), never a record's: the
//! binary is the host's own `qemu-system-*` of the recorded name, from the policy's directory
//! (default `/usr/bin`). The command line is read as QEMU reads it (`--opt` as `-opt`, a bare
//! argument as a disk). Every socket or file QEMU would create, write or unlink (QMP, chardev
//! sockets and log files, serial and monitor files and host devices, pid, debug and trace
//! files, guest memory's `mem-path`, e.g. a hugetlbfs mount, a filter's dump file), and every
//! host file, device or directory it would hand the guest to write (disks of `-drive`,
//! `-blockdev` — libvirt's JSON form too — and their short forms, `json:` and
//! `file:`/`host_device:` names, `-virtfs` and `-fsdev` directories, `vvfat` directories, a
//! TPM, an input device, a VNC or audio file) must lie inside the policy's directories
//! (`--vm-dir`, the disk directory, `--launch-dir`). Files QEMU reads for the guest (`-kernel`,
//! `-initrd`, firmware and `-L`, ROMs, `-fw_cfg`, ACPI and SMBIOS tables, read-only disks and
//! CD-ROMs) must lie inside those or the system's package data ([`SYSTEM_READ_DIRS`]): a
//! record cannot show its guest a host secret. Nothing the command line names, in any option,
//! may lie in the node's own data directory (identity key, store, control socket), but in a
//! disk directory inside it. Network disks (`nbd:`, `rbd:`, ...) name no host file and pass;
//! other block protocols are refused. Options that run host code (`-plugin`; a tap's
//! `script=`, `downscript=` and `helper=`; user networking's `smb=` and any `guestfwd`), hand
//! the guest a host device (VFIO, `usb-host`, NVMe, vhost SCSI and vDPA, `u2f-passthru`) or the
//! host (`-gdb`, `-s`, semihosting), put a monitor anywhere but on a Unix socket, change an
//! option after the check (`-set`, but a device's property) or read options this check cannot
//! see (`-readconfig`) are refused, and so is a key given twice where QEMU would keep the
//! other value. A record that breaks the policy is refused before anything is unlinked or
//! spawned. What is checked is exactly what QEMU is given, and what a disk image's header names
//! (its backing chain, a qcow2 data file) as if QEMU probed it; QEMU starts in `/`.

use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmcsnap_protocol::manifest::QemuState;

/// Time for a launched QEMU to start listening for its stream.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);

/// A QEMU started by [`launch`].
pub struct Launched {
    /// Its process id.
    pub pid: u32,
    /// Its QMP socket.
    pub qmp: PathBuf,
    /// The socket it listens on for the migration stream.
    pub incoming: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

/// The recorded command line without its `-incoming` and `-daemonize` (in either spelling),
/// read as QEMU reads it: an option's argument is never taken for an option.
pub fn without_incoming(cmdline: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(cmdline.len());
    out.extend(cmdline.first().cloned());
    let mut i = 1;
    while i < cmdline.len() {
        let opt = option_name(&cmdline[i]);
        let takes = opt.as_deref().is_some_and(|o| OPTIONS_WITH_ARGUMENT.contains(&o));
        match opt.as_deref() {
            Some("-incoming") => {}
            Some("-daemonize") => {}
            _ => {
                out.push(cmdline[i].clone());
                if takes {
                    out.extend(cmdline.get(i + 1).cloned());
                }
            }
        }
        i += if takes { 2 } else { 1 };
    }
    out
}

/// A command line (already [`without_incoming`]) adjusted to wait for a stream on `incoming`,
/// and with `sandbox`, run in QEMU's seccomp sandbox ([`sandbox_value`]).
pub fn adjusted_cmdline(cmdline: &[String], incoming: &std::path::Path, sandbox: bool) -> Vec<String> {
    let mut out = cmdline.to_vec();
    out.extend(["-incoming".to_string(), format!("unix:{}", incoming.display())]);
    if sandbox {
        out.extend(["-sandbox".to_string(), sandbox_value(cmdline)]);
    }
    out
}

/// The `-sandbox` a launched QEMU gets: what libvirt gives its QEMUs. QEMU is killed if it
/// starts a program (`spawn`: `migrate exec:`, tap scripts, `smb=`, or whatever option this
/// check does not know of), gains privileges (`elevateprivileges`; allowed where the command
/// line drops them itself with `-runas`, whose `setuid` it would otherwise kill), uses
/// obsolete system calls or changes its scheduling (`resourcecontrol`). QEMU merges every
/// `-sandbox` it is given and the last value of each key wins, so one the record carries
/// (`-sandbox off`, `spawn=allow`) cannot undo this one, which comes last.
pub fn sandbox_value(cmdline: &[String]) -> String {
    let runas = options(cmdline).iter().any(|(o, _)| o == "-runas");
    let elevate = if runas { "allow" } else { "deny" };
    format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny")
}

/// The options of a command line as QEMU reads it (see [`parse`]), each with its argument if
/// it takes one; bare arguments left out.
fn options(cmdline: &[String]) -> Vec<(String, Option<&str>)> {
    let mut out = Vec::new();
    let mut i = 1;
    while i < cmdline.len() {
        let Some(opt) = option_name(&cmdline[i]) else {
            i += 1;
            continue;
        };
        let takes = OPTIONS_WITH_ARGUMENT.contains(&opt.as_str());
        let arg = if takes { cmdline.get(i + 1).map(String::as_str) } else { None };
        out.push((opt, arg));
        i += if takes { 2 } else { 1 };
    }
    out
}

/// Every QMP socket of a command line, in order: `-qmp unix:PATH` (and `-qmp-pretty`, or
/// `chardev:ID` naming one), and a Unix `-chardev socket` that a `-mon ...,mode=control` runs
/// QMP on (as Proxmox and many scripts give it). A VM under libvirt or Proxmox has its
/// manager's and, for vmcsnap, a second one.
pub fn qmp_sockets(cmdline: &[String]) -> Vec<String> {
    let opts = options(cmdline);
    let socket_of = |id: &str| {
        opts.iter().filter(|(o, _)| o == "-chardev").find_map(|(_, v)| {
            let parts = super::disks::drive_options(v.unwrap_or_default());
            let is_socket = parts.first().is_some_and(|(b, v)| b == "socket" && v.is_empty()) || parts.iter().any(|(k, v)| k == "backend" && v == "socket");
            let named = parts.iter().any(|(k, v)| k == "id" && v == id);
            (is_socket && named).then(|| parts.iter().find(|(k, _)| k == "path").map(|(_, p)| p.clone())).flatten()
        })
    };
    let mut out = Vec::new();
    for (o, v) in &opts {
        let v = v.unwrap_or_default();
        match o.as_str() {
            "-qmp" | "-qmp-pretty" => {
                let head = v.split(',').next().unwrap_or(v);
                if let Some(p) = head.strip_prefix("unix:") {
                    out.push(p.to_string());
                } else if let Some(p) = head.strip_prefix("chardev:").and_then(socket_of) {
                    out.push(p);
                }
            }
            "-mon" => {
                let parts = super::disks::drive_options(v);
                let control = parts.iter().any(|(k, v)| k == "mode" && v == "control");
                if let Some(p) = parts.iter().find(|(k, _)| k == "chardev").filter(|_| control).and_then(|(_, id)| socket_of(id)) {
                    out.push(p);
                }
            }
            _ => {}
        }
    }
    out
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &std::path::Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// What this host lets a restore launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchPolicy {
    /// Where this host's `qemu-system-*` binaries are.
    pub qemu_dir: PathBuf,
    /// Directories QEMU's sockets, files and disks may be in (the node's `--vm-dir`, its disk
    /// directory and any `--launch-dir`); QEMU may read from them too.
    pub dirs: Vec<PathBuf>,
    /// The node's own data directory (its identity key, store and control socket): nothing a
    /// command line names may lie in it, read or written, except inside one of `dirs` (the
    /// default disk directory is in it).
    pub own: PathBuf,
    /// Whether launched QEMUs run in QEMU's seccomp sandbox (`--launch-sandbox`, on by
    /// default; see [`sandbox_value`]).
    pub sandbox: bool,
}

/// Directories of files any QEMU may read whatever the policy: the system's firmware, ROMs and
/// other package data (OVMF, SeaBIOS, iPXE, keymaps), which hold nothing secret.
pub const SYSTEM_READ_DIRS: &[&str] = &["/usr/share", "/usr/lib", "/usr/lib64", "/usr/local/share", "/usr/local/lib"];

/// Options that make QEMU run host code, serve a debugger on a TCP port (it reads and writes
/// the guest and runs monitor commands), give the guest the host's files (semihosting), or
/// read more options from a file this check cannot see: refused whatever their value.
const REFUSED_OPTIONS: &[&str] = &["-plugin", "-readconfig", "-gdb", "-s", "-semihosting", "-semihosting-config"];
/// Options whose value names sockets or files QEMU creates, writes or unlinks, host files and
/// directories it hands the guest (disks, shared directories), or files it loads for the guest
/// (ROMs, firmware tables, `fw_cfg` files).
const PATH_OPTIONS: &[&str] = &[
    "-chardev", "-qmp", "-qmp-pretty", "-monitor", "-serial", "-parallel", "-debugcon", "-mon", "-pidfile", "-D", "-trace", "-writeconfig",
    "-mem-path", "-object", "-drive", "-blockdev", "-hda", "-hdb", "-hdc", "-hdd", "-fda", "-fdb", "-pflash", "-mtdblock", "-sd", "-virtfs",
    "-fsdev", "-netdev", "-nic", "-net", "-vnc", "-audiodev", "-tpmdev", "-device", "-global", "-set", "-fw_cfg", "-acpitable", "-smbios",
    "-qtest", "-qtest-log", "-dump-vmstate", "-spice", "-display", "-boot", "-machine", "-M", "-icount", "-audio", "-option-rom",
];
/// Options that set up a guest network (tap scripts, helpers, smbd, `guestfwd` commands).
const NET_OPTIONS: &[&str] = &["-netdev", "-nic", "-net"];
/// Options whose value is a character device, `unix:P,server=on` or `/dev/ttyS0` included.
const CHARDEV_OPTIONS: &[&str] = &["-qmp", "-qmp-pretty", "-monitor", "-serial", "-parallel", "-debugcon", "-vnc", "-qtest"];
/// Options whose whole value is one file QEMU writes or hands the guest to write.
const FILE_OPTIONS: &[&str] =
    &["-pidfile", "-D", "-mem-path", "-writeconfig", "-hda", "-hdb", "-hdc", "-hdd", "-fda", "-fdb", "-pflash", "-mtdblock", "-sd", "-qtest-log", "-dump-vmstate"];
/// Options whose whole value is one file or directory QEMU only reads: boot files, firmware
/// and its directory, a CD-ROM.
const READ_FILE_OPTIONS: &[&str] = &["-kernel", "-initrd", "-dtb", "-bios", "-L", "-cdrom", "-shim"];
/// Options that load files for the guest by key (`-fw_cfg name=N,file=F`, `-acpitable
/// file=F`, `-smbios file=F`): read.
const READ_KEY_OPTIONS: &[&str] = &["-fw_cfg", "-acpitable", "-smbios", "-boot", "-option-rom"];
/// Host devices any QEMU may use whatever the policy: entropy sources and sinks.
const HARMLESS_DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/hwrng"];
/// Does `key` of `opt`'s value (`key=P`, or a JSON member) name a file or directory: sockets and
/// logs, memory backends' `mem-path`, a dump's or a secret's `file`, a disk's `file` or
/// `filename` (a `-blockdev`'s `file` names its child node instead), a shared directory's
/// `path`, a `vvfat` disk's or TLS credentials' `dir`, a host input device's `evdev`, a vDPA
/// device's `vhostdev`, a device's `romfile` (`-global DRIVER.romfile=F` too), a GPU's
/// `rendernode`, an audio device's `dev`, SPICE's TLS files, a boot splash image.
fn is_path_key(opt: &str, key: &str) -> bool {
    // Dotted keys (`file.filename`, `addr.path`, `local.path`; `-global DRIVER.PROP=V`, `-set
    // GROUP.ID.PROP=V`) name their last part.
    let key = key.rsplit('.').next().unwrap_or(key);
    matches!(
        key,
        "path" | "logfile" | "mem-path" | "sock" | "filename" | "dir" | "evdev" | "vhostdev" | "sysfsdev" | "romfile" | "rendernode" | "tftp" | "rootdir" | "frudatafile" | "sdrfile" | "cancel-path"
    ) || (key == "file" && opt != "-blockdev")
        || (key == "data" && opt == "-acpitable")
        || (key == "splash" && opt == "-boot")
        || (key == "dev" && opt == "-audiodev")
        || (key.starts_with("x509") && opt == "-spice")
        || (key == "rrfile" && opt == "-icount")
        || (matches!(key, "kernel" | "initrd" | "firmware" | "dtb" | "dumpdtb") && matches!(opt, "-machine" | "-M"))
}

/// Keys of files QEMU only reads, for the guest or itself.
fn is_read_key(opt: &str, key: &str) -> bool {
    let key = key.rsplit('.').next().unwrap_or(key);
    matches!(key, "romfile" | "frudatafile" | "sdrfile") || (matches!(key, "kernel" | "initrd" | "firmware" | "dtb") && matches!(opt, "-machine" | "-M"))
}

/// The key QEMU gives a value's first part when it has no `key=` (`-device e1000` is
/// `driver=e1000`), if the option has one.
fn implied_key(opt: &str) -> Option<&'static str> {
    match opt {
        "-device" => Some("driver"),
        "-netdev" | "-nic" | "-net" => Some("type"),
        "-chardev" => Some("backend"),
        "-object" => Some("qom-type"),
        "-option-rom" => Some("romfile"),
        "-machine" | "-M" => Some("type"),
        _ => None,
    }
}

/// How QEMU uses a file a command line names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// It creates, writes or unlinks it, or hands it to the guest to write.
    Write,
    /// It only reads it, for itself or into the guest.
    Read,
}

impl LaunchPolicy {
    /// Checks `cmdline` against the policy; returns the program to run (the host's own).
    pub fn check(&self, cmdline: &[String]) -> Result<PathBuf, LaunchError> {
        let refused = |m: String| Err(LaunchError::Refused(m));
        let Some(first) = cmdline.first() else { return refused("the snapshot has no QEMU command line".into()) };
        let name = Path::new(first).file_name().and_then(|n| n.to_str()).unwrap_or("");
        // Proxmox runs its QEMU as `kvm`, a link to its qemu-system-x86_64.
        let name = if name == "kvm" { "qemu-system-x86_64" } else { name };
        let arch = name.strip_prefix("qemu-system-").unwrap_or("");
        if arch.is_empty() || !arch.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return refused(format!("the recorded command line runs {first:?}, not a qemu-system-* binary; refusing to start it"));
        }
        let prog = self.qemu_dir.join(name);
        if !prog.is_file() {
            return refused(format!("this host has no {} (the launch policy allows QEMU from {} only)", name, self.qemu_dir.display()));
        }
        let (bare, guest_text) = parse(cmdline);
        let chardevs = chardev_kinds(cmdline);
        // Every argument that names an option is checked with the argument after it, whether
        // or not QEMU would read them so: a misread option table cannot hide one.
        for (i, arg) in cmdline.iter().enumerate().skip(1) {
            let Some(opt) = option_name(arg) else { continue };
            let opt = opt.as_str();
            let value = cmdline.get(i + 1).map(String::as_str).unwrap_or("");
            if REFUSED_OPTIONS.contains(&opt) {
                return refused(format!(
                    "the recorded command line has {opt}, which a restored VM may never have here (it runs host code, serves a debugger or host file access, or reads options this host cannot check); refusing to start it"
                ));
            }
            let unreadable = |e: String| LaunchError::Refused(format!("the recorded command line's {opt} {value}: {e}; refusing to start it"));
            if NET_OPTIONS.contains(&opt) {
                if let Some(what) = runs_host_code(value).map_err(unreadable)? {
                    return refused(format!("the recorded command line runs {what} ({opt} {value}); refusing to start it"));
                }
            }
            if opt == "-set" {
                // `-set GROUP.ID.PROP=VALUE` changes an option given elsewhere, after this
                // check has read it: only a device's property, not its driver.
                let target = value.split_once('=').map(|(t, _)| t).unwrap_or(value);
                if !target.starts_with("device.") || target.rsplit('.').next() == Some("driver") {
                    return refused(format!("the recorded command line has -set {value}, which changes an option after this host's check; refusing to start it"));
                }
            }
            let monitor = match opt {
                "-monitor" | "-qmp" | "-qmp-pretty" => Some(value),
                "-mon" => Some(value),
                o if CHARDEV_OPTIONS.contains(&o) => value.strip_prefix("mon:"),
                _ => None,
            };
            if let Some(spec) = monitor {
                if !local_monitor(opt, spec, &chardevs) {
                    return refused(format!(
                        "the recorded command line puts a QEMU monitor where others than this host's root may reach it ({opt} {value}); monitors must be on Unix sockets; refusing to start it"
                    ));
                }
            }
            if opt == "-device" && passes_through_host_device(value) {
                return refused(format!("the recorded command line hands the guest a host device ({opt} {value}); refusing to start it"));
            }
            if PATH_OPTIONS.contains(&opt) || READ_FILE_OPTIONS.contains(&opt) {
                for (p, access) in paths_in(opt, value).map_err(unreadable)? {
                    self.check_path(&p, opt, access)?;
                    // A `-drive` given as `format=raw` is not probed: its header is data.
                    let raw = opt == "-drive" && super::disks::drive_options(value).iter().any(|(k, v)| k == "format" && v == "raw");
                    if IMAGE_OPTIONS.contains(&opt) && !raw {
                        self.check_image(&p, opt)?;
                    }
                }
            }
        }
        // A bare argument is QEMU's first disk (`-hda`).
        for &i in &bare {
            let mut out = Vec::new();
            local_file("-hda", &cmdline[i], Access::Write, &mut out).map_err(|e| LaunchError::Refused(format!("the recorded command line's bare argument {}: {e}; refusing to start it", cmdline[i])))?;
            for (p, access) in out {
                self.check_path(&p, "bare argument (a disk, as -hda)", access)?;
                self.check_image(&p, "bare argument (a disk, as -hda)")?;
            }
        }
        // Whatever an option is, no file of the node's own may be named in it (the guest's
        // kernel command line, `-append`, is the guest's and names no host file).
        for (k, arg) in cmdline.iter().enumerate().skip(1) {
            if guest_text.contains(&k) {
                continue;
            }
            for p in path_tokens(arg) {
                self.check_not_own(&p, cmdline.get(k - 1).map(String::as_str).unwrap_or(""))?;
            }
        }
        Ok(prog)
    }

    /// Checks the files a disk image's own header names (its backing chain, a qcow2 external
    /// data file) as QEMU would open them: a backing file is read, a data file written.
    fn check_image(&self, p: &str, opt: &str) -> Result<(), LaunchError> {
        let mut image = Path::new("/").join(p);
        for _ in 0..IMAGE_CHAIN_MAX {
            let refs = match image_references(&image) {
                Ok(r) => r,
                Err(e) => return Err(LaunchError::Refused(format!("the recorded command line's {opt} uses {}, {e}; refusing to start it", image.display()))),
            };
            let mut backing = None;
            for (r, access) in refs {
                let name = r.display().to_string();
                self.check_path(&name, &format!("{opt} image {}", image.display()), access)?;
                if access == Access::Read {
                    backing = Some(r);
                }
            }
            match backing {
                Some(b) => image = b,
                None => return Ok(()),
            }
        }
        Err(LaunchError::Refused(format!("the recorded command line's {opt} uses {p}, whose backing chain is longer than {IMAGE_CHAIN_MAX}; refusing to start it")))
    }

    /// Whether a restore may write `p` (a disk restored in place).
    pub fn may_write(&self, p: &Path) -> Result<(), String> {
        self.check_path(&p.display().to_string(), "disk image", Access::Write).map_err(|e| e.to_string())
    }

    /// Whether QEMU may use `p` so: written, only inside [`LaunchPolicy::dirs`] (named without
    /// `..`); read, inside those or [`SYSTEM_READ_DIRS`], or a bare file name QEMU looks up in
    /// its firmware directories; never in the node's own directory nor through a dangling
    /// link. Symbolic links are followed.
    fn check_path(&self, p: &str, opt: &str, access: Access) -> Result<(), LaunchError> {
        if p.is_empty() {
            return Ok(()); // `romfile=` with no file: none loaded
        }
        if HARMLESS_DEVICES.contains(&p) {
            return Ok(());
        }
        self.check_not_own(p, opt)?;
        let path = Path::new(p);
        // QEMU runs in `/`: a relative name is opened from there first; a ROM or firmware name
        // not found there is looked up in QEMU's own firmware directories.
        let real = resolve(&Path::new("/").join(path));
        if access == Access::Read && path.is_relative() && !real.exists() && path.components().count() == 1 {
            return Ok(());
        }
        let (inside, allowed) = match access {
            Access::Write => (
                path.is_absolute()
                    && !path.components().any(|c| matches!(c, Component::ParentDir))
                    && self.dirs.iter().any(|d| path.starts_with(d) && real.starts_with(resolve(d))),
                self.dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
            ),
            Access::Read => {
                let dirs: Vec<PathBuf> = self.dirs.iter().cloned().chain(SYSTEM_READ_DIRS.iter().map(PathBuf::from)).collect();
                (dirs.iter().any(|d| real.starts_with(resolve(d))), dirs.iter().map(|d| d.display().to_string()).collect())
            }
        };
        if !inside {
            let how = match access {
                Access::Write => "uses",
                Access::Read => "reads",
            };
            return Err(LaunchError::Refused(format!(
                "the recorded command line's {opt} {how} {p}, outside the directories this host's launch policy allows ({}); add its directory with --launch-dir if it belongs to the VM, otherwise refusing to start it",
                allowed.join(", ")
            )));
        }
        Ok(())
    }

    /// Refuses a path that is, or leads, into the node's own directory (but not into one of
    /// [`LaunchPolicy::dirs`] inside it, such as the default disk directory). A relative path
    /// is taken from `/`, the launched QEMU's working directory.
    fn check_not_own(&self, p: &str, opt: &str) -> Result<(), LaunchError> {
        let own = resolve(&self.own);
        let abs = Path::new("/").join(p);
        if dangling(&abs) {
            return Err(LaunchError::Refused(format!("the recorded command line's {opt} names {p}, through a link to nothing; refusing to start it")));
        }
        let real = resolve(&abs);
        // Inside it (but in a directory of the policy's within it, such as the default disk
        // directory), or a directory around it (a shared directory, a TFTP root, -L).
        let inside = real.starts_with(&own) && !self.dirs.iter().map(|d| resolve(d)).any(|d| d != own && d.starts_with(&own) && real.starts_with(&d));
        if inside || own.starts_with(&real) {
            let where_ = if inside { "in" } else { "a directory around" };
            return Err(LaunchError::Refused(format!(
                "the recorded command line's {opt} names {p}, {where_} this node's own data directory {} (its identity and store); refusing to start it",
                self.own.display()
            )));
        }
        Ok(())
    }
}

/// The options that take an argument in QEMU 7.2's option table (`qemu-options.hx`, every
/// target), and in later QEMU's (`-shim`, `-run-with`); every other option takes none.
const OPTIONS_WITH_ARGUMENT: &[&str] = &[
    "-shim", "-run-with",
    "-machine", "-M", "-cpu", "-accel", "-smp", "-numa", "-add-fd", "-set", "-global", "-boot", "-m", "-mem-path", "-k", "-audio", "-audiodev", "-device", "-name", "-uuid", "-fda", "-fdb", "-hda", "-hdb", "-hdc", "-hdd", "-cdrom", "-blockdev", "-drive", "-mtdblock", "-sd", "-fsdev", "-virtfs", "-iscsi", "-usbdevice", "-display", "-spice", "-rotate", "-vga", "-g", "-vnc", "-acpitable", "-smbios", "-netdev", "-nic", "-net", "-chardev", "-tpmdev", "-bios", "-pflash", "-kernel", "-append", "-initrd", "-dtb", "-compat", "-fw_cfg", "-serial", "-parallel", "-monitor", "-qmp", "-qmp-pretty", "-mon", "-debugcon", "-pidfile", "-overcommit", "-gdb", "-d", "-D", "-dfilter", "-seed", "-L", "-xen-domid", "-action", "-loadvm", "-option-rom", "-rtc", "-icount", "-watchdog-action", "-echr", "-incoming", "-chroot", "-runas", "-prom-env", "-semihosting-config", "-sandbox", "-readconfig", "-trace", "-plugin", "-qtest", "-qtest-log", "-msg", "-dump-vmstate", "-object"
];

/// The option an argument names, as QEMU reads it (`-drive` and `--drive` alike), if it
/// names one.
fn option_name(arg: &str) -> Option<String> {
    let name = arg.strip_prefix('-')?;
    let name = name.strip_prefix('-').unwrap_or(name);
    (!name.is_empty()).then(|| format!("-{name}"))
}

/// Reads a command line as QEMU does: an option in [`OPTIONS_WITH_ARGUMENT`] takes the next
/// argument whatever it is; any other option takes none (QEMU exits on one it does not know).
/// Returns the bare arguments (QEMU opens each as a disk) and the arguments of `-append` (the
/// guest kernel's command line).
fn parse(cmdline: &[String]) -> (Vec<usize>, Vec<usize>) {
    let (mut bare, mut guest_text) = (Vec::new(), Vec::new());
    let mut i = 1;
    while i < cmdline.len() {
        match option_name(&cmdline[i]) {
            None => bare.push(i),
            Some(o) if OPTIONS_WITH_ARGUMENT.contains(&o.as_str()) => {
                if o == "-append" {
                    guest_text.push(i + 1);
                }
                i += 1;
            }
            Some(_) => {}
        }
        i += 1;
    }
    (bare, guest_text)
}

/// Each `-chardev`'s id and kind: its backend, `socket-unix` for a socket with a `path=`.
fn chardev_kinds(cmdline: &[String]) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    for w in cmdline.windows(2) {
        if option_name(&w[0]).as_deref() != Some("-chardev") {
            continue;
        }
        let parts = super::disks::drive_options(&w[1]);
        let Some(id) = parts.iter().find(|(k, _)| k == "id").map(|(_, v)| v.clone()) else { continue };
        let backend = match parts.first() {
            Some((b, v)) if v.is_empty() => b.clone(),
            _ => parts.iter().find(|(k, _)| k == "backend").map(|(_, v)| v.clone()).unwrap_or_default(),
        };
        let unix = backend == "socket" && parts.iter().any(|(k, _)| k == "path");
        out.insert(id, if unix { "socket-unix".into() } else { backend });
    }
    out
}

/// Whether a monitor on `spec` (a `-monitor` or `-qmp` value, a `-mon` value, what follows a
/// serial port's `mon:`) is reachable from this host only: a Unix socket, or nowhere. A
/// monitor runs `drive_add`, `dump-guest-memory` to a file and the like: on a TCP port or a
/// console it would give whoever reaches it the host.
fn local_monitor(opt: &str, spec: &str, chardevs: &std::collections::HashMap<String, String>) -> bool {
    let local_chardev = |id: &str| chardevs.get(id).is_some_and(|k| matches!(k.as_str(), "socket-unix" | "null" | "stdio"));
    if opt == "-mon" {
        let parts = super::disks::drive_options(spec);
        return parts.iter().find(|(k, _)| k == "chardev").is_some_and(|(_, id)| local_chardev(id));
    }
    let head = spec.split(',').next().unwrap_or(spec);
    if let Some(id) = head.strip_prefix("chardev:") {
        return local_chardev(id);
    }
    head.starts_with("unix:") || matches!(head, "none" | "null" | "stdio")
}

/// Whether a link on the way to `p` leads nowhere (QEMU creating the file would follow it to
/// wherever it points).
fn dangling(p: &Path) -> bool {
    let mut head = PathBuf::new();
    for c in p.components() {
        head.push(c);
        match std::fs::symlink_metadata(&head) {
            Ok(m) if m.file_type().is_symlink() && std::fs::metadata(&head).is_err() => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// `p` as the kernel would find it: its longest existing ancestor with symbolic links
/// resolved, then the rest with `.` and `..` applied by name.
fn resolve(p: &Path) -> PathBuf {
    let parts: Vec<Component> = p.components().collect();
    for k in (1..=parts.len()).rev() {
        let head: PathBuf = parts[..k].iter().collect();
        if let Ok(mut out) = std::fs::canonicalize(&head) {
            for c in &parts[k..] {
                match c {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::Normal(n) => out.push(n),
                    _ => {}
                }
            }
            return out;
        }
    }
    p.to_path_buf()
}

/// Every string in an argument that may name a file, for the check that no option names the
/// node's own files: each run of characters that starts the argument or follows `=`, `:`,
/// `,`, a quote or a bracket, up to the next `,`, quote, bracket or blank; and the same in the
/// strings of JSON values (`{...}` arguments, `json:{...}` names), whose escapes may hide a
/// `/`. Only runs with a `/` are kept.
fn path_tokens(arg: &str) -> Vec<String> {
    fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            serde_json::Value::Object(m) => m.values().for_each(|x| strings(x, out)),
            _ => {}
        }
    }
    let mut texts = vec![arg.to_string()];
    let mut k = 0;
    while k < texts.len() {
        let t = texts[k].clone();
        let starts = t.match_indices('{').map(|(i, _)| i).filter(|&i| i == 0 || t[..i].ends_with("json:"));
        for i in starts.collect::<Vec<_>>() {
            let rest = t[i..].replace(",,", ",");
            if let Some(Ok(v)) = serde_json::Deserializer::from_str(&rest).into_iter::<serde_json::Value>().next() {
                let mut found = Vec::new();
                strings(&v, &mut found);
                for f in found {
                    if !texts.contains(&f) {
                        texts.push(f);
                    }
                }
            }
        }
        k += 1;
    }
    let starts_after = |c: char| matches!(c, '=' | ':' | ',' | '"' | '\'' | '{' | '[') || c.is_whitespace();
    let ends_at = |c: char| matches!(c, ',' | '"' | '\'' | '}' | ']');
    let mut out = Vec::new();
    for t in &texts {
        let mut prev: Option<char> = None;
        for (i, c) in t.char_indices() {
            if (prev.is_none() || prev.is_some_and(starts_after)) && !ends_at(c) && !c.is_whitespace() {
                let run: String = t[i..].chars().take_while(|&c| !ends_at(c)).collect();
                if run.contains('/') && !out.contains(&run) {
                    out.push(run);
                }
            }
            prev = Some(c);
        }
    }
    out
}

/// Does a `-device` hand the guest a host device (VFIO, a host USB device, a vhost SCSI or
/// vDPA target)?
fn passes_through_host_device(value: &str) -> bool {
    let drivers: Vec<String> = if value.trim_start().starts_with('{') {
        serde_json::from_str::<serde_json::Value>(value).ok().and_then(|v| v.get("driver").and_then(|d| d.as_str()).map(str::to_string)).into_iter().collect()
    } else {
        super::disks::drive_options(value)
            .into_iter()
            .enumerate()
            .filter_map(|(k, (key, v))| match (k, v.is_empty()) {
                (0, true) => Some(key),
                _ if key == "driver" => Some(v),
                _ => None,
            })
            .collect()
    };
    drivers.iter().any(|d| {
        d.starts_with("vfio") || d.starts_with("usb-host") || d.starts_with("vhost-scsi") || d.starts_with("vhost-vdpa") || d.starts_with("u2f-passthru") || d == "pci-assign"
    })
}

/// What in a network option's value would make QEMU run a host program: a tap device's
/// `script=`, `downscript=` or `helper=`, user networking's `smb=` (runs smbd) or a
/// `guestfwd=` to a command; `key=value` or JSON.
fn runs_host_code(value: &str) -> Result<Option<&'static str>, String> {
    let what = |k: &str, v: &str| match k {
        "script" | "downscript" if v != "no" && !v.is_empty() => Some("a host script"),
        "helper" if !v.is_empty() => Some("a host helper program"),
        "smb" if !v.is_empty() => Some("a host smbd"),
        // To a command, a host file or device, or a host socket: the guest reaches the host.
        "guestfwd" if !v.is_empty() => Some("a host command, file or socket for the guest (guestfwd)"),
        _ => None,
    };
    if value.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(value).map_err(|e| format!("not JSON QEMU would take ({e})"))?;
        let Some(m) = v.as_object() else { return Ok(None) };
        return Ok(m.iter().find_map(|(k, x)| what(k, &x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()))));
    }
    Ok(super::disks::drive_options(value).iter().find_map(|(k, v)| what(k, v)))
}

/// The local paths in an option's value and how QEMU uses each: a character device's
/// `unix:P`, `file:P`, `pipe:P`, `tty:P` or `/dev/...`; the path keys ([`is_path_key`]) of
/// `key=value` parts or of a JSON value (`-blockdev {"driver":"file",...}` as libvirt writes
/// them, a disk's `json:{...}`); or the value itself for options that take a file name. A
/// read-only disk's files, boot files, firmware and what `-fw_cfg`, `-acpitable`, `-smbios` and
/// a device's `romfile` load are read; the rest written. A disk's network protocol (`nbd:`,
/// `rbd:`, `iscsi://`, ...) names no local file.
fn paths_in(opt: &str, value: &str) -> Result<Vec<(String, Access)>, String> {
    let mut out = Vec::new();
    if FILE_OPTIONS.contains(&opt) {
        local_file(opt, value, Access::Write, &mut out)?;
        return Ok(out);
    }
    if opt == "-initrd" {
        // Multiboot modules: `FILE ARGS,FILE ARGS`.
        for m in value.split(',') {
            local_file(opt, m.split(' ').next().unwrap_or(m), Access::Read, &mut out)?;
        }
        return Ok(out);
    }
    if READ_FILE_OPTIONS.contains(&opt) {
        local_file(opt, value, Access::Read, &mut out)?;
        return Ok(out);
    }
    // Devices' files (`romfile`, a `loader`'s `file`) are loaded, not written; `-set` may set a
    // drive's file, though.
    let device = opt == "-device" || opt == "-global" || (opt == "-set" && value.starts_with("device."));
    let keyed = if READ_KEY_OPTIONS.contains(&opt) || device { Access::Read } else { Access::Write };
    if value.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(value).map_err(|e| format!("not JSON QEMU would take ({e})"))?;
        json_paths(opt, &v, keyed, &mut out)?;
        return Ok(out);
    }
    let mut parts = super::disks::drive_options(value);
    if let (Some(implied), Some((k, v))) = (implied_key(opt), parts.first_mut()) {
        if v.is_empty() && !CHARDEV_OPTIONS.contains(&opt) {
            (*k, *v) = (implied.to_string(), std::mem::take(k));
        }
    }
    // QEMU keeps a repeated key's last value, a check may look at another: refused.
    let matters = |k: &str| {
        is_path_key(opt, k) || matches!(k.rsplit('.').next().unwrap_or(k), "readonly" | "read-only" | "snapshot" | "media" | "driver" | "type" | "backend" | "qom-type" | "format")
    };
    let mut seen = std::collections::HashSet::new();
    if let Some((k, _)) = parts.iter().find(|(k, _)| matters(k) && !seen.insert(k.as_str())) {
        return Err(format!("{k} is given twice"));
    }
    if DISK_OPTIONS.contains(&opt) {
        if let Some((_, d)) = parts.iter().find(|(k, v)| k.rsplit('.').next() == Some("driver") && LOCAL_DEVICE_DRIVERS.contains(&v.as_str())) {
            return Err(format!("the block driver {d} hands the guest a host device"));
        }
    }
    if opt == "-option-rom" {
        if let Some((_, f)) = parts.iter().find(|(k, _)| k == "romfile") {
            local_file(opt, f, Access::Read, &mut out)?;
        }
        return Ok(out);
    }
    let access = if DISK_OPTIONS.contains(&opt) && read_only(&parts) { Access::Read } else { keyed };
    // `-global driver=D,property=P,value=V`: the property's name is a value here.
    let global_path = opt == "-global" && parts.iter().any(|(k, v)| k == "property" && is_path_key(opt, v));
    for (k, (key, v)) in parts.into_iter().enumerate() {
        if k == 0 && CHARDEV_OPTIONS.contains(&opt) {
            // A character device's short form: `unix:P`, `file:P`, `pipe:P`, `tty:P`, or a
            // host device itself (`/dev/ttyS0`).
            let mut raw = if v.is_empty() { key.clone() } else { format!("{key}={v}") };
            // `mon:SPEC` multiplexes a monitor onto SPEC.
            while let Some(rest) = raw.strip_prefix("mon:") {
                raw = rest.to_string();
            }
            if raw.starts_with('/') {
                out.push((raw.clone(), Access::Write));
            }
            for prefix in ["unix:", "file:", "pipe:", "tty:", "serial:"] {
                if let Some(p) = raw.strip_prefix(prefix) {
                    out.push((p.to_string(), Access::Write));
                }
            }
            if let Some(p) = v.strip_prefix("unix:") {
                out.push((p.to_string(), Access::Write));
            }
            continue;
        }
        let read = if is_read_key(opt, &key) { Access::Read } else { access };
        if let Some(p) = v.strip_prefix("unix:") {
            // A socket, whatever the key (`vnc=unix:P`).
            out.push((p.to_string(), Access::Write));
            continue;
        }
        if opt == "-spice" && key == "addr" && v.starts_with('/') {
            // `-spice unix=on,addr=/P`: a socket.
            out.push((v.clone(), Access::Write));
        }
        if (key == "data" || key == "file") && opt == "-acpitable" {
            for f in v.split(':') {
                local_file(opt, f, Access::Read, &mut out)?;
            }
        } else if is_path_key(opt, &key) || (global_path && key == "value") {
            local_file(opt, &v, read, &mut out)?;
        }
    }
    Ok(out)
}

/// Options that attach a disk.
const DISK_OPTIONS: &[&str] = &["-drive", "-blockdev"];
/// Options whose files QEMU may open as disk images (and so follow what their headers name).
const IMAGE_OPTIONS: &[&str] = &["-drive", "-blockdev", "-hda", "-hdb", "-hdc", "-hdd", "-fda", "-fdb", "-pflash", "-mtdblock", "-sd", "-cdrom"];
/// Longest backing chain followed.
const IMAGE_CHAIN_MAX: usize = 16;

/// The files an image's header names, should QEMU open it in the format its first bytes
/// claim (it probes an image given without `format=`): a qcow2 or QED backing file (read;
/// relative to the image's directory) and a qcow2 external data file (written). A VMDK
/// descriptor, whose extents may be anywhere, is refused; anything else (raw) names nothing.
/// A file that is not there, or not a regular file, names nothing.
fn image_references(image: &Path) -> Result<Vec<(PathBuf, Access)>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(image) else { return Ok(vec![]) };
    if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Ok(vec![]);
    }
    let mut h = [0u8; 4096];
    let n = f.read(&mut h).map_err(|e| format!("which cannot be read ({e})"))?;
    let h = &h[..n];
    let be32 = |o: usize| h.get(o..o + 4).map(|b| u32::from_be_bytes(b.try_into().unwrap_or_default()) as u64);
    let be64 = |o: usize| h.get(o..o + 8).map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
    let le32 = |o: usize| h.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as u64);
    let mut name_at = |off: u64, len: u64| -> Result<PathBuf, String> {
        if len == 0 || len > 1023 {
            return Err(format!("whose header names a file of {len} bytes"));
        }
        let mut b = vec![0u8; len as usize];
        f.seek(SeekFrom::Start(off)).and_then(|_| f.read_exact(&mut b)).map_err(|e| format!("whose header cannot be read ({e})"))?;
        let name = String::from_utf8(b).map_err(|_| "whose header names a file that is not UTF-8".to_string())?;
        // `json:{...}`, `file:P`, `nbd://...`: QEMU opens such a name as it says, not beside the
        // image; not followed here.
        if name.split('/').next().is_some_and(|head| head.contains(':')) {
            return Err(format!("whose header names {name:?}, a protocol or JSON name this host does not follow"));
        }
        Ok(image.parent().unwrap_or(Path::new("/")).join(name))
    };
    let bad = || "whose header is cut short".to_string();
    let mut out = Vec::new();
    if h.starts_with(b"QFI\xfb") {
        let (version, off, len) = (be32(4).ok_or_else(bad)?, be64(8).ok_or_else(bad)?, be32(16).ok_or_else(bad)?);
        if off != 0 {
            out.push((name_at(off, len)?, Access::Read));
        }
        // Header extensions: type, length, data padded to 8 bytes; type 0 ends them.
        let mut at = if version >= 3 { be32(100).ok_or_else(bad)? as usize } else { 72 };
        while let (Some(kind), Some(len)) = (be32(at), be32(at + 4)) {
            if kind == 0 {
                break;
            }
            if kind == 0x4441_5441 {
                out.push((name_at(at as u64 + 8, len)?, Access::Write));
            }
            at += 8 + (len as usize).div_ceil(8) * 8;
        }
    } else if h.starts_with(b"QED\0") {
        let (off, len) = (le32(56).ok_or_else(bad)?, le32(60).ok_or_else(bad)?);
        if off != 0 {
            out.push((name_at(off, len)?, Access::Read));
        }
    } else if h.starts_with(b"KDMV") || h.starts_with(b"# Disk DescriptorFile") {
        return Err("a VMDK image, whose extents this host does not check (give it as format=raw, or convert it)".into());
    }
    Ok(out)
}

/// Is a disk opened read-only (`readonly=on`, `read-only=on`, a CD-ROM, or `snapshot=on`, which
/// writes to a temporary file instead)? QEMU only reads such an image, as it reads a kernel or
/// firmware (`-drive if=pflash,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd`).
fn read_only(parts: &[(String, String)]) -> bool {
    let last = |k: &str| k.rsplit('.').next().unwrap_or("").to_string();
    let off = parts.iter().any(|(k, v)| matches!(last(k).as_str(), "readonly" | "read-only" | "snapshot") && matches!(v.as_str(), "off" | "false" | "no"));
    !off && parts.iter().any(|(k, v)| match k.as_str() {
        "readonly" | "read-only" | "snapshot" => matches!(v.as_str(), "on" | "true" | "yes" | ""),
        "media" => v == "cdrom",
        _ => false,
    })
}

/// Block drivers that open a host device by address rather than by file (NVMe over VFIO).
const LOCAL_DEVICE_DRIVERS: &[&str] = &["nvme", "nvme-io_uring", "virtio-blk-vfio-pci", "virtio-blk-vhost-vdpa", "virtio-blk-vhost-user"];

/// A disk's or file's name: the file itself, a `file:` path, a `json:{...}` description's files;
/// nothing for a network protocol.
fn local_file(opt: &str, v: &str, access: Access, out: &mut Vec<(String, Access)>) -> Result<(), String> {
    if let Some(j) = v.strip_prefix("json:") {
        let j: serde_json::Value = serde_json::from_str(j).map_err(|e| format!("a json: name QEMU would not take ({e})"))?;
        return json_paths(opt, &j, access, out);
    }
    // `proto:...` with no `/` before the colon: a block protocol. The local ones open the
    // rest as a file; network ones (nbd, rbd, iscsi, http, ssh, ...) name no local file;
    // others (`fat:rw:DIR` hands the guest a host directory, `blkdebug:` reads a config
    // file) cannot be checked and are refused.
    let proto = v.split_once(':').filter(|(p, _)| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '_')));
    match proto {
        None => out.push((v.to_string(), access)),
        Some(("file" | "host_device" | "host_cdrom", rest)) => out.push((rest.to_string(), access)),
        Some((p, _)) if NETWORK_PROTOCOLS.contains(&p.split('+').next().unwrap_or(p)) => {}
        Some((p, _)) => return Err(format!("the block protocol {p}: names host files this host's launch policy cannot check")),
    }
    Ok(())
}

/// Block protocols that reach a disk over the network (QEMU 7.2's).
const NETWORK_PROTOCOLS: &[&str] = &["nbd", "rbd", "iscsi", "gluster", "ssh", "http", "https", "ftp", "ftps", "nfs", "sheepdog", "vxhs"];

/// The strings of path keys ([`is_path_key`]) anywhere in a JSON value (an `addr: {"type":
/// "unix", "path": P}` too); a path key whose value is neither a string nor an object is
/// refused. A read-only disk's files are read.
fn json_paths(opt: &str, v: &serde_json::Value, access: Access, out: &mut Vec<(String, Access)>) -> Result<(), String> {
    match v {
        serde_json::Value::Object(m) => {
            let access = match m.get("read-only").and_then(serde_json::Value::as_bool) {
                Some(true) if DISK_OPTIONS.contains(&opt) => Access::Read,
                Some(false) => Access::Write,
                _ => access,
            };
            if DISK_OPTIONS.contains(&opt) {
                if let Some(d) = m.get("driver").and_then(serde_json::Value::as_str).filter(|d| LOCAL_DEVICE_DRIVERS.contains(d)) {
                    return Err(format!("the block driver {d} hands the guest a host device"));
                }
            }
            for (k, x) in m {
                match x {
                    serde_json::Value::String(s) if s.starts_with("unix:") => out.push((s["unix:".len()..].to_string(), Access::Write)),
                    serde_json::Value::String(s) if is_path_key(opt, k) => local_file(opt, s, if is_read_key(opt, k) { Access::Read } else { access }, out)?,
                    serde_json::Value::Object(_) | serde_json::Value::Array(_) => json_paths(opt, x, access, out)?,
                    serde_json::Value::String(_) => {}
                    other if is_path_key(opt, k) => return Err(format!("{k} is {other}, not a file name")),
                    _ => {}
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().try_for_each(|x| json_paths(opt, x, access, out))?,
        _ => {}
    }
    Ok(())
}

/// Why a QEMU could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The recorded command line cannot or must not be started here.
    #[error("{0}")]
    Refused(String),
    /// QEMU did not start, or did not start listening.
    #[error("{0}")]
    Failed(String),
}

/// Starts the VM's QEMU on this host, waiting for its migration stream. `beside` runs as soon
/// as QEMU is started, with its monitor's path (its socket may not be there yet); what it
/// returns comes back with the launch.
pub fn launch<T>(data_dir: &std::path::Path, vm: &str, state: &QemuState, policy: &LaunchPolicy, beside: impl FnOnce(&std::path::Path) -> T) -> Result<(Launched, T), LaunchError> {
    // A record can come from any member: the host's policy decides, before anything is touched,
    // on exactly what QEMU will be given.
    let cmdline = without_incoming(&state.cmdline);
    let prog = policy.check(&cmdline)?;
    // The monitor the VM was captured through (of several, the one its manager left to
    // vmcsnap), else its first.
    let monitors = qmp_sockets(&cmdline);
    let qmp = monitors.iter().find(|p| **p == state.qmp).or(monitors.first()).cloned().ok_or_else(|| {
        LaunchError::Refused(
            "the recorded command line has no QMP socket (-qmp unix:PATH, or a -chardev socket with -mon mode=control); start QEMU yourself with -incoming unix:PATH and restore with --to qemu:unix:PATH".into(),
        )
    })?;
    let qmp = PathBuf::from(qmp);
    if std::os::unix::net::UnixStream::connect(&qmp).is_ok() {
        return Err(LaunchError::Refused(format!("QMP socket {} is in use: a QEMU with it is still running here (stop it first)", qmp.display())));
    }
    // Stale sockets of the old QEMU go first, so that a socket file appearing means the new
    // QEMU is listening (probing by connecting would take QEMU's one monitor client, or worse,
    // be taken as the migration stream).
    let _ = std::fs::remove_file(&qmp);
    let incoming = data_dir.join(format!("incoming-{vm}.sock"));
    let _ = std::fs::remove_file(&incoming);
    let log = data_dir.join(format!("launch-{vm}.log"));
    let argv = adjusted_cmdline(&cmdline, &incoming, policy.sandbox);
    let failed = LaunchError::Failed;
    let out = std::fs::File::create(&log).map_err(|e| failed(format!("cannot create {}: {e}", log.display())))?;
    let err = out.try_clone().map_err(|e| failed(e.to_string()))?;
    let mut cmd = Command::new(&prog);
    // Relative paths start at `/` (what the policy's check assumed), not at the node's own
    // working directory.
    cmd.current_dir("/");
    cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(out).stderr(err);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(|e| failed(format!("cannot start {}: {e}", prog.display())))?;
    let pid = child.id();
    let besides = beside(&qmp);
    let t0 = Instant::now();
    loop {
        use std::os::unix::fs::FileTypeExt;
        let is_socket = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.file_type().is_socket()).unwrap_or(false);
        if is_socket(&incoming) && is_socket(&qmp) {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            let tail = log_tail(&log);
            let killed = std::os::unix::process::ExitStatusExt::signal(&st) == Some(libc::SIGSYS);
            let hint = if policy.sandbox && killed {
                " (killed by its seccomp sandbox: something in the recorded command line needs a system call the sandbox denies; the node's --launch-sandbox off launches QEMU without it)"
            } else if policy.sandbox && (tail.contains("sandbox") || tail.contains("seccomp")) {
                " (this QEMU cannot run in its seccomp sandbox: start the node with --launch-sandbox off to launch it without)"
            } else {
                ""
            };
            return Err(failed(format!("QEMU exited ({st}) before listening: {tail}{hint}")));
        }
        if t0.elapsed() > LAUNCH_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!("QEMU did not start listening within {LAUNCH_TIMEOUT:?}: {}", log_tail(&log))));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // Reap it when it exits, whenever that is.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok((Launched { pid, qmp, incoming, log }, besides))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: &Path) -> LaunchPolicy {
        LaunchPolicy { qemu_dir: PathBuf::from("/usr/bin"), dirs: vec![dir.to_path_buf()], own: dir.join("node"), sandbox: true }
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_host_policy_decides_what_runs() {
        if !Path::new("/usr/bin/qemu-system-x86_64").is_file() {
            eprintln!("no /usr/bin/qemu-system-x86_64 here: policy test skipped");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().display().to_string();
        let p = policy(dir.path());
        std::fs::create_dir_all(dir.path().join("node")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("x")).expect("mkdir");
        std::os::unix::fs::symlink(dir.path().join("node"), dir.path().join("link")).expect("symlink");
        std::os::unix::fs::symlink("/etc/cron.d/vmcsnap-test-nothing", dir.path().join("dangling")).expect("symlink");
        let ok = args(&[
            "/some/where/qemu-system-x86_64",
            "-m",
            "128",
            "-qmp",
            &format!("unix:{d}/v.qmp,server=on,wait=off"),
            "-chardev",
            &format!("socket,id=s,path={d}/v.ser,server=on,logfile={d}/v.log"),
            "-object",
            &format!("memory-backend-file,id=m0,mem-path={d}/huge,size=128M,share=off"),
            "-object",
            "memory-backend-memfd,id=m1,hugetlb=on,size=128M",
            "-drive",
            &format!("file={d}/disk.img,if=virtio,format=raw"),
            "-drive",
            "file=rbd:pool/image,if=none,id=ceph",
            "-drive",
            "file=nbd+unix:///export?socket=/run/nbd.sock,if=none,id=n",
            "-blockdev",
            &format!(r#"{{"driver":"file","filename":"{d}/v.qcow2","node-name":"s"}}"#),
            "-blockdev",
            r#"{"driver":"qcow2","node-name":"f","file":"s"}"#,
            "-blockdev",
            "driver=qcow2,node-name=g,file=s",
            "-netdev",
            "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-netdev",
            "user,id=n1,hostfwd=tcp::2222-:22",
            "-serial",
            "mon:stdio",
            "-chardev",
            &format!("socket,id=mon0,path={d}/v.mon,server=on,wait=off"),
            "-mon",
            "chardev=mon0,mode=control",
            "-monitor",
            "none",
            "-netdev",
            "user,id=n2,hostfwd=tcp::2223-:22,hostfwd=tcp::8080-:80",
            "-set",
            "device.net0.mac=52:54:00:12:34:56",
            "-machine",
            "q35,accel=tcg",
            "-device",
            "virtio-net-pci,netdev=n2,romfile=",
            "-append",
            "console=ttyS0 script=/x",
            // Read-only images, boot files and ROMs are read: from the policy's directories or
            // the system's package data.
            "-drive",
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd",
            "-drive",
            &format!("file={d}/debian.iso,media=cdrom"),
            "-cdrom",
            &format!("{d}/debian.iso"),
            "-blockdev",
            &format!(r#"{{"driver":"file","filename":"{d}/base.qcow2","node-name":"b","read-only":true}}"#),
            "-kernel",
            &format!("{d}/sub/../bzImage"),
            "--initrd",
            &format!("{d}/initrd.img"),
            "-L",
            "/usr/share/qemu",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=/usr/share/qemu/efi-virtio.rom",
            "-device",
            "e1000,netdev=n1,romfile=efi-e1000.rom",
            "-bios",
            "bios-256k.bin",
            "-fw_cfg",
            &format!("name=opt/x,file={d}/fw.bin"),
            &format!("{d}/disks/first.img"),
            "-object",
            r#"{"qom-type":"rng-random","id":"rng0","filename":"/dev/urandom"}"#,
            "-vnc",
            "127.0.0.1:0",
        ]);
        // The host's own binary runs, whatever path the record names.
        assert_eq!(p.check(&ok).expect("allowed"), PathBuf::from("/usr/bin/qemu-system-x86_64"));
        // Proxmox's name for it too.
        let mut proxmox = ok.clone();
        proxmox[0] = "/usr/bin/kvm".into();
        assert_eq!(p.check(&proxmox).expect("allowed"), PathBuf::from("/usr/bin/qemu-system-x86_64"));
        let refused: Vec<Vec<String>> = vec![
            args(&["/tmp/x/evil", "-m", "128"]),
            args(&["qemu-system-x86_64;rm", "-m", "128"]),
            args(&["qemu-system-nosuch", "-m", "128"]),
            args(&["qemu-system-x86_64", "-plugin", "/tmp/evil.so"]),
            args(&["qemu-system-x86_64", "-netdev", "tap,id=n,script=/tmp/evil.sh"]),
            args(&["qemu-system-x86_64", "-qmp", "unix:/etc/passwd,server=on"]),
            args(&["qemu-system-x86_64", "-chardev", "file,id=f,path=/etc/shadow"]),
            args(&["qemu-system-x86_64", "-chardev", &format!("socket,id=s,path={d}/../../etc/x,server=on")]),
            args(&["qemu-system-x86_64", "-serial", "file:/root/.bashrc"]),
            args(&["qemu-system-x86_64", "-pidfile", "/etc/motd"]),
            args(&["qemu-system-x86_64", "-mem-path", "/etc/motd"]),
            args(&["qemu-system-x86_64", "-object", "memory-backend-file,id=m0,mem-path=/etc/motd,size=128M,share=on"]),
            args(&["qemu-system-x86_64", "-object", r#"{"qom-type":"memory-backend-file","id":"m0","mem-path":"/etc/motd","size":134217728}"#]),
            args(&["qemu-system-x86_64", "-object", "filter-dump,id=f,netdev=n,file=/etc/cron.d/x"]),
            args(&["qemu-system-x86_64", "-object", "{not json"]),
            // Disks the guest may write: the host decides where they are.
            args(&["qemu-system-x86_64", "-drive", "file=/etc/shadow,format=raw,if=virtio"]),
            args(&["qemu-system-x86_64", "-drive", "file.driver=file,file.filename=/etc/shadow,if=virtio"]),
            args(&["qemu-system-x86_64", "-drive", r#"file=json:{"driver":"file","filename":"/etc/shadow"},if=virtio"#]),
            args(&["qemu-system-x86_64", "-drive", "file=relative.img,if=virtio"]),
            args(&["qemu-system-x86_64", "-drive", &format!("file={d}/x,,/../../../etc/shadow,if=virtio")]),
            args(&["qemu-system-x86_64", "-blockdev", r#"{"driver":"file","filename":"/dev/sda","node-name":"s"}"#]),
            args(&["qemu-system-x86_64", "-blockdev", r#"{"driver":"qcow2","node-name":"f","file":{"driver":"file","filename":"/etc/shadow"}}"#]),
            args(&["qemu-system-x86_64", "-blockdev", "driver=host_device,filename=/dev/sda,node-name=s"]),
            args(&["qemu-system-x86_64", "-hda", "/etc/shadow"]),
            args(&["qemu-system-x86_64", "-hda", "host_device:/dev/sda"]),
            args(&["qemu-system-x86_64", "-drive", "file=fat:rw:/etc,if=virtio"]),
            args(&["qemu-system-x86_64", "-blockdev", "driver=vvfat,dir=/etc,rw=on,node-name=v"]),
            args(&["qemu-system-x86_64", "-blockdev", r#"{"driver":"vvfat","dir":"/etc","rw":true,"node-name":"v"}"#]),
            args(&["qemu-system-x86_64", "-pflash", "/boot/efi.fd"]),
            args(&["qemu-system-x86_64", "-virtfs", "local,path=/,mount_tag=root,security_model=passthrough"]),
            args(&["qemu-system-x86_64", "-serial", "/dev/ttyS0"]),
            args(&["qemu-system-x86_64", "-gdb", "unix:/etc/x,server=on"]),
            args(&["qemu-system-x86_64", "-trace", "events=e,file=/etc/motd"]),
            args(&["qemu-system-x86_64", "-writeconfig", "/etc/motd"]),
            args(&["qemu-system-x86_64", "-readconfig", &format!("{d}/vm.cfg")]),
            args(&["qemu-system-x86_64", "-drive", "if=pflash,format=raw,unit=1,file=/var/lib/other/VARS.fd,readonly=off"]),
            args(&["qemu-system-x86_64", "-blockdev", r#"{"driver":"file","filename":"/srv/base.qcow2","node-name":"b","read-only":false}"#]),
            args(&["qemu-system-x86_64", "-vnc", "unix:/etc/x"]),
            args(&["qemu-system-x86_64", "-audiodev", "wav,id=a,path=/etc/motd"]),
            args(&["qemu-system-x86_64", "-tpmdev", "passthrough,id=t,path=/dev/tpm0"]),
            args(&["qemu-system-x86_64", "-object", "input-linux,id=k,evdev=/dev/input/event0"]),
            // Host programs behind guest networking.
            args(&["qemu-system-x86_64", "-netdev", "tap,id=n,helper=/tmp/evil"]),
            args(&["qemu-system-x86_64", "-netdev", r#"{"type":"tap","id":"n","script":"/tmp/evil.sh"}"#]),
            args(&["qemu-system-x86_64", "-nic", "user,smb=/srv"]),
            args(&["qemu-system-x86_64", "-netdev", "user,id=n,guestfwd=tcp:10.0.2.100:1234-cmd:/bin/sh"]),
            args(&["qemu-system-x86_64", "-netdev", r#"{"type":"user","id":"n","guestfwd":[{"str":"tcp:10.0.2.100:1234-cmd:/bin/sh"}]}"#]),
            args(&["qemu-system-x86_64", "-netdev", "stream,id=n,addr.type=unix,addr.path=/etc/x,server=on"]),
            // `--option` is the same option.
            args(&["qemu-system-x86_64", "--drive", "file=/etc/shadow,format=raw,if=virtio"]),
            args(&["qemu-system-x86_64", "--plugin", "/tmp/evil.so"]),
            // A bare argument is a disk.
            args(&["qemu-system-x86_64", "-m", "128", "/etc/shadow"]),
            args(&["qemu-system-x86_64", "-nographic", "/dev/sda"]),
            // `-append`'s argument is the guest's, but only where QEMU reads it so.
            args(&["qemu-system-x86_64", "-name", "-append", "/etc/shadow"]),
            // Files read into the guest (a kernel, a read-only disk, a ROM, fw_cfg) come from
            // the policy's directories or the system's package data only.
            args(&["qemu-system-x86_64", "-kernel", "/root/.ssh/id_ed25519"]),
            args(&["qemu-system-x86_64", "-initrd", "/etc/shadow"]),
            args(&["qemu-system-x86_64", "-drive", "file=/etc/shadow,readonly=on,if=virtio"]),
            args(&["qemu-system-x86_64", "-cdrom", "/etc/shadow"]),
            args(&["qemu-system-x86_64", "-blockdev", r#"{"driver":"file","filename":"/etc/shadow","node-name":"b","read-only":true}"#]),
            args(&["qemu-system-x86_64", "-device", "virtio-net-pci,romfile=/etc/shadow"]),
            args(&["qemu-system-x86_64", "-global", "virtio-net-pci.romfile=/etc/shadow"]),
            args(&["qemu-system-x86_64", "-global", "driver=virtio-net-pci,property=romfile,value=/etc/shadow"]),
            args(&["qemu-system-x86_64", "-set", "drive.d0.file=/etc/shadow"]),
            args(&["qemu-system-x86_64", "-device", "loader,file=/etc/shadow,addr=0x1000"]),
            args(&["qemu-system-x86_64", "-fw_cfg", "name=opt/x,file=/etc/shadow"]),
            args(&["qemu-system-x86_64", "-acpitable", "data=/usr/share/x:/etc/shadow"]),
            args(&["qemu-system-x86_64", "-smbios", "file=/etc/shadow"]),
            args(&["qemu-system-x86_64", "-L", "/etc"]),
            args(&["qemu-system-x86_64", "-kernel", "/usr/share/../../etc/shadow"]),
            args(&["qemu-system-x86_64", "-kernel", "etc/shadow"]),
            args(&["qemu-system-x86_64", "-bios", "../etc/shadow"]),
            // Host devices handed to the guest.
            args(&["qemu-system-x86_64", "-device", "vfio-pci,host=01:00.0"]),
            args(&["qemu-system-x86_64", "-device", "usb-host,hostbus=1,hostaddr=2"]),
            args(&["qemu-system-x86_64", "-device", r#"{"driver":"vfio-pci","host":"01:00.0"}"#]),
            args(&["qemu-system-x86_64", "-netdev", "vhost-vdpa,id=v,vhostdev=/dev/vhost-vdpa-0"]),
            // The node's own files (identity key, store, control socket), read or written,
            // through whatever option, link or spelling.
            args(&["qemu-system-x86_64", "-drive", &format!("file={d}/node/identity.key,format=raw,if=virtio")]),
            args(&["qemu-system-x86_64", "-kernel", &format!("{d}/node/identity.key")]),
            args(&["qemu-system-x86_64", "-pidfile", &format!("{d}/node/identity.key")]),
            args(&["qemu-system-x86_64", "-chardev", &format!("socket,id=c,path={d}/node/control.sock,server=on")]),
            args(&["qemu-system-x86_64", "-name", &format!("guest=x,debug-threads=on,,{d}/node/identity.key")]),
            args(&["qemu-system-x86_64", "-blockdev", &format!(r#"{{"driver":"file","filename":"\u002f{}/node/db","node-name":"b"}}"#, d.trim_start_matches('/'))]),
            args(&["qemu-system-x86_64", "-drive", &format!(r#"file=json:{{"driver":"file",,"filename":"{d}/node/identity.key"}},if=virtio"#)]),
            args(&["qemu-system-x86_64", "-drive", &format!("file={d}/link/identity.key,if=virtio")]),
            args(&["qemu-system-x86_64", "-drive", &format!("file={d}/x/../node/identity.key,readonly=on,if=virtio")]),
            args(&["qemu-system-x86_64", "-drive", &format!("file={},if=virtio,readonly=on", d.trim_start_matches('/').to_string() + "/node/identity.key")]),
            args(&["qemu-system-x86_64", "-unknown-option", &format!("{d}/node/identity.key")]),
            // What the first round of this check let through (an outside review, 2026-12-06).
            args(&["qemu-system-x86_64", "-netdev", "user,id=n,guestfwd=tcp:10.0.2.100:1-file:/root/.ssh/authorized_keys"]),
            args(&["qemu-system-x86_64", "-netdev", "user,id=n", "-set", "netdev.n.guestfwd=tcp:10.0.2.100:1-cmd:sh"]),
            args(&["qemu-system-x86_64", "-device", "e1000,id=x", "-set", "device.x.driver=vfio-pci"]),
            args(&["qemu-system-x86_64", "-monitor", "tcp::4444,server=on,wait=off"]),
            args(&["qemu-system-x86_64", "-qmp", "tcp:0.0.0.0:4444,server=on,wait=off"]),
            args(&["qemu-system-x86_64", "-chardev", "socket,id=c,host=0.0.0.0,port=4444,server=on,wait=off", "-mon", "chardev=c"]),
            args(&["qemu-system-x86_64", "-serial", "mon:tcp::4444,server=on,wait=off"]),
            args(&["qemu-system-x86_64", "-monitor", "vc"]),
            args(&["qemu-system-x86_64", "-gdb", "tcp::1234"]),
            args(&["qemu-system-x86_64", "-s"]),
            args(&["qemu-system-x86_64", "-serial", "mon:file:/etc/cron.d/x"]),
            args(&["qemu-system-x86_64", "-netdev", "user,id=n,tftp=/"]),
            args(&["qemu-system-x86_64", "-device", "usb-mtp,rootdir=/,readonly=off"]),
            args(&["qemu-system-x86_64", "-virtfs", &format!("local,path={d},mount_tag=t,security_model=mapped")]),
            args(&["qemu-system-x86_64", "-L", &format!("{d}/node/.."), "-device", "e1000,romfile=node/identity.key"]),
            args(&["qemu-system-x86_64", "-device", "e1000,romfile=../etc/shadow"]),
            args(&["qemu-system-x86_64", "-M", "pc,initrd=/etc/shadow"]),
            args(&["qemu-system-x86_64", "-machine", "pc,dumpdtb=/etc/motd"]),
            args(&["qemu-system-x86_64", "-icount", "shift=auto,rr=record,rrfile=/etc/passwd"]),
            args(&["qemu-system-x86_64", "-audio", "wav,model=ac97,path=/etc/x"]),
            args(&["qemu-system-x86_64", "-drive", "file.driver=vvfat,file.dir=/,if=virtio"]),
            args(&["qemu-system-x86_64", "-netdev", "dgram,id=n,local.type=unix,local.path=/etc/x"]),
            args(&["qemu-system-x86_64", "-device", "ipmi-bmc-sim,id=b,frudatafile=/etc/shadow"]),
            args(&["qemu-system-x86_64", "-vnc", "vnc=unix:/etc/x"]),
            args(&["qemu-system-x86_64", "-drive", "file=/usr/lib/os-release,readonly=on,readonly=off,if=virtio"]),
            args(&["qemu-system-x86_64", "-drive", "file=/usr/lib/os-release,snapshot=on,file.read-only=off,if=virtio"]),
            args(&["qemu-system-x86_64", "-blockdev", r#"{"driver":"raw","read-only":true,"node-name":"p","file":{"driver":"file","filename":"/usr/lib/os-release","read-only":false}}"#]),
            args(&["qemu-system-x86_64", "-device", "e1000,driver=vfio-pci,host=01:00.0"]),
            args(&["qemu-system-x86_64", "-option-rom", "romfile=/etc/shadow"]),
            args(&["qemu-system-x86_64", "-option-rom", "/usr/share/qemu/x.rom,romfile=/etc/shadow"]),
            args(&["qemu-system-x86_64", "-acpitable", "file=/usr/share/a:/etc/shadow"]),
            args(&["qemu-system-x86_64", "-initrd", &format!("{d}/a,/etc/shadow")]),
            args(&["qemu-system-x86_64", "-blockdev", "driver=nvme,device=0000:01:00.0,namespace=1,node-name=n"]),
            args(&["qemu-system-x86_64", "-device", "u2f-passthru,hidraw=/dev/hidraw0"]),
            args(&["qemu-system-x86_64", "-semihosting"]),
            args(&["qemu-system-x86_64", "-serial", &format!("file:{d}/dangling")]),
        ];
        for c in refused {
            assert!(matches!(p.check(&c), Err(LaunchError::Refused(_))), "{c:?} was allowed");
        }
    }

    #[test]
    fn the_data_directory_is_open_only_where_restored_disks_go() {
        if !Path::new("/usr/bin/qemu-system-x86_64").is_file() {
            eprintln!("no /usr/bin/qemu-system-x86_64 here: policy test skipped");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let own = dir.path().join("data");
        let disks = own.join("disks");
        std::fs::create_dir_all(disks.join("g1")).expect("mkdir");
        // The default disk directory is in the data directory; a --launch-dir around it all
        // opens neither the rest of it.
        let p = LaunchPolicy { qemu_dir: PathBuf::from("/usr/bin"), dirs: vec![disks.clone(), dir.path().to_path_buf()], own: own.clone(), sandbox: true };
        let drive = |f: &Path| args(&["qemu-system-x86_64", "-drive", &format!("file={},if=virtio,format=raw", f.display())]);
        assert!(p.check(&drive(&disks.join("g1/s1-vda.raw"))).is_ok());
        assert!(p.check(&drive(&dir.path().join("vm.img"))).is_ok());
        for f in [own.join("identity.key"), own.join("db/CURRENT"), own.join("certificate"), disks.join("../identity.key"), own.clone()] {
            let e = p.check(&drive(&f)).expect_err("refused").to_string();
            assert!(e.contains("own data directory"), "{f:?}: {e}");
        }
        assert!(p.may_write(&disks.join("g1/vda.raw")).is_ok());
        assert!(p.may_write(&own.join("identity.key")).is_err());
    }

    /// A qcow2 header (version 2, or 3 with an external data file) naming `backing`.
    fn qcow2(path: &Path, backing: &str, data_file: Option<&str>) {
        let mut h = vec![0u8; 1024];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&(if data_file.is_some() { 3u32 } else { 2 }).to_be_bytes());
        if !backing.is_empty() {
            h[8..16].copy_from_slice(&768u64.to_be_bytes());
            h[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
            h[768..768 + backing.len()].copy_from_slice(backing.as_bytes());
        }
        if let Some(d) = data_file {
            h[100..104].copy_from_slice(&104u32.to_be_bytes());
            h[104..108].copy_from_slice(&0x4441_5441u32.to_be_bytes());
            h[108..112].copy_from_slice(&(d.len() as u32).to_be_bytes());
            h[112..112 + d.len()].copy_from_slice(d.as_bytes());
        }
        std::fs::write(path, h).expect("image");
    }

    #[test]
    fn what_an_images_header_names_is_checked_too() {
        if !Path::new("/usr/bin/qemu-system-x86_64").is_file() {
            eprintln!("no /usr/bin/qemu-system-x86_64 here: policy test skipped");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let p = policy(d);
        std::fs::create_dir_all(d.join("node")).expect("mkdir");
        let drive = |f: &str, extra: &str| args(&["qemu-system-x86_64", "-drive", &format!("file={}/{f},if=virtio{extra}", d.display())]);
        std::fs::write(d.join("base.raw"), vec![0u8; 4096]).expect("base");
        qcow2(&d.join("ok.qcow2"), "base.raw", None);
        qcow2(&d.join("chain.qcow2"), "ok.qcow2", None);
        qcow2(&d.join("shadow.qcow2"), "/etc/shadow", None);
        qcow2(&d.join("own.qcow2"), "node/identity.key", None);
        qcow2(&d.join("far.qcow2"), "shadow.qcow2", None);
        qcow2(&d.join("data.qcow2"), "", Some("/etc/motd"));
        qcow2(&d.join("json.qcow2"), r#"json:{"driver":"file","filename":"/etc/shadow"}"#, None);
        std::fs::write(d.join("x.vmdk"), b"# Disk DescriptorFile\nRW 8 FLAT \"/dev/sda\" 0\n").expect("vmdk");
        for ok in [drive("ok.qcow2", ""), drive("chain.qcow2", ",format=qcow2"), drive("shadow.qcow2", ",format=raw"), drive("base.raw", "")] {
            assert!(p.check(&ok).is_ok(), "{ok:?}: {:?}", p.check(&ok));
        }
        for (bad, why) in [("shadow.qcow2", "/etc/shadow"), ("own.qcow2", "own data directory"), ("far.qcow2", "/etc/shadow"), ("data.qcow2", "/etc/motd"), ("x.vmdk", "VMDK"), ("json.qcow2", "protocol or JSON")] {
            let e = p.check(&drive(bad, "")).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = p.check(&args(&["qemu-system-x86_64", &format!("{}/shadow.qcow2", d.display())])).expect_err("bare").to_string();
        assert!(e.contains("/etc/shadow"), "{e}");
    }

    #[test]
    fn a_refused_record_touches_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"keep").expect("write");
        let state = QemuState {
            qmp: victim.display().to_string(),
            head: vec![],
            machine: String::new(),
            ram_section: (0, 0, 0),
            footers: false,
            device_state: vmcsnap_protocol::manifest::BlobRef { len: 0, chunks: vec![] },
            qemu_version: String::new(),
            accel: "tcg".into(),
            cmdline: args(&["qemu-system-x86_64", "-qmp", &format!("unix:{},server=on,wait=off", victim.display())]),
            mode: vmcsnap_protocol::manifest::CaptureMode::StopCopy,
            was_running: true,
        };
        assert!(matches!(launch(dir.path(), "v", &state, &policy(dir.path()), |_| ()), Err(LaunchError::Refused(_))));
        assert_eq!(std::fs::read(&victim).expect("still there"), b"keep");
        assert!(!dir.path().join("launch-v.log").exists(), "nothing was started");
    }

    #[test]
    fn finds_the_qmp_sockets() {
        let c: Vec<String> = ["qemu", "-m", "256", "-qmp", "unix:/run/v1.qmp,server=on,wait=off"].iter().map(|s| s.to_string()).collect();
        assert_eq!(qmp_sockets(&c), ["/run/v1.qmp"]);
        assert_eq!(qmp_sockets(&c[..3]), Vec::<String>::new());
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<String>>();
        // As Proxmox gives it: a Unix socket chardev with a control-mode monitor on it, then
        // a second, HMP one, which is no QMP socket.
        let c = args(&[
            "qemu", "-chardev", "socket,id=qmp,path=/run/q/100.qmp,server=on,wait=off", "-mon", "chardev=qmp,mode=control",
            "-chardev", "socket,id=hmp,path=/run/q/100.mon,server=on,wait=off", "-mon", "chardev=hmp", "--qmp", "unix:/run/v.qmp,server=on",
        ]);
        assert_eq!(qmp_sockets(&c), ["/run/q/100.qmp", "/run/v.qmp"]);
        // `chardev:ID`; an option's argument is no option; a TCP chardev is no socket file.
        let c = args(&["qemu", "-chardev", "socket,id=m,path=/run/m.qmp,server=on", "-qmp", "chardev:m", "-name", "-qmp", "-chardev", "socket,id=t,host=::,port=4444", "-mon", "chardev=t,mode=control"]);
        assert_eq!(qmp_sockets(&c), ["/run/m.qmp"]);
    }

    #[test]
    fn cmdline_is_adjusted_for_incoming() {
        let c: Vec<String> = ["qemu", "-m", "256", "-daemonize", "-incoming", "defer", "-qmp", "unix:/q,server=on", "--incoming", "exec:sh", "--daemonize"].iter().map(|s| s.to_string()).collect();
        let a = adjusted_cmdline(&without_incoming(&c), std::path::Path::new("/d/in.sock"), false);
        assert_eq!(a, ["qemu", "-m", "256", "-qmp", "unix:/q,server=on", "-incoming", "unix:/d/in.sock"]);
        // In the sandbox, whose options come last (QEMU keeps the last value of each key).
        let c: Vec<String> = ["qemu", "-m", "256", "-sandbox", "off"].iter().map(|s| s.to_string()).collect();
        let a = adjusted_cmdline(&c, std::path::Path::new("/d/in.sock"), true);
        assert_eq!(a[a.len() - 2..], ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
        // A QEMU that drops its privileges itself may: `-runas` calls setuid.
        let c: Vec<String> = ["qemu", "--runas", "nobody"].iter().map(|s| s.to_string()).collect();
        assert!(sandbox_value(&c).contains("elevateprivileges=allow,spawn=deny"));
        // `-runas` as another option's argument is no `-runas`.
        let c: Vec<String> = ["qemu", "-name", "-runas", "-m", "64"].iter().map(|s| s.to_string()).collect();
        assert!(sandbox_value(&c).contains("elevateprivileges=deny"));
        // An option's argument is never taken for an option: what is checked is what runs.
        let c: Vec<String> = ["qemu", "-netdev", "-incoming", "-append", "user,id=n,guestfwd=x"].iter().map(|s| s.to_string()).collect();
        assert_eq!(without_incoming(&c), ["qemu", "-netdev", "-incoming", "-append", "user,id=n,guestfwd=x"]);
    }
}
