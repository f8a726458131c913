//! `vmcsnap node run`'s settings: flags over a TOML file (`--config`) over defaults.
//!
//! The file is read into [`FileConfig`], a raw serde struct whose keys are the flags' names
//! (`data-dir`, `listen`, `scrub-rate`, ...), unknown keys refused; [`resolve`] merges it under
//! the flags and checks every value, naming the key (or flag) of a bad one, into a validated
//! [`vmcsnap_node::NodeConfig`]. `vmcsnap node config-example` prints a file with every key
//! and its default.

use anyhow::{bail, Context};
use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmcsnap_node::config as defaults;

/// `node run`'s options. Each is optional here: unset, it comes from the config file, else
/// from its default (given in its help).
#[derive(Args, Debug, Default)]
pub(crate) struct RunArgs {
    /// A TOML file with any of the options below (keys are the flags' names without `--`,
    /// e.g. `data-dir = "/var/lib/vmcsnap"`; see `vmcsnap node config-example`). Flags
    /// override it.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Directory for the identity, the page store and the control socket. Required (here or
    /// in the file).
    #[arg(long, value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Address peers reach this node at: TCP for membership, UDP (QUIC) for pages. Required
    /// (here or in the file).
    #[arg(long, value_name = "IP:PORT")]
    pub(crate) listen: Option<SocketAddr>,
    /// Any existing member to join through (repeatable; replaces the file's `peers`). Not
    /// needed on a restart.
    #[arg(long = "peer", value_name = "IP:PORT")]
    pub(crate) peers: Vec<SocketAddr>,
    /// Copies of every page for snapshots this node takes [default: 2].
    #[arg(long, value_name = "N")]
    pub(crate) replicas: Option<u8>,
    /// This node's name in the cluster (`vm list`, `restore --on`): the one its certificate
    /// gives; if given, it must be that name.
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,
    /// The cluster's id (printed by `vmcsnap cluster init`). Needed on the first start; kept
    /// in the data directory.
    #[arg(long, env = "VMCSNAP_CLUSTER_KEY", value_name = "CLUSTER_ID")]
    pub(crate) cluster_key: Option<String>,
    /// This node's admission (printed by `vmcsnap cluster admit NODE_ID`). Needed on the first
    /// start; kept in the data directory.
    #[arg(long, env = "VMCSNAP_JOIN", value_name = "TOKEN")]
    pub(crate) join: Option<String>,
    /// A directory of this host's QMP sockets named ID.qmp: each is a registered VM for as
    /// long as the socket exists.
    #[arg(long, value_name = "DIR")]
    pub(crate) vm_dir: Option<PathBuf>,
    /// Where this host's qemu-system-* binaries are: a restore launches only those, never a
    /// binary a snapshot names [default: /usr/bin].
    #[arg(long, value_name = "DIR")]
    pub(crate) qemu_dir: Option<PathBuf>,
    /// A directory where a restored VM's sockets, files and disks (QMP, serial, logs, disk
    /// images, hugetlbfs, guest kernels, ISOs) may be, besides --vm-dir and --disk-dir
    /// (repeatable; replaces the file's `launch-dirs`), e.g. /var/lib/libvirt/images. A
    /// snapshot whose command line uses any other path (for files QEMU only reads, any other
    /// than /usr/share and /usr/lib) is refused, and so is any path in the data directory but
    /// its disks.
    #[arg(long = "launch-dir", value_name = "DIR")]
    pub(crate) launch_dirs: Vec<PathBuf>,
    /// Whether a QEMU a restore launches here runs in QEMU's seccomp sandbox, as libvirt runs
    /// its QEMUs: it is killed if it starts a program (a `migrate exec:...`, a network script,
    /// anything a snapshot's command line might make it run) or gains privileges. Turn it off
    /// only for a QEMU built without seccomp, or to migrate restored VMs with `exec:`
    /// [default: on].
    #[arg(long, value_name = "on|off", value_parser = clap::builder::BoolishValueParser::new(), hide_possible_values = true)]
    pub(crate) launch_sandbox: Option<bool>,
    /// Longest a snapshot this node takes may run before it is given up (e.g. 90s, 30m, 6h).
    /// Garbage collection frees a page only after it was unreferenced this long (plus 10 s),
    /// so give every node the same value [default: 6h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) snapshot_deadline: Option<Duration>,
    /// Time between garbage-collection cycles (a snapshot deletion starts one at once)
    /// [default: 1h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) gc_interval: Option<Duration>,
    /// Time between scrub passes, which read back and check every stored page and repair
    /// damaged copies from replicas [default: 24h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) scrub_interval: Option<Duration>,
    /// Most MiB a second a scrub pass reads [default: 32].
    #[arg(long, value_name = "MIB_PER_S")]
    pub(crate) scrub_rate: Option<u64>,
    /// Space to keep free on the data directory's file system (e.g. 1G, 500M): new pages that
    /// would eat into it are refused with a clear error, and snapshots place their pages on
    /// other members while this node is that full [default: 1G].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) min_free: Option<u64>,
    /// Time between repair cycles, which copy the pages of removed or long-gone members to new
    /// owners and move their share of the pages to members that joined (a `cluster remove` or
    /// a change of membership starts one at once) [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) repair_interval: Option<Duration>,
    /// How long a member may be down before its pages are copied to other owners
    /// [default: 1h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) repair_after: Option<Duration>,
    /// Most MiB a second this node fetches from other members to repair and rebalance
    /// [default: 64].
    #[arg(long, value_name = "MIB_PER_S")]
    pub(crate) repair_rate: Option<u64>,
    /// Most MiB a second a lazy restore (`snapshot restore --launch`) pushes to its guest in
    /// the background, 0 for no cap; pages the guest asks for always go at once [default: 0].
    #[arg(long, value_name = "MIB_PER_S")]
    pub(crate) lazy_push_rate: Option<u64>,
    /// Where a restore that launches a VM here writes the VM's disks, as sparse raw images
    /// named SNAPSHOT-VM-DEVICE-TIME.raw [default: DATA_DIR/disks]. The VM's original disks
    /// are never written.
    #[arg(long, value_name = "DIR")]
    pub(crate) disk_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://IP:PORT/metrics (e.g. 127.0.0.1:9464) [default:
    /// off]. No credentials: bind it to a management address.
    #[arg(long, value_name = "IP:PORT")]
    pub(crate) metrics: Option<SocketAddr>,
    /// Log filter (tracing syntax), e.g. `info` or `vmcsnap=debug` [default: info].
    #[arg(long, env = "VMCSNAP_LOG", value_name = "FILTER")]
    pub(crate) log: Option<String>,
}

