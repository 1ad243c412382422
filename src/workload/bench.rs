//! The benchmark (`tandem bench`, `scripts/bench.sh`): one bank transfer
//! run several ways, side by side, so Tandem's cost is measured against
//! what a user would otherwise do, on the same machine in the same run.
//!
//! A transfer moves 1 from a random account in database A to a random
//! account in database B (`bench_balances`, many accounts, so that rows
//! rarely collide). The modes:
//! - `tandem`: one `Transact` through the cluster (two branches);
//! - `bare_2pc`: the client itself runs BEGIN / UPDATE / PREPARE TRANSACTION
//!   on both databases, then COMMIT PREPARED on both, with no coordinator
//!   and no durable log: the floor for any 2PC (unsafe; for comparison);
//! - `non_atomic`: two independent local commits, one per database;
//! - `single_db`: both accounts in database A, one local transaction (the
//!   ceiling);
//! - `decisions_only`: COMMIT decisions through the cluster's decision log
//!   with no participant work; each worker completes its decision once it
//!   has the answer (its latency), before its next (`tandem bench
//!   --empty` runs it alone).
//!
//! The three baselines take the fewest round trips: their statements are
//! prepared once per connection, and BEGIN, the updates and PREPARE (or
//! COMMIT) go out pipelined; a baseline that paid round trips Tandem does
//! not would flatter Tandem.
//!
//! Each mode runs at each concurrency for a fixed time; every worker
//! connects first, then all run transfers back to back from the moment
//! the clock starts, recording each one's latency. Around each point the
//! nodes' counters, their CPU time, the client's and the machine's are
//! read, to show where a transfer's CPU went; over its middle, the
//! databases' count of write-ahead log fsyncs, to show how well their
//! group commit shares flushes.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

use super::Rng;
use crate::client::Client;
use crate::config::ParticipantConfig;
use crate::error::Error;
use crate::error::Result;
use crate::participant::postgres::in_order;
use crate::proto as pb;
use crate::txn::Branch;
use crate::txn::Decision;
use crate::txn::TxId;

/// What is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Tandem,
    #[serde(rename = "bare_2pc")]
    Bare2pc,
    NonAtomic,
    SingleDb,
    DecisionsOnly,
}

impl Mode {
    pub const ALL: [Mode; 5] = [Mode::Tandem, Mode::Bare2pc, Mode::NonAtomic, Mode::SingleDb, Mode::DecisionsOnly];

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
            Error::InvalidInput(format!("unknown mode {s:?} (modes: {})", names.join(", ")))
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Tandem => "tandem",
            Mode::Bare2pc => "bare_2pc",
            Mode::NonAtomic => "non_atomic",
            Mode::SingleDb => "single_db",
            Mode::DecisionsOnly => "decisions_only",
        }
    }

    /// Whether the mode does work in the databases (all but the decision
    /// log alone).
    pub fn touches_databases(self) -> bool {
        self != Mode::DecisionsOnly
    }
}

pub struct BenchConfig {
    pub nodes: Vec<String>,
    /// Databases A and B (the first two participants).
    pub a: ParticipantConfig,
    pub b: ParticipantConfig,
    pub modes: Vec<Mode>,
    pub concurrency: Vec<usize>,
    /// How long each mode runs at each concurrency.
    pub duration: Duration,
    /// Instead of `duration`: run each point until this many transfers are
    /// done (the long run: throughput early against late).
    pub transactions: Option<u64>,
    pub accounts: i64,
    pub seed: u64,
    /// Modes through the cluster: this many clients share one connection to
    /// each node (1: each its own).
    pub clients_per_connection: usize,
}

/// One mode at one concurrency.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub mode: Mode,
    pub concurrency: usize,
    /// Transfers (or decisions) completed per second.
    pub throughput: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub completed: u64,
    /// Attempts that failed (aborted or errors); not in the latencies.
    pub failed: u64,
    /// Runs of at least twice [`WINDOW`] transfers: the throughput over the
    /// first and over the last [`WINDOW`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_window_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_window_per_s: Option<f64>,
    /// `tandem` only: the mean split of a commit on the leader, from its
    /// counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
    /// Modes through the cluster: Raft log entries written per fsync, over
    /// the three nodes (group commit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries_per_fsync: Option<f64>,
    /// Modes through the cluster: decisions per Raft entry (the decision
    /// batcher).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decisions_per_entry: Option<f64>,
    /// `decisions_only`: completions per Raft entry (the decision log API's
    /// completion batcher).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completions_per_entry: Option<f64>,
    /// Modes through the cluster: the mean time of one fsync of the Raft
    /// log, over the three nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsync_ms: Option<f64>,
    /// Modes through the cluster: the share of the Raft log's reads (range
    /// reads, replication's and apply's) that the nodes served from their
    /// memory copy of the newest entries, against RocksDB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_reads_from_memory_share: Option<f64>,
    /// Where the machine's CPU went, per transfer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuPerTransfer>,
    /// Every mode but decisions_only, in timed points of at least 9 s: the
    /// fsyncs of PostgreSQL's write-ahead log per transfer, both databases
    /// together (`pg_stat_wal.wal_sync`), from a fifth of the way into the
    /// point to four fifths; it shows how well the databases' own group
    /// commit shares flushes at this load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal_fsyncs_per_transfer: Option<f64>,
}

