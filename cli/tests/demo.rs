//! The README's first command, at its own (small) scale: `vmcsnap-testnet demo` boots three
//! real guests on a local 3-node cluster, takes a live cut from the host that runs none,
//! rolls every guest back on another host and checks its memory from inside. Its figures are
//! checked here, not only that it ran.

use std::path::PathBuf;
use vmcsnap_testnet::guest;

#[test]
fn the_demo_rolls_back_real_guests_and_stores_less_than_default_kvm() {
    let (_k, _i) = guest::guest_files().expect("guest build (scripts/build-guest.sh)");
    let _slot = guest::slot();
    let tmp = tempfile::tempdir().expect("tmp");
    let f = vmcsnap_testnet::demovm::run(&tmp.path().join("demo"), &PathBuf::from(env!("CARGO_BIN_EXE_vmcsnap"))).expect("the demo");
    assert_eq!((f.guests_intact, f.guests), (3, 3), "{f:?}");
    // Three guests whose page cache is the same: stored once (and no zero pages), where
    // QEMU's files hold each guest's copy.
    assert!(f.vmcsnap_bytes * 10 < f.kvm_bytes * 8, "at least 20% less than default KVM: {f:?}");
    assert!(f.vmcsnap_pause_ms > 0.0 && f.kvm_pause_ms > 0.0, "{f:?}");
    assert!(f.vmcsnap_rollback_s > 0.0 && f.kvm_rollback_s > 0.0, "{f:?}");
}
