//! The crash matrix: the leader killed at each step of a commit, under the
//! bank workload, each time checked by the same checker as the chaos run
//! (`tandem::workload::check`).
//!
//! `CRASH_MATRIX_REPS` (default 1) sets the repetitions per point; the full
//! matrix is `CRASH_MATRIX_REPS=20 cargo test --features failpoints --test
//! crash_matrix -- --nocapture`.

mod common;

use std::time::Duration;

use common::bank::Bank;
use tandem::config::ParticipantConfig;
use tandem::config::ParticipantKind;
use tandem::workload::bank;
use tandem::workload::check;

/// Every step of a commit where a kill can land.
const POINTS: [&str; 8] = [
    "coordinator::before_prepare",
    "coordinator::after_prepare",
    "coordinator::before_commit_decision",
    "coordinator::after_commit_proposed",
    "coordinator::after_commit_decision",
    "coordinator::before_commit_prepared",
    "coordinator::after_commit_prepared",
    "server::before_transact_answer",
];
const ACCOUNTS: i64 = 10;
const OPENING: i64 = 1000;

fn participants(bank: &Bank) -> Vec<ParticipantConfig> {
    [("accounts_a", &bank.a), ("accounts_b", &bank.b)]
        .map(|(name, pg)| ParticipantConfig {
            name: name.into(),
            kind: ParticipantKind::Postgres,
            url: pg.url("accounts"),
            pool_size: 8,
        })
        .to_vec()
}

fn check_config(bank: &Bank, out: &std::path::Path) -> check::CheckConfig {
    check::CheckConfig {
        nodes: bank.cluster.addrs(),
        participants: participants(bank),
        accounts: ACCOUNTS,
        opening: OPENING,
        out: out.to_path_buf(),
        events: None,
        gid_prefix: tandem::txn::gid::Gid::cluster_prefix("test"),
        settle: common::WAIT,
    }
}

/// Runs the bank for `seconds` with a fixed seed, writing to `out`.
fn workload(bank: &Bank, out: &std::path::Path, seed: u64, seconds: u64) -> tokio::task::JoinHandle<(u64, u64, u64)> {
    let cfg = bank::BankConfig {
        nodes: bank.cluster.addrs(),
        participants: participants(bank),
        accounts: ACCOUNTS,
        opening: OPENING,
        workers: 4,
        duration: Duration::from_secs(seconds),
        seed,
        out: out.to_path_buf(),
        timeout_ms: 5000,
    };
    tokio::spawn(async move { bank::run(cfg).await.unwrap() })
}

/// Arms `point` to abort the leader's process; returns the leader. A node
/// just restarted may not take the call yet: try again. The point may fire
/// before the call is answered: then the leader is gone already.
async fn arm_on_leader(bank: &mut Bank, point: &str) -> u64 {
    let mut tries = 0;
    loop {
        let leader = bank.cluster.leader().await;
        match bank.cluster.pinned(leader).set_fail_point(point, "1*return(abort)").await {
            Ok(()) => return leader,
            Err(_)
                if {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    bank.cluster.has_exited(leader)
                } =>
            {
                return leader;
            }
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("arming {point} on node {leader}: {e}; again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("arming {point}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_at_every_step_passes_the_checker() {
    let reps: u64 = std::env::var("CRASH_MATRIX_REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(1);
    let only = std::env::var("CRASH_MATRIX_POINT").ok();
    let mut bank = Bank::start_with(1_000).await;
    let dir = tempfile::tempdir().unwrap();
    let mut run = 0;
    for point in POINTS.into_iter().filter(|p| only.as_deref().is_none_or(|o| p.contains(o))) {
        for rep in 0..reps {
            run += 1;
            bank::setup(&participants(&bank), ACCOUNTS, OPENING).await.unwrap();
            let out = dir.path().join(format!("run{run}"));
            let running = workload(&bank, &out, run, 6);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let leader = arm_on_leader(&mut bank, point).await;
            bank.cluster.wait_exit(leader).await;
            bank.cluster.start_node(leader);
            bank.cluster.wait_answering(leader).await;
            let (committed, aborted, unknown) = running.await.unwrap();
            let report = check::check(&check_config(&bank, &out)).await.unwrap();
            eprintln!(
                "{point} #{rep}: {committed} committed, {aborted} aborted, {unknown} unknown; in doubt settled in {:?} ms",
                report.in_doubt_resolution_ms
            );
            if !report.violations.is_empty() {
                let logs: Vec<String> = (1..=3).map(|id| bank.cluster.log_tail(id)).collect();
                panic!("{point} #{rep}:\n{}\nlogs:\n{}", report.summary(), logs.join("\n---\n"));
            }
            assert!(committed > 0, "{point} #{rep}: nothing committed");
        }
    }
}

/// The checker is not a rubber stamp: a marker removed by hand is an
/// atomicity violation and a lost acknowledgement, a balance changed by
/// hand breaks conservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_finds_broken_invariants() {
    let bank = Bank::start_with(1_000).await;
    bank::setup(&participants(&bank), ACCOUNTS, OPENING).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (committed, _, _) = workload(&bank, dir.path(), 1, 2).await.unwrap();
    assert!(committed > 0);
    let report = check::check(&check_config(&bank, dir.path())).await.unwrap();
    assert!(report.violations.is_empty(), "{}", report.summary());

    let a = bank.a.client("accounts").await;
    a.batch_execute("DELETE FROM tandem_markers WHERE op IN (SELECT op FROM tandem_markers LIMIT 1)").await.unwrap();
    a.batch_execute("UPDATE balances SET balance = balance + 1 WHERE id = 1").await.unwrap();
    let report = check::check(&check_config(&bank, dir.path())).await.unwrap();
    let text = report.violations.join("\n");
    assert!(text.contains("atomicity") && text.contains("conservation"), "{text}");
}