/// The CPU time used during a point, per transfer (or decision), in
/// microseconds: by the leader, by the followers together, by the
/// benchmark client, and by everything else the machine ran (the two
/// PostgreSQL servers above all); and how busy the machine's cores were.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CpuPerTransfer {
    pub leader_us: f64,
    pub followers_us: f64,
    pub client_us: f64,
    pub rest_us: f64,
    /// The share of all cores busy over the point, 0 to 1.
    pub machine_busy: f64,
}

/// Where a committed transaction's time went on the leader, in mean
/// milliseconds: until every branch was prepared, the decision through
/// Raft, phase 2 until the answer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Split {
    pub prepare_ms: f64,
    pub decide_ms: f64,
    pub phase2_ms: f64,
}

/// The counters read from the nodes: the leader's split
/// (`timed_commits`, `prepare_us_total`, `decide_us_total`,
/// `phase2_us_total`), the Raft log's `log_entries_appended` and
/// `log_fsyncs`, the decision batcher's `decisions_proposed` and
/// `decision_entries`, the time the log's fsyncs took, and the decision log
/// API's completion batcher's `api_completions_proposed` and
/// `api_completion_entries`, and the log's reads from memory and from
/// RocksDB, each summed over the nodes that answer.
const COUNTERS: [&str; 13] = [
    "timed_commits",
    "prepare_us_total",
    "decide_us_total",
    "phase2_us_total",
    "log_entries_appended",
    "log_fsyncs",
    "decisions_proposed",
    "decision_entries",
    "log_fsync_us_total",
    "api_completions_proposed",
    "api_completion_entries",
    "log_reads_from_memory",
    "log_reads_from_rocksdb",
];

/// One reading of the counters and of the CPU time used so far.
#[derive(Debug, Default)]
struct Reading {
    /// [`COUNTERS`], each summed over the nodes that answered.
    counters: [u64; 13],
    /// Each node that answered: its id, whether it was the leader, the CPU
    /// time its process has used (`process_cpu_us`).
    nodes: Vec<(u64, bool, u64)>,
    /// The CPU time this process (the benchmark client) has used.
    client_cpu_us: u64,
    /// The machine's CPU time, busy and in all (busy and idle), over all
    /// cores, if `/proc/stat` says.
    machine_cpu_us: Option<(u64, u64)>,
}

async fn read_counters(nodes: &[String]) -> Reading {
    let mut reading = Reading::default();
    for addr in nodes {
        let Ok(mut client) = Client::pinned(addr) else { continue };
        let Ok(status) = client.status().await else { continue };
        for (total, name) in reading.counters.iter_mut().zip(COUNTERS) {
            *total += status.counters.get(name).copied().unwrap_or(0);
        }
        let cpu = status.counters.get("process_cpu_us").copied().unwrap_or(0);
        reading.nodes.push((status.id, status.role == pb::Role::Leader as i32, cpu));
    }
    reading.client_cpu_us = crate::server::process_cpu_us();
    reading.machine_cpu_us = std::fs::read_to_string("/proc/stat").ok().and_then(|s| machine_cpu_us(&s));
    reading
}

/// How many times databases A and B together have fsynced their
/// write-ahead logs (`pg_stat_wal.wal_sync`), or `None` if either cannot
/// say: unreachable, or without that column (PostgreSQL before 14, and
/// not every later version). The count is of fsync calls: 0 under a
/// `wal_sync_method` that writes synchronously instead (`open_sync`,
/// `open_datasync`).
async fn wal_fsyncs(a: &ParticipantConfig, b: &ParticipantConfig) -> Option<u64> {
    async fn of(participant: &ParticipantConfig) -> Option<u64> {
        let read = async {
            let client = super::bank::connect(participant).await.ok()?;
            let row = client.query_one("SELECT wal_sync FROM pg_stat_wal", &[]).await.ok()?;
            u64::try_from(row.try_get::<_, i64>(0).ok()?).ok()
        };
        tokio::time::timeout(Duration::from_secs(5), read).await.ok().flatten()
    }
    let (a, b) = tokio::join!(of(a), of(b));
    Some(a? + b?)
}

/// The databases' WAL fsyncs per transfer over the middle of a timed
/// point, from a fifth of `duration` in to four fifths, with `done` the
/// point's count of transfers. PostgreSQL publishes a backend's counts
/// when it goes idle, at most once a second, and an idle one's up to 10 s
/// later: read right after a point, the count would miss some of its
/// last fsyncs. Mid-point every backend is busy, and the two readings lag
/// alike.
async fn wal_window(
    a: ParticipantConfig,
    b: ParticipantConfig,
    duration: Duration,
    done: Arc<AtomicU64>,
) -> Option<f64> {
    tokio::time::sleep(duration / 5).await;
    let first = (wal_fsyncs(&a, &b).await?, done.load(Ordering::Relaxed));
    tokio::time::sleep(duration * 3 / 5).await;
    let last = (wal_fsyncs(&a, &b).await?, done.load(Ordering::Relaxed));
    per_transfer(first, last)
}

