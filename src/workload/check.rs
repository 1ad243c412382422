//! The checker: run after the faults heal, it proves from the databases,
//! the recorded outcomes and every node's decision log that
//!
//! - **no orphans**: no prepared branch with the cluster's gid prefix is
//!   left (waiting, up to a bound, for recovery to settle what is in doubt;
//!   the wait is the in-doubt resolution time);
//! - **atomicity**: each transfer's marker is in all its branches or in
//!   none;
//! - **conservation**: the total balance is what the bank opened with;
//! - **no lost acknowledgement**: every transfer answered COMMITTED has its
//!   markers in both databases, every one answered ABORTED in neither;
//! - **decisions agree**: every node's decision records are identical, once
//!   they have applied the same log.
//!
//! It also reports throughput before, during and after the faults, and how
//! long throughput took to recover after each leader kill, from the events
//! file that `scripts/chaos.sh` writes (`<unix ms> <event> …` per line;
//! events whose name starts with `heal` end a fault).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

use super::OUTCOMES_FILE;
use super::Outcome;
use super::bank::connect;
use crate::client::Client;
use crate::config::ParticipantConfig;
use crate::error::Error;
use crate::error::Result;

pub struct CheckConfig {
    pub nodes: Vec<String>,
    pub participants: Vec<ParticipantConfig>,
    pub accounts: i64,
    pub opening: i64,
    /// The workload's output directory (`outcomes.jsonl`).
    pub out: PathBuf,
    /// Fault events, if any.
    pub events: Option<PathBuf>,
    /// The gid prefix of this cluster's branches (`tdm_<cluster_id>_`).
    pub gid_prefix: String,
    /// How long to wait for in-doubt branches to be settled, and for the
    /// nodes to converge.
    pub settle: Duration,
}

#[derive(Debug, Default, Serialize)]
pub struct Throughput {
    /// Committed transfers per second.
    pub before_faults: f64,
    pub during_faults: f64,
    pub after_faults: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: Option<u64>,
    pub p99: Option<u64>,
    pub max: Option<u64>,
}