/// The config file as written: every key optional, durations and sizes as text (`"6h"`,
/// `"1G"`), rates in MiB/s.
#[derive(serde::Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    peers: Option<Vec<String>>,
    replicas: Option<u8>,
    name: Option<String>,
    cluster_key: Option<String>,
    join: Option<String>,
    vm_dir: Option<PathBuf>,
    qemu_dir: Option<PathBuf>,
    launch_dirs: Option<Vec<PathBuf>>,
    launch_sandbox: Option<bool>,
    snapshot_deadline: Option<String>,
    gc_interval: Option<String>,
    scrub_interval: Option<String>,
    scrub_rate: Option<u64>,
    min_free: Option<String>,
    repair_interval: Option<String>,
    repair_after: Option<String>,
    repair_rate: Option<u64>,
    lazy_push_rate: Option<u64>,
    disk_dir: Option<PathBuf>,
    metrics: Option<String>,
    log: Option<String>,
}

impl FileConfig {
    /// Reads and parses `path` (not yet checked: see [`resolve`]).
    pub(crate) fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    /// Parses a config file's text: a TOML syntax error, an unknown key or a value of the
    /// wrong type is an error that names the key and its line.
    pub(crate) fn parse(text: &str) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
    }
}

/// The node's configuration and log filter from `args` over the file `args.config` names
/// over the defaults; every value checked.
pub(crate) fn resolve(args: RunArgs) -> anyhow::Result<(vmcsnap_node::NodeConfig, String)> {
    let file = match &args.config {
        Some(p) => FileConfig::read(p)?,
        None => FileConfig::default(),
    };
    merge(args, file)
}

