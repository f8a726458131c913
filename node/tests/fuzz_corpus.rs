//! Replays the fuzz seed corpus (`fuzz/corpus/TARGET/*`) through the fuzzing entry points, so
//! every test run checks that no seed (and no crash a fuzzer once found, kept there) panics.
//!
//! `write_seeds` (ignored; run it with `--ignored` after a format change) makes the seeds from
//! real material: a migration stream from a real QEMU, the QMP answers that QEMU gave, and
//! signed records, wire and control messages built from that stream's facts.

use std::path::PathBuf;
use vmcsnap_node::fuzz::TARGETS;

/// This crate's directory: the running test's `CARGO_MANIFEST_DIR` (cargo sets it when it runs
/// tests), else the one it was compiled in (a build directory shared by two checkouts may run
/// a test built in the other, which may be gone).
fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn corpus() -> PathBuf {
    crate_dir().join("../fuzz/corpus")
}

#[test]
fn every_seed_of_every_target_replays_without_panicking() {
    let mut replayed = 0;
    for (name, target) in TARGETS {
        let dir = corpus().join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (make the seeds with `cargo test -p vmcsnap-node --test fuzz_corpus -- --ignored`)", dir.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "target {name} has no seeds");
        for f in files {
            let data = std::fs::read(&f).expect("read seed");
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                panic!("target {name} panics on {}", f.display());
            }
            replayed += 1;
        }
    }
    println!("replayed {replayed} seeds over {} targets", TARGETS.len());
}

/// The seeds a fuzzer starts from must decode, or it starts from nothing: a seed written in a
/// format version since replaced is refused at its first bytes. (The control seeds had been
/// whole frames, length header included, and two versions old, until a fuzzer found the
/// first input that decoded — and the target's round trip then failed on its own frame.)
#[test]
fn the_message_seeds_decode_in_todays_formats() {
    use vmcsnap_protocol::codec::decode_body;
    use vmcsnap_protocol::control::{decode_control, ControlEvent, ControlRequest};
    use vmcsnap_protocol::wire::{CutCommand, CutReport, DataRequest, DataResponse};
    let seed = |target: &str, name: &str| std::fs::read(corpus().join(target).join(name)).expect("read seed");
    for name in ["restore", "list"] {
        decode_control::<ControlRequest>(&seed("control", name)).unwrap_or_else(|e| panic!("control/{name}: {e} (regenerate the seeds)"));
    }
    decode_control::<ControlEvent>(&seed("control", "failed")).expect("control/failed (regenerate the seeds)");
    let mut wire = 0;
    for e in std::fs::read_dir(corpus().join("wire")).expect("wire seeds") {
        let name = e.expect("entry").file_name().into_string().expect("utf-8 name");
        let data = seed("wire", &name);
        let ok = match name.split('-').next() {
            Some("request") => decode_body::<DataRequest>(&data).is_ok(),
            Some("response") => decode_body::<DataResponse>(&data).is_ok(),
            Some("cut") => decode_body::<CutCommand>(&data).is_ok() || decode_body::<CutReport>(&data).is_ok(),
            _ => continue, // a crash a fuzzer found, kept as it was
        };
        assert!(ok, "wire/{name} does not decode (regenerate the seeds)");
        wire += 1;
    }
    assert!(wire >= 3, "only {wire} wire seeds");
}

mod seeds {
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;
    use vmcsnap_dht::admission::{sign_record, ClusterKey};
    use vmcsnap_node::qemu::qmp::Qmp;
    use vmcsnap_node::qemu::stream;
    use vmcsnap_protocol::codec::encode_body;
    use vmcsnap_protocol::control::{encode_control, ControlEvent, ControlRequest, ErrorKind};
    use vmcsnap_protocol::manifest::{build_manifest, BlobRef, CaptureMode, CommitRecord, QemuState, Tombstone, VmEntry, VmStats};
    use vmcsnap_protocol::wire::{CatalogEntry, CutBegin, CutCommand, CutReport, DataRequest, DataResponse, PagePuts, PageSet};
    use vmcsnap_protocol::{hash_page, PageHash, PAGE_SIZE, ZERO_HASH};

    struct Guest(Child);

    impl Drop for Guest {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(d.join(name), bytes).expect("write seed");
    }