/// The shortest point whose WAL fsyncs [`wal_window`] counts: its window
/// is three fifths of the point, and PostgreSQL's counts lag by up to
/// about a second, so a much shorter window would mostly miss them (a 1-s
/// point reads 0).
const WAL_POINT_MIN: Duration = Duration::from_secs(9);

/// `(fsyncs, transfers done)` read twice: fsyncs per transfer between.
fn per_transfer((fsyncs0, done0): (u64, u64), (fsyncs1, done1): (u64, u64)) -> Option<f64> {
    let transfers = done1.checked_sub(done0).filter(|&n| n > 0)?;
    Some(fsyncs1.saturating_sub(fsyncs0) as f64 / transfers as f64)
}

/// The machine's busy and total CPU time in microseconds, from the `cpu`
/// line of `/proc/stat` (user nice system idle iowait irq softirq steal,
/// in clock ticks; idle and iowait are not busy).
fn machine_cpu_us(proc_stat: &str) -> Option<(u64, u64)> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|t| t.parse().ok()).collect::<Option<_>>()?;
    if ticks.len() < 5 {
        return None;
    }
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_tick = 1_000_000 / u64::try_from(hz).ok().filter(|&h| h > 0)?;
    let total: u64 = ticks.iter().sum();
    let busy = total - ticks[3] - ticks[4];
    Some((busy * per_tick, total * per_tick))
}

/// What the counters show between two readings of [`read_counters`].
#[derive(Debug, Default, PartialEq)]
struct Counted {
    /// The leader's mean split of a commit.
    split: Option<Split>,
    /// Log entries per fsync, all nodes.
    entries_per_fsync: Option<f64>,
    /// Decisions per Raft entry.
    decisions_per_entry: Option<f64>,
    /// The decision log API's completions per Raft entry.
    completions_per_entry: Option<f64>,
    /// The mean time of one fsync of the log, all nodes.
    fsync_ms: Option<f64>,
    /// The share of log reads served from memory, all nodes.
    log_reads_from_memory_share: Option<f64>,
    /// CPU per transfer.
    cpu: Option<CpuPerTransfer>,
}

/// What happened between two readings in which `transfers` were done.
/// A node's CPU time counts for the role it had in the second reading; a
/// node missing from either reading counts in the rest.
fn between(before: &Reading, after: &Reading, transfers: u64) -> Counted {
    let d: Vec<f64> = before.counters.iter().zip(after.counters).map(|(b, a)| a.saturating_sub(*b) as f64).collect();
    let split = (d[0] > 0.0).then(|| Split {
        prepare_ms: d[1] / d[0] / 1000.0,
        decide_ms: d[2] / d[0] / 1000.0,
        phase2_ms: d[3] / d[0] / 1000.0,
    });
    Counted {
        split,
        entries_per_fsync: (d[5] > 0.0).then(|| d[4] / d[5]),
        decisions_per_entry: (d[7] > 0.0).then(|| d[6] / d[7]),
        completions_per_entry: (d[10] > 0.0).then(|| d[9] / d[10]),
        fsync_ms: (d[5] > 0.0).then(|| d[8] / d[5] / 1000.0),
        log_reads_from_memory_share: (d[11] + d[12] > 0.0).then(|| d[11] / (d[11] + d[12])),
        cpu: cpu_between(before, after, transfers),
    }
}

fn cpu_between(before: &Reading, after: &Reading, transfers: u64) -> Option<CpuPerTransfer> {
    let ((busy0, total0), (busy1, total1)) = (before.machine_cpu_us?, after.machine_cpu_us?);
    if transfers == 0 || total1 <= total0 {
        return None;
    }
    let (mut leader, mut followers) = (0u64, 0u64);
    for &(id, is_leader, cpu) in &after.nodes {
        let Some(&(_, _, earlier)) = before.nodes.iter().find(|n| n.0 == id) else { continue };
        let used = cpu.saturating_sub(earlier);
        if is_leader { leader += used } else { followers += used }
    }
    let client = after.client_cpu_us.saturating_sub(before.client_cpu_us);
    let busy = busy1.saturating_sub(busy0);
    let per = |us: u64| us as f64 / transfers as f64;
    Some(CpuPerTransfer {
        leader_us: per(leader),
        followers_us: per(followers),
        client_us: per(client),
        rest_us: per(busy.saturating_sub(leader + followers + client)),
        machine_busy: busy as f64 / (total1 - total0) as f64,
    })
}

/// The stretch of a long run whose throughput is compared, early and late.
pub const WINDOW: u64 = 100_000;

/// When the count of done transfers passed `n`, interpolated between the
/// progress samples `(seconds, done)`.
fn time_at(samples: &[(f64, u64)], n: u64) -> Option<f64> {
    let i = samples.iter().position(|&(_, done)| done >= n)?;
    if i == 0 {
        return Some(samples[0].0);
    }
    let ((t0, d0), (t1, d1)) = (samples[i - 1], samples[i]);
    Some(t0 + (t1 - t0) * (n - d0) as f64 / (d1 - d0) as f64)
}

