//! Signed commit records against two real nodes (in this process): real QUIC, libp2p and
//! RocksDB. Node B's catalog is seeded with an honest record and with forgeries; node A's
//! catalog sync must take the first and refuse the rest. Then B, as a member, sends A
//! `Commit`s: unsigned, forged and impostor records are refused; two honest but different
//! records under one name are both kept, and A's control socket shows the conflict and
//! restores neither until one is picked as `NAME@ID`. Last, B claims (`Have`) a page it does
//! not store: a snapshot that would rely on it fails and commits nothing.

use libp2p::identity::Keypair;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmcsnap_dht::admission::{sign_record, Certificate};
use vmcsnap_dht::membership::node_id_of_key;
use vmcsnap_dht::ClusterKey;
use vmcsnap_node::control::{read_frame, write_frame};
use vmcsnap_node::net::{self, DataClient, NetError};
use vmcsnap_node::store::Store;
use vmcsnap_node::NodeConfig;
use vmcsnap_dht::placement::{owners, View};
use vmcsnap_protocol::control::{ControlEvent, ControlRequest, ControlResult, ErrorKind, VmSpec};
use vmcsnap_protocol::manifest::{short_record_id, CaptureMode, CommitRecord, SignedRecord};
use vmcsnap_protocol::wire::{DataRequest, DataResponse, RemoteErrorKind};
use vmcsnap_protocol::{hash_page, NodeId, PAGE_SIZE};

fn free_addr() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr")
}

/// A record of one all-zero page (nothing to store), made by `initiator`.
fn record(name: &str, initiator: NodeId, created: u64) -> CommitRecord {
    let mut r = CommitRecord::minimal(initiator, name);
    r.created_unix_ms = created;
    r
}

struct Host {
    dir: PathBuf,
    addr: SocketAddr,
    key: Keypair,
    id: NodeId,
    cert: Certificate,
}

fn host(root: &Path, name: &str, cluster: &ClusterKey) -> Host {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("dir");
    let key = vmcsnap_node::identity::load_or_create(&dir).expect("identity");
    let id = node_id_of_key(&key.public()).expect("id");
    let cert = cluster.certify(id, name, 1).expect("certify");
    Host { dir, addr: free_addr(), key, id, cert }
}

fn config(h: &Host, cluster: &ClusterKey, peers: Vec<SocketAddr>) -> NodeConfig {
    NodeConfig {
        peers,
        replicas: 1,
        cluster_key: Some(cluster.id().to_string()),
        join: Some(h.cert.to_token()),
        ..NodeConfig::new(h.dir.clone(), h.addr)
    }
}

