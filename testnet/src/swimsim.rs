//! SWIM at scale, simulated: how many messages a node sends per second, and how fast a failed
//! node is known down by all, for cluster sizes this machine cannot run as processes.
//!
//! Every simulated host runs the real state machine the nodes run (foca, with
//! [`vmcsnap_dht::swim::config`]) in one process on a virtual clock; messages take
//! [`LATENCY`] and are never lost. The identity is a small number instead of a certificate
//! (the message count does not depend on it; the bytes do, so they are not reported). Each
//! host starts knowing every other one (as after a join), then the cluster idles for
//! `warmup + window` virtual seconds, messages being counted during the window; then one host
//! stops answering and the time until every other host lists it down is measured, with every
//! other host wrongly declared down counted as a false positive.
//!
//! Cost: foca keeps members in a list it searches linearly, so setting up `n` hosts costs
//! about `n^3 / 2` comparisons (1,000 hosts: a second; 10,000: minutes) and every message
//! costs `O(n)`. The real node pays that `O(n)` per message too (not measured apart).

use bytes::Bytes;
use foca::{AccumulatingRuntime, Foca, Identity, Member, NoCustomBroadcast, OwnedNotification, PostcardCodec, Timer};
use rand10::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// One-way delay of every simulated message.
pub const LATENCY: Duration = Duration::from_millis(1);

/// A simulated host: its number and its incarnation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SimId {
    n: u32,
    bump: u16,
}

impl Identity for SimId {
    type Addr = u32;
    fn renew(&self) -> Option<Self> {
        Some(Self { n: self.n, bump: self.bump.wrapping_add(1) })
    }
    fn addr(&self) -> u32 {
        self.n
    }
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

type Host = Foca<SimId, PostcardCodec, rand10::rngs::SmallRng, NoCustomBroadcast>;

enum Event {
    Timer(u32, Timer<SimId>),
    Deliver(u32, Bytes),
}

/// What one simulated cluster size gave.
#[derive(Debug, Clone, Serialize)]
pub struct SwimSimResult {
    /// Hosts.
    pub hosts: u32,
    /// Messages sent per host per second while idle (mean over hosts).
    pub msgs_per_host_s: f64,
    /// The most any host sent per second while idle.
    pub msgs_per_host_s_max: f64,
    /// Seconds from the failure until the first host declared it down.
    pub first_down_s: Option<f64>,
    /// Seconds from the failure until every other host lists it down.
    pub all_down_s: Option<f64>,
    /// Healthy hosts declared down by someone, over the whole run.
    pub false_downs: u64,
    /// Wall time of the run.
    pub elapsed_s: f64,
}

struct Sim {
    hosts: Vec<Host>,
    rt: AccumulatingRuntime<SimId>,
    queue: BTreeMap<(u64, u64), Event>,
    seq: u64,
    now_us: u64,
    sent: Vec<u64>,
    dead: Option<u32>,
    /// Per host: whether it lists the dead host down.
    sees_dead_down: Vec<bool>,
    false_downs: u64,
    first_down_us: Option<u64>,
}

impl Sim {
    fn push(&mut self, at_us: u64, ev: Event) {
        self.seq += 1;
        self.queue.insert((at_us, self.seq), ev);
    }

    /// Takes what host `h`'s last call asked for.
    fn drain(&mut self, h: u32) {
        while let Some((to, data)) = self.rt.to_send() {
            self.sent[h as usize] += 1;
            self.push(self.now_us + LATENCY.as_micros() as u64, Event::Deliver(to.n, data));
        }
        while let Some((after, timer)) = self.rt.to_schedule() {
            self.push(self.now_us + after.as_micros() as u64, Event::Timer(h, timer));
        }
        while let Some(n) = self.rt.to_notify() {
            if let OwnedNotification::MemberDown(id) = n {
                if Some(id.n) == self.dead {
                    self.sees_dead_down[h as usize] = true;
                    self.first_down_us.get_or_insert(self.now_us);
                } else {
                    self.false_downs += 1;
                }
            }
        }
    }