/// Throughput over the first and the last [`WINDOW`] transfers of a run
/// of `total`, if it is long enough.
fn windows(samples: &[(f64, u64)], total: u64) -> (Option<f64>, Option<f64>) {
    if total < 2 * WINDOW {
        return (None, None);
    }
    let rate = |from: u64, to: u64| Some(WINDOW as f64 / (time_at(samples, to)? - time_at(samples, from)?));
    (rate(0, WINDOW), rate(total - WINDOW, total))
}

/// Most concurrent workers of one run.
pub const CONCURRENCY_MAX: usize = 1024;

/// (Re)creates `bench_balances` in both databases: `accounts` accounts in
/// each (database A holds both ranges, for `single_db`).
pub async fn setup(cfg: &BenchConfig) -> Result<()> {
    for (p, rows) in [(&cfg.a, 2 * cfg.accounts), (&cfg.b, cfg.accounts)] {
        let c = super::bank::connect(p).await?;
        c.batch_execute(&format!(
            "DROP TABLE IF EXISTS bench_balances;
             CREATE TABLE bench_balances (id bigint PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO bench_balances SELECT g, 1000000 FROM generate_series(1, {rows}) g;"
        ))
        .await
        .map_err(|e| crate::participant::postgres::pg_error(&p.name, e))?;
        // Alone: VACUUM refuses to run in the implicit transaction of a
        // multi-statement batch.
        c.batch_execute("VACUUM ANALYZE bench_balances")
            .await
            .map_err(|e| crate::participant::postgres::pg_error(&p.name, e))?;
    }
    Ok(())
}

/// Runs every mode at every concurrency, printing progress to stderr.
pub async fn run(cfg: &BenchConfig) -> Result<Vec<BenchResult>> {
    if cfg.concurrency.is_empty() || cfg.concurrency.iter().any(|&c| c == 0 || c > CONCURRENCY_MAX) {
        return Err(Error::InvalidInput(format!("each concurrency must be 1 to {CONCURRENCY_MAX}")));
    }
    let mut results = Vec::new();
    for &mode in &cfg.modes {
        for &concurrency in &cfg.concurrency {
            let r = run_one(cfg, mode, concurrency).await?;
            eprintln!(
                "{:<15} {:>4} clients: {:>9.1} tx/s  p50 {:>7.2} ms  p99 {:>7.2} ms  p999 {:>7.2} ms  ({} failed)",
                mode.name(),
                concurrency,
                r.throughput,
                r.p50_ms,
                r.p99_ms,
                r.p999_ms,
                r.failed
            );
            if let Some(split) = r.split {
                eprintln!(
                    "{:<15} on the leader: prepare {:.2} ms, decision {:.2} ms, phase 2 {:.2} ms (mean)",
                    "", split.prepare_ms, split.decide_ms, split.phase2_ms
                );
            }
            if let (Some(n), Some(ms)) = (r.entries_per_fsync, r.fsync_ms) {
                eprintln!("{:<15} Raft log entries per fsync: {n:.1}; an fsync took {ms:.2} ms (mean)", "");
            }
            if let Some(share) = r.log_reads_from_memory_share {
                eprintln!("{:<15} Raft log reads served from memory: {:.1}%", "", 100.0 * share);
            }
            if let Some(n) = r.decisions_per_entry {
                eprintln!("{:<15} decisions per Raft entry: {n:.1}", "");
            }
            if let Some(n) = r.completions_per_entry {
                eprintln!("{:<15} completions per Raft entry: {n:.1}", "");
            }
            if let Some(c) = r.cpu {
                eprintln!(
                    "{:<15} CPU per transfer: leader {:.0} us, followers {:.0} us, client {:.0} us, the rest \
                     (PostgreSQL, ...) {:.0} us; cores {:.0}% busy",
                    "",
                    c.leader_us,
                    c.followers_us,
                    c.client_us,
                    c.rest_us,
                    100.0 * c.machine_busy
                );
            }
            if let Some(n) = r.wal_fsyncs_per_transfer {
                eprintln!("{:<15} PostgreSQL WAL fsyncs per transfer (both databases): {n:.2}", "");
            }
            if let (Some(first), Some(last)) = (r.first_window_per_s, r.last_window_per_s) {
                eprintln!(
                    "{:<15} first {WINDOW} transfers {first:.1}/s, last {WINDOW} {last:.1}/s ({:+.1}%)",
                    "",
                    100.0 * (last - first) / first
                );
            }
            results.push(r);
        }
    }
    Ok(results)
}

async fn run_one(cfg: &BenchConfig, mode: Mode, concurrency: usize) -> Result<BenchResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let limit = cfg.transactions.unwrap_or(u64::MAX);
    let through_cluster = matches!(mode, Mode::Tandem | Mode::DecisionsOnly);
    // Every worker connects first; then all start, with the clock.
    // (Opening hundreds of database connections takes seconds: workers
    // that started as soon as they connected would count transfers done
    // before the clock started.)
    let mut connected = Vec::with_capacity(concurrency);
    let mut shared: Option<Client> = None;
    for w in 0..concurrency {
        if w % cfg.clients_per_connection.max(1) == 0 {
            shared = Some(Client::new(&cfg.nodes)?);
        }
        let client = shared.as_ref().map(Client::share).expect("made at the first worker");
        connected.push(Worker::connect(cfg, mode, w, client).await?);
    }
    let before = read_counters(&cfg.nodes).await;
    let started = Instant::now();
    // decisions_only does no work in the databases; a point run to a
    // number of transfers has no middle known in advance.
    let wal = (mode.touches_databases() && cfg.transactions.is_none() && cfg.duration >= WAL_POINT_MIN)
        .then(|| tokio::spawn(wal_window(cfg.a.clone(), cfg.b.clone(), cfg.duration, done.clone())));
    let mut workers = Vec::with_capacity(concurrency);
    for (w, mut worker) in connected.into_iter().enumerate() {
        let (stop, done) = (stop.clone(), done.clone());
        let mut rng = Rng::new(cfg.seed ^ ((w as u64 + 1) << 32) ^ mode as u64);
        let accounts = cfg.accounts;
        workers.push(tokio::spawn(async move {
            let mut latencies_us = Vec::new();
            let mut failed = 0u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let from = 1 + (rng.next_u64() % accounts as u64) as i64;
                let to = 1 + (rng.next_u64() % accounts as u64) as i64;
                let started = Instant::now();
                let result = match worker.transfer(from, to, w, n).await {
                    Ok(()) => {
                        let answered = started.elapsed();
                        worker.settle().await.map(|()| answered)
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Ok(answered) => {
                        latencies_us.push(answered.as_micros() as u64);
                        if done.fetch_add(1, Ordering::Relaxed) + 1 >= limit {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        if failed <= 3 {
                            tracing::warn!(mode = mode.name(), worker = w, error = %e, "transfer failed");
                        }
                    }
                }
            }
            (latencies_us, failed)
        }));
    }
    // Samples of (seconds, done) every 200 ms; progress every second.
    let progress = {
        let (done, stop) = (done.clone(), stop.clone());
        let deadline = cfg.transactions.is_none().then(|| started + cfg.duration);
        tokio::spawn(async move {
            let mut samples = vec![(0.0, 0)];
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = done.load(Ordering::Relaxed);
                samples.push((started.elapsed().as_secs_f64(), now));
                if samples.len() % 5 == 1 {
                    eprint!("\r  {} x{concurrency}: {} done, {}/s   ", mode.name(), now, now - last);
                    last = now;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    stop.store(true, Ordering::Relaxed);
                }
                if stop.load(Ordering::Relaxed) {
                    return samples;
                }
            }
        })
    };
    let mut latencies = Vec::new();
    let mut failed = 0;
    for w in workers {
        let (l, f) = w.await.map_err(|e| Error::Internal(format!("a bench worker panicked: {e}")))?;
        latencies.extend(l);
        failed += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = read_counters(&cfg.nodes).await;
    let wal_fsyncs_per_transfer = match wal {
        Some(window) => window.await.ok().flatten(),
        None => None,
    };
    let mut samples = progress.await.map_err(|e| Error::Internal(format!("the bench progress task failed: {e}")))?;
    samples.push((elapsed, latencies.len() as u64));
    let (first_window_per_s, last_window_per_s) = windows(&samples, latencies.len() as u64);
    let counted = between(&before, &after, latencies.len() as u64);
    // The cluster's counters mean nothing for the modes that do not use it.
    let Counted {
        split,
        entries_per_fsync,
        decisions_per_entry,
        completions_per_entry,
        fsync_ms,
        log_reads_from_memory_share,
        cpu,
    } = if through_cluster { counted } else { Counted { cpu: counted.cpu, ..Counted::default() } };
    eprint!("\r{:100}\r", "");
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i] as f64 / 1000.0
    };
    Ok(BenchResult {
        mode,
        concurrency,
        throughput: latencies.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        completed: latencies.len() as u64,
        failed,
        first_window_per_s,
        last_window_per_s,
        split,
        entries_per_fsync,
        decisions_per_entry,
        completions_per_entry,
        fsync_ms,
        log_reads_from_memory_share,
        cpu,
        wal_fsyncs_per_transfer,
    })
}