/// [`resolve`] once the file is read.
fn merge(args: RunArgs, file: FileConfig) -> anyhow::Result<(vmcsnap_node::NodeConfig, String)> {
    let duration = |flag: Option<Duration>, key: &str, v: Option<String>, default: Duration| -> anyhow::Result<Duration> {
        match (flag, v) {
            (Some(d), _) => Ok(d),
            (None, Some(s)) => parse_duration(&s).map_err(|e| anyhow::anyhow!("config key `{key}`: {e}")),
            (None, None) => Ok(default),
        }
    };
    let mib = |flag: Option<u64>, v: Option<u64>, default: u64| flag.or(v).unwrap_or(default).saturating_mul(1 << 20);
    let data_dir = args.data_dir.or(file.data_dir).context("no data directory: give --data-dir or `data-dir` in the config file")?;
    let listen = match (args.listen, file.listen) {
        (Some(l), _) => l,
        (None, Some(s)) => s.parse().map_err(|_| anyhow::anyhow!("config key `listen`: {s:?} is not an IP:PORT address (like \"10.0.0.1:7400\")"))?,
        (None, None) => bail!("no listen address: give --listen or `listen` in the config file"),
    };
    let peers = if !args.peers.is_empty() {
        args.peers
    } else {
        let mut out = vec![];
        for s in file.peers.unwrap_or_default() {
            out.push(s.parse().map_err(|_| anyhow::anyhow!("config key `peers`: {s:?} is not an IP:PORT address (like \"10.0.0.2:7400\")"))?);
        }
        out
    };
    let launch_dirs = if args.launch_dirs.is_empty() { file.launch_dirs.unwrap_or_default() } else { args.launch_dirs };
    let min_free = match (args.min_free, file.min_free) {
        (Some(n), _) => n,
        (None, Some(s)) => parse_size(&s).map_err(|e| anyhow::anyhow!("config key `min-free`: {e}"))?,
        (None, None) => DEFAULT_MIN_FREE,
    };
    let abs = |p: PathBuf| std::path::absolute(&p).with_context(|| format!("cannot make {} absolute", p.display()));
    let config = vmcsnap_node::NodeConfig {
        data_dir: abs(data_dir)?,
        listen,
        peers,
        replicas: args.replicas.or(file.replicas).unwrap_or(defaults::DEFAULT_REPLICAS),
        name: args.name.or(file.name).unwrap_or_default(),
        vm_dir: args.vm_dir.or(file.vm_dir).map(abs).transpose()?,
        cluster_key: args.cluster_key.or(file.cluster_key),
        join: args.join.or(file.join),
        qemu_dir: abs(args.qemu_dir.or(file.qemu_dir).unwrap_or_else(|| "/usr/bin".into()))?,
        launch_dirs: launch_dirs.into_iter().map(abs).collect::<Result<_, _>>()?,
        launch_sandbox: args.launch_sandbox.or(file.launch_sandbox).unwrap_or(true),
        snapshot_deadline: duration(args.snapshot_deadline, "snapshot-deadline", file.snapshot_deadline, defaults::DEFAULT_SNAPSHOT_DEADLINE)?,
        gc_interval: duration(args.gc_interval, "gc-interval", file.gc_interval, defaults::DEFAULT_GC_INTERVAL)?,
        scrub_interval: duration(args.scrub_interval, "scrub-interval", file.scrub_interval, defaults::DEFAULT_SCRUB_INTERVAL)?,
        scrub_rate: mib(args.scrub_rate, file.scrub_rate, defaults::DEFAULT_SCRUB_RATE >> 20),
        min_free,
        repair_interval: duration(args.repair_interval, "repair-interval", file.repair_interval, defaults::DEFAULT_REPAIR_INTERVAL)?,
        repair_after: duration(args.repair_after, "repair-after", file.repair_after, defaults::DEFAULT_REPAIR_AFTER)?,
        repair_rate: mib(args.repair_rate, file.repair_rate, defaults::DEFAULT_REPAIR_RATE >> 20),
        lazy_push_rate: mib(args.lazy_push_rate, file.lazy_push_rate, 0),
        disk_dir: args.disk_dir.or(file.disk_dir).map(abs).transpose()?,
        metrics: match (args.metrics, file.metrics) {
            (Some(a), _) => Some(a),
            (None, Some(s)) => Some(s.parse().map_err(|_| anyhow::anyhow!("config key `metrics`: {s:?} is not an IP:PORT address (like \"127.0.0.1:9464\")"))?),
            (None, None) => None,
        },
    };
    config.validate()?;
    let log = args.log.or(file.log).unwrap_or_else(|| "info".into());
    Ok((config, log))
}