    /// Runs events up to `until_us`, or until `stop` holds (then the clock stays at the event
    /// that made it hold).
    fn run_until(&mut self, until_us: u64, mut stop: impl FnMut(&Self) -> bool) {
        loop {
            if stop(self) {
                return;
            }
            let Some(entry) = self.queue.first_entry() else { break };
            if entry.key().0 > until_us {
                break;
            }
            let ((at, _), ev) = entry.remove_entry();
            self.now_us = at;
            let h = match ev {
                Event::Timer(h, t) => {
                    if Some(h) == self.dead {
                        continue;
                    }
                    let _ = self.hosts[h as usize].handle_timer(t, &mut self.rt);
                    h
                }
                Event::Deliver(h, data) => {
                    if Some(h) == self.dead {
                        continue;
                    }
                    let _ = self.hosts[h as usize].handle_data(&data, &mut self.rt);
                    h
                }
            };
            self.drain(h);
        }
        if !stop(self) {
            self.now_us = until_us;
        }
    }
}

/// Simulates `hosts` hosts: idle for `warmup` then `window` (counting), then one failure
/// followed for at most `detect_max`.
pub fn simulate(hosts: u32, warmup: Duration, window: Duration, detect_max: Duration, seed: u64) -> SwimSimResult {
    let t0 = Instant::now();
    let config = vmcsnap_dht::swim::config();
    let mut sim = Sim {
        hosts: Vec::with_capacity(hosts as usize),
        rt: AccumulatingRuntime::new(),
        queue: BTreeMap::new(),
        seq: 0,
        now_us: 0,
        sent: vec![0; hosts as usize],
        dead: None,
        sees_dead_down: vec![false; hosts as usize],
        false_downs: 0,
        first_down_us: None,
    };
    for i in 0..hosts {
        let rng = rand10::rngs::SmallRng::seed_from_u64(seed ^ u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut h = Foca::new(SimId { n: i, bump: 0 }, config.clone(), rng, PostcardCodec);
        let others = (0..hosts).filter(|&j| j != i).map(|j| Member::alive(SimId { n: j, bump: 0 }));
        let _ = h.apply_many(others, false, &mut sim.rt);
        sim.hosts.push(h);
        // Start the hosts' probe cycles spread over one period.
        sim.now_us = u64::from(i) * config.probe_period.as_micros() as u64 / u64::from(hosts);
        sim.drain(i);
    }
    let warm_us = warmup.as_micros() as u64;
    sim.run_until(warm_us, |_| false);
    let before = sim.sent.clone();
    let end_us = warm_us + window.as_micros() as u64;
    sim.run_until(end_us, |_| false);
    let secs = window.as_secs_f64();
    let rates: Vec<f64> = sim.sent.iter().zip(&before).map(|(a, b)| (a - b) as f64 / secs).collect();
    let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    let max = rates.iter().cloned().fold(0.0, f64::max);
    // One host stops answering.
    let dead = hosts - 1;
    sim.dead = Some(dead);
    let fail_us = sim.now_us;
    sim.run_until(fail_us + detect_max.as_micros() as u64, |s| (0..hosts).all(|h| h == dead || s.sees_dead_down[h as usize]));
    let all = (0..hosts).all(|h| h == dead || sim.sees_dead_down[h as usize]);
    SwimSimResult {
        hosts,
        msgs_per_host_s: mean,
        msgs_per_host_s_max: max,
        first_down_s: sim.first_down_us.map(|t| (t - fail_us) as f64 / 1e6),
        all_down_s: all.then(|| (sim.now_us - fail_us) as f64 / 1e6),
        false_downs: sim.false_downs,
        elapsed_s: t0.elapsed().as_secs_f64(),
    }
}

/// Plain-text table of results.
pub fn table(results: &[SwimSimResult]) -> String {
    let mut s = String::new();
    let c = vmcsnap_dht::swim::config();
    let _ = writeln!(
        s,
        "SWIM simulated (foca, probe every {:?}, {} indirect, suspect {:?}, gossip every {:?} to {}, each update sent {} times; {:?} latency, no loss)",
        c.probe_period, c.num_indirect_probes, c.suspect_to_down_after, vmcsnap_dht::swim::GOSSIP_INTERVAL, vmcsnap_dht::swim::GOSSIP_FANOUT, c.max_transmissions, LATENCY
    );
    let _ = writeln!(s, "{:>7} {:>14} {:>10} {:>12} {:>12} {:>11} {:>9}", "hosts", "msgs/host/s", "max", "first down", "down by all", "false down", "wall");
    let f = |o: Option<f64>| o.map_or("never".to_string(), |v| format!("{v:.1} s"));
    for r in results {
        let _ = writeln!(
            s,
            "{:>7} {:>14.2} {:>10.2} {:>12} {:>12} {:>11} {:>7.0} s",
            r.hosts, r.msgs_per_host_s, r.msgs_per_host_s_max, f(r.first_down_s), f(r.all_down_s), r.false_downs, r.elapsed_s
        );
    }
    s
}
