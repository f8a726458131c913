//! `vmcsnap`: run a node, and operate the cluster through the local node.
//!
//! Noun-verb commands (`vmcsnap snapshot create`, `vmcsnap cluster status`); every reading
//! command takes `--json`; long work shows a progress bar on a terminal.

mod config;
mod doctor;
mod rocksdb_crc;
mod wait;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use vmcsnap_node::control::{read_frame, write_frame, FrameReadError};
use vmcsnap_protocol::control::{ControlEvent, ControlRequest, ControlResult, ErrorKind, VmSpec};
use vmcsnap_protocol::manifest::CaptureMode;
use vmcsnap_protocol::retention::{self, Candidate, Policy};
use vmcsnap_protocol::units::human_bytes;
use vmcsnap_protocol::PAGE_SIZE;
use vmcsnap_protocol::wire::DiskChoice;

/// `--version`: the release and the versions of what it speaks and stores (nodes speak to
/// each other only on the same data-plane version; records are readable by equal versions).
static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (data plane {}, control {}, commit records {}, signed records {})",
        env!("CARGO_PKG_VERSION"),
        String::from_utf8_lossy(vmcsnap_protocol::wire::DATA_ALPN),
        vmcsnap_protocol::control::CONTROL_VERSION,
        vmcsnap_protocol::manifest::RECORD_VERSION,
        vmcsnap_protocol::manifest::SIGNED_VERSION,
    )
});

