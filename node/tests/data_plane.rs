//! The data plane against a real node (in this process): real QUIC with identity-bound TLS,
//! real libp2p membership, real RocksDB. The test plays a member that misbehaves, and a
//! stranger that is not a member at all.

use libp2p::identity::Keypair;
use std::net::SocketAddr;
use std::time::Duration;
use std::sync::Arc;
use vmcsnap_dht::membership::node_id_of_key;
use vmcsnap_dht::{ClusterKey, Member, Membership, MembershipConfig, Trust};
use vmcsnap_node::net::{self, DataClient, NetError};
use vmcsnap_node::NodeConfig;
use vmcsnap_dht::admission::{sign_record, sign_tombstone};
use vmcsnap_protocol::manifest::{CaptureMode, CommitRecord, SignedRecord, SignedTombstone, Tombstone};
use vmcsnap_protocol::wire::{CutBegin, DataRequest, DataResponse, PagePuts, PageSet, RemoteErrorKind, HAVE_HASHES_MAX};
use vmcsnap_protocol::{hash_page, NodeId, PageHash, PAGE_SIZE};

fn free_addr() -> SocketAddr {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = tcp.local_addr().expect("addr");
        if std::net::UdpSocket::bind(addr).is_ok() {
            return addr;
        }
    }
}

/// One request of every kind a peer can make, each one that acts or reads included.
fn every_request(page: PageHash, record: SignedRecord, tombstone: SignedTombstone, placement: Vec<NodeId>) -> Vec<DataRequest> {
    vec![
        DataRequest::Have { hashes: vec![page] },
        DataRequest::Put { pages: PagePuts::from_parts(vec![page], vec![0u8; PAGE_SIZE]) },
        DataRequest::Get { hashes: vec![page] },
        DataRequest::Sync { incarnation: 0 },
        DataRequest::Delete { tombstone: tombstone.clone() },
        DataRequest::Tombstones,
        DataRequest::Commit { record, relay: vec![] },
        DataRequest::CatalogList,
        DataRequest::CatalogDigest,
        DataRequest::CatalogGet { name: "x".into() },
        DataRequest::Stats,
        DataRequest::Cut(CutBegin { name: "x".into(), vms: vec![("vm".into(), None)], mode: CaptureMode::StopCopy, replicas: 1, placement, max_bandwidth: None, disks: Default::default() }),
        DataRequest::VmList,
        DataRequest::VmForget { id: "vm".into() },
        DataRequest::Revoke { token: "x".into() },
        DataRequest::Revocations,
        DataRequest::RestoreVm { name: "x".into(), vm: "vm".into(), eager: false, in_place: false },
        DataRequest::ClaimName { name: "x".into(), record: page, release: false },
    ]
}

/// Sends each request once, all at once, each from a fresh endpoint with key `kp` (a refused
/// connection waits out the server's grace for new members, so one at a time would take long).
async fn each_once(kp: &Keypair, target: &Member, reqs: Vec<DataRequest>) -> Vec<(DataRequest, Result<DataResponse, NetError>)> {
    futures::future::join_all(reqs.into_iter().map(|req| async move {
        let client = DataClient::new(net::endpoint(kp, free_addr()).expect("endpoint"), kp.clone());
        let frame = vmcsnap_protocol::codec::encode_frame(&req).expect("encode");
        let r = client.request_raw(target.id, target.data_addr, &frame).await;
        (req, r)
    }))
    .await
}

async fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..300 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("condition not reached in 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_reject_bad_pages_and_strangers() {
    let dir = tempfile::tempdir().expect("tmp");
    let node_addr = free_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    // The operator's cluster key admits the node and the probing member.
    let cluster = ClusterKey::generate();
    let node_dir = dir.path().join("node");
    std::fs::create_dir_all(&node_dir).expect("dir");
    let node_key = vmcsnap_node::identity::load_or_create(&node_dir).expect("identity");
    let node_id = node_id_of_key(&node_key.public()).expect("id");
    let config = NodeConfig {
        replicas: 1,
        cluster_key: Some(cluster.id().to_string()),
        join: Some(cluster.certify(node_id, "solo", 1).expect("certify").to_token()),
        ..NodeConfig::new(node_dir, node_addr)
    };
    let node = tokio::spawn(vmcsnap_node::run(config, Some(stopped)));

    // A member: joins through libp2p, then talks QUIC.
    let kp = Keypair::generate_ed25519();
    let my_addr = free_addr();
    let trust = Arc::new(Trust::new(cluster.id()).expect("trust"));
    let certificate = cluster.certify(node_id_of_key(&kp.public()).expect("id"), "probe", 1).expect("certify");
    let me = Membership::start(MembershipConfig { keypair: kp.clone(), listen: my_addr, bootstrap: vec![node_addr], known: vec![], name: "probe".into(), trust: trust.clone(), certificate: certificate.clone() })
        .await
        .expect("membership");
    let target: Member = wait_for(|| me.members().into_iter().find(|m| m.id != me.local() && m.alive)).await;
    let client = DataClient::new(net::endpoint(&kp, my_addr).expect("endpoint"), kp.clone());

    let mut page = vec![0u8; PAGE_SIZE];
    page[100] = 7;
    let good = hash_page(&page);
    // A page sent under someone else's hash is refused, and not stored.
    let wrong = PageHash([9; 32]);
    let put = DataRequest::Put { pages: PagePuts::from_parts(vec![wrong], page.clone()) };
    match client.request(target.id, target.data_addr, &put).await {
        Err(NetError::Remote { kind: RemoteErrorKind::HashMismatch, .. }) => {}
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
    // A short page is a malformed request.
    let put = DataRequest::Put { pages: PagePuts::from_parts(vec![good], vec![7u8; 100]) };
    assert!(matches!(client.request(target.id, target.data_addr, &put).await, Err(NetError::Remote { kind: RemoteErrorKind::BadRequest, .. })));
    let have = client.request(target.id, target.data_addr, &DataRequest::Have { hashes: vec![good, wrong] }).await.expect("have");
    let DataResponse::Have { missing, incarnation } = have else { panic!("{have:?}") };
    assert_eq!(missing, vec![0, 1]);

    // The honest page is stored and served back, and counted once.
    let put = DataRequest::Put { pages: PagePuts::from_parts(vec![good], page.clone()) };
    assert_eq!(client.request(target.id, target.data_addr, &put).await.expect("put"), DataResponse::Put { stored: 1, already: 0, incarnation });
    // A sync under another incarnation (the owner restarted since it answered) is refused.
    let r = client.request(target.id, target.data_addr, &DataRequest::Sync { incarnation: incarnation ^ 1 }).await;
    assert!(matches!(r, Err(NetError::Remote { kind: RemoteErrorKind::Restarted, .. })), "{r:?}");
    assert_eq!(client.request(target.id, target.data_addr, &DataRequest::Sync { incarnation }).await.expect("sync"), DataResponse::Synced);
    let got = client.request(target.id, target.data_addr, &DataRequest::Get { hashes: vec![good, wrong] }).await.expect("get");
    assert_eq!(got, DataResponse::Pages { pages: PageSet::of([Some(page.clone()), None]) });
    match client.request(target.id, target.data_addr, &DataRequest::Stats).await.expect("stats") {
        DataResponse::Stats { pages, .. } => assert_eq!(pages, 1),
        other => panic!("{other:?}"),
    }

    // A request over its limit is refused by the owner.
    let big = DataRequest::Have { hashes: vec![good; HAVE_HASHES_MAX + 1] };
    assert!(matches!(client.request(target.id, target.data_addr, &big).await, Err(NetError::Remote { kind: RemoteErrorKind::BadRequest, .. })));

    // Hostile frames get a clear error, and the node keeps serving: a header that claims
    // 4 GiB, a 10-byte body that declares 2^40 hashes, a body of garbage.
    let mut lying_vec = vec![0u8, 253];
    lying_vec.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let framed = |body: &[u8]| [&(body.len() as u32).to_be_bytes()[..], body].concat();
    for (what, frame) in [("a 4 GiB header", u32::MAX.to_be_bytes().to_vec()), ("2^40 hashes", framed(&lying_vec)), ("garbage", framed(&[0xff; 64]))] {
        match client.request_raw(target.id, target.data_addr, &frame).await {
            Err(NetError::Remote { kind: RemoteErrorKind::BadRequest, message, .. }) => eprintln!("{what}: {message}"),
            other => panic!("{what}: expected a bad-request answer, got {other:?}"),
        }
        assert!(matches!(client.request(target.id, target.data_addr, &DataRequest::Stats).await, Ok(DataResponse::Stats { pages: 1, .. })), "the node stopped serving after {what}");
    }
    // A properly signed record that claims a VM of 2^62 bytes is refused, not allocated.
    let me_id = node_id_of_key(&kp.public()).expect("id");
    let mut absurd = CommitRecord::minimal(me_id, "absurd");
    absurd.vms[0].blocks[0].bytes = 1 << 62;
    absurd.vms[0].manifest.pages = (1 << 62) / PAGE_SIZE as u64;
    let signed = sign_record(&kp, &certificate, absurd).expect("sign");
    match client.request(target.id, target.data_addr, &DataRequest::Commit { record: signed, relay: vec![] }).await {
        Err(NetError::Remote { kind: RemoteErrorKind::BadRequest, message, .. }) => assert!(message.contains("bytes"), "{message}"),
        other => panic!("expected the absurd record refused, got {other:?}"),
    }
    assert!(matches!(client.request(target.id, target.data_addr, &DataRequest::CatalogList).await, Ok(DataResponse::Catalog { entries }) if entries.is_empty()));
    let honest = sign_record(&kp, &certificate, CommitRecord::minimal(me_id, "honest")).expect("sign");
    let tombstone = sign_tombstone(&kp, &certificate, Tombstone { name: "honest".into(), record: honest.id().expect("id"), deleted_by: me_id, deleted_unix_ms: 1 }).expect("sign");

    // One peer holds at most CONNECTIONS_PER_PEER_MAX connections: `client` holds one, three
    // more endpoints with the same key are served, the next is refused.
    let mut extra = Vec::new();
    for _ in 1..vmcsnap_node::server::CONNECTIONS_PER_PEER_MAX {
        let c = DataClient::new(net::endpoint(&kp, free_addr()).expect("endpoint"), kp.clone());
        assert!(matches!(c.request(target.id, target.data_addr, &DataRequest::Stats).await, Ok(DataResponse::Stats { .. })));
        extra.push(c);
    }
    let one_too_many = DataClient::new(net::endpoint(&kp, free_addr()).expect("endpoint"), kp.clone());
    let r = one_too_many.request(target.id, target.data_addr, &DataRequest::Stats).await;
    assert!(r.is_err(), "a fifth connection of one peer was served: {r:?}");
    drop((extra, one_too_many));

    // A member of another data-plane version is refused at the handshake, with a clear
    // "another version" error rather than a misdecode.
    let old = DataClient::with_alpn(net::endpoint(&kp, free_addr()).expect("endpoint"), kp.clone(), b"vmcsnap/data/1");
    let r = old.request(target.id, target.data_addr, &DataRequest::Stats).await;
    match r {
        Err(e @ NetError::VersionMismatch { .. }) => assert!(e.to_string().contains("another vmcsnap version"), "{e}"),
        other => panic!("expected a version mismatch, got {other:?}"),
    }

    // A node admitted by another cluster's key joins the membership plane but is never a
    // member, and the data plane refuses it.
    let outsider_kp = Keypair::generate_ed25519();
    let outsider_addr = free_addr();
    let outsider_cert = ClusterKey::generate().certify(node_id_of_key(&outsider_kp.public()).expect("id"), "outsider", 1).expect("certify");
    let outsider = Membership::start(MembershipConfig {
        keypair: outsider_kp.clone(),
        listen: outsider_addr,
        bootstrap: vec![node_addr],
        known: vec![],
        name: "outsider".into(),
        trust: trust.clone(),
        certificate: outsider_cert,
    })
    .await
    .expect("membership");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!me.members().iter().any(|m| m.id == outsider.local() && m.alive), "the probe took the outsider in");
    for (req, r) in each_once(&outsider_kp, &target, every_request(good, honest.clone(), tombstone.clone(), vec![target.id])).await {
        assert!(r.is_err(), "the outsider was served {req:?}: {r:?}");
    }
    outsider.shutdown().await;

    // A stranger with a valid TLS identity but no membership is cut off.
    let stranger_kp = Keypair::generate_ed25519();
    for (req, r) in each_once(&stranger_kp, &target, every_request(good, honest.clone(), tombstone.clone(), vec![target.id])).await {
        assert!(r.is_err(), "a non-member was served {req:?}: {r:?}");
    }
    // Nothing the two sent was kept: the catalog is empty still.
    assert!(matches!(client.request(target.id, target.data_addr, &DataRequest::CatalogList).await, Ok(DataResponse::Catalog { entries }) if entries.is_empty()));

    // Asking for a node id that is not the one answering fails the TLS check.
    let impostor = Keypair::generate_ed25519();
    let fake_id = vmcsnap_dht::membership::node_id_of_key(&impostor.public()).expect("id");
    let r = client.request(fake_id, target.data_addr, &DataRequest::Stats).await;
    assert!(matches!(r, Err(NetError::Unreachable { .. })), "{r:?}");

    let _ = stop.send(());
    node.await.expect("join").expect("node ran");
}
