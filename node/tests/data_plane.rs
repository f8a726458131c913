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
use vmcsnap_protocol::wire::{DataRequest, DataResponse, PagePut, RemoteErrorKind, HAVE_HASHES_MAX};
use vmcsnap_protocol::{hash_page, PageHash, PAGE_SIZE};

fn free_addr() -> SocketAddr {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = tcp.local_addr().expect("addr");
        if std::net::UdpSocket::bind(addr).is_ok() {
            return addr;
        }
    }
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
        data_dir: node_dir,
        listen: node_addr,
        peers: vec![],
        replicas: 1,
        name: String::new(),
        vm_dir: None,
        cluster_key: Some(cluster.id().to_string()),
        join: Some(cluster.certify(node_id, "solo", 1).expect("certify").to_token()),
        qemu_dir: "/usr/bin".into(),
        launch_dirs: vec![],
    };
    let node = tokio::spawn(vmcsnap_node::run(config, Some(stopped)));

    // A member: joins through libp2p, then talks QUIC.
    let kp = Keypair::generate_ed25519();
    let my_addr = free_addr();
    let trust = Arc::new(Trust::new(cluster.id()).expect("trust"));
    let certificate = cluster.certify(node_id_of_key(&kp.public()).expect("id"), "probe", 1).expect("certify");
    let me = Membership::start(MembershipConfig { keypair: kp.clone(), listen: my_addr, bootstrap: vec![node_addr], known: vec![], name: "probe".into(), trust: trust.clone(), certificate })
        .await
        .expect("membership");
    let target: Member = wait_for(|| me.members().into_iter().find(|m| m.id != me.local() && m.alive)).await;
    let client = DataClient::new(net::endpoint(&kp, my_addr).expect("endpoint"), kp.clone());

    let mut page = vec![0u8; PAGE_SIZE];
    page[100] = 7;
    let good = hash_page(&page);
    // A page sent under someone else's hash is refused, and not stored.
    let wrong = PageHash([9; 32]);
    let put = DataRequest::Put { pages: vec![PagePut { hash: wrong, data: page.clone().into() }] };
    match client.request(target.id, target.data_addr, &put).await {
        Err(NetError::Remote { kind: RemoteErrorKind::HashMismatch, .. }) => {}
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
    // A short page too.
    let put = DataRequest::Put { pages: vec![PagePut { hash: good, data: vec![7u8; 100].into() }] };
    assert!(matches!(client.request(target.id, target.data_addr, &put).await, Err(NetError::Remote { kind: RemoteErrorKind::HashMismatch, .. })));
    let have = client.request(target.id, target.data_addr, &DataRequest::Have { hashes: vec![good, wrong] }).await.expect("have");
    assert_eq!(have, DataResponse::Have { missing: vec![0, 1] });

    // The honest page is stored and served back, and counted once.
    let put = DataRequest::Put { pages: vec![PagePut { hash: good, data: page.clone().into() }] };
    assert_eq!(client.request(target.id, target.data_addr, &put).await.expect("put"), DataResponse::Put { stored: 1, already: 0 });
    let got = client.request(target.id, target.data_addr, &DataRequest::Get { hashes: vec![good, wrong] }).await.expect("get");
    assert_eq!(got, DataResponse::Pages { pages: vec![Some(page.clone().into()), None] });
    match client.request(target.id, target.data_addr, &DataRequest::Stats).await.expect("stats") {
        DataResponse::Stats { pages, .. } => assert_eq!(pages, 1),
        other => panic!("{other:?}"),
    }

    // A request over its limit is refused by the owner.
    let big = DataRequest::Have { hashes: vec![good; HAVE_HASHES_MAX + 1] };
    assert!(matches!(client.request(target.id, target.data_addr, &big).await, Err(NetError::Remote { kind: RemoteErrorKind::BadRequest, .. })));

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
    let outsider_client = DataClient::new(net::endpoint(&outsider_kp, free_addr()).expect("endpoint"), outsider_kp);
    for req in [DataRequest::Stats, DataRequest::Get { hashes: vec![good] }, DataRequest::CatalogList, DataRequest::VmList] {
        let r = outsider_client.request(target.id, target.data_addr, &req).await;
        assert!(r.is_err(), "the outsider was served {req:?}: {r:?}");
    }
    outsider.shutdown().await;

    // A stranger with a valid TLS identity but no membership is cut off.
    let stranger_kp = Keypair::generate_ed25519();
    let stranger = DataClient::new(net::endpoint(&stranger_kp, free_addr()).expect("endpoint"), stranger_kp);
    let r = stranger.request(target.id, target.data_addr, &DataRequest::Stats).await;
    assert!(r.is_err(), "a non-member was served: {r:?}");

    // Asking for a node id that is not the one answering fails the TLS check.
    let impostor = Keypair::generate_ed25519();
    let fake_id = vmcsnap_dht::membership::node_id_of_key(&impostor.public()).expect("id");
    let r = client.request(fake_id, target.data_addr, &DataRequest::Stats).await;
    assert!(matches!(r, Err(NetError::Unreachable { .. })), "{r:?}");

    let _ = stop.send(());
    node.await.expect("join").expect("node ran");
}
