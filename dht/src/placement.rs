//! Placement: page hash → `replicas` distinct owner hosts, by rendezvous (highest random
//! weight) hashing over a membership view.
//!
//! Every member gets a score for a key, `mix(key ^ seed(member))`; the `replicas` members with
//! the highest scores own the key. Because a member's score for a key does not depend on who
//! else is in the view:
//! - a host that joins takes over exactly the keys for which it now scores in the top
//!   `replicas`, about `replicas / N` of them, and no key moves between old members;
//! - a host that leaves gives up only its own keys.
//!
//! Page hashes are BLAKE3 outputs, so their first 8 bytes are already uniform; `mix` only has
//! to decorrelate members.
//!
//! Cost: [`owners`] scores every member (O(N) per key). Whether one member is among a key's
//! owners ([`is_owner`], what repair and garbage collection ask of every page when the view
//! changes) stops as soon as `replicas` members beat it: about `replicas × ln N` scores per
//! key on average, not N.

use vmcsnap_protocol::{NodeId, PageHash};

/// A membership view: the members placement chooses from, each with its precomputed seed
/// (already mixed: a key's score for a member is `mix(key ^ seed)`). The order of `members`
/// does not matter to placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    members: Vec<NodeId>,
    seeds: Vec<u64>,
}

/// splitmix64's finaliser: a bijective 64-bit mixer with full avalanche.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn seed_of(id: &NodeId) -> u64 {
    let h = blake3::hash(&id.0);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

impl View {
    /// A view over these members (duplicates are dropped; the result is sorted by id).
    pub fn new(mut members: Vec<NodeId>) -> Self {
        members.sort();
        members.dedup();
        let seeds = members.iter().map(|m| mix(seed_of(m))).collect();
        Self { members, seeds }
    }

    /// The members, sorted by id.
    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when there are no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Index of a member in [`View::members`].
    pub fn index_of(&self, id: &NodeId) -> Option<usize> {
        self.members.binary_search(id).ok()
    }
}

/// The owners of `hash`: indexes into `view.members()`, best first, `min(replicas, N)` of them,
/// all distinct. The first is the primary owner.
pub fn owners(view: &View, hash: &PageHash, replicas: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(replicas);
    owners_into(view, hash.prefix_u64(), replicas, &mut out);
    out
}

/// [`owners`] for a raw 64-bit key, writing into `out` (cleared first) to avoid allocating
/// on the hot path.
pub fn owners_into(view: &View, key: u64, replicas: usize, out: &mut Vec<usize>) {
    out.clear();
    let r = replicas.min(view.members.len());
    if r == 0 {
        return;
    }
    // Keep the best `r` (score, index) pairs; `r` is tiny (1 to 3), so a sorted array beats a heap.
    let mut best: Vec<(u64, usize)> = Vec::with_capacity(r + 1);
    for (i, seed) in view.seeds.iter().enumerate() {
        let score = mix(key ^ *seed);
        if best.len() < r || score > best[best.len() - 1].0 {
            let pos = best.partition_point(|&(s, _)| s >= score);
            best.insert(pos, (score, i));
            best.truncate(r);
        }
    }
    out.extend(best.iter().map(|&(_, i)| i));
}

/// Whether member `me` (an index into `view.members()`) is among the owners of `hash`, as
/// [`owners`] would say, without scoring every member: it stops once `replicas` members beat
/// `me` (a higher score, or an equal one at a lower index, as [`owners`] breaks ties).
pub fn is_owner(view: &View, hash: &PageHash, replicas: usize, me: usize) -> bool {
    let key = hash.prefix_u64();
    let Some(mine) = view.seeds.get(me).map(|s| mix(key ^ s)) else { return false };
    if replicas == 0 {
        return false;
    }
    let mut ahead = 0;
    for (j, seed) in view.seeds.iter().enumerate() {
        let score = mix(key ^ seed);
        if score > mine || (score == mine && j < me) {
            ahead += 1;
            if ahead >= replicas {
                return false;
            }
        }
    }
    true
}