/// One worker's connections.
enum Worker {
    Tandem(Client),
    Databases {
        a: Box<Connection>,
        b: Box<Connection>,
        mode: Mode,
        accounts: i64,
    },
    /// `decided`: the txid of the decision just recorded, until settled.
    Decisions {
        client: Client,
        prefix: String,
        decided: Option<TxId>,
    },
}

fn int(i: i64) -> pb::Value {
    pb::Value { kind: Some(pb::value::Kind::Int64(i)) }
}

fn statement(sql: &str, id: i64) -> pb::Statement {
    pb::Statement { sql: sql.into(), params: vec![int(id)] }
}

const DEBIT: &str = "UPDATE bench_balances SET balance = balance - 1 WHERE id = $1";
const CREDIT: &str = "UPDATE bench_balances SET balance = balance + 1 WHERE id = $1";

/// A baseline's connection to one database, with the transfer's two
/// statements prepared on it once.
struct Connection {
    client: tokio_postgres::Client,
    debit: tokio_postgres::Statement,
    credit: tokio_postgres::Statement,
}

impl Connection {
    async fn open(participant: &ParticipantConfig) -> Result<Self> {
        let client = super::bank::connect(participant).await?;
        let pg = |e| crate::participant::postgres::pg_error(&participant.name, e);
        let debit = client.prepare(DEBIT).await.map_err(pg)?;
        let credit = client.prepare(CREDIT).await.map_err(pg)?;
        Ok(Self { client, debit, credit })
    }