/// `--min-free`'s default.
pub(crate) const DEFAULT_MIN_FREE: u64 = 1 << 30;

/// A config file with every key at its default, commented, for `node config-example`.
pub(crate) fn example() -> String {
    let d = |t: Duration| format!("{}s", t.as_secs());
    format!(
        r#"# vmcsnap node configuration: `vmcsnap node run --config /etc/vmcsnap/node.toml`.
# Keys are `node run`'s flags without the `--`; a flag given on the command line wins.
# Commented-out keys show their default.

# Required: where the node keeps its identity, pages and catalog, and where peers reach it.
data-dir = "/var/lib/vmcsnap"
listen = "10.0.0.1:7400"         # this host's own address on the cluster network

# Members to join through on the first start (IP:PORT).
# peers = ["10.0.0.2:7400", "10.0.0.3:7400"]

# Admission, needed on the first start only (then kept in data-dir):
# cluster-key = "CLUSTER_ID"     # from `vmcsnap cluster init`
# join = "TOKEN"                 # from `vmcsnap cluster admit NODE_ID --name NAME`
# name = "kvm-01"                # must be the name the token gives

# replicas = {replicas}
# vm-dir = "/run/vmcsnap/vms"    # QMP sockets named ID.qmp: this host's VMs
# qemu-dir = "/usr/bin"
# launch-dirs = []              # where restored VMs' disks, sockets, logs, kernels and ISOs may be, e.g. ["/var/lib/libvirt"]
# launch-sandbox = true          # restored QEMUs in QEMU's seccomp sandbox (killed if they start a program)
# disk-dir = "/var/lib/vmcsnap/disks"
# snapshot-deadline = "{deadline}"
# gc-interval = "{gc}"
# scrub-interval = "{scrub}"
# scrub-rate = {scrub_rate}              # MiB/s
# min-free = "1G"
# repair-interval = "{repair}"
# repair-after = "{after}"
# repair-rate = {repair_rate}            # MiB/s
# lazy-push-rate = 0             # MiB/s, 0: no cap
# metrics = "127.0.0.1:9464"     # Prometheus endpoint, off unless set
# log = "info"
"#,
        replicas = defaults::DEFAULT_REPLICAS,
        deadline = d(defaults::DEFAULT_SNAPSHOT_DEADLINE),
        gc = d(defaults::DEFAULT_GC_INTERVAL),
        scrub = d(defaults::DEFAULT_SCRUB_INTERVAL),
        scrub_rate = defaults::DEFAULT_SCRUB_RATE >> 20,
        repair = d(defaults::DEFAULT_REPAIR_INTERVAL),
        after = d(defaults::DEFAULT_REPAIR_AFTER),
        repair_rate = defaults::DEFAULT_REPAIR_RATE >> 20,
    )
}