async fn control(dir: &Path, req: ControlRequest) -> Result<ControlResult, (ErrorKind, String)> {
    // Not there yet while the node starts.
    let mut s = tokio::net::UnixStream::connect(dir.join("control.sock")).await.map_err(|e| (ErrorKind::Unavailable, e.to_string()))?;
    write_frame(&mut s, &req).await.expect("send");
    loop {
        match read_frame::<ControlEvent, _>(&mut s).await.expect("answer") {
            ControlEvent::Progress { .. } => {}
            ControlEvent::Done(r) => return Ok(r),
            ControlEvent::Failed { kind, message } => return Err((kind, message)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_records_signed_by_their_admitted_initiator_are_kept_and_conflicts_show() {
    let root = tempfile::tempdir().expect("tmp");
    let cluster = ClusterKey::generate();
    let a = host(root.path(), "a", &cluster);
    let b = host(root.path(), "b", &cluster);

    // B's catalog before it starts: one honest record, and three that no admitted member made.
    let honest = sign_record(&b.key, &b.cert, record("by-b", b.id, 1)).expect("sign");
    let mut forged = sign_record(&b.key, &b.cert, record("forged", b.id, 2)).expect("sign");
    forged.record.replicas = 1;
    forged.record.created_unix_ms = 3; // changed after signing
    let mut impostor = record("impostor", a.id, 4); // A's name, B's key
    impostor.placement = vec![a.id];
    let impostor = SignedRecord {
        signature: b.key.sign(&SignedRecord::signed_bytes(&impostor).expect("bytes")).expect("sign"),
        certificate: b.cert.to_token(),
        record: impostor,
    };
    let outsider_key = ClusterKey::generate();
    let outsider_cert = outsider_key.certify(b.id, "b", 1).expect("certify");
    let foreign = sign_record(&b.key, &outsider_cert, record("foreign", b.id, 5)).expect("sign");
    {
        let store = Store::open(&b.dir).expect("store");
        for r in [&honest, &forged, &impostor, &foreign] {
            store.catalog_put(r).expect("seed");
        }
    }
    // A page B will own and claim to hold: present in its index, absent from its pages.
    let view = View::new(vec![a.id, b.id]);
    let b_index = view.index_of(&b.id).expect("b");
    let claimed_page: Vec<u8> = (0u32..)
        .map(|i| {
            let mut p = vec![0u8; PAGE_SIZE];
            p[..4].copy_from_slice(&i.to_le_bytes());
            p[PAGE_SIZE - 1] = 1;
            p
        })
        .find(|p| owners(&view, &hash_page(p), 1) == vec![b_index])
        .expect("a page B owns");
    {
        let opts = rocksdb::Options::default();
        let cfs = rocksdb::DB::list_cf(&opts, b.dir.join("db")).expect("families");
        let db = rocksdb::DB::open_cf(&opts, b.dir.join("db"), cfs).expect("open");
        let present = db.cf_handle("present").expect("present family");
        db.put_cf(present, hash_page(&claimed_page).0, []).expect("plant a claim");
    }

    let (stop_a, stopped_a) = tokio::sync::oneshot::channel();
    let (stop_b, stopped_b) = tokio::sync::oneshot::channel();
    let node_a = tokio::spawn(vmcsnap_node::run(config(&a, &cluster, vec![]), Some(stopped_a)));
    let node_b = tokio::spawn(vmcsnap_node::run(config(&b, &cluster, vec![a.addr]), Some(stopped_b)));

    // A learns B's honest record by catalog sync, and nothing else.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let names = loop {
        if let Ok(ControlResult::List(list)) = control(&a.dir, ControlRequest::SnapshotList { unique: false }).await {
            if !list.is_empty() {
                break list.into_iter().map(|s| s.name).collect::<Vec<_>>();
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "A never learned B's record");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(names, vec!["by-b".to_string()]);

    // B, a member, sends A commits.
    let client = DataClient::new(net::endpoint(&b.key, free_addr()).expect("endpoint"), b.key.clone());
    let commit = |r: SignedRecord| DataRequest::Commit { record: r, relay: vec![] };
    let mut unsigned = sign_record(&b.key, &b.cert, record("unsigned", b.id, 6)).expect("sign");
    unsigned.signature.clear();
    for (what, r) in [("unsigned", unsigned), ("forged", forged), ("impostor", impostor), ("foreign", foreign)] {
        match client.request(a.id, a.addr, &commit(r)).await {
            Err(NetError::Remote { kind: RemoteErrorKind::BadRequest, message, .. }) => assert!(message.contains("refused"), "{what}: {message}"),
            other => panic!("the {what} record was not refused: {other:?}"),
        }
    }
    // Two honest records under one name (as when two members race for it): both kept.
    let first = sign_record(&b.key, &b.cert, record("twice", b.id, 10)).expect("sign");
    let second = sign_record(&b.key, &b.cert, record("twice", b.id, 11)).expect("sign");
    for r in [&first, &second] {
        assert_eq!(client.request(a.id, a.addr, &commit(r.clone())).await.expect("commit"), DataResponse::Committed);
    }
    match client.request(a.id, a.addr, &DataRequest::CatalogGet { name: "twice".into() }).await.expect("get") {
        DataResponse::Records { records } => assert_eq!(records.len(), 2),
        other => panic!("{other:?}"),
    }
    let Ok(ControlResult::List(list)) = control(&a.dir, ControlRequest::SnapshotList { unique: false }).await else { panic!("list") };
    let twice: Vec<_> = list.iter().filter(|s| s.name == "twice").collect();
    assert_eq!(twice.len(), 2);
    assert!(twice.iter().all(|s| s.conflict && s.signed && s.initiator == "b"), "{twice:?}");
    assert!(list.iter().filter(|s| s.name != "twice").all(|s| !s.conflict));
    // The bare name is refused with both choices; NAME@ID picks one.
    let show = |name: String| control(&a.dir, ControlRequest::SnapshotShow { name });
    match show("twice".into()).await {
        Err((ErrorKind::Conflict, message)) => {
            for r in [&first, &second] {
                assert!(message.contains(&format!("twice@{}", short_record_id(&r.id().expect("id")))), "{message}");
            }
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let pick = format!("twice@{}", &second.id().expect("id").to_string()[..8]);
    match show(pick).await {
        Ok(ControlResult::Show(r)) => assert_eq!(r.created_unix_ms, 11),
        other => panic!("{other:?}"),
    }
    assert!(matches!(show("twice@zz".into()).await, Err((ErrorKind::Invalid, _))));
    assert!(matches!(show("twice@0000000".into()).await, Err((ErrorKind::NotFound, _))));

    // A snapshot of a VM whose one page B claims but does not hold: refused, nothing committed.
    let img = root.path().join("vm.img");
    std::fs::write(&img, &claimed_page).expect("image");
    let create = ControlRequest::SnapshotCreate {
        name: "on-a-false-claim".into(),
        vms: vec![VmSpec { id: "vm1".into(), source: Some(format!("file:{}", img.display())) }],
        all: false,
        mode: CaptureMode::StopCopy,
        replicas: Some(1),
        max_bandwidth: None,
        disks: Default::default(),
    };
    match control(&a.dir, create).await {
        Err((ErrorKind::Peer, message)) => assert!(message.contains("said it holds page") && message.contains("nothing was committed"), "{message}"),
        other => panic!("expected the false claim to be caught, got {other:?}"),
    }
    let Ok(ControlResult::List(list)) = control(&a.dir, ControlRequest::SnapshotList { unique: false }).await else { panic!("list") };
    assert!(list.iter().all(|s| s.name != "on-a-false-claim"), "committed on a false claim");

    let _ = stop_a.send(());
    let _ = stop_b.send(());
    node_a.await.expect("join").expect("node a");
    node_b.await.expect("join").expect("node b");
}