impl Percentiles {
    fn of(mut values: Vec<u64>) -> Self {
        values.sort_unstable();
        let at = |q: f64| values.get(((values.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied();
        Self { count: values.len(), p50: at(0.5), p99: at(0.99), max: values.last().copied() }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Empty when every invariant holds.
    pub violations: Vec<String>,
    pub committed: u64,
    pub aborted: u64,
    pub unknown: u64,
    /// Of the unknown ones, how they really ended (by their markers).
    pub unknown_landed: u64,
    pub unknown_not_landed: u64,
    /// From the check's start until no prepared branch was left.
    pub in_doubt_resolution_ms: Option<u64>,
    pub throughput: Throughput,
    /// Per leader kill: ms until the commit rate was back to half the
    /// rate before the faults (`null` if it never was).
    pub recovery_after_leader_kill_ms: Vec<Option<u64>>,
    /// After each fault healed: ms until every branch prepared at that
    /// moment was settled (from `in-doubt-resolved` events).
    pub in_doubt_after_fault_ms: Percentiles,
    pub faults: BTreeMap<String, u64>,
    pub decision_records: u64,
}

/// Reads the outcomes a workload wrote.
pub fn read_outcomes(out: &std::path::Path) -> Result<Vec<Outcome>> {
    let file = std::fs::File::open(out.join(OUTCOMES_FILE))?;
    let mut list = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if !line.trim().is_empty() {
            list.push(serde_json::from_str(&line)?);
        }
    }
    Ok(list)
}

async fn prepared_left(clients: &[(&ParticipantConfig, tokio_postgres::Client)], prefix: &str) -> Result<Vec<String>> {
    let mut left = Vec::new();
    for (p, c) in clients {
        let rows = c
            .query("SELECT gid FROM pg_prepared_xacts WHERE starts_with(gid, $1)", &[&prefix])
            .await
            .map_err(|e| crate::participant::postgres::pg_error(&p.name, e))?;
        left.extend(rows.iter().map(|r| format!("{}:{}", p.name, r.get::<_, String>(0))));
    }
    Ok(left)
}

/// Every node's applied log index, if every node answers.
async fn applied_indexes(nodes: &[String]) -> Result<Option<BTreeSet<Option<u64>>>> {
    let mut applied = BTreeSet::new();
    for addr in nodes {
        match tokio::time::timeout(Duration::from_secs(3), Client::pinned(addr)?.status()).await {
            Ok(Ok(s)) => {
                applied.insert(s.applied_index);
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(applied))
}

/// Compares every node's decision records once they have applied the same
/// log. The leader's recovery may still be writing (completing records), so
/// the records count only if no node applied anything while they were read.
async fn decisions_agree(nodes: &[String], settle: Duration, violations: &mut Vec<String>) -> Result<u64> {
    let deadline = Instant::now() + settle;
    loop {
        let before = applied_indexes(nodes).await?;
        if before.as_ref().is_some_and(|a| a.len() == 1) {
            let mut all = Vec::new();
            for addr in nodes {
                all.push((addr.clone(), Client::pinned(addr)?.list_all_records(None, true).await?));
            }
            if applied_indexes(nodes).await? == before {
                let (first_addr, first) = &all[0];
                for (addr, records) in &all[1..] {
                    if records != first {
                        let theirs: BTreeSet<_> = first.iter().map(|x| format!("{x:?}")).collect();
                        let ours: BTreeSet<_> = records.iter().map(|x| format!("{x:?}")).collect();
                        let diff: Vec<_> = theirs.symmetric_difference(&ours).take(3).collect();
                        violations.push(format!(
                            "decisions agree: {first_addr} and {addr} hold different records at the same \
                             applied index, e.g. {diff:?}"
                        ));
                    }
                }
                return Ok(first.len() as u64);
            }
        }
        if Instant::now() >= deadline {
            violations.push(format!(
                "decisions agree: the nodes did not settle at one applied index in {settle:?} (last seen {before:?})"
            ));
            return Ok(0);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Commits per second over `[from, to)` (Unix ms), by end time.
fn rate(commits: &[u64], from: u64, to: u64) -> f64 {
    if to <= from {
        return 0.0;
    }
    let n = commits.iter().filter(|t| **t >= from && **t < to).count();
    n as f64 * 1000.0 / (to - from) as f64
}

/// Runs every check; the report's `violations` is empty when all hold.
pub async fn check(cfg: &CheckConfig) -> Result<Report> {
    let mut report = Report::default();
    let outcomes = read_outcomes(&cfg.out)?;

    // No orphans, and how long in-doubt branches took to be settled.
    let mut clients = Vec::new();
    for p in &cfg.participants {
        clients.push((p, connect(p).await?));
    }
    let start = Instant::now();
    let deadline = start + cfg.settle;
    loop {
        let left = prepared_left(&clients, &cfg.gid_prefix).await?;
        if left.is_empty() {
            report.in_doubt_resolution_ms = Some(start.elapsed().as_millis() as u64);
            break;
        }
        if Instant::now() >= deadline {
            report.violations.push(format!(
                "no orphans: {} prepared branches left after {:?}: {left:?}",
                left.len(),
                cfg.settle
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    report.decision_records = decisions_agree(&cfg.nodes, cfg.settle, &mut report.violations).await?;

    // Markers and balances.
    let mut markers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut total = 0i64;
    for (p, c) in &clients {
        let pg = |e| crate::participant::postgres::pg_error(&p.name, e);
        let rows = c.query("SELECT op FROM tandem_markers", &[]).await.map_err(pg)?;
        markers.insert(p.name.clone(), rows.iter().map(|r| r.get(0)).collect());
        let row = c.query_one("SELECT coalesce(sum(balance), 0)::bigint FROM balances", &[]).await.map_err(pg)?;
        total += row.get::<_, i64>(0);
    }
    let expected = cfg.accounts * cfg.opening * cfg.participants.len() as i64;
    if total != expected {
        report.violations.push(format!("conservation: the total balance is {total}, not {expected}"));
    }
    let has = |p: &str, op: &str| markers.get(p).is_some_and(|m| m.contains(op));
    for o in &outcomes {
        let (from, to) = (has(&o.from, &o.op), has(&o.to, &o.op));
        if from != to {
            report.violations.push(format!(
                "atomicity: transfer {} (txid {}) landed on {} only",
                o.op,
                o.txid,
                if from { &o.from } else { &o.to }
            ));
        }
        match o.outcome.as_str() {
            "committed" => {
                report.committed += 1;
                if !(from && to) {
                    report
                        .violations
                        .push(format!("lost acknowledgement: {} was answered COMMITTED but is missing", o.op));
                }
            }
            "aborted" => {
                report.aborted += 1;
                if from || to {
                    report.violations.push(format!(
                        "lost acknowledgement: {} was answered ABORTED (txid {}: {}) but landed",
                        o.op, o.txid, o.reason
                    ));
                }
            }
            _ => {
                report.unknown += 1;
                if from && to {
                    report.unknown_landed += 1;
                } else {
                    report.unknown_not_landed += 1;
                }
            }
        }
    }

    // Liveness figures from the fault events.
    let commits: Vec<u64> = outcomes.iter().filter(|o| o.outcome == "committed").map(|o| o.end_unix_ms).collect();
    let first = outcomes.iter().map(|o| o.start_unix_ms).min().unwrap_or(0);
    let last = outcomes.iter().map(|o| o.end_unix_ms).max().unwrap_or(0);
    let events = match &cfg.events {
        Some(path) if path.exists() => read_events(path)?,
        _ => Vec::new(),
    };
    let is_fault = |n: &str| !n.starts_with("heal") && n != "in-doubt-resolved";
    for (_, name, _) in events.iter().filter(|(_, n, _)| is_fault(n)) {
        *report.faults.entry(name.clone()).or_default() += 1;
    }
    report.in_doubt_after_fault_ms = Percentiles::of(
        events.iter().filter(|(_, n, _)| n == "in-doubt-resolved").filter_map(|(_, _, ms)| ms.parse().ok()).collect(),
    );
    let faults: Vec<u64> = events.iter().filter(|(_, n, _)| is_fault(n)).map(|(t, _, _)| *t).collect();
    let fault_start = faults.first().copied().unwrap_or(last);
    let fault_end = events.iter().map(|(t, _, _)| *t).max().unwrap_or(last).max(fault_start);
    report.throughput = Throughput {
        before_faults: rate(&commits, first, fault_start),
        during_faults: rate(&commits, fault_start, fault_end),
        after_faults: rate(&commits, fault_end, last),
    };
    let normal = report.throughput.before_faults;
    for (kill, _, _) in events.iter().filter(|(_, n, _)| n == "kill-leader") {
        // The first one-second window after the kill at half the normal rate.
        let mut recovered = None;
        let mut t = *kill;
        while t + 1000 <= last {
            if normal > 0.0 && rate(&commits, t, t + 1000) >= normal / 2.0 {
                recovered = Some(t - kill);
                break;
            }
            t += 100;
        }
        report.recovery_after_leader_kill_ms.push(recovered);
    }
    Ok(report)
}

/// Events as (time, name, first argument).
fn read_events(path: &std::path::Path) -> Result<Vec<(u64, String, String)>> {
    let mut events = Vec::new();
    for line in std::fs::read_to_string(path)?.lines() {
        let mut words = line.split_whitespace();
        let (Some(t), Some(name)) = (words.next(), words.next()) else { continue };
        let t = t.parse().map_err(|_| Error::InvalidInput(format!("bad event line {line:?}")))?;
        events.push((t, name.to_string(), words.next().unwrap_or_default().to_string()));
    }
    events.sort();
    Ok(events)
}

impl Report {
    /// A few lines for people.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "transfers: {} committed, {} aborted, {} unknown ({} of them landed, {} did not)\n",
            self.committed, self.aborted, self.unknown, self.unknown_landed, self.unknown_not_landed
        );
        s += &format!(
            "in-doubt resolution after the faults: {}\n",
            self.in_doubt_resolution_ms.map_or("never".to_string(), |ms| format!("{ms} ms"))
        );
        let p = &self.in_doubt_after_fault_ms;
        if p.count > 0 {
            s += &format!(
                "in-doubt resolution after each fault healed (ms): p50 {:?}, p99 {:?}, max {:?} over {} faults\n",
                p.p50, p.p99, p.max, p.count
            );
        }
        s += &format!(
            "throughput (commits/s): {:.1} before faults, {:.1} during, {:.1} after\n",
            self.throughput.before_faults, self.throughput.during_faults, self.throughput.after_faults
        );
        if !self.recovery_after_leader_kill_ms.is_empty() {
            s += &format!(
                "throughput back to half after each leader kill (ms): {:?}\n",
                self.recovery_after_leader_kill_ms
            );
        }
        s += &format!("faults: {:?}; decision records on every node: {}\n", self.faults, self.decision_records);
        if self.violations.is_empty() {
            s += "violations: none\n";
        } else {
            s += &format!("VIOLATIONS ({}):\n", self.violations.len());
            for v in &self.violations {
                s += &format!("  {v}\n");
            }
        }
        s
    }
}
