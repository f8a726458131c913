//! Network namespaces for partition tests: each node in its own namespace, all joined
//! through one router namespace, so that a partition can be cut and healed silently (packets
//! between the two sides are dropped by the router, as a failed switch would drop them; no
//! error reaches the senders).
//!
//! Node `i` (0-based) lives in namespace `vmcs<tag>-<i>` with address `10.77.<i+1>.2`, behind
//! the router's `10.77.<i+1>.1`. Everything is removed on drop. Needs root and `ip` (iproute2).

use anyhow::{bail, Context};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};

/// The namespaces of one test.
pub struct Netns {
    tag: String,
    nodes: usize,
    /// The policy rules that cut the network now (`from`, `to` subnets).
    cut: Vec<(String, String)>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Netns {
    /// Creates `nodes` node namespaces and the router; `Err` where this machine does not
    /// allow it (not root, no `ip`, no namespaces).
    pub fn create(nodes: usize) -> anyhow::Result<Self> {
        let tag = format!("{:05x}", rand::random::<u32>() & 0xfffff);
        let net = Netns { tag, nodes, cut: Vec::new() };
        let r = net.router();
        ip(&["netns", "add", &r])?;
        ip(&["-n", &r, "link", "set", "lo", "up"])?;
        let fwd = Command::new("ip").args(["netns", "exec", &r, "sysctl", "-qw", "net.ipv4.ip_forward=1"]).status().context("sysctl")?;
        if !fwd.success() {
            bail!("cannot enable forwarding in namespace {r}");
        }
        for i in 0..nodes {
            let (ns, host, peer) = (net.ns(i), format!("h{}{i}", net.tag), format!("n{}{i}", net.tag));
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &host, "netns", &r, "type", "veth", "peer", "name", &peer, "netns", &ns])?;
            ip(&["-n", &r, "addr", "add", &format!("10.77.{}.1/24", i + 1), "dev", &host])?;
            ip(&["-n", &r, "link", "set", &host, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("10.77.{}.2/24", i + 1), "dev", &peer])?;
            ip(&["-n", &ns, "link", "set", &peer, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", &format!("10.77.{}.1", i + 1)])?;
        }
        Ok(net)
    }

    fn router(&self) -> String {
        format!("vmcs{}-r", self.tag)
    }

    /// Node `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("vmcs{}-{i}", self.tag)
    }

    /// Node `i`'s address, port `port`.
    pub fn addr(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 77, i as u8 + 1, 2)), port)
    }

    /// Cuts every node of `a` off from every node of `b`, both ways.
    pub fn partition(&mut self, a: &[usize], b: &[usize]) -> anyhow::Result<()> {
        for &x in a {
            for &y in b {
                for (from, to) in [(x, y), (y, x)] {
                    let (from, to) = (format!("10.77.{}.0/24", from + 1), format!("10.77.{}.0/24", to + 1));
                    ip(&["-n", &self.router(), "rule", "add", "from", &from, "to", &to, "blackhole"])?;
                    self.cut.push((from, to));
                }
            }
        }
        Ok(())
    }

    /// Heals every partition.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        while let Some((from, to)) = self.cut.pop() {
            ip(&["-n", &self.router(), "rule", "del", "from", &from, "to", &to, "blackhole"])?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth, and with it the other end.
        for i in 0..self.nodes {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["netns", "del", &self.router()]);
    }
}