/// Each member's share of the hash space as primary owner, estimated over `samples` evenly
/// spread keys (deterministic). Sums to 1.
pub fn primary_shares(view: &View, samples: u64) -> Vec<f64> {
    let mut counts = vec![0u64; view.len()];
    let mut out = Vec::with_capacity(1);
    if view.is_empty() || samples == 0 {
        return vec![0.0; view.len()];
    }
    let step = u64::MAX / samples;
    for s in 0..samples {
        owners_into(view, mix(s.wrapping_mul(step)), 1, &mut out);
        counts[out[0]] += 1;
    }
    counts.iter().map(|&c| c as f64 / samples as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(i: u64) -> NodeId {
        NodeId(*blake3::hash(format!("node-{i}").as_bytes()).as_bytes())
    }

    fn key(i: u64) -> PageHash {
        PageHash(*blake3::hash(&i.to_le_bytes()).as_bytes())
    }

    fn view(n: u64, salt: u64) -> View {
        View::new((0..n).map(|i| node(i * 1000 + salt)).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn owners_are_distinct_and_bounded(n in 1u64..20, r in 1usize..4, k in any::<u64>()) {
            let v = view(n, k % 7);
            let o = owners(&v, &key(k), r);
            prop_assert_eq!(o.len(), r.min(n as usize));
            let mut s = o.clone();
            s.sort();
            s.dedup();
            prop_assert_eq!(s.len(), o.len());
        }

        #[test]
        fn balanced_within_ten_percent_at_eight_hosts(salt in 0u64..1000, r in 1usize..3) {
            let v = view(8, salt);
            let keys = 200_000u64;
            let mut load = vec![0u64; 8];
            for k in 0..keys {
                for o in owners(&v, &key(k + salt * keys), r) {
                    load[o] += 1;
                }
            }
            let mean = (keys * r as u64) as f64 / 8.0;
            for l in &load {
                prop_assert!(((*l as f64) - mean).abs() / mean < 0.10, "load {:?} mean {}", load, mean);
            }
        }

        #[test]
        fn a_join_moves_about_one_nth(n in 3u64..16, salt in 0u64..1000, r in 1usize..3) {
            let before = view(n, salt);
            let mut ids = before.members().to_vec();
            ids.push(node(999_999 + salt));
            let after = View::new(ids);
            let newcomer = after.index_of(&node(999_999 + salt)).expect("member");
            let keys = 20_000u64;
            let mut moved = 0u64;
            for k in 0..keys {
                let h = key(k);
                let old: Vec<NodeId> = owners(&before, &h, r).iter().map(|&i| before.members()[i]).collect();
                let new: Vec<NodeId> = owners(&after, &h, r).iter().map(|&i| after.members()[i]).collect();
                // Any copy that moved, moved to the newcomer; old members never swap keys.
                for id in &new {
                    if !old.contains(id) {
                        prop_assert_eq!(*id, after.members()[newcomer]);
                        moved += 1;
                    }
                }
            }
            let expected = (keys * r as u64) as f64 / (n + 1) as f64;
            let moved = moved as f64;
            prop_assert!((moved - expected).abs() / expected < 0.15, "moved {} expected {}", moved, expected);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn is_owner_agrees_with_owners(n in 1u64..40, r in 0usize..4, salt in 0u64..1000) {
            let v = view(n, salt);
            for k in 0..200u64 {
                let h = key(k + salt * 1000);
                let o = owners(&v, &h, r);
                for me in 0..v.len() {
                    prop_assert_eq!(is_owner(&v, &h, r, me), o.contains(&me), "key {} member {}", k, me);
                }
            }
            prop_assert!(!is_owner(&v, &key(0), r, v.len()), "not a member");
        }
    }

    /// Ties (equal scores) are broken as `owners` breaks them: by index.
    #[test]
    fn is_owner_breaks_ties_by_index() {
        let v = View { members: vec![NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32])], seeds: vec![7, 7, 7] };
        let h = key(1);
        assert_eq!(owners(&v, &h, 2), vec![0, 1]);
        assert_eq!([0, 1, 2].map(|me| is_owner(&v, &h, 2, me)), [true, true, false]);
    }

    /// Placement is what it was before seeds were mixed once per view instead of once per
    /// score: keys do not move on an upgrade.
    #[test]
    fn placement_is_unchanged_by_the_precomputed_seeds() {
        let v = view(7, 3);
        for k in 0..500 {
            let h = key(k);
            let mut scored: Vec<(u64, usize)> = v.members().iter().enumerate().map(|(i, id)| (mix(h.prefix_u64() ^ mix(seed_of(id))), i)).collect();
            scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            assert_eq!(owners(&v, &h, 3), scored.iter().take(3).map(|s| s.1).collect::<Vec<_>>());
        }
    }

    #[test]
    fn placement_ignores_view_order() {
        let ids: Vec<NodeId> = (0..5).map(node).collect();
        let mut rev = ids.clone();
        rev.reverse();
        let (a, b) = (View::new(ids), View::new(rev));
        for k in 0..1000 {
            assert_eq!(owners(&a, &key(k), 2), owners(&b, &key(k), 2));
        }
    }

    #[test]
    fn shares_sum_to_one_and_are_even() {
        let v = view(8, 1);
        let s = primary_shares(&v, 1 << 16);
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        for x in s {
            assert!((x - 0.125).abs() < 0.0125, "{x}");
        }
    }
}
