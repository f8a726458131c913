//! Placement simulation: how evenly [`placement`](vmcsnap_dht::placement) spreads key copies over
//! hosts, and how many copies move when one host joins or leaves.
//!
//! [`simulate`] builds a view of `hosts` pseudo-random members, places `keys` pseudo-random
//! keys with the real [`owners_into`] three times (base view, base plus one newcomer, base
//! minus one leaver) and compares owner sets key by key. [`table`] renders results as plain
//! text. Everything is deterministic in the seed except [`SimResult::elapsed_ms`].
//!
//! Cost: rendezvous hashing scores every member for every key, so one run is about
//! `3 * hosts * keys` score computations, spread over the available cores.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Instant;

use vmcsnap_protocol::{NodeId, PageHash};

use vmcsnap_dht::placement::{is_owner, owners_into, View};

/// The outcome of one [`simulate`] run.
///
/// "Copies" are `(key, owner)` pairs: with `R` replicas and `N >= R` hosts, each key has `R`
/// copies. Fractions are of the copies placed in the base view (`keys * min(R, N)`).
#[derive(Clone, Debug, PartialEq)]
pub struct SimResult {
    /// Members in the base view.
    pub hosts: usize,
    /// Replicas per key asked of placement.
    pub replicas: usize,
    /// Keys placed.
    pub keys: u64,
    /// Smallest per-host share of copies in the base view (fraction of all copies; the mean is
    /// `1 / hosts`).
    pub share_min: f64,
    /// Largest per-host share of copies in the base view.
    pub share_max: f64,
    /// Standard deviation of the per-host shares, relative to their mean.
    pub share_stddev_rel: f64,
    /// `share_max` divided by the mean share.
    pub max_over_mean: f64,
    /// Fraction of copies that land on a different host when one new host joins.
    pub join_moved: f64,
    /// The least a join can move while staying balanced: `1 / (hosts + 1)` of the copies.
    pub join_moved_ideal: f64,
    /// True when every copy that moved on the join moved to the newcomer (no copy moved
    /// between old members).
    pub join_moved_to_newcomer_only: bool,
    /// Fraction of copies that land on a different host when one host leaves.
    pub leave_moved: f64,
    /// The least a leave can move: `1 / hosts` of the copies (the leaver's share).
    pub leave_moved_ideal: f64,
    /// True when every copy that moved on the leave came from the leaver.
    pub leave_moved_from_leaver_only: bool,
    /// Wall-clock time of the whole run, in milliseconds.
    pub elapsed_ms: u64,
}

/// splitmix64's finaliser (the same mixer placement uses, kept private there).
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// The `index`-th key of the splitmix64 stream for `seed`: uniform 64-bit keys, like
/// `PageHash::prefix_u64` of real page hashes. Indexable, so threads can split the range.
fn sim_key(seed: u64, index: u64) -> u64 {
    splitmix64(
        splitmix64(seed ^ 0x6b65_7973) // "keys": keep the key stream apart from host ids
            .wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)),
    )
}

/// The `index`-th simulated host id for `seed`: BLAKE3 of `seed || index` (little-endian).
fn sim_host(seed: u64, index: u64) -> NodeId {
    let mut input = [0u8; 16];
    input[..8].copy_from_slice(&seed.to_le_bytes());
    input[8..].copy_from_slice(&index.to_le_bytes());
    NodeId(*blake3::hash(&input).as_bytes())
}

/// A view plus, for each of its (sorted) member indexes, the host's generation number, so owner
/// sets from different views can be compared.
struct NumberedView {
    view: View,
    host_number: Vec<u32>,
}

impl NumberedView {
    fn new(ids: &[NodeId], numbers: &HashMap<NodeId, u32>) -> Self {
        let view = View::new(ids.to_vec());
        let host_number = view
            .members()
            .iter()
            .map(|id| numbers.get(id).copied().unwrap_or(u32::MAX))
            .collect();
        Self { view, host_number }
    }

    /// Owners of `key` as host numbers, written into `out`; `scratch` is reused.
    fn owners(&self, key: u64, replicas: usize, scratch: &mut Vec<usize>, out: &mut Vec<u32>) {
        owners_into(&self.view, key, replicas, scratch);
        out.clear();
        out.extend(scratch.iter().map(|&i| self.host_number[i]));
    }
}