/// Parses `1G`, `500M`, `4K` or bare bytes.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (like 1G, 500M)"))?;
    let shift = match unit.trim_end_matches(['i', 'B']) {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses `90s`, `30m`, `6h`, `2d` or bare seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (like 90s, 30m, 6h, 2d)"))?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    n.checked_mul(unit_secs).map(Duration::from_secs).ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RunArgs {
        RunArgs::default()
    }

    #[test]
    fn the_example_parses_and_gives_the_defaults() {
        let file = FileConfig::parse(&example()).expect("example");
        let (c, log) = merge(args(), file).expect("valid");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/vmcsnap"));
        assert_eq!(c.listen, "10.0.0.1:7400".parse::<SocketAddr>().expect("addr"));
        assert_eq!((c.replicas, c.min_free, c.scrub_rate, log.as_str()), (2, 1 << 30, 32 << 20, "info"));
        assert_eq!(c.snapshot_deadline, defaults::DEFAULT_SNAPSHOT_DEADLINE);
        assert!(c.launch_sandbox, "restored QEMUs are sandboxed unless told otherwise");
    }

    #[test]
    fn flags_override_the_file() {
        let file = FileConfig::parse("data-dir = \"/a\"\nlisten = \"127.0.0.1:1\"\nreplicas = 3\nscrub-rate = 8\ngc-interval = \"2m\"\npeers = [\"127.0.0.1:2\"]\n").expect("file");
        let a = RunArgs { replicas: Some(1), data_dir: Some("/b".into()), ..args() };
        let (c, _) = merge(a, file).expect("valid");
        assert_eq!((c.replicas, c.scrub_rate, c.gc_interval), (1, 8 << 20, Duration::from_secs(120)));
        let file = FileConfig::parse("data-dir = \"/a\"\nlisten = \"127.0.0.1:1\"\nlaunch-sandbox = false\n").expect("file");
        assert!(!merge(args(), file).expect("valid").0.launch_sandbox);
        let file = FileConfig::parse("data-dir = \"/a\"\nlisten = \"127.0.0.1:1\"\nlaunch-sandbox = false\n").expect("file");
        assert!(merge(RunArgs { launch_sandbox: Some(true), ..args() }, file).expect("valid").0.launch_sandbox);
        assert_eq!(c.data_dir, PathBuf::from("/b"));
        assert_eq!(c.peers, vec!["127.0.0.1:2".parse::<SocketAddr>().expect("addr")]);
    }

    #[test]
    fn bad_files_name_the_key() {
        let base = "data-dir = \"/a\"\nlisten = \"127.0.0.1:7400\"\n";
        for (extra, key) in [
            ("replica = 2\n", "replica"),
            ("replicas = \"two\"\n", "replicas"),
            ("replicas = 300\n", "replicas"),
            ("peers = [\"nowhere\"]\n", "peers"),
            ("gc-interval = \"often\"\n", "gc-interval"),
            ("min-free = \"1X\"\n", "min-free"),
            ("metrics = \"9464\"\n", "metrics"),
        ] {
            let err = FileConfig::parse(&format!("{base}{extra}")).and_then(|f| merge(args(), f)).map(|_| ()).expect_err(extra);
            assert!(format!("{err:#}").contains(key), "{extra:?}: {err:#}");
        }
        let err = FileConfig::parse("data-dir = \"/a\"\nlisten = \"here\"\n").and_then(|f| merge(args(), f)).map(|_| ()).expect_err("listen");
        assert!(format!("{err:#}").contains("`listen`"), "{err:#}");
        let err = FileConfig::parse("listen = \"127.0.0.1:7400\"\n").and_then(|f| merge(args(), f)).map(|_| ()).expect_err("no data dir");
        assert!(format!("{err:#}").contains("data-dir"), "{err:#}");
        assert!(parse_duration("99999999999999999d").is_err());
    }
}