#[derive(Parser)]
#[command(
    name = "vmcsnap",
    version = VERSION.as_str(),
    about = "Deduplicated memory snapshots of whole QEMU/KVM VM clusters, stored across all hosts",
    long_about = "vmcsnap snapshots the memory of many VMs at once and stores every distinct 4 KiB page \
once (times --replicas), spread over every host that runs a node. Any host can list and restore any \
snapshot.\n\nEvery host runs `vmcsnap node run`; every other command talks to the node on this host \
through its control socket (--node, or VMCSNAP_NODE).",
    after_help = "Setting up (the cluster key stays on the operator's machine, never on a host):\n  \
vmcsnap cluster init --key ~/cluster.key                     # once; prints the CLUSTER_ID\n  \
vmcsnap node id --data-dir /var/lib/vmcsnap                 # on each host; prints its NODE_ID\n  \
vmcsnap cluster admit NODE_ID --name kvm-01 --key ~/cluster.key   # prints its TOKEN\n  \
vmcsnap node run --data-dir /var/lib/vmcsnap --listen 10.0.0.1:7400 --cluster-key CLUSTER_ID --join TOKEN\n\n\
Examples:\n  vmcsnap node run --data-dir /var/lib/vmcsnap --listen 10.0.0.1:7400 --peer 10.0.0.2:7400\n  \
export VMCSNAP_NODE=/var/lib/vmcsnap\n  \
vmcsnap vm add web1 --qmp /run/web1.qmp\n  vmcsnap snapshot create nightly --all\n  \
vmcsnap snapshot restore nightly --launch --on kvm-03\n  vmcsnap cluster status"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run this host's node.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Take, list, inspect and restore snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Internal: a live capture's relay between QEMU and the node (see node/src/qemu/relay.rs).
    #[command(name = "stream-relay", hide = true)]
    StreamRelay {
        /// The socket QEMU connects to.
        listen: PathBuf,
        /// The node's capture socket.
        to: PathBuf,
        /// Read nothing until `go FILLER` on standard input (see relay.rs).
        #[arg(long)]
        held: bool,
    },
    /// Internal: holds a lazily restored QEMU's monitor for the node (see
    /// node/src/qemu/keeper.rs).
    #[command(name = "qmp-keeper", hide = true)]
    QmpKeeper {
        /// QEMU's QMP socket.
        qmp: PathBuf,
        /// The socket the node asks on.
        listen: PathBuf,
    },
    /// Register this host's VMs and list the cluster's.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Inspect the cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Check this host: QEMU and its version, KVM or TCG only, userfaultfd (live snapshots,
    /// lazy restores), clock sync, free disk space and, if a node runs here (--node), its
    /// membership. Exits 1 if anything vmcsnap needs is missing.
    #[command(after_help = "Examples:\n  vmcsnap doctor --node /var/lib/vmcsnap\n  vmcsnap doctor --json")]
    Doctor {
        /// Where this host's qemu-system-* binaries are (the node's --qemu-dir).
        #[arg(long, value_name = "DIR", default_value = "/usr/bin")]
        qemu_dir: PathBuf,
        #[command(flatten)]
        common: NodeArg,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Examples:\n  vmcsnap completions bash > /etc/bash_completion.d/vmcsnap\n  vmcsnap completions zsh > ~/.zfunc/_vmcsnap")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Internal: write the man pages (vmcsnap.1 and one per subcommand) into DIR.
    #[command(name = "man-pages", hide = true)]
    ManPages {
        /// Where to write them.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Register a QEMU VM running on this host, so that any host can snapshot it by id.
    ///
    /// The VM needs a QMP socket: `-qmp unix:PATH,server=on,wait=off`. The registration is
    /// kept across node restarts; a restore with --launch moves it to the host the VM runs on.
    Add {
        /// VM id, unique in the cluster (letters, digits, '.', '_', '-').
        id: String,
        /// The VM's QMP socket.
        #[arg(long, value_name = "PATH")]
        qmp: PathBuf,
        #[command(flatten)]
        common: NodeArg,
    },
    /// Forget a VM registered on this host.
    Remove {
        /// VM id.
        id: String,
        #[command(flatten)]
        common: NodeArg,
    },
    /// List every VM of the cluster: where it runs and its state.
    List {
        #[command(flatten)]
        common: NodeArg,
    },
}

/// `snapshot list --sort`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ListSort {
    /// Creation time.
    Time,
    /// Name.
    Name,
    /// Raw bytes of memory and disks captured.
    Raw,
    /// Bytes the snapshot added to the cluster when it was taken.
    New,
    /// Bytes only this snapshot references now, which deleting it would free (implies --unique).
    Unique,
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum NodeCmd {
    /// Start the node in the foreground (stop it with Ctrl-C or SIGTERM).
    ///
    /// The node keeps its identity, pages and catalog in --data-dir; starting it again on the
    /// same directory brings back the same member with the same pages.
    #[command(after_help = "Examples:\n  vmcsnap node run --data-dir /var/lib/vmcsnap --listen 10.0.0.1:7000 --peer 10.0.0.2:7000\n  \
vmcsnap node run --config /etc/vmcsnap/node.toml\n  \
vmcsnap node config-example > /etc/vmcsnap/node.toml")]
    Run {
        #[command(flatten)]
        args: config::RunArgs,
    },
    /// Print a config file for `node run --config` with every key, its default and what it
    /// means.
    ConfigExample,
    /// Print this host's node id (creating the node's identity if it has none yet), for
    /// `vmcsnap cluster admit`.
    Id {
        /// The node's data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct NodeArg {
    /// The local node: its data directory or its control socket.
    #[arg(long, env = "VMCSNAP_NODE", value_name = "DIR|SOCKET", global = true)]
    node: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Snapshot VMs wherever they run in the cluster, as one cut.
    ///
    /// This node drives the snapshot; each VM's own host captures it. One cut: every VM's
    /// state is its state at a moment when every VM of the snapshot was paused. With live (the
    /// default) each VM is paused only until all are and its device state is saved, and its
    /// memory is then copied as of that moment while it runs; with stop-copy no VM resumes
    /// before every VM is copied; with pre-copy every VM copies live first, then all pause
    /// together for the last round. If any VM or host fails, every VM is resumed and nothing
    /// is committed.
    #[command(after_help = "Examples:\n  vmcsnap snapshot create nightly --all\n  \
vmcsnap snapshot create before-upgrade --vm web1 --vm db1 --mode stop-copy\n  \
vmcsnap snapshot create img --vm test=file:/srv/test.mem")]
    Create {
        /// A new, unique snapshot name (letters, digits, '.', '_', '-').
        name: String,
        /// A VM, repeatable: ID of a VM registered on any host (`vmcsnap vm list`), or
        /// ID=qemu:QMP_SOCKET / ID=file:PATH (a raw image of whole 4 KiB pages) on this host.
        #[arg(long = "vm", value_name = "ID[=SOURCE]", required_unless_present = "all")]
        vms: Vec<String>,
        /// Every VM registered in the cluster (plus any --vm).
        #[arg(long)]
        all: bool,
        /// How to capture running VMs: live pauses each VM only while every VM of the cut is
        /// paused and its device state saved, then copies memory as it was at that instant
        /// while the VM runs (QEMU's background snapshot; a VM whose QEMU or host cannot falls
        /// back to pre-copy, and says so); pre-copy copies while the VM runs and pauses it for
        /// the last round; stop-copy pauses it for the whole copy. With live, a VM that is
        /// paused is captured with stop-copy (it stays paused).
        #[arg(long, value_enum, default_value = "live")]
        mode: Mode,
        /// Copies of every page (default: the node's --replicas).
        #[arg(long, value_name = "N")]
        replicas: Option<u8>,
        /// Cap each VM's live copy at this many MiB/s, to disturb guests less (pre-copy only:
        /// QEMU does not cap a live snapshot's stream).
        #[arg(long, value_name = "MIB_PER_S")]
        max_bandwidth: Option<u64>,
        /// Memory only: leave every disk out (a restore then runs the VM on whatever disk its
        /// recorded command line names). By default every writable disk given as
        /// `-drive file=...` is captured with the memory, as it was in the cut's pause.
        #[arg(long, conflicts_with = "disks")]
        no_disks: bool,
        /// Capture only this disk (QEMU's device name: `virtio0`, or the drive's id),
        /// repeatable. Read-only drives are never copied: a restore uses them as recorded.
        #[arg(long = "disk", value_name = "DEVICE")]
        disks: Vec<String>,
        #[command(flatten)]
        common: NodeArg,
    },
    /// Restore VMs of a snapshot: launch them on chosen hosts, or write one here.
    ///
    /// With --launch every VM named (all of the snapshot's by default) starts on its host —
    /// the one --on names, else the one that captured it if it is up, else this one — from
    /// its recorded QEMU command line, and runs on from the snapshot.
    #[command(after_help = "Examples:\n  vmcsnap snapshot restore nightly --launch\n  \
vmcsnap snapshot restore nightly --vm web1 --launch --on kvm-03\n  \
vmcsnap snapshot restore nightly --launch --on web1=kvm-03 --on db1=kvm-04\n  \
vmcsnap snapshot restore nightly --vm web1 --to file:/tmp/web1.mem\n  \
vmcsnap snapshot restore nightly --vm web1 --disk virtio0 --to file:/tmp/web1-disk.raw")]
    Restore {
        /// Snapshot name (NAME@RECORD picks one of conflicting records; see `snapshot list`).
        name: String,
        /// A VM to restore (repeatable; default with --launch: every VM of the snapshot).
        #[arg(long = "vm", value_name = "ID")]
        vms: Vec<String>,
        /// With --launch: HOST (a member's name or node id) for every VM, or VM=HOST
        /// (repeatable).
        #[arg(long, value_name = "HOST|VM=HOST", requires = "launch")]
        on: Vec<String>,
        /// Where: file:PATH writes the guest RAM as a raw image; qemu:unix:PATH feeds a QEMU
        /// started with `-incoming unix:PATH` (same command line as the snapshotted VM).
        #[arg(long, value_name = "TARGET", required_unless_present = "launch")]
        to: Option<String>,
        /// Start each VM's recorded QEMU command line on its host and restore into it; the
        /// guests run on from where they were captured.
        #[arg(long, conflicts_with = "to")]
        launch: bool,
        /// With --to qemu:unix:PATH: the target's QMP socket, to check its accelerator and
        /// resume the guest after loading.
        #[arg(long, value_name = "SOCKET")]
        qmp: Option<PathBuf>,
        /// Replace a file target if it exists.
        #[arg(long)]
        force: bool,
        /// With --launch: load all of a guest's memory before it runs. By default a guest runs
        /// as soon as its device state is loaded and its memory follows (QEMU postcopy: pages
        /// it touches first are fetched first); a guest that cannot get its pages waits,
        /// paused in postcopy, and never runs on wrong memory.
        #[arg(long, requires = "launch")]
        eager: bool,
        /// With --to file:PATH: write this disk of the VM (its device name, as `snapshot
        /// show` lists it) as a raw image, instead of its memory. (--launch restores every
        /// captured disk into a new image in the host's --disk-dir and starts the VM on them.)
        #[arg(long, value_name = "DEVICE", requires = "to")]
        disk: Option<String>,
        /// With --launch: write each VM's captured disks over the images its recorded command
        /// line names (which must lie in the host's --launch-dir, --vm-dir or disk
        /// directory), instead of into new images. Destroys what those images hold now: needs
        /// --yes.
        #[arg(long, requires = "launch")]
        in_place: bool,
        /// Confirm --in-place.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        common: NodeArg,
    },
    /// List snapshots (from every reachable member's catalog), oldest first.
    #[command(after_help = "Examples:\n  vmcsnap snapshot list --vm web1 --since 7d\n  vmcsnap snapshot list --sort new --reverse\n  vmcsnap snapshot list --sort unique --reverse    # what deleting each would free, largest first")]
    List {
        /// Only snapshots holding this VM (repeatable: any of them).
        #[arg(long = "vm", value_name = "ID")]
        vms: Vec<String>,
        /// Only snapshots taken within this long before now (e.g. 90m, 7d).
        #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
        since: Option<std::time::Duration>,
        /// Order by creation time, name, raw size, bytes the snapshot added, or bytes only it holds.
        #[arg(long, value_enum, default_value = "time")]
        sort: ListSort,
        /// Reverse the order (newest or largest first).
        #[arg(long)]
        reverse: bool,
        /// Also show what each snapshot holds uniquely: the bytes (one copy; times its
        /// replicas on disk) of pages no other snapshot references, which deleting it would
        /// free. Reads every snapshot's manifest from its owners, so it takes longer.
        #[arg(long)]
        unique: bool,
        #[command(flatten)]
        common: NodeArg,
    },
    /// Show a snapshot: its VMs, their pages and what dedup saved.
    Show {
        /// Snapshot name (NAME@RECORD picks one of conflicting records).
        name: String,
        #[command(flatten)]
        common: NodeArg,
    },
    /// Check that every page of a snapshot is on each of its owners; --deep reads every copy
    /// back and hashes it there. Exits 1 if anything is missing, damaged or unreachable.
    #[command(after_help = "Examples:\n  vmcsnap snapshot verify nightly\n  vmcsnap snapshot verify nightly --deep --json")]
    Verify {
        /// Snapshot name (NAME@RECORD picks one of conflicting records).
        name: String,
        /// Read and hash every copy on its owner (slower: reads the snapshot R times).
        #[arg(long)]
        deep: bool,
        #[command(flatten)]
        common: NodeArg,
    },
    /// Delete snapshots everywhere. Each becomes a signed tombstone that every member keeps
    /// (members that are down learn it when they come back); garbage collection then frees
    /// the pages no other snapshot uses, on every owner.
    #[command(after_help = "Examples:\n  vmcsnap snapshot delete before-upgrade --yes\n  \
vmcsnap snapshot delete nightly@3f2a91c0 --yes   (one of two conflicting records)")]
    Delete {
        /// Snapshots (NAME, or NAME@RECORD for one of conflicting records).
        #[arg(required = true)]
        names: Vec<String>,
        /// Really delete them (this cannot be undone).
        #[arg(long)]
        yes: bool,
        /// Wait until garbage collection on every live member has freed what they used alone
        /// (at least the grace period: --snapshot-deadline plus two catalog syncs), showing
        /// progress. Ctrl-C stops waiting, not the collection.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        common: NodeArg,
    },
    /// Delete the snapshots a retention policy does not keep (like `restic forget`).
    ///
    /// Snapshots are grouped by the set of VMs they hold (a nightly --all snapshot and an
    /// ad-hoc one of a single VM are counted apart). In each group, newest first: --keep-last
    /// keeps the N newest; --keep-hourly/-daily/-weekly/-monthly/-yearly keep the newest
    /// snapshot of each of the N most recent hours, days, weeks (Monday first), months, years
    /// (UTC) that have one. A snapshot any rule keeps is kept.
    #[command(after_help = "Examples:\n  vmcsnap snapshot forget --keep-last 3 --keep-daily 7 --keep-weekly 4 --dry-run\n  \
vmcsnap snapshot forget --keep-daily 14 --vm web1 --yes")]
    Forget {
        /// Keep the N newest.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_last: u32,
        /// Keep the newest of each of the N most recent hours.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_hourly: u32,
        /// ... days.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_daily: u32,
        /// ... weeks.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_weekly: u32,
        /// ... months.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_monthly: u32,
        /// ... years.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_yearly: u32,
        /// Only snapshots that hold this VM (repeatable).
        #[arg(long = "vm", value_name = "ID")]
        vms: Vec<String>,
        /// Count all snapshots as one group instead of one group per set of VMs.
        #[arg(long)]
        one_group: bool,
        /// Print what would be deleted and delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Delete without asking again (needed unless --dry-run).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        common: NodeArg,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// Pause for the device state only; memory as of that instant, copied while running.
    Live,
    /// Copy while running; pause only for the last round.
    PreCopy,
    /// Pause, copy everything, resume.
    StopCopy,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// List every member: address, share of the hash space, pages and bytes stored.
    Status {
        #[command(flatten)]
        common: NodeArg,
    },
    /// List the members this node knows and whether each is up, from its own view (asks no
    /// other member, so it answers at once however large the cluster; `status` asks every
    /// member for its figures). DISK and VMS are what each member last said about itself by
    /// gossip (FULL: snapshots place around it; "?": not heard yet).
    Members {
        #[command(flatten)]
        common: NodeArg,
    },
    /// Create a cluster key (on the operator's machine; never copy it to a host) and print
    /// the cluster's id, which every node is started with.
    Init {
        /// Where to write the key (created owner-only; never overwritten).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Admit a node: print the token its `node run --join` takes.
    #[command(after_help = "Example:\n  vmcsnap cluster admit $(ssh kvm-03 vmcsnap node id --data-dir /var/lib/vmcsnap) --name kvm-03 --key ~/cluster.key")]
    Admit {
        /// The node's id (`vmcsnap node id` on its host).
        node_id: String,
        /// Its name in the cluster.
        #[arg(long)]
        name: String,
        /// The cluster key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The admission's serial (default: the current time in seconds).
        #[arg(long)]
        serial: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a member from the cluster, everywhere: it is disconnected, never an owner again,
    /// and members that are down learn it when they come back.
    Remove {
        /// The member: its name or node id.
        member: String,
        /// The cluster key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Really remove it (this cannot be undone: the node needs a new identity to rejoin).
        #[arg(long)]
        yes: bool,
        /// Wait until repair on every live member has made the copies that left with it,
        /// showing progress. Ctrl-C stops waiting, not the repair.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        common: NodeArg,
    },
}

fn main() {
    let cli = Cli::parse();
    // Commands die quietly on a closed pipe (`vmcsnap snapshot list | head`), as command-line
    // tools do. A node must not (a client that goes away while it answers, a QEMU that dies
    // while it is spoken to), nor must the relay (it drains on when the node is gone): for
    // them a closed pipe stays an error (Rust's default).
    if !matches!(cli.cmd, Cmd::Node(NodeCmd::Run { .. }) | Cmd::StreamRelay { .. } | Cmd::QmpKeeper { .. }) {
        // SAFETY: signal(2) with SIG_DFL before any thread exists; no handler code runs.
        #[allow(unsafe_code)]
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let json = cli.cmd.json();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        let kind = e.downcast_ref::<CliError>().map(|c| c.kind).unwrap_or(ErrorKind::Invalid);
        if json {
            // Scripts get the kind as well as the message, on stdout like every other answer.
            println!("{}", serde_json::json!({ "error": { "kind": kind, "message": format!("{e:#}") } }));
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

impl Cmd {
    /// Whether the command was asked for JSON output.
    fn json(&self) -> bool {
        match self {
            Cmd::Node(NodeCmd::Id { json, .. }) => *json,
            Cmd::Node(_) | Cmd::StreamRelay { .. } | Cmd::QmpKeeper { .. } => false,
            Cmd::Snapshot(c) => match c {
                SnapshotCmd::Create { common, .. }
                | SnapshotCmd::Restore { common, .. }
                | SnapshotCmd::List { common, .. }
                | SnapshotCmd::Show { common, .. }
                | SnapshotCmd::Delete { common, .. }
                | SnapshotCmd::Verify { common, .. }
                | SnapshotCmd::Forget { common, .. } => common.json,
            },
            Cmd::Vm(c) => match c {
                VmCmd::Add { common, .. } | VmCmd::Remove { common, .. } | VmCmd::List { common } => common.json,
            },
            Cmd::Cluster(ClusterCmd::Status { common } | ClusterCmd::Members { common } | ClusterCmd::Remove { common, .. }) => common.json,
            Cmd::Cluster(ClusterCmd::Init { json, .. } | ClusterCmd::Admit { json, .. }) => *json,
            Cmd::Doctor { common, .. } => common.json,
            Cmd::Completions { .. } | Cmd::ManPages { .. } => false,
        }
    }
}

/// A failure the node reported (or the CLI met reaching it), with its kind.
#[derive(Debug)]
struct CliError {
    kind: ErrorKind,
    message: String,
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

fn cli_error(kind: ErrorKind, message: impl Into<String>) -> anyhow::Error {
    CliError { kind, message: message.into() }.into()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::StreamRelay { listen, to, held } => std::process::exit(vmcsnap_node::qemu::relay::run(&listen, &to, held)),
        Cmd::QmpKeeper { qmp, listen } => std::process::exit(vmcsnap_node::qemu::keeper::run(&qmp, &listen)),
        Cmd::Node(NodeCmd::Run { args }) => node_run(args).await,
        Cmd::Node(NodeCmd::ConfigExample) => {
            print!("{}", config::example());
            Ok(())
        }
        Cmd::Node(NodeCmd::Id { data_dir, json }) => node_id(&data_dir, json),
        Cmd::Cluster(ClusterCmd::Init { key, json }) => cluster_init(&key, json),
        Cmd::Cluster(ClusterCmd::Admit { node_id, name, key, serial, json }) => cluster_admit(&node_id, &name, &key, serial, json),
        Cmd::Cluster(ClusterCmd::Remove { member, key, yes, wait, common }) => cluster_remove(&member, &key, yes, wait, &common).await,
        Cmd::Snapshot(SnapshotCmd::Create { name, vms, all, mode, replicas, max_bandwidth, no_disks, disks, common }) => {
            let disks = match (no_disks, disks.is_empty()) {
                (true, _) => DiskChoice::None,
                (false, true) => DiskChoice::All,
                (false, false) => DiskChoice::Only(disks),
            };
            snapshot_create(name, vms, all, mode, replicas, max_bandwidth, disks, &common).await
        }
        Cmd::Snapshot(SnapshotCmd::Restore { name, vms, on, to, launch, qmp, force, eager, disk, in_place, yes, common }) => {
            if in_place && !yes {
                return Err(cli_error(ErrorKind::Invalid, "--in-place overwrites the VMs' disk images with the snapshot's: add --yes to confirm (without --in-place, disks are restored into new images)"));
            }
            snapshot_restore(name, vms, on, to, launch, qmp, force, (eager, disk, in_place), &common).await
        }
        Cmd::Snapshot(SnapshotCmd::List { vms, since, sort, reverse, unique, common }) => snapshot_list(&vms, since, sort, reverse, unique, &common).await,
        Cmd::Snapshot(SnapshotCmd::Show { name, common }) => snapshot_show(name, &common).await,
        Cmd::Snapshot(SnapshotCmd::Verify { name, deep, common }) => snapshot_verify(name, deep, &common).await,
        Cmd::Snapshot(SnapshotCmd::Delete { names, yes, wait, common }) => snapshot_delete(names, yes, wait, &common).await,
        Cmd::Snapshot(SnapshotCmd::Forget { keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, vms, one_group, dry_run, yes, common }) => {
            let policy = Policy { last: keep_last, hourly: keep_hourly, daily: keep_daily, weekly: keep_weekly, monthly: keep_monthly, yearly: keep_yearly };
            snapshot_forget(policy, vms, one_group, dry_run, yes, &common).await
        }
        Cmd::Vm(VmCmd::Add { id, qmp, common }) => {
            let qmp = std::path::absolute(&qmp)?.display().to_string();
            call(&common, ControlRequest::VmAdd { id: id.clone(), qmp: qmp.clone() }).await?;
            if common.json {
                return print_json(&serde_json::json!({ "id": id, "qmp": qmp }));
            }
            println!("VM {id} registered ({qmp})");
            Ok(())
        }
        Cmd::Vm(VmCmd::Remove { id, common }) => {
            call(&common, ControlRequest::VmRemove { id: id.clone() }).await?;
            if common.json {
                return print_json(&serde_json::json!({ "id": id }));
            }
            println!("VM {id} forgotten");
            Ok(())
        }
        Cmd::Vm(VmCmd::List { common }) => vm_list(&common).await,
        Cmd::Cluster(ClusterCmd::Status { common }) => cluster_status(&common).await,
        Cmd::Cluster(ClusterCmd::Members { common }) => cluster_members(&common).await,
        Cmd::Doctor { qemu_dir, common } => doctor_run(&qemu_dir, &common).await,
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "vmcsnap", &mut std::io::stdout());
            Ok(())
        }
        Cmd::ManPages { dir } => man_pages(&dir),
    }
}

async fn node_run(args: config::RunArgs) -> anyhow::Result<()> {
    let (config, log) = config::resolve(args)?;
    // Colours only for a terminal: not in journald or a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&log).context("bad log filter (--log, or `log` in the config file)")?)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    tune_malloc();
    vmcsnap_node::run(config, None).await
}

fn node_id(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let kp = vmcsnap_node::identity::load_or_create(data_dir)?;
    let id = vmcsnap_dht::membership::node_id_of_key(&kp.public()).context("the identity is not an ed25519 key")?;
    if json {
        return print_json(&serde_json::json!({ "node_id": id.to_string() }));
    }
    println!("{id}");
    Ok(())
}

fn cluster_init(key: &Path, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let k = vmcsnap_dht::ClusterKey::generate();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key)
        .map_err(|e| cli_error(ErrorKind::Conflict, format!("cannot create {} ({e}); an existing key is never overwritten", key.display())))?;
    f.write_all(k.to_text().as_bytes())?;
    f.sync_all()?;
    if json {
        return print_json(&serde_json::json!({ "cluster_id": k.id().to_string(), "key": key.display().to_string() }));
    }
    println!("{}", k.id());
    eprintln!(
        "cluster key written to {} (keep it off the hosts: whoever has it can admit nodes)\n\
next, on each host: vmcsnap node id --data-dir DIR; then here: vmcsnap cluster admit NODE_ID --name NAME --key {}; then on the host: vmcsnap node run ... --cluster-key {} --join TOKEN",
        key.display(),
        key.display(),
        k.id()
    );
    Ok(())
}

fn read_cluster_key(key: &Path) -> anyhow::Result<vmcsnap_dht::ClusterKey> {
    let text = std::fs::read_to_string(key).map_err(|e| cli_error(ErrorKind::NotFound, format!("cannot read the cluster key {}: {e}", key.display())))?;
    vmcsnap_dht::ClusterKey::from_text(&text).map_err(|e| cli_error(ErrorKind::Invalid, format!("{}: {e}", key.display())))
}

fn parse_node_id(s: &str) -> anyhow::Result<vmcsnap_protocol::NodeId> {
    // A node id is an ed25519 public key in hex, as a cluster id is.
    vmcsnap_dht::admission::parse_cluster_id(s)
        .map_err(|_| cli_error(ErrorKind::Invalid, format!("{s:?} is not a node id (64 hex digits, from `vmcsnap node id`)")))
}

fn cluster_admit(node: &str, name: &str, key: &Path, serial: Option<u64>, json: bool) -> anyhow::Result<()> {
    let k = read_cluster_key(key)?;
    let id = parse_node_id(node)?;
    let serial = serial.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
    let cert = k.certify(id, name, serial).map_err(|e| cli_error(ErrorKind::Invalid, e.to_string()))?;
    if json {
        return print_json(&serde_json::json!({ "node_id": id.to_string(), "name": name, "serial": serial, "cluster_id": k.id().to_string(), "token": cert.to_token() }));
    }
    println!("{}", cert.to_token());
    Ok(())
}

async fn cluster_remove(member: &str, key: &Path, yes: bool, wait: bool, common: &NodeArg) -> anyhow::Result<()> {
    let k = read_cluster_key(key)?;
    let id = match parse_node_id(member) {
        Ok(id) => id,
        Err(_) => {
            let ControlResult::Cluster(c) = call(common, ControlRequest::ClusterStatus).await? else { bail!("node answered with the wrong result") };
            let hits: Vec<_> = c.members.iter().filter(|m| m.name == member || m.id.to_string().starts_with(member)).collect();
            match hits.as_slice() {
                [m] => m.id,
                [] => return Err(cli_error(ErrorKind::NotFound, format!("no member named {member:?}; give its node id"))),
                _ => return Err(cli_error(ErrorKind::Invalid, format!("{member:?} matches several members; give the whole node id"))),
            }
        }
    };
    if !yes {
        return Err(cli_error(ErrorKind::Invalid, format!("removing {member} ({}) cannot be undone; run again with --yes", id.short())));
    }
    let token = k.revoke(id).to_token();
    let base = match wait {
        true => Some(wait::baseline(common, wait::Work::Repair).await?),
        false => None,
    };
    let ControlResult::Removed { node, already, told } = call(common, ControlRequest::ClusterRemove { token }).await? else {
        bail!("node answered with the wrong result")
    };
    if !common.json {
        if already {
            println!("{} was already removed", node.short());
        } else {
            println!("{} removed; {told} live member(s) told now, the others when they next sync", node.short());
        }
    }
    let waited = match base {
        Some(base) => Some(wait::wait(common, wait::Work::Repair, Some(node), base).await?),
        None => None,
    };
    if common.json {
        return print_json(&serde_json::json!({ "node_id": node.to_string(), "already": already, "told": told, "repair": waited }));
    }
    if let Some(w) = waited {
        println!("repair done on {} member(s) in {:.1} s: {} copies made ({} sent)", w.members, w.seconds, w.copies, human_bytes(w.bytes));
    }
    Ok(())
}



#[allow(clippy::too_many_arguments)]
async fn snapshot_create(
    name: String,
    vms: Vec<String>,
    all: bool,
    mode: Mode,
    replicas: Option<u8>,
    max_bandwidth: Option<u64>,
    disks: DiskChoice,
    common: &NodeArg,
) -> anyhow::Result<()> {
    if mode == Mode::Live && max_bandwidth.is_some() {
        return Err(cli_error(ErrorKind::Invalid, "--max-bandwidth caps pre-copy's live copy; QEMU does not cap a live snapshot's stream: add --mode pre-copy"));
    }
    let mode = match mode {
        Mode::Live => CaptureMode::Live,
        Mode::PreCopy => CaptureMode::PreCopy,
        Mode::StopCopy => CaptureMode::StopCopy,
    };
    let mut specs = Vec::new();
    for v in vms {
        specs.push(match v.split_once('=') {
            Some((id, source)) => VmSpec { id: id.to_string(), source: Some(absolutize(source)?) },
            None => VmSpec { id: v, source: None },
        });
    }
    let max_bandwidth = max_bandwidth.map(|m| m.saturating_mul(1 << 20));
    let r = call(common, ControlRequest::SnapshotCreate { name, vms: specs, all, mode, replicas, max_bandwidth, disks }).await?;
    let ControlResult::Created(s) = r else { bail!("node answered with the wrong result") };
    if common.json {
        return print_json(&s);
    }
    for ((id, st), host) in s.vms.iter().zip(&s.hosts) {
        println!(
            "  {id:<16} on {host:<12} {:>9} pages  {:>5.1}% zero  {:>8} new  {:>8} dedup  {:>10} sent{}",
            st.pages_total,
            pct(st.pages_zero, st.pages_total),
            st.pages_new,
            st.pages_dedup,
            human_bytes(st.bytes_sent),
            st.pause_ms.map(|p| format!("  paused {p} ms")).unwrap_or_default()
        );
    }
    println!(
        "snapshot {} committed: {} raw, {} new to the cluster, {} sent to peers, {:.2} s ({})",
        s.name,
        human_bytes(s.raw_bytes),
        human_bytes(s.new_bytes),
        human_bytes(s.bytes_sent),
        s.elapsed_ms as f64 / 1000.0,
        rate(s.raw_bytes, s.elapsed_ms)
    );
    if let Some(us) = s.pause_skew_us {
        println!("one cut: first to last pause {:.1} ms apart", us as f64 / 1000.0);
    }
    if mode == CaptureMode::Live {
        // Say which VMs could not be captured live (their QEMU or host refused it).
        if let Ok(ControlResult::Show(r)) = call(common, ControlRequest::SnapshotShow { name: s.name.clone() }).await {
            for v in &r.vms {
                if v.qemu.as_ref().is_some_and(|q| q.mode == CaptureMode::StopCopy) {
                    eprintln!("note: VM {} was paused, so it was captured with stop-copy (it stays paused)", v.id);
                } else if let Some(q) = v.qemu.as_ref().filter(|q| q.mode != CaptureMode::Live) {
                    eprintln!("note: VM {} was captured with {}, not live: its QEMU or host cannot take a background snapshot (the node's log on {} says why)", v.id, mode_name(q.mode), v.host_name);
                }
            }
        }
    }
    Ok(())
}

/// A capture mode as `--mode` spells it.
fn mode_name(m: CaptureMode) -> &'static str {
    match m {
        CaptureMode::Live => "live",
        CaptureMode::PreCopy => "pre-copy",
        CaptureMode::StopCopy => "stop-copy",
    }
}

#[allow(clippy::too_many_arguments)]
async fn snapshot_restore(
    name: String,
    vms: Vec<String>,
    on: Vec<String>,
    to: Option<String>,
    launch: bool,
    qmp: Option<PathBuf>,
    force: bool,
    (eager, disk, in_place): (bool, Option<String>, bool),
    common: &NodeArg,
) -> anyhow::Result<()> {
    if !launch && vms.len() != 1 {
        return Err(cli_error(ErrorKind::Invalid, "--to restores one VM: name it with --vm ID (or use --launch to restore several)"));
    }
    let target = to.as_deref().map(absolutize).transpose()?;
    let qmp = qmp.map(|p| std::path::absolute(&p).map(|p| p.display().to_string())).transpose()?;
    let r = call(common, ControlRequest::SnapshotRestore { name, vms, on, target, force, launch, qmp, eager, disk, in_place }).await?;
    let ControlResult::Restored(list) = r else { bail!("node answered with the wrong result") };
    if common.json {
        return print_json(&list);
    }
    for s in list {
        println!(
            "restored {}/{} on {} to {}: {} raw, {} distinct pages ({} already there), {} fetched, {:.2} s ({})",
            s.name,
            s.vm,
            s.host,
            s.target,
            human_bytes(s.raw_bytes),
            s.pages_needed,
            s.pages_local,
            human_bytes(s.bytes_fetched),
            s.elapsed_ms as f64 / 1000.0,
            rate(s.raw_bytes, s.elapsed_ms)
        );
        if let Some(pid) = s.launched_pid {
            println!("QEMU started with pid {pid}");
        }
        match (s.lazy, s.running_ms) {
            (true, Some(r)) => println!(
                "guest ran after {:.2} s, its memory following (postcopy: {} pages asked for first); all memory resident after {:.2} s",
                r as f64 / 1000.0,
                s.pages_requested.unwrap_or(0),
                s.elapsed_ms as f64 / 1000.0
            ),
            (false, Some(r)) => println!("guest ran after {:.2} s, once all memory was loaded (eager)", r as f64 / 1000.0),
            _ => {}
        }
        for d in &s.disks {
            println!("disk {}", d.replacen('=', " restored to ", 1));
        }
        if let Some(n) = s.note {
            println!("note: {n}");
        }
        if let Some(st) = s.vm_status {
            println!("guest is {st}");
        }
    }
    Ok(())
}

async fn vm_list(common: &NodeArg) -> anyhow::Result<()> {
    let ControlResult::Vms(list) = call(common, ControlRequest::VmList).await? else {
        bail!("node answered with the wrong result")
    };
    if common.json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("no VMs registered (see `vmcsnap vm add --help`)");
        return Ok(());
    }
    println!("{:<16} {:<14} {:<12} {:<6} QMP", "VM", "HOST", "STATE", "FROM");
    for v in list {
        println!("{:<16} {:<14} {:<12} {:<6} {}", v.id, v.host, v.status, v.origin, v.qmp);
    }
    Ok(())
}

async fn snapshot_list(vms: &[String], since: Option<std::time::Duration>, sort: ListSort, reverse: bool, unique: bool, common: &NodeArg) -> anyhow::Result<()> {
    let unique = unique || matches!(sort, ListSort::Unique);
    let ControlResult::List(mut list) = call(common, ControlRequest::SnapshotList { unique }).await? else {
        bail!("node answered with the wrong result")
    };
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    list.retain(|s| vms.is_empty() || s.vms.iter().any(|v| vms.contains(v)));
    if let Some(d) = since {
        list.retain(|s| s.created_unix_ms >= now_ms.saturating_sub(d.as_millis() as u64));
    }
    match sort {
        ListSort::Time => list.sort_by(|a, b| (a.created_unix_ms, &a.name).cmp(&(b.created_unix_ms, &b.name))),
        ListSort::Name => list.sort_by(|a, b| (&a.name, a.created_unix_ms).cmp(&(&b.name, b.created_unix_ms))),
        ListSort::Raw => list.sort_by_key(|s| (s.raw_bytes, s.created_unix_ms)),
        ListSort::New => list.sort_by_key(|s| (s.new_bytes, s.created_unix_ms)),
        ListSort::Unique => list.sort_by_key(|s| (s.unique_bytes, s.created_unix_ms)),
    }
    if reverse {
        list.reverse();
    }
    if common.json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("no snapshots");
        return Ok(());
    }
    let unique_col = |v: Option<u64>| if unique { format!(" {:>10}", v.map(human_bytes).unwrap_or_default()) } else { String::new() };
    let unique_head = if unique { format!(" {:>10}", "UNIQUE") } else { String::new() };
    println!("{:<24} {:<12} {:<23} {:>10} {:>10}{unique_head} {:>3}  {:<12} VMS", "NAME", "RECORD", "CREATED", "RAW", "NEW", "R", "BY");
    let mut conflicts = false;
    for s in list {
        let mark = match (s.conflict, s.signed) {
            (true, _) => "  CONFLICT: pick with NAME@RECORD",
            (false, false) => "  (unsigned: from before admission, this node only)",
            _ => "",
        };
        conflicts |= s.conflict;
        println!(
            "{:<24} {:<12} {:<23} {:>10} {:>10}{} {:>3}  {:<12} {}{mark}",
            s.name,
            s.record,
            vmcsnap_protocol::units::utc_time(s.created_unix_ms),
            human_bytes(s.raw_bytes),
            human_bytes(s.new_bytes),
            unique_col(s.unique_bytes),
            s.replicas,
            s.initiator,
            s.vms.join(",")
        );
    }
    if conflicts {
        println!("\nDifferent members committed different snapshots under one name. Restore or show one as NAME@RECORD.");
    }
    Ok(())
}

async fn snapshot_verify(name: String, deep: bool, common: &NodeArg) -> anyhow::Result<()> {
    let ControlResult::Verified(r) = call(common, ControlRequest::SnapshotVerify { name, deep }).await? else {
        bail!("node answered with the wrong result")
    };
    if common.json {
        print_json(&r)?;
    } else {
        println!("snapshot {}@{} ({}):", r.name, r.record, if r.deep { "every copy read and hashed" } else { "every owner asked" });
        println!("  {:<16} {:<14} {:>9} {:>9} {:>9}  STATE", "VM", "OWNER", "PAGES", "MISSING", "DAMAGED");
        for v in &r.vms {
            for o in &v.owners {
                let state = match (&o.unreachable, o.missing + o.corrupt) {
                    (Some(why), _) => format!("NOT CHECKED: {why}"),
                    (None, 0) => "ok".into(),
                    (None, _) => "DAMAGED".into(),
                };
                let damaged = if r.deep { o.corrupt.to_string() } else { "-".into() };
                println!("  {:<16} {:<14} {:>9} {:>9} {:>9}  {state}", v.vm, o.owner, o.pages, o.missing, damaged);
            }
        }
        if r.ok {
            println!("every page is on each of its owners{}", if r.deep { " and reads back correct" } else { "" });
        }
    }
    if !r.ok {
        if common.json {
            std::process::exit(1);
        }
        return Err(cli_error(ErrorKind::Storage, "some copies are missing, damaged or could not be checked (see above); the scrubber repairs damaged copies from replicas"));
    }
    Ok(())
}

async fn snapshot_delete(names: Vec<String>, yes: bool, wait: bool, common: &NodeArg) -> anyhow::Result<()> {
    if !yes {
        return Err(cli_error(ErrorKind::Invalid, format!("deleting {} cannot be undone; run again with --yes", names.join(", "))));
    }
    let base = match wait {
        true => Some(wait::baseline(common, wait::Work::Gc).await?),
        false => None,
    };
    let ControlResult::Deleted(done) = call(common, ControlRequest::SnapshotDelete { names }).await? else {
        bail!("node answered with the wrong result")
    };
    if !common.json {
        for d in &done {
            println!("deleted {}@{} (told {} live members; the others learn it when they are back)", d.name, d.record, d.told);
        }
    }
    let Some(base) = base else {
        if common.json {
            return print_json(&done);
        }
        println!("Pages no other snapshot uses are freed by garbage collection on each owner (see `vmcsnap cluster status`, or wait with --wait).");
        return Ok(());
    };
    let w = wait::wait(common, wait::Work::Gc, None, base).await?;
    if common.json {
        return print_json(&serde_json::json!({ "deleted": done, "gc": w }));
    }
    println!("garbage collection done on {} member(s) in {:.1} s: {} freed (all copies)", w.members, w.seconds, human_bytes(w.bytes));
    Ok(())
}

async fn snapshot_forget(policy: Policy, vms: Vec<String>, one_group: bool, dry_run: bool, yes: bool, common: &NodeArg) -> anyhow::Result<()> {
    if policy.is_empty() {
        return Err(cli_error(ErrorKind::Invalid, "no --keep-* rule given: that would delete every snapshot; give at least one (e.g. --keep-last 1)"));
    }
    if !dry_run && !yes {
        return Err(cli_error(ErrorKind::Invalid, "forget deletes snapshots: look first with --dry-run, then run again with --yes"));
    }
    let ControlResult::List(list) = call(common, ControlRequest::SnapshotList { unique: false }).await? else {
        bail!("node answered with the wrong result")
    };
    let candidates: Vec<Candidate> = list
        .iter()
        .filter(|s| vms.is_empty() || s.vms.iter().any(|v| vms.contains(v)))
        .map(|s| {
            let mut set = s.vms.clone();
            set.sort();
            Candidate {
                // Conflicting records are deleted one by one, by record.
                name: if s.conflict { format!("{}@{}", s.name, s.record) } else { s.name.clone() },
                created_unix_ms: s.created_unix_ms,
                group: if one_group { String::new() } else { set.join(",") },
            }
        })
        .collect();
    let decisions = retention::apply(&policy, &candidates);
    let doomed: Vec<String> = decisions.iter().filter(|d| !d.keep()).map(|d| d.name.clone()).collect();
    let deleted = if dry_run || doomed.is_empty() {
        Vec::new()
    } else {
        let ControlResult::Deleted(done) = call(common, ControlRequest::SnapshotDelete { names: doomed.clone() }).await? else {
            bail!("node answered with the wrong result")
        };
        done
    };
    if common.json {
        return print_json(&serde_json::json!({ "dry_run": dry_run, "decisions": decisions, "deleted": deleted }));
    }
    let mut group = None;
    for d in &decisions {
        if group != Some(&d.group) {
            println!("group {}:", if d.group.is_empty() { "(all)" } else { d.group.as_str() });
            group = Some(&d.group);
        }
        let why = if d.keep() { format!("keep ({})", d.kept_by.join(", ")) } else if dry_run { "would delete".into() } else { "deleted".into() };
        println!("  {:<32} {:<24} {why}", d.name, vmcsnap_protocol::units::utc_time(d.created_unix_ms));
    }
    let kept = decisions.len() - doomed.len();
    match (dry_run, doomed.len()) {
        (_, 0) => println!("{kept} kept; nothing to delete"),
        (true, n) => println!("{kept} kept, {n} would be deleted (run again with --yes instead of --dry-run)"),
        (false, n) => println!("{kept} kept, {n} deleted; garbage collection frees their pages on each owner"),
    }
    Ok(())
}

async fn snapshot_show(name: String, common: &NodeArg) -> anyhow::Result<()> {
    let ControlResult::Show(r) = call(common, ControlRequest::SnapshotShow { name }).await? else {
        bail!("node answered with the wrong result")
    };
    if common.json {
        return print_json(&r);
    }
    println!(
        "snapshot {}  (replicas {}, {} placement members, taken by {}, {:.2} s)",
        r.name,
        r.replicas,
        r.placement.len(),
        r.initiator.short(),
        r.elapsed_ms as f64 / 1000.0
    );
    println!("{:<16} {:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}", "VM", "HOST", "PAGES", "ZERO", "NONZERO", "NEW", "DEDUP", "SENT", "PAUSE");
    for v in &r.vms {
        let s = &v.stats;
        let pause = s.pause_ms.map(|p| format!("{p} ms")).unwrap_or_else(|| "-".into());
        println!(
            "{:<16} {:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
            v.id,
            v.host_name,
            s.pages_total,
            s.pages_zero,
            s.pages_nonzero,
            s.pages_new,
            s.pages_dedup,
            human_bytes(s.bytes_sent),
            pause
        );
    }
    if let Some(us) = r.pause_skew_us {
        println!("one cut: first to last pause {:.1} ms apart", us as f64 / 1000.0);
    }
    for v in &r.vms {
        if let Some(q) = &v.qemu {
            println!(
                "\nVM {}: QEMU {} ({}), machine {}, {}, paused {} ms, device state {}",
                v.id,
                q.qemu_version,
                q.accel,
                q.machine,
                mode_name(q.mode),
                v.stats.pause_ms.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                human_bytes(q.device_state.len)
            );
            println!("  RAM blocks: {}", v.ram_blocks().iter().map(|b| format!("{} ({})", b.name, human_bytes(b.bytes))).collect::<Vec<_>>().join(", "));
            let disks = v.disks();
            if disks.is_empty() {
                println!("  disks: none captured (a restore uses the disks its command line names)");
            }
            for (d, _, _) in disks {
                println!("  disk {}: {} ({}), restored as a new raw image", d.device, human_bytes(d.size), q.cmdline.get(d.arg).map(String::as_str).unwrap_or("?"));
            }
            println!("  command line: {}", q.cmdline.join(" "));
        }
    }
    Ok(())
}

/// Writes `vmcsnap.1` and a page per subcommand (`vmcsnap-snapshot-create.1`, ...) into `dir`,
/// hidden commands left out.
fn man_pages(dir: &Path) -> anyhow::Result<()> {
    fn write(cmd: &clap::Command, name: &str, dir: &Path) -> anyhow::Result<()> {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd.clone().name(name.to_string())).render(&mut out)?;
        std::fs::write(dir.join(format!("{name}.1")), out).with_context(|| format!("cannot write {name}.1 in {}", dir.display()))?;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub, &format!("{name}-{}", sub.get_name()), dir)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    write(&cmd, "vmcsnap", dir)
}

async fn doctor_run(qemu_dir: &Path, common: &NodeArg) -> anyhow::Result<()> {
    use doctor::Verdict;
    let data = doctor::data_dir(common.node.as_deref());
    let mut checks = vec![doctor::qemu(qemu_dir), doctor::kvm(), doctor::userfaultfd(), doctor::clock(), doctor::disk(&data), doctor::checksums()];
    checks.push(match &common.node {
        None => doctor::Check { name: "node", verdict: Verdict::Warn, detail: "not checked: pass --node DIR (or set VMCSNAP_NODE) to check this host's node".into() },
        Some(_) => match tokio::time::timeout(std::time::Duration::from_secs(10), call(&NodeArg { node: common.node.clone(), json: true }, ControlRequest::ClusterStatus)).await {
            Ok(Ok(ControlResult::Cluster(c))) => {
                let down: Vec<&str> = c.members.iter().filter(|m| !m.alive).map(|m| m.name.as_str()).collect();
                let me = c.members.iter().find(|m| m.local);
                let detail = format!(
                    "node {} answers; {} of {} members reachable{}",
                    me.map(|m| m.name.as_str()).unwrap_or("?"),
                    c.members.len() - down.len(),
                    c.members.len(),
                    if down.is_empty() { String::new() } else { format!("; down: {} (their port unreachable from here, or their node stopped)", down.join(", ")) }
                );
                let verdict = if me.and_then(|m| m.full) == Some(true) || !down.is_empty() { Verdict::Warn } else { Verdict::Ok };
                doctor::Check { name: "node", verdict, detail }
            }
            Ok(Ok(_)) => doctor::Check { name: "node", verdict: Verdict::Fail, detail: "the node answered with the wrong result".into() },
            Ok(Err(e)) => doctor::Check { name: "node", verdict: Verdict::Fail, detail: format!("{e:#}") },
            Err(_) => doctor::Check { name: "node", verdict: Verdict::Fail, detail: "the node did not answer within 10 s".into() },
        },
    });
    let failed = checks.iter().any(|c| c.verdict == Verdict::Fail);
    if common.json {
        print_json(&serde_json::json!({ "ok": !failed, "checks": checks }))?;
    } else {
        for c in &checks {
            let v = match c.verdict {
                Verdict::Ok => "ok",
                Verdict::Warn => "WARN",
                Verdict::Fail => "FAIL",
            };
            println!("{v:<5} {:<12} {}", c.name, c.detail);
        }
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

async fn cluster_members(common: &NodeArg) -> anyhow::Result<()> {
    let ControlResult::Members(l) = call(common, ControlRequest::ClusterMembers).await? else {
        bail!("node answered with the wrong result")
    };
    if common.json {
        return print_json(&l);
    }
    println!("{:<14} {:<10} {:<22} {:<5} {:>4}  STATE", "NAME", "MEMBER", "ADDRESS", "DISK", "VMS");
    for m in &l.members {
        let name = if m.name.is_empty() { "?" } else { m.name.as_str() };
        let state = if m.alive { "up" } else { "DOWN" };
        // What the member said about itself by gossip ("?": not heard yet).
        let disk = m.said.as_ref().map_or("?", |s| if s.full { "FULL" } else { "ok" });
        let vms = m.said.as_ref().and_then(|s| s.vms.as_ref()).map_or("?".to_string(), |v| v.len().to_string());
        println!("{name:<14} {:<10} {:<22} {disk:<5} {vms:>4}  {state}{}", m.id.short(), m.address, if m.local { " (this node)" } else { "" });
    }
    let up = l.members.iter().filter(|m| m.alive).count();
    println!("{up} of {} members up", l.members.len());
    Ok(())
}

async fn cluster_status(common: &NodeArg) -> anyhow::Result<()> {
    let ControlResult::Cluster(c) = call(common, ControlRequest::ClusterStatus).await? else {
        bail!("node answered with the wrong result")
    };
    if common.json {
        return print_json(&c);
    }
    println!("{:<14} {:<10} {:<22} {:>6} {:>10} {:>10} {:>10} {:>11} {:>10}  STATE", "NAME", "MEMBER", "ADDRESS", "SHARE", "PAGES", "BYTES", "ON DISK", "RECLAIMABLE", "RECLAIMED");
    let gc_bytes = |m: &vmcsnap_protocol::control::MemberStatus, f: fn(&vmcsnap_protocol::wire::GcStats) -> u64| m.gc.as_ref().map(|g| human_bytes(f(g))).unwrap_or_else(|| "-".into());
    for m in &c.members {
        println!(
            "{:<14} {:<10} {:<22} {:>5.1}% {:>10} {:>10} {:>10} {:>11} {:>10}  {}{}",
            if m.name.is_empty() { "?" } else { m.name.as_str() },
            m.id.short(),
            m.address,
            m.share * 100.0,
            m.pages.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            m.bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
            gc_bytes(m, |g| g.disk_bytes),
            gc_bytes(m, |g| g.reclaimable_bytes),
            gc_bytes(m, |g| g.reclaimed_bytes),
            match (m.alive, m.full) {
                (false, _) => "DOWN",
                (true, Some(true)) => "up, DISK FULL (refuses pages)",
                (true, _) => "up",
            },
            if m.local { " (this node)" } else { "" }
        );
    }
    let scrub: Vec<String> = c
        .members
        .iter()
        .filter_map(|m| m.scrub.as_ref().filter(|s| s.corrupt_found > 0 || s.state != "idle").map(|s| format!("{}: {} ({} checked, {} damaged, {} repaired)", m.name, s.state, s.pages_checked, s.corrupt_found, s.repaired)))
        .collect();
    if !scrub.is_empty() {
        println!("scrub: {}", scrub.join("; "));
    }
    let repair: Vec<String> = c
        .members
        .iter()
        .filter_map(|m| m.repair.as_ref().filter(|r| r.copies_made > 0 || r.state != "idle").map(|r| format!("{}: {} ({} copies made, {})", m.name, r.state, r.copies_made, human_bytes(r.bytes_sent))))
        .collect();
    if !repair.is_empty() {
        println!("repair: {}", repair.join("; "));
    }
    let busy: Vec<String> = c.members.iter().filter_map(|m| m.gc.as_ref().filter(|g| g.state != "idle").map(|g| format!("{}: {}", m.name, g.state))).collect();
    if !busy.is_empty() {
        println!("garbage collection: {}", busy.join("; "));
    }
    Ok(())
}

/// The node allocates and frees many buffers of a few MiB (read windows, QUIC frames). By
/// default glibc serves each from a fresh mmap, so every page of every buffer is faulted in and
/// zeroed by the kernel: 15% of a snapshotting node's CPU in a profile. Serving them from the
/// heap, which keeps freed memory for reuse, removes that.
fn tune_malloc() {
    // SAFETY: mallopt(3) only sets allocator parameters; called before any other thread runs.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn pct(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 * 100.0 / b as f64 }
}


fn rate(bytes: u64, ms: u64) -> String {
    format!("{:.2} GB/s", bytes as f64 / (ms.max(1) as f64 / 1000.0) / 1e9)
}

/// `file:rel/path` → `file:/abs/path`, since the node may run in another directory.
fn absolutize(source: &str) -> anyhow::Result<String> {
    match source.split_once(':') {
        Some(("qemu", rest)) if rest.starts_with("unix:") => {
            let p = &rest[5..];
            if !p.is_empty() && !Path::new(p).is_absolute() {
                return Ok(format!("qemu:unix:{}", std::env::current_dir()?.join(p).display()));
            }
            Ok(source.to_string())
        }
        Some((kind, p)) if !p.is_empty() && !Path::new(p).is_absolute() => {
            let abs = std::env::current_dir()?.join(p);
            Ok(format!("{kind}:{}", abs.display()))
        }
        _ => Ok(source.to_string()),
    }
}

fn socket_path(common: &NodeArg) -> anyhow::Result<PathBuf> {
    let Some(p) = &common.node else {
        bail!("which node? pass --node DIR (the node's --data-dir) or set VMCSNAP_NODE");
    };
    Ok(if p.is_dir() { p.join("control.sock") } else { p.clone() })
}

async fn call(common: &NodeArg, req: ControlRequest) -> anyhow::Result<ControlResult> {
    let path = socket_path(common)?;
    let mut stream = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
        cli_error(ErrorKind::Unavailable, format!("no vmcsnap node at {} (is `vmcsnap node run` running there?): {e}", path.display()))
    })?;
    if let Err(e) = write_frame(&mut stream, &req).await {
        // The node may have refused us before reading (another user, another version): its
        // answer says why better than the broken pipe.
        if let Ok(ControlEvent::Failed { kind, message }) = read_frame::<ControlEvent, _>(&mut stream).await {
            return Err(cli_error(kind, message));
        }
        return Err(cli_error(ErrorKind::Unavailable, format!("cannot send the request to the node at {}: {e}", path.display())));
    }
    let bar = (!common.json && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{msg:>9} [{bar:40}] {percent:>3}% {pos}/{len} pages, {per_sec}, eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    });
    // With --json, progress goes to stderr as one JSON object a line (stdout keeps the one
    // result): at a phase's start and end and at most every PROGRESS_EVENT_EVERY between.
    let mut last_event: Option<(String, std::time::Instant)> = None;
    loop {
        let ev: ControlEvent = read_frame(&mut stream).await.map_err(|e| match e {
            FrameReadError::Version(_) => cli_error(ErrorKind::VersionMismatch, format!("the node at {}: {e}", path.display())),
            e => cli_error(ErrorKind::Unavailable, format!("the node closed the connection mid-request: {e}")),
        })?;
        match ev {
            ControlEvent::Progress { phase, done, total } => {
                let due = match &last_event {
                    Some((p, at)) => *p != phase || done >= total || at.elapsed() >= PROGRESS_EVENT_EVERY,
                    None => true,
                };
                if common.json && due {
                    eprintln!("{}", serde_json::json!({ "progress": { "phase": phase, "done": done, "total": total } }));
                    last_event = Some((phase.clone(), std::time::Instant::now()));
                }
                if let Some(b) = &bar {
                    b.set_message(phase);
                    b.set_length(total);
                    b.set_position(done.min(total));
                }
            }
            ControlEvent::Done(r) => {
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                return Ok(r);
            }
            ControlEvent::Failed { kind, message } => {
                if let Some(b) = bar {
                    b.abandon();
                }
                return Err(cli_error(kind, message));
            }
        }
    }
}

const _: () = assert!(PAGE_SIZE == 4096);

/// Least time between two `--json` progress lines of one phase.
const PROGRESS_EVENT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