/// Counts from one range of keys; summed over threads.
#[derive(Default)]
struct Tally {
    /// Copies per host number in the base view.
    load: Vec<u64>,
    base_copies: u64,
    join_moved: u64,
    join_foreign: u64,
    leave_moved: u64,
    leave_foreign: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        for (a, b) in self.load.iter_mut().zip(&other.load) {
            *a += b;
        }
        self.base_copies += other.base_copies;
        self.join_moved += other.join_moved;
        self.join_foreign += other.join_foreign;
        self.leave_moved += other.leave_moved;
        self.leave_foreign += other.leave_foreign;
    }
}

struct Views {
    base: NumberedView,
    join: NumberedView,
    leave: Option<NumberedView>,
    newcomer: u32,
    leaver: u32,
}

fn tally_range(
    views: &Views,
    hosts: usize,
    replicas: usize,
    seed: u64,
    keys: std::ops::Range<u64>,
) -> Tally {
    let mut t = Tally {
        load: vec![0; hosts],
        ..Tally::default()
    };
    let mut scratch = Vec::with_capacity(replicas + 1);
    let (mut base, mut other) = (
        Vec::with_capacity(replicas),
        Vec::with_capacity(replicas + 1),
    );
    for i in keys {
        let key = sim_key(seed, i);
        views.base.owners(key, replicas, &mut scratch, &mut base);
        for &h in &base {
            if let Some(l) = t.load.get_mut(h as usize) {
                *l += 1;
            }
        }
        t.base_copies += base.len() as u64;

        // Join: copies now on a host that did not hold the key before.
        views.join.owners(key, replicas, &mut scratch, &mut other);
        for h in &other {
            if !base.contains(h) {
                t.join_moved += 1;
                if *h != views.newcomer {
                    t.join_foreign += 1;
                }
            }
        }

        // Leave: copies whose host no longer holds the key.
        if let Some(leave) = &views.leave {
            leave.owners(key, replicas, &mut scratch, &mut other);
            for h in &base {
                if !other.contains(h) {
                    t.leave_moved += 1;
                    if *h != views.leaver {
                        t.leave_foreign += 1;
                    }
                }
            }
        }
    }
    t
}

fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 {
        f64::NAN
    } else {
        num / den
    }
}

/// Simulates placement of `keys` keys with `replicas` replicas over `hosts` hosts, then one
/// host joining and (separately) one host leaving. Deterministic in `seed` (apart from
/// `elapsed_ms`); runs on all available cores.
///
/// Host ids are BLAKE3 of `seed || index`; host `hosts` is the newcomer and host 0 the leaver.
/// Keys come from a splitmix64 stream. Ratios that would divide by zero (no hosts, no keys)
/// are NaN. The ideals assume `replicas <= hosts`.
pub fn simulate(hosts: usize, replicas: usize, keys: u64, seed: u64) -> SimResult {
    let start = Instant::now();
    let ids: Vec<NodeId> = (0..=hosts as u64).map(|i| sim_host(seed, i)).collect();
    let numbers: HashMap<NodeId, u32> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as u32))
        .collect();
    let views = Views {
        base: NumberedView::new(&ids[..hosts], &numbers),
        join: NumberedView::new(&ids, &numbers),
        leave: (hosts > 0).then(|| NumberedView::new(&ids[1..hosts], &numbers)),
        newcomer: hosts as u32,
        leaver: 0,
    };

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let threads = threads.clamp(1, keys.max(1));
    let chunk = keys.div_ceil(threads);
    let mut total = Tally {
        load: vec![0; hosts],
        ..Tally::default()
    };
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let range = (t * chunk).min(keys)..((t + 1) * chunk).min(keys);
                let views = &views;
                s.spawn(move || tally_range(views, hosts, replicas, seed, range))
            })
            .collect();
        for w in workers {
            match w.join() {
                Ok(t) => total.add(&t),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });

    let copies = total.base_copies as f64;
    let shares: Vec<f64> = total
        .load
        .iter()
        .map(|&l| ratio(l as f64, copies))
        .collect();
    let mean = ratio(1.0, hosts as f64);
    let share_min = shares.iter().copied().fold(f64::INFINITY, f64::min);
    let share_max = shares.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let variance = ratio(
        shares.iter().map(|s| (s - mean) * (s - mean)).sum::<f64>(),
        hosts as f64,
    );

    SimResult {
        hosts,
        replicas,
        keys,
        share_min: if hosts == 0 { f64::NAN } else { share_min },
        share_max: if hosts == 0 { f64::NAN } else { share_max },
        share_stddev_rel: ratio(variance.sqrt(), mean),
        max_over_mean: ratio(share_max, mean),
        join_moved: ratio(total.join_moved as f64, copies),
        join_moved_ideal: 1.0 / (hosts as f64 + 1.0),
        join_moved_to_newcomer_only: total.join_foreign == 0,
        leave_moved: ratio(total.leave_moved as f64, copies),
        leave_moved_ideal: ratio(1.0, hosts as f64),
        leave_moved_from_leaver_only: total.leave_foreign == 0,
        elapsed_ms: start.elapsed().as_millis() as u64,
    }
}

