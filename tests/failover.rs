//! Faults at exact moments of a commit, reached with fail points (the test
//! build has them): the leader killed at each step, a participant restarted
//! with branches prepared, a branch rolled back by hand after COMMIT.

mod common;

use std::time::Duration;
use std::time::Instant;

use common::WAIT;
use common::bank::ACCOUNTS;
use common::bank::Bank;
use common::bank::OPENING;
use common::bank::balance;
use common::bank::prepared_gids;
use common::bank::transfer;
use tandem::proto as pb;
use tandem::txn::TxId;

/// Kills the leader at each fail point in turn, in the middle of one keyed
/// transfer, and checks that the new leader settles it all-or-nothing, and
/// that retrying the request never applies it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_at_each_step_of_a_commit() {
    let mut bank = Bank::start_with(1_000).await;
    // Acknowledged transfers before any fault must survive all of them.
    let mut client = bank.cluster.client();
    for i in 1..=3 {
        let r = client.transact(transfer(i, i, 1)).await.unwrap();
        assert_eq!(r.outcome, pb::Outcome::Committed as i32, "{r:?}");
    }
    // (fail point, whether the transfer is decided COMMIT when it is hit)
    let cases = [
        ("coordinator::after_prepare", false),
        ("coordinator::after_commit_decision", true),
        ("coordinator::after_commit_prepared", true),
        ("server::before_transact_answer", true),
    ];
    for (n, (point, committed)) in cases.into_iter().enumerate() {
        let (from, to) = (4 + n as i64, 4 + n as i64);
        let leader = bank.cluster.leader().await;
        bank.cluster.pinned(leader).set_fail_point(point, "1*return(abort)").await.unwrap();
        let mut request = transfer(from, to, 7);
        request.idempotency_key = format!("kill-{n}");
        // To the leader alone: the answer is lost with it.
        let first = bank.cluster.pinned(leader).transact(request.clone()).await;
        assert!(first.is_err(), "{point}: the leader answered {first:?}");
        bank.cluster.wait_exit(leader).await;
        let new_leader = bank.cluster.leader().await;
        assert_ne!(leader, new_leader);

        // The new leader's recovery settles the branches the old one left.
        bank.no_prepared_left().await;
        let moved = if committed { 7 } else { 0 };
        wait_balances(&bank, from, OPENING - moved, to, OPENING + moved, point).await;

        // The client's retry with the same key: applied once in all.
        let again = client.transact(request).await.unwrap();
        assert_eq!(again.outcome, pb::Outcome::Committed as i32, "{point}: {again:?}");
        assert_eq!(again.duplicate, committed, "{point}: {again:?}");
        wait_balances(&bank, from, OPENING - 7, to, OPENING + 7, point).await;
        let record = client.get_transaction(&TxId::parse(&again.txid).unwrap()).await.unwrap();
        assert!(
            [pb::TransactionState::Committed as i32, pb::TransactionState::Committing as i32].contains(&record.state),
            "{point}: {record:?}"
        );

        bank.cluster.start_node(leader);
        bank.cluster.wait_converged(&[1, 2, 3]).await;
    }
    bank.no_prepared_left().await;
    let (a, b) = (Bank::total(&bank.a).await, Bank::total(&bank.b).await);
    assert_eq!(a + b, 2 * ACCOUNTS * OPENING);
    assert_eq!(a, ACCOUNTS * OPENING - 3 - 4 * 7);
}

/// Waits until account `from` in accounts_a and `to` in accounts_b hold
/// the balances given (COMMIT PREPARED may still be under way).
async fn wait_balances(bank: &Bank, from: i64, a: i64, to: i64, b: i64, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (now_a, now_b) = (balance(&bank.a, from).await, balance(&bank.b, to).await);
        if (now_a, now_b) == (a, b) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: balances {now_a}/{now_b}, expected {a}/{b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until each database holds `n` prepared branches.
async fn wait_prepared(bank: &Bank, n: usize) -> (Vec<String>, Vec<String>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (a, b) = (prepared_gids(&bank.a).await, prepared_gids(&bank.b).await);
        if a.len() == n && b.len() == n {
            return (a, b);
        }
        assert!(Instant::now() < deadline, "prepared branches: {a:?} {b:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Transfer = tokio::task::JoinHandle<tandem::error::Result<pb::TransactResponse>>;

/// A bank with one transfer of 10 (account `from` in accounts_a to `to` in
/// accounts_b) held between its COMMIT decision and COMMIT PREPARED (4 s),
/// both branches prepared. Returns the bank, the leader, the running
/// transfer and accounts_b's prepared gids.
async fn held_after_commit_decision(from: i64, to: i64) -> (Bank, u64, Transfer, Vec<String>) {
    let bank = Bank::start_with(1_000).await;
    let leader = bank.cluster.leader().await;
    bank.cluster
        .pinned(leader)
        .set_fail_point("coordinator::before_commit_prepared", "1*return(sleep 4000)")
        .await
        .unwrap();
    let mut client = bank.cluster.client();
    let running = tokio::spawn(async move { client.transact(transfer(from, to, 10)).await });
    let (_, b) = wait_prepared(&bank, 1).await;
    (bank, leader, running, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_restarted_with_branches_prepared() {
    let (bank, _, running, _) = held_after_commit_decision(1, 2).await;
    // A crash as far as PostgreSQL knows; prepared branches survive it, the
    // coordinator's connections do not.
    bank.b.restart_immediate();
    let r = running.await.unwrap().unwrap();
    assert_eq!(r.outcome, pb::Outcome::Committed as i32, "{r:?}");
    bank.no_prepared_left().await;
    wait_balances(&bank, 1, OPENING - 10, 2, OPENING + 10, "after the restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_rolled_back_by_hand_after_commit_is_a_heuristic_outcome() {
    let (bank, leader, running, b) = held_after_commit_decision(3, 4).await;
    // An operator ends accounts_b's branch against the decision.
    bank.b.client("accounts").await.batch_execute(&format!("ROLLBACK PREPARED '{}'", b[0])).await.unwrap();

    let r = running.await.unwrap().unwrap();
    assert_eq!(r.outcome, pb::Outcome::Committed as i32, "{r:?}");
    assert_eq!(r.heuristic, vec!["accounts_b".to_string()], "{r:?}");
    bank.cluster.wait_log(leader, "HEURISTIC OUTCOME").await;
    assert_eq!(balance(&bank.a, 3).await, OPENING - 10);
    assert_eq!(balance(&bank.b, 4).await, OPENING);

    // The record keeps it once the transaction is complete.
    let txid = TxId::parse(&r.txid).unwrap();
    let mut client = bank.cluster.client();
    let deadline = Instant::now() + WAIT;
    let t = loop {
        let t = client.get_transaction(&txid).await.unwrap();
        if t.completed_unix_ms.is_some() {
            break t;
        }
        assert!(Instant::now() < deadline, "{t:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(t.heuristic, vec!["accounts_b".to_string()], "{t:?}");
    let b_state = t.branches.iter().find(|b| b.participant == "accounts_b").unwrap();
    assert_eq!(b_state.state, "heuristic(rolled-back)", "{t:?}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["txn", "get", txid.as_str(), "--nodes", &bank.cluster.addrs().join(",")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("HEURISTIC") && stdout.contains("accounts_b"), "{stdout}");
}
