//! The bank workload: concurrent transfers between accounts in different
//! participants.
//!
//! Every participant database holds `balances(id, balance)` with the same
//! accounts and `tandem_markers(op)`. A transfer takes `amount` from an
//! account in one participant and gives it to an account in another; both
//! branches insert the transfer's `op` into their markers. Its idempotency
//! key is `op` too, so the client's retries never apply it twice.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use tokio::sync::mpsc;

use super::OUTCOMES_FILE;
use super::Outcome;
use super::Rng;
use crate::client::Client;
use crate::config::ParticipantConfig;
use crate::error::Error;
use crate::error::Result;
use crate::proto as pb;
use crate::server::now_unix_ms;

pub struct BankConfig {
    pub nodes: Vec<String>,
    pub participants: Vec<ParticipantConfig>,
    pub accounts: i64,
    pub opening: i64,
    pub workers: usize,
    pub duration: Duration,
    pub seed: u64,
    /// Where `outcomes.jsonl` is written.
    pub out: PathBuf,
    /// Each transaction's deadline.
    pub timeout_ms: u32,
}

/// A plain connection to a participant's database.
pub async fn connect(p: &ParticipantConfig) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(&p.url, tokio_postgres::NoTls)
        .await
        .map_err(|e| Error::Unavailable { message: format!("participant {}: {e}", p.name), leader: None })?;
    tokio::spawn(connection);
    Ok(client)
}

fn pg(p: &ParticipantConfig) -> impl Fn(tokio_postgres::Error) -> Error + '_ {
    move |e| crate::participant::postgres::pg_error(&p.name, e)
}

/// (Re)creates the tables in every participant: `accounts` accounts of
/// `opening` each, no markers.
pub async fn setup(participants: &[ParticipantConfig], accounts: i64, opening: i64) -> Result<()> {
    for p in participants {
        let c = connect(p).await?;
        c.batch_execute(&format!(
            "DROP TABLE IF EXISTS balances, tandem_markers;
             CREATE TABLE balances (id bigint PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));
             CREATE TABLE tandem_markers (op text PRIMARY KEY);
             INSERT INTO balances SELECT g, {opening} FROM generate_series(1, {accounts}) g;"
        ))
        .await
        .map_err(pg(p))?;
    }
    Ok(())
}

fn int(i: i64) -> pb::Value {
    pb::Value { kind: Some(pb::value::Kind::Int64(i)) }
}

fn transfer(op: &str, from: &str, to: &str, a: i64, b: i64, amount: i64, timeout_ms: u32) -> pb::TransactRequest {
    let marker = || pb::Statement {
        sql: "INSERT INTO tandem_markers (op) VALUES ($1)".into(),
        params: vec![pb::Value { kind: Some(pb::value::Kind::String(op.into())) }],
    };
    let change = |sign: &str, id: i64| pb::Statement {
        sql: format!("UPDATE balances SET balance = balance {sign} $1 WHERE id = $2"),
        params: vec![int(amount), int(id)],
    };
    pb::TransactRequest {
        branches: vec![
            pb::BranchRequest { participant: from.into(), statements: vec![change("-", a), marker()] },
            pb::BranchRequest { participant: to.into(), statements: vec![change("+", b), marker()] },
        ],
        timeout_ms,
        idempotency_key: op.into(),
        labels: [("workload".to_string(), "bank".to_string())].into(),
    }
}

/// Counts so far, for progress lines.
#[derive(Default)]
struct Counts {
    committed: AtomicU64,
    aborted: AtomicU64,
    unknown: AtomicU64,
}

/// Runs the workload for its duration; writes every outcome to
/// `out/outcomes.jsonl` and returns (committed, aborted, unknown).
pub async fn run(cfg: BankConfig) -> Result<(u64, u64, u64)> {
    if cfg.participants.len() < 2 {
        return Err(Error::InvalidInput("the bank needs at least two participants".into()));
    }
    if cfg.accounts < 1 || cfg.workers == 0 {
        return Err(Error::InvalidInput("the bank needs at least one account and one worker".into()));
    }
    std::fs::create_dir_all(&cfg.out)?;
    let mut file = std::io::BufWriter::new(std::fs::File::create(cfg.out.join(OUTCOMES_FILE))?);
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let counts = Arc::new(Counts::default());
    let deadline = Instant::now() + cfg.duration;
    let names: Vec<String> = cfg.participants.iter().map(|p| p.name.clone()).collect();
    let mut workers = Vec::new();
    for w in 0..cfg.workers {
        let (tx, names, nodes, counts) = (tx.clone(), names.clone(), cfg.nodes.clone(), counts.clone());
        let (seed, accounts, opening, timeout_ms) = (cfg.seed, cfg.accounts, cfg.opening, cfg.timeout_ms);
        workers.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(w as u64));
            let mut client = Client::new(&nodes)?;
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let from = rng.below(names.len() as u64) as usize;
                let to = (from + 1 + rng.below(names.len() as u64 - 1) as usize) % names.len();
                let (a, b) = (1 + rng.below(accounts as u64) as i64, 1 + rng.below(accounts as u64) as i64);
                let amount = 1 + rng.below((opening / 4).max(1) as u64) as i64;
                let op = format!("s{seed}w{w}i{i}");
                let request = transfer(&op, &names[from], &names[to], a, b, amount, timeout_ms);
                let start = now_unix_ms();
                let (outcome, txid, reason) = match client.transact(request).await {
                    Ok(r) if r.outcome == pb::Outcome::Committed as i32 => ("committed", r.txid, String::new()),
                    Ok(r) => ("aborted", r.txid, r.reason),
                    Err(e) => ("unknown", String::new(), e.to_string()),
                };
                match outcome {
                    "committed" => counts.committed.fetch_add(1, Ordering::Relaxed),
                    "aborted" => counts.aborted.fetch_add(1, Ordering::Relaxed),
                    _ => counts.unknown.fetch_add(1, Ordering::Relaxed),
                };
                let o = Outcome {
                    op,
                    from: names[from].clone(),
                    to: names[to].clone(),
                    amount,
                    outcome: outcome.into(),
                    txid,
                    start_unix_ms: start,
                    end_unix_ms: now_unix_ms(),
                    reason,
                };
                if tx.send(o).is_err() {
                    break;
                }
            }
            Ok::<_, Error>(())
        }));
    }
    drop(tx);
    let progress = {
        let counts = counts.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                eprintln!(
                    "bank: {} committed, {} aborted, {} unknown",
                    counts.committed.load(Ordering::Relaxed),
                    counts.aborted.load(Ordering::Relaxed),
                    counts.unknown.load(Ordering::Relaxed)
                );
            }
        })
    };
    while let Some(o) = rx.recv().await {
        serde_json::to_writer(&mut file, &o).map_err(Error::internal)?;
        file.write_all(b"\n")?;
    }
    file.flush()?;
    progress.abort();
    for w in workers {
        w.await.map_err(Error::internal)??;
    }
    Ok((
        counts.committed.load(Ordering::Relaxed),
        counts.aborted.load(Ordering::Relaxed),
        counts.unknown.load(Ordering::Relaxed),
    ))
}