/// The relative standard deviation of per-host shares that sampling alone produces with a
/// perfectly fair placement: each host holds each key with probability `p = min(R, N) / N`,
/// so its copy count is Binomial(`keys`, `p`) and the relative deviation is
/// `sqrt((1 - p) / (keys * p))`. A [`SimResult::share_stddev_rel`] near this value means the
/// measured imbalance is sampling noise, not a placement bias. NaN when undefined.
pub fn sampling_stddev_rel(hosts: usize, replicas: usize, keys: u64) -> f64 {
    let p = ratio(replicas.min(hosts) as f64, hosts as f64);
    ratio(1.0 - p, keys as f64 * p).sqrt()
}

/// A fraction as a percentage with at least 3 significant digits (2 to 4 decimals), so
/// that 1/1001 shows as "0.0999%"; "n/a" for NaN.
fn percent(fraction: f64) -> String {
    if !fraction.is_finite() {
        return "n/a".to_string();
    }
    let p = 100.0 * fraction;
    let decimals = if p == 0.0 {
        2
    } else {
        (2 - p.abs().log10().floor() as i32).clamp(2, 4) as usize
    };
    format!("{p:.decimals$}%")
}

/// Renders results as a plain-text table, one row per result: hosts, replicas, keys, smallest
/// and largest host share as % of the mean, relative standard deviation (with the
/// [`sampling_stddev_rel`] a fair placement would show in parentheses), copies moved on a
/// join and on a leave (with the ideal in parentheses), and whether moves only went to the
/// newcomer / only came from the leaver.
pub fn table(results: &[SimResult]) -> String {
    let header = [
        "hosts",
        "R",
        "keys",
        "share min/max (% of mean)",
        "rel stddev (sampling)",
        "join moved (ideal)",
        "leave moved (ideal)",
        "only newcomer/leaver",
        "time",
    ];
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let rows: Vec<[String; 9]> = results
        .iter()
        .map(|r| {
            let mean = 1.0 / r.hosts as f64;
            [
                r.hosts.to_string(),
                r.replicas.to_string(),
                r.keys.to_string(),
                format!(
                    "{:.1} / {:.1}",
                    100.0 * r.share_min / mean,
                    100.0 * r.share_max / mean
                ),
                format!(
                    "{:.2}% ({:.2}%)",
                    100.0 * r.share_stddev_rel,
                    100.0 * sampling_stddev_rel(r.hosts, r.replicas, r.keys)
                ),
                format!(
                    "{} ({})",
                    percent(r.join_moved),
                    percent(r.join_moved_ideal)
                ),
                format!(
                    "{} ({})",
                    percent(r.leave_moved),
                    percent(r.leave_moved_ideal)
                ),
                format!(
                    "{}/{}",
                    yes_no(r.join_moved_to_newcomer_only),
                    yes_no(r.leave_moved_from_leaver_only)
                ),
                format!("{:.1} s", r.elapsed_ms as f64 / 1000.0),
            ]
        })
        .collect();

    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(&mut header.iter().copied());
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(&mut rule.iter().map(String::as_str));
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Nanoseconds per key, on one thread, of [`owners_into`] (every member scored) and of
/// [`is_owner`] for one member (it stops once `replicas` members beat it), over `keys` keys
/// and `hosts` hosts; and the share of keys that member owns (the two must agree on it).
pub fn owner_cost(hosts: usize, replicas: usize, keys: u64) -> (f64, f64, f64) {
    let ids: Vec<NodeId> = (0..hosts as u64).map(|i| sim_host(7, i)).collect();
    let view = View::new(ids);
    let key = |k: u64| {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&(k.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d).to_le_bytes());
        PageHash(*blake3::hash(&b).as_bytes())
    };
    let hashes: Vec<PageHash> = (0..keys).map(key).collect();
    let me = hosts / 2;
    let mut scratch = Vec::with_capacity(replicas);
    let t0 = Instant::now();
    let mut by_list = 0u64;
    for h in &hashes {
        owners_into(&view, h.prefix_u64(), replicas, &mut scratch);
        by_list += u64::from(scratch.contains(&me));
    }
    let list_ns = t0.elapsed().as_nanos() as f64 / keys.max(1) as f64;
    let t0 = Instant::now();
    let by_ask = hashes.iter().filter(|h| is_owner(&view, h, replicas, me)).count() as u64;
    let ask_ns = t0.elapsed().as_nanos() as f64 / keys.max(1) as f64;
    assert_eq!(by_list, by_ask, "is_owner disagrees with owners_into");
    (list_ns, ask_ns, by_ask as f64 / keys.max(1) as f64)
}

