//! Retention policies in the spirit of `restic forget`: which snapshots a policy keeps, and
//! why. Pure: the caller lists the snapshots and deletes what is not kept.
//!
//! Snapshots are grouped (by default by the set of VMs they hold, so a nightly `--all`
//! snapshot and an ad-hoc snapshot of one VM are kept by separate counts). Within a group,
//! newest first: `last` keeps the N newest; `hourly`, `daily`, `weekly`, `monthly` and
//! `yearly` keep the newest snapshot of each of the N most recent hours, days, ISO weeks
//! (Monday to Sunday), months and years that have one (UTC). A snapshot kept by any rule is
//! kept.

use serde::{Deserialize, Serialize};

/// How many snapshots to keep, per rule. All zero keeps nothing, so callers refuse it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The N newest.
    pub last: u32,
    /// The newest of each of the N most recent hours.
    pub hourly: u32,
    /// ... days.
    pub daily: u32,
    /// ... ISO weeks.
    pub weekly: u32,
    /// ... months.
    pub monthly: u32,
    /// ... years.
    pub yearly: u32,
}

impl Policy {
    /// Whether the policy keeps nothing at all.
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// One snapshot as the policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// How the caller names it (`NAME` or `NAME@ID`).
    pub name: String,
    /// Milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The group it is counted in.
    pub group: String,
}

/// What the policy decided for one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The snapshot.
    pub name: String,
    /// Its group.
    pub group: String,
    /// Milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The rules that keep it (`last`, `daily`, ...); empty: it goes.
    pub kept_by: Vec<String>,
}

impl Decision {
    /// Whether the snapshot is kept.
    pub fn keep(&self) -> bool {
        !self.kept_by.is_empty()
    }
}

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (proleptic Gregorian).
pub fn civil(days: u64) -> (i64, u32, u32) {
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The bucket of `ms` for each time rule, in the order hourly, daily, weekly, monthly, yearly.
fn buckets(ms: u64) -> [i64; 5] {
    let days = ms / DAY_MS;
    let (year, month, _) = civil(days);
    [
        (ms / HOUR_MS) as i64,
        days as i64,
        // 1970-01-01 was a Thursday: shifting by 3 days starts each week on a Monday.
        ((days + 3) / 7) as i64,
        year * 12 + i64::from(month),
        year,
    ]
}

/// Applies `policy` to `snapshots`; one decision per snapshot, newest first within each group.
pub fn apply(policy: &Policy, snapshots: &[Candidate]) -> Vec<Decision> {
    let mut groups: std::collections::BTreeMap<&str, Vec<&Candidate>> = Default::default();
    for s in snapshots {
        groups.entry(s.group.as_str()).or_default().push(s);
    }
    let mut out = Vec::with_capacity(snapshots.len());
    for (_, mut list) in groups {
        list.sort_by(|a, b| b.created_unix_ms.cmp(&a.created_unix_ms).then_with(|| a.name.cmp(&b.name)));
        let rules = [("hourly", policy.hourly), ("daily", policy.daily), ("weekly", policy.weekly), ("monthly", policy.monthly), ("yearly", policy.yearly)];
        let mut last_bucket: [Option<i64>; 5] = [None; 5];
        let mut used = [0u32; 5];
        for (i, s) in list.into_iter().enumerate() {
            let mut kept_by = Vec::new();
            if (i as u64) < u64::from(policy.last) {
                kept_by.push("last".to_string());
            }
            let b = buckets(s.created_unix_ms);
            for (r, (rule, n)) in rules.iter().enumerate() {
                // Newest first: the first snapshot seen in a bucket is that bucket's newest.
                if last_bucket[r] != Some(b[r]) {
                    last_bucket[r] = Some(b[r]);
                    if used[r] < *n {
                        used[r] += 1;
                        kept_by.push(rule.to_string());
                    }
                }
            }
            out.push(Decision { name: s.name.clone(), group: s.group.clone(), created_unix_ms: s.created_unix_ms, kept_by });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(name: &str, ms: u64) -> Candidate {
        Candidate { name: name.into(), created_unix_ms: ms, group: "g".into() }
    }

    fn kept(d: &[Decision]) -> Vec<&str> {
        d.iter().filter(|d| d.keep()).map(|d| d.name.as_str()).collect()
    }

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(31), (1970, 2, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(20_789), (2026, 12, 2));
    }

    #[test]
    fn last_keeps_the_newest_n() {
        let s: Vec<_> = (0..5).map(|i| at(&format!("s{i}"), i * 1000)).collect();
        let d = apply(&Policy { last: 2, ..Default::default() }, &s);
        assert_eq!(kept(&d), ["s4", "s3"]);
        assert_eq!(d.len(), 5);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_recent_day_and_weekly_spans_weeks() {
        // Two snapshots a day, 03:00 and 15:00, for 15 days from Monday 2026-11-16.
        let monday = 20_773 * DAY_MS;
        let mut s = Vec::new();
        for d in 0..15u64 {
            s.push(at(&format!("d{d}-03"), monday + d * DAY_MS + 3 * HOUR_MS));
            s.push(at(&format!("d{d}-15"), monday + d * DAY_MS + 15 * HOUR_MS));
        }
        let d = apply(&Policy { daily: 3, ..Default::default() }, &s);
        assert_eq!(kept(&d), ["d14-15", "d13-15", "d12-15"]);
        // Weeks: d14 is Monday of the third week, d13 the Sunday of the second, d6 of the first.
        let d = apply(&Policy { weekly: 3, ..Default::default() }, &s);
        assert_eq!(kept(&d), ["d14-15", "d13-15", "d6-15"]);
        let d = apply(&Policy { last: 1, daily: 2, ..Default::default() }, &s);
        let first = d.iter().find(|d| d.name == "d14-15").expect("kept");
        assert_eq!(first.kept_by, ["last", "daily"]);
        assert_eq!(kept(&d), ["d14-15", "d13-15"]);
    }

    #[test]
    fn groups_are_counted_apart_and_an_empty_policy_keeps_nothing() {
        let mut s = vec![at("a1", 1), at("a2", 2)];
        s.push(Candidate { name: "b1".into(), created_unix_ms: 0, group: "h".into() });
        let d = apply(&Policy { last: 1, ..Default::default() }, &s);
        assert_eq!(kept(&d), ["a2", "b1"]);
        assert!(Policy::default().is_empty());
        assert!(kept(&apply(&Policy::default(), &s)).is_empty());
    }
}