    /// Runs each statement on its account inside BEGIN … `end`, all
    /// pipelined: one round trip. Every answer is checked, so a failed
    /// update fails the call even though `end` on a failed transaction
    /// rolls it back without an error.
    async fn transaction(
        &self,
        statements: &[(&tokio_postgres::Statement, i64)],
        end: &str,
    ) -> Result<(), tokio_postgres::Error> {
        let c = &self.client;
        let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 1]> =
            statements.iter().map(|(_, id)| [id as &(dyn tokio_postgres::types::ToSql + Sync)]).collect();
        let updates = in_order(statements.iter().zip(&params).map(|((s, _), p)| c.execute(*s, p)).collect());
        // `biased`: polled, so sent, in this order.
        let (begin, updates, end) = tokio::join!(biased; c.batch_execute("BEGIN"), updates, c.batch_execute(end));
        begin?;
        for n in updates {
            n?;
        }
        end
    }
}

impl Worker {
    /// `client` serves the modes through the cluster.
    async fn connect(cfg: &BenchConfig, mode: Mode, w: usize, client: Client) -> Result<Self> {
        Ok(match mode {
            Mode::Tandem => Worker::Tandem(client),
            Mode::DecisionsOnly => {
                // Txids unique across runs: the clock, the worker.
                let prefix = format!("bench{}w{w}n", crate::server::now_unix_ms());
                Worker::Decisions { client, prefix, decided: None }
            }
            Mode::Bare2pc | Mode::NonAtomic | Mode::SingleDb => Worker::Databases {
                a: Box::new(Connection::open(&cfg.a).await?),
                b: Box::new(Connection::open(&cfg.b).await?),
                mode,
                accounts: cfg.accounts,
            },
        })
    }

    /// What follows a transfer's answer before the worker's next one, off
    /// its latency: `decisions_only` completes the decision it just had
    /// recorded, as a coordinator does once its phase 2 is done (here there
    /// is no participant work), so that the records do not pile up
    /// incomplete for recovery to complete beside the load.
    async fn settle(&mut self) -> Result<()> {
        match self {
            Worker::Decisions { client, decided: Some(txid), .. } => client.complete(txid).await.map(|_| ()),
            _ => Ok(()),
        }
    }

    async fn transfer(&mut self, from: i64, to: i64, w: usize, n: u64) -> Result<()> {
        let pg = |e: tokio_postgres::Error| crate::participant::postgres::pg_error("bench", e);
        match self {
            Worker::Tandem(client) => {
                let request = pb::TransactRequest {
                    branches: vec![
                        pb::BranchRequest { participant: "bench_a".into(), statements: vec![statement(DEBIT, from)] },
                        pb::BranchRequest { participant: "bench_b".into(), statements: vec![statement(CREDIT, to)] },
                    ],
                    timeout_ms: 10_000,
                    ..Default::default()
                };
                let answer = client.transact(request).await?;
                if answer.outcome != pb::Outcome::Committed as i32 {
                    return Err(Error::FailedPrecondition(format!("aborted: {}", answer.reason)));
                }
                Ok(())
            }
            Worker::Decisions { client, prefix, decided } => {
                let txid = TxId::parse(&format!("{prefix}{n}"))?;
                let decision = Decision::Commit {
                    branches: vec![Branch::new("bench_a"), Branch::new("bench_b")],
                    idempotency_key: None,
                };
                client.decide(&txid, &decision).await?;
                *decided = Some(txid);
                Ok(())
            }
            Worker::Databases { a, b, mode: Mode::Bare2pc, .. } => {
                let prepare = format!("PREPARE TRANSACTION 'bench_{w}_{n}'");
                let (debit, credit) = ([(&a.debit, from)], [(&b.credit, to)]);
                let (pa, pb_) = tokio::join!(a.transaction(&debit, &prepare), b.transaction(&credit, &prepare));
                pa.map_err(pg)?;
                pb_.map_err(pg)?;
                let commit = format!("COMMIT PREPARED 'bench_{w}_{n}'");
                let (ca, cb) = tokio::join!(a.client.batch_execute(&commit), b.client.batch_execute(&commit));
                ca.map_err(pg)?;
                cb.map_err(pg)
            }
            Worker::Databases { a, b, mode: Mode::NonAtomic, .. } => {
                let (pa, pb_): (
                    [&(dyn tokio_postgres::types::ToSql + Sync); 1],
                    [&(dyn tokio_postgres::types::ToSql + Sync); 1],
                ) = ([&from], [&to]);
                let (da, cb) = tokio::join!(a.client.execute(&a.debit, &pa), b.client.execute(&b.credit, &pb_));
                da.map_err(pg)?;
                cb.map_err(pg).map(|_| ())
            }
            Worker::Databases { a, accounts, .. } => {
                // single_db: both accounts in A (the credit in its second
                // range of accounts).
                let both = [(&a.debit, from), (&a.credit, *accounts + to)];
                a.transaction(&both, "COMMIT").await.map_err(pg)
            }
        }
    }
}