/// [`owner_cost`] for each of `hosts`, as a plain-text table.
pub fn cost_table(hosts: &[usize], replicas: usize, keys: u64) -> String {
    let mut out = format!("\nowner computation, R = {replicas}, {keys} keys, one thread:\n{:>7}  {:>22}  {:>26}  {:>8}\n", "hosts", "all owners (ns/key)", "is this host one (ns/key)", "speedup");
    for &h in hosts {
        let (list, ask, _) = owner_cost(h, replicas, keys);
        out += &format!("{h:>7}  {list:>22.1}  {ask:>26.1}  {:>7.1}x\n", list / ask);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel_err(actual: f64, ideal: f64) -> f64 {
        (actual - ideal).abs() / ideal
    }

    #[test]
    fn sim_small_cluster_is_balanced_and_moves_minimally() {
        for replicas in 1..=3 {
            let r = simulate(10, replicas, 20_000, 7);
            assert_eq!((r.hosts, r.replicas, r.keys), (10, replicas, 20_000));
            // 20,000 * R copies over 10 hosts: at least 2,000 per host, binomial sd <= 2.2%.
            assert!(r.share_min * 10.0 > 0.90, "{r:?}");
            assert!(r.max_over_mean < 1.10, "{r:?}");
            assert!(r.share_stddev_rel < 0.05, "{r:?}");
            assert!(rel_err(r.join_moved, r.join_moved_ideal) < 0.25, "{r:?}");
            assert!(rel_err(r.leave_moved, r.leave_moved_ideal) < 0.25, "{r:?}");
            assert!(r.join_moved_to_newcomer_only, "{r:?}");
            assert!(r.leave_moved_from_leaver_only, "{r:?}");
        }
    }

    #[test]
    fn sim_balance_is_sampling_noise_only() {
        let r = simulate(50, 2, 100_000, 11);
        let noise = sampling_stddev_rel(50, 2, 100_000);
        assert!(
            rel_err(r.share_stddev_rel, noise) < 0.3,
            "{r:?} noise {noise}"
        );
    }

    #[test]
    fn sim_is_deterministic_in_the_seed() {
        let strip = |mut r: SimResult| {
            r.elapsed_ms = 0;
            r
        };
        let a = strip(simulate(10, 2, 5_000, 3));
        let b = strip(simulate(10, 2, 5_000, 3));
        let c = strip(simulate(10, 2, 5_000, 4));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn sim_shares_sum_to_one_and_ideals_are_exact() {
        let r = simulate(4, 2, 10_000, 1);
        assert!((r.join_moved_ideal - 0.2).abs() < 1e-12);
        assert!((r.leave_moved_ideal - 0.25).abs() < 1e-12);
        assert!(r.share_min <= 0.25 && r.share_max >= 0.25);
    }

    #[test]
    fn sim_degenerate_sizes_do_not_panic() {
        let empty = simulate(0, 2, 100, 1);
        assert!(empty.join_moved.is_nan() && empty.leave_moved.is_nan());
        let one = simulate(1, 2, 100, 1);
        // One host holds everything; when it leaves, every copy goes.
        assert_eq!(one.leave_moved, 1.0);
        let none = simulate(5, 2, 0, 1);
        assert!(none.join_moved.is_nan());
        let _ = table(&[empty, one, none]);
    }

    #[test]
    fn sim_table_has_a_header_and_one_row_per_result() {
        let results = [simulate(10, 2, 2_000, 1), simulate(20, 3, 2_000, 1)];
        let t = table(&results);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].contains("join moved (ideal)"));
        assert!(lines[3].contains("yes/yes"), "{t}");
        println!("{t}");
    }

    /// Timing at production-like scale: `cargo test --release -p vmcsnap-dht sim_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn sim_timing_1000_hosts() {
        let keys: u64 = std::env::var("SIM_KEYS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200_000);
        let r = simulate(1000, 2, keys, 1);
        println!("{}", table(&[r]));
    }
}