    /// A real QEMU (stopped before its firmware runs, 16 MiB): its migration stream and the
    /// QMP lines it answered with.
    async fn real_stream(tmp: &Path) -> (Vec<u8>, Vec<Vec<u8>>) {
        let qmp_path = tmp.join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args(["-S", "-m", "16", "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (scripts/setup.sh installs it)");
        let _guest = Guest(child);
        let mut q = None;
        for _ in 0..100 {
            if let Ok(c) = Qmp::connect(&qmp_path).await {
                q = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut q = q.expect("QMP");
        let mut replies = Vec::new();
        for cmd in ["query-status", "query-version", "query-kvm", "query-migrate"] {
            let v = q.execute(cmd, serde_json::json!({})).await.expect("qmp");
            replies.push(serde_json::json!({ "return": v }).to_string().into_bytes());
        }
        replies.push(br#"{"error": {"class": "GenericError", "desc": "no such command"}}"#.to_vec());
        replies.push(br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#.to_vec());
        let file = tmp.join("stream");
        q.execute("migrate", serde_json::json!({ "uri": format!("exec:cat > {}", file.display()) })).await.expect("migrate");
        q.wait_migration_completed(Duration::from_secs(60)).await.expect("completed");
        (std::fs::read(&file).expect("stream"), replies)
    }

    #[tokio::test]
    #[ignore = "writes fuzz/corpus from a real QEMU; run by hand after a format change"]
    async fn write_seeds() {
        let dir = super::corpus();
        let tmp = tempfile::tempdir().expect("tmp");
        let (stream_bytes, replies) = real_stream(tmp.path()).await;

        // Streams: the real one, and its start (a truncated stream).
        let mut pages: Vec<(usize, u64, Vec<u8>)> = Vec::new();
        let parsed = stream::parse(stream_bytes.as_slice(), |b, i, d| {
            if let Some(d) = d {
                pages.push((b, i, d.to_vec()));
            }
            Ok(())
        })
        .expect("the real stream parses");
        put(&dir, "stream", "qemu-7.2-pc-16M", &stream_bytes);
        put(&dir, "stream", "qemu-7.2-pc-16M-truncated", &stream_bytes[..stream_bytes.len().min(70_000)]);
        for (i, r) in replies.iter().enumerate() {
            put(&dir, "qmp", &format!("reply-{i}"), r);
        }
        put(&dir, "rebuild", "meta", &encode_body(&parsed.meta).expect("meta"));

        // A record built from the real stream's facts, signed by an admitted member.
        let cluster = ClusterKey::generate();
        let key = libp2p::identity::Keypair::ed25519_from_bytes([3; 32]).expect("key");
        let me = vmcsnap_dht::membership::node_id_of_key(&key.public()).expect("id");
        let cert = cluster.certify(me, "kvm-01", 1).expect("certify");
        let total: u64 = parsed.meta.blocks.iter().map(|b| b.bytes).sum();
        let mut hashes = vec![ZERO_HASH; (total / PAGE_SIZE as u64) as usize];
        let mut base = 0u64;
        let mut bases = Vec::new();
        for b in &parsed.meta.blocks {
            bases.push(base);
            base += b.bytes / PAGE_SIZE as u64;
        }
        for (b, i, d) in &pages {
            hashes[(bases[*b] + i) as usize] = hash_page(d);
        }
        let built = build_manifest(&hashes);
        let tail_chunks: Vec<PageHash> = parsed.tail.chunks(PAGE_SIZE).map(|c| {
            let mut p = c.to_vec();
            p.resize(PAGE_SIZE, 0);
            hash_page(&p)
        }).collect();
        let record = CommitRecord {
            name: "nightly".into(),
            created_unix_ms: 1_764_547_200_000,
            replicas: 1,
            placement: vec![me],
            initiator: me,
            vms: vec![VmEntry {
                id: "web1".into(),
                source: "qemu:/run/web1.qmp".into(),
                host: me,
                host_name: "kvm-01".into(),
                blocks: parsed.meta.blocks.clone(),
                manifest: built.root.clone(),
                stats: VmStats { pages_total: hashes.len() as u64, pause_ms: Some(12), ..Default::default() },
                qemu: Some(QemuState {
                    qmp: "/run/web1.qmp".into(),
                    head: parsed.meta.head.clone(),
                    machine: parsed.meta.machine.clone(),
                    ram_section: parsed.meta.ram_section,
                    footers: parsed.meta.footers,
                    device_state: BlobRef { len: parsed.tail.len() as u64, chunks: tail_chunks },
                    qemu_version: "7.2.22".into(),
                    accel: "tcg".into(),
                    cmdline: vec!["/usr/bin/qemu-system-x86_64".into(), "-m".into(), "16".into()],
                    mode: CaptureMode::StopCopy,
                    was_running: false,
                }),
            }],
            elapsed_ms: 900,
            pause_skew_us: Some(0),
        };
        let signed = sign_record(&key, &cert, record.clone()).expect("sign");
        put(&dir, "record", "signed", &signed.encode().expect("encode"));
        put(&dir, "record", "legacy-unsigned", &record.encode().expect("encode"));
        put(&dir, "record", "certificate", cert.to_token().as_bytes());
        put(&dir, "record", "revocation", cluster.revoke(me).to_token().as_bytes());
        let tomb = vmcsnap_dht::admission::sign_tombstone(&key, &cert, Tombstone { name: "nightly".into(), record: signed.id().expect("id"), deleted_by: me, deleted_unix_ms: 1 }).expect("sign");
        put(&dir, "record", "tombstone", &tomb.encode().expect("encode"));

        // Manifest: pages, depth, then the top and the chunk pages as the target reads them.
        let mut m = built.root.pages.to_le_bytes().to_vec();
        m.push(built.root.depth);
        for h in &built.root.top {
            m.extend_from_slice(&h.0);
        }
        for (_, c) in &built.chunks {
            m.extend_from_slice(c);
        }
        put(&dir, "manifest", "real", &m);
        let flat = build_manifest(&hashes[..100]);
        let mut m = flat.root.pages.to_le_bytes().to_vec();
        m.push(0);
        for h in &flat.root.top {
            m.extend_from_slice(&h.0);
        }
        put(&dir, "manifest", "flat", &m);

        // Wire messages, one of each kind that carries data.
        let page = pages.first().map(|p| p.2.clone()).unwrap_or_else(|| vec![1; PAGE_SIZE]);
        let h = hash_page(&page);
        let requests = vec![
            DataRequest::Have { hashes: vec![h, ZERO_HASH] },
            DataRequest::Put { pages: PagePuts::from_parts(vec![h], page.clone()) },
            DataRequest::Get { hashes: vec![h] },
            DataRequest::Commit { record: signed.clone(), relay: vec![] },
            DataRequest::CatalogGet { name: "nightly".into() },
            DataRequest::Cut(CutBegin { name: "nightly".into(), vms: vec![("web1".into(), None)], mode: CaptureMode::PreCopy, replicas: 2, placement: vec![me], max_bandwidth: None, disks: Default::default() }),
            DataRequest::Revoke { token: cluster.revoke(me).to_token() },
            DataRequest::RestoreVm { name: "nightly@0123abcd".into(), vm: "web1".into(), eager: false, in_place: false },
            DataRequest::Sync { incarnation: 7 },
            DataRequest::Delete { tombstone: tomb.clone() },
        ];
        for (i, r) in requests.iter().enumerate() {
            put(&dir, "wire", &format!("request-{i}"), &encode_body(r).expect("encode"));
        }
        let responses = [
            DataResponse::Have { missing: vec![0, 3], incarnation: 7 },
            DataResponse::Tombstones { tombstones: vec![tomb.clone()] },
            DataResponse::Pages { pages: PageSet::of([Some(page.clone()), None]) },
            DataResponse::Catalog { entries: vec![CatalogEntry { name: "nightly".into(), record_hash: signed.id().expect("id") }] },
            DataResponse::Records { records: vec![signed.clone()] },
        ];
        for (i, r) in responses.iter().enumerate() {
            put(&dir, "wire", &format!("response-{i}"), &encode_body(r).expect("encode"));
        }
        put(&dir, "wire", "cut-go", &encode_body(&CutCommand::Go).expect("encode"));
        let vms = signed.record.vms.clone();
        put(&dir, "wire", "cut-done", &encode_body(&CutReport::Done { vms }).expect("encode"));

        // Control frames.
        let req = ControlRequest::SnapshotRestore {
            name: "nightly".into(),
            vms: vec!["web1".into()],
            on: vec!["web1=kvm-02".into()],
            target: None,
            force: false,
            launch: true,
            qmp: None,
            eager: false,
            disk: None,
            in_place: false,
        };
        // The target takes frame bodies, as the control socket's reader passes them on.
        let body = |frame: Vec<u8>| frame[vmcsnap_protocol::codec::FRAME_HEADER_BYTES..].to_vec();
        put(&dir, "control", "restore", &body(encode_control(&req).expect("encode")));
        put(&dir, "control", "list", &body(encode_control(&ControlRequest::SnapshotList { unique: false }).expect("encode")));
        let failed = ControlEvent::Failed { kind: ErrorKind::Conflict, message: "two records".into() };
        put(&dir, "control", "failed", &body(encode_control(&failed).expect("encode")));
    }
}