/// The results as a table, with Tandem's throughput as a share of bare
/// 2PC's at the same concurrency.
pub fn table(results: &[BenchResult]) -> String {
    let mut out = String::new();
    writeln!(
        out,
        "{:<15} {:>7} {:>11} {:>9} {:>9} {:>9} {:>8} {:>14}",
        "mode", "clients", "tx/s", "p50 ms", "p99 ms", "p999 ms", "failed", "vs bare 2PC"
    )
    .ok();
    for r in results {
        let bare = results.iter().find(|b| b.mode == Mode::Bare2pc && b.concurrency == r.concurrency);
        let ratio = match (r.mode, bare) {
            (Mode::Tandem, Some(b)) if b.throughput > 0.0 => format!("{:.0}%", 100.0 * r.throughput / b.throughput),
            _ => String::new(),
        };
        writeln!(
            out,
            "{:<15} {:>7} {:>11.1} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>14}",
            r.mode.name(),
            r.concurrency,
            r.throughput,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.failed,
            ratio
        )
        .ok();
    }
    out
}

/// `{"results": [...]}`.
pub fn json(results: &[BenchResult]) -> String {
    serde_json::json!({ "results": results }).to_string()
}

/// Latency (p50, log scale) against throughput, one line per mode through
/// its concurrencies, as an SVG document.
pub fn svg(results: &[BenchResult]) -> String {
    const W: f64 = 720.0;
    const H: f64 = 440.0;
    const L: f64 = 70.0;
    const R: f64 = 160.0;
    const T: f64 = 30.0;
    const B: f64 = 50.0;
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];
    let max_tput = results.iter().map(|r| r.throughput).fold(1.0, f64::max) * 1.05;
    let lat = |r: &BenchResult| r.p50_ms.max(0.01);
    let (min_l, max_l) = results.iter().fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(lat(r)), hi.max(lat(r))));
    let (lo, hi) = (min_l.min(max_l).max(0.01).log10().floor(), max_l.max(0.1).log10().ceil().max(min_l.log10() + 1.0));
    let x = |t: f64| L + (W - L - R) * t / max_tput;
    let y = |ms: f64| T + (H - T - B) * (1.0 - (ms.log10() - lo) / (hi - lo));
    let mut s = String::new();
    writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    )
    .ok();
    writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#).ok();
    writeln!(s, r#"<line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, H - B, W - R, H - B).ok();
    writeln!(s, r#"<line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="black"/>"#, H - B).ok();
    for i in 0..=4 {
        let t = max_tput * i as f64 / 4.0;
        writeln!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0}</text>"#, x(t), H - B + 16.0, t).ok();
    }
    let mut decade = lo;
    while decade <= hi {
        let ms = 10f64.powf(decade);
        writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{ms}</text>"#, L - 6.0, y(ms) + 4.0).ok();
        writeln!(s, r##"<line x1="{L}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/>"##, y(ms), W - R).ok();
        decade += 1.0;
    }
    writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">throughput (transfers/s)</text>"#,
        (L + W - R) / 2.0,
        H - 12.0
    )
    .ok();
    writeln!(
        s,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">p50 latency (ms, log)</text>"#,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0
    )
    .ok();
    for (i, mode) in Mode::ALL.iter().enumerate() {
        let points: Vec<&BenchResult> = results.iter().filter(|r| r.mode == *mode).collect();
        if points.is_empty() {
            continue;
        }
        let color = colors[i % colors.len()];
        let path: Vec<String> = points.iter().map(|r| format!("{:.1},{:.1}", x(r.throughput), y(lat(r)))).collect();
        writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, path.join(" ")).ok();
        for r in &points {
            writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{} x{}</title></circle>"#,
                x(r.throughput),
                y(lat(r)),
                mode.name(),
                r.concurrency
            )
            .ok();
        }
        let ly = T + 18.0 * i as f64;
        writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/>"#,
            W - R + 12.0,
            W - R + 32.0
        )
        .ok();
        writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, W - R + 38.0, ly + 4.0, mode.name()).ok();
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(mode: Mode, concurrency: usize, throughput: f64, p50_ms: f64) -> BenchResult {
        BenchResult {
            mode,
            concurrency,
            throughput,
            p50_ms,
            p99_ms: p50_ms * 3.0,
            p999_ms: p50_ms * 5.0,
            completed: 10,
            failed: 0,
            first_window_per_s: None,
            last_window_per_s: None,
            split: None,
            entries_per_fsync: None,
            decisions_per_entry: None,
            completions_per_entry: None,
            fsync_ms: None,
            log_reads_from_memory_share: None,
            cpu: None,
            wal_fsyncs_per_transfer: None,
        }
    }

    fn reading(counters: [u64; 13]) -> Reading {
        Reading { counters, ..Reading::default() }
    }

    #[test]
    fn split_is_the_mean_between_readings() {
        let counted = between(
            &reading([10, 1000, 2000, 3000, 50, 5, 7, 1, 100, 0, 0, 40, 0]),
            &reading([20, 31_000, 12_000, 8000, 250, 25, 47, 11, 4100, 30, 2, 130, 10]),
            10,
        );
        assert_eq!(counted.split, Some(Split { prepare_ms: 3.0, decide_ms: 1.0, phase2_ms: 0.5 }));
        assert_eq!(counted.entries_per_fsync, Some(10.0));
        assert_eq!(counted.decisions_per_entry, Some(4.0));
        assert_eq!(counted.completions_per_entry, Some(15.0));
        assert_eq!(counted.fsync_ms, Some(0.2));
        assert_eq!(counted.log_reads_from_memory_share, Some(0.9));
        assert_eq!(
            between(
                &reading([5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                &reading([5, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                3
            ),
            Counted::default()
        );
    }

    #[test]
    fn cpu_is_shared_out_per_transfer() {
        let before = Reading {
            nodes: vec![(1, true, 1_000), (2, false, 500), (3, false, 700)],
            client_cpu_us: 100,
            machine_cpu_us: Some((10_000, 50_000)),
            ..Reading::default()
        };
        // Node 2 became the leader; node 4 was not there before, so its
        // time counts in the rest.
        let after = Reading {
            nodes: vec![(1, false, 3_000), (2, true, 4_500), (3, false, 1_700), (4, false, 9_000)],
            client_cpu_us: 2_100,
            machine_cpu_us: Some((30_000, 90_000)),
            ..Reading::default()
        };
        let cpu = between(&before, &after, 100).cpu.unwrap();
        assert_eq!(
            cpu,
            CpuPerTransfer { leader_us: 40.0, followers_us: 30.0, client_us: 20.0, rest_us: 110.0, machine_busy: 0.5 }
        );
        assert_eq!(between(&before, &after, 0).cpu, None);
        assert_eq!(between(&before, &Reading { machine_cpu_us: None, ..after }, 100).cpu, None);
    }

    #[test]
    fn database_fsyncs_are_counted_per_transfer() {
        assert_eq!(per_transfer((1_000, 40), (1_250, 140)), Some(2.5));
        // No transfers between the readings: nothing to share out.
        assert_eq!(per_transfer((1_000, 40), (1_250, 40)), None);
        assert_eq!(per_transfer((1_000, 40), (1_000, 90)), Some(0.0));
    }

    #[test]
    fn machine_cpu_is_read_from_proc_stat() {
        // SAFETY: sysconf reads a constant of the system.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        // Steal counts as busy; guest time (the last two) is already in
        // user and nice.
        let stat = "cpu  100 5 50 800 40 3 2 7 30 9\ncpu0 50 2 25 400 20 1 1 3 15 4\nintr 1 2 3\n";
        let tick = 1_000_000 / hz;
        assert_eq!(machine_cpu_us(stat), Some((167 * tick, 1007 * tick)));
        assert_eq!(machine_cpu_us("cpu0 1 2 3 4 5\n"), None);
        assert_eq!(machine_cpu_us("cpu  1 x 3 4 5\n"), None);
    }

    #[test]
    fn windows_compare_early_and_late_throughput() {
        // 1,000 per second for 100 s, then 500 per second.
        let samples: Vec<(f64, u64)> =
            (0..=300).map(|t| (t as f64, if t <= 100 { 1000 * t } else { 100_000 + 500 * (t - 100) })).collect();
        let (first, last) = windows(&samples, 200_000);
        assert!((first.unwrap() - 1000.0).abs() < 1e-6, "{first:?}");
        assert!((last.unwrap() - 500.0).abs() < 1e-6, "{last:?}");
        // Window ends between samples are interpolated.
        let sparse: Vec<(f64, u64)> = (0..=50).map(|i| (7.0 * i as f64, 5600 * i)).collect();
        let (first, last) = windows(&sparse, 250_000);
        assert!((first.unwrap() - 800.0).abs() < 1e-6 && (last.unwrap() - 800.0).abs() < 1e-6, "{first:?} {last:?}");
        assert_eq!(windows(&samples, 2 * WINDOW - 1), (None, None));
        assert_eq!(time_at(&samples, 2_000_000), None);
    }

    #[test]
    fn modes_parse_by_name() {
        for m in Mode::ALL {
            assert_eq!(Mode::parse(m.name()).unwrap(), m);
        }
        assert!(Mode::parse("fast").is_err());
    }

    #[test]
    fn outputs_name_every_result() {
        let results = vec![
            result(Mode::Tandem, 1, 50.0, 4.0),
            result(Mode::Bare2pc, 1, 100.0, 2.0),
            result(Mode::Tandem, 16, 400.0, 8.0),
            result(Mode::Bare2pc, 16, 500.0, 6.0),
        ];
        let table = table(&results);
        assert!(table.contains("50%") && table.contains("80%"), "{table}");
        let json: serde_json::Value = serde_json::from_str(&json(&results)).unwrap();
        assert_eq!(json["results"][0]["mode"], "tandem");
        assert_eq!(json["results"][1]["mode"], "bare_2pc");
        // Every mode is written as it is named on the command line.
        for mode in Mode::ALL {
            assert_eq!(serde_json::to_value(mode).unwrap(), mode.name(), "{mode:?}");
        }
        assert_eq!(json["results"][3]["concurrency"], 16);
        assert!(json["results"][1]["p999_ms"].as_f64().is_some());
        let svg = svg(&results);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 4);
    }
}
