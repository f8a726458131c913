//! Socket buffer sizes past the system's caps (`net.core.rmem_max`, `wmem_max`), for a
//! process with `CAP_NET_ADMIN` (a node run by root): the data plane's UDP receive buffer
//! (`net`) and the send buffer of QEMU's end of a capture's stream (`qemu::capture`).

/// Enlarges a socket's send buffer to `bytes` (as `SO_SNDBUF` does, past `net.core.wmem_max`
/// with `CAP_NET_ADMIN`: `SO_SNDBUFFORCE`); short of that capability, to `wmem_max`. Writers
/// blocked on the buffer are woken. Returns the buffer granted.
pub fn enlarge_send_buffer(socket: std::os::fd::BorrowedFd<'_>, bytes: usize) -> usize {
    // asm-generic/socket.h (x86, Arm, RISC-V); the libc crate does not export it for glibc.
    const SO_SNDBUFFORCE: libc::c_int = 32;
    let s = socket2::SockRef::from(&socket);
    // Linux reports twice what it granted (the rest is its bookkeeping).
    let granted = |s: &socket2::SockRef<'_>| s.send_buffer_size().map_or(0, |b| b / 2);
    force(socket, SO_SNDBUFFORCE, bytes);
    if granted(&s) < bytes {
        let _ = s.set_send_buffer_size(bytes);
    }
    granted(&s)
}

/// `setsockopt(SOL_SOCKET, option, bytes)` for the `*BUFFORCE` options of
/// asm-generic/socket.h (x86, Arm, RISC-V; elsewhere nothing); a failure (no
/// `CAP_NET_ADMIN`) leaves the buffer as it was.
#[allow(unsafe_code)]
pub fn force(socket: std::os::fd::BorrowedFd<'_>, option: libc::c_int, bytes: usize) {
    use std::os::fd::AsRawFd;
    if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64")) {
        return;
    }
    let Ok(value) = libc::c_int::try_from(bytes) else { return };
    // SAFETY: setsockopt(2) on a descriptor this function borrows, with a pointer to a c_int
    // that outlives the call and its size; a failure only leaves the buffer as it was.
    unsafe {
        libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, option, (&raw const value).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")))
    }

    /// Bytes a writer gets into a Unix stream socket before a write would block.
    fn fill(w: &std::os::unix::net::UnixStream) -> usize {
        use std::io::Write;
        w.set_nonblocking(true).expect("nonblocking");
        let chunk = [0u8; 64 << 10];
        let mut n = 0;
        while let Ok(k) = (&*w).write(&chunk) {
            n += k;
        }
        n
    }

    /// A capture's pause: QEMU's end of the stream takes megabytes unread once its send buffer
    /// is enlarged through another descriptor of the same socket (as the node's handle on the
    /// end it gave QEMU); a writer blocked before goes on.
    #[test]
    fn a_send_buffer_enlarged_through_another_descriptor_takes_megabytes() {
        let (w, _r) = std::os::unix::net::UnixStream::pair().expect("pair");
        let before = fill(&w);
        let handle = w.try_clone().expect("dup");
        let granted = enlarge_send_buffer(std::os::fd::AsFd::as_fd(&handle), 16 << 20);
        drop(handle);
        let after = before + fill(&w);
        if root() {
            assert_eq!(granted, 16 << 20);
            assert!(after >= 8 << 20, "{after} bytes unread with a 16 MiB send buffer (before: {before})");
        }
        assert!(before < 1 << 20, "the default buffer took {before} bytes");
        assert!(after >= before);
    }
}
