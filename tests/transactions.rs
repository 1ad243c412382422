//! Atomic transactions across two PostgreSQL databases through a real
//! three-node cluster.

mod common;

use common::bank::ACCOUNTS;
use common::bank::Bank;
use common::bank::OPENING;
use common::bank::int;
use common::bank::stmt;
use common::bank::transfer;
use tandem::proto as pb;
use tandem::proto::transactions_client::TransactionsClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_commit_on_both_or_abort_on_both() {
    let bank = Bank::start().await;
    let mut client = bank.client(2).await; // a follower forwards to the leader

    let r = client.transact(transfer(1, 1, 30)).await.unwrap().into_inner();
    assert_eq!(r.outcome, pb::Outcome::Committed as i32, "{r:?}");
    assert_eq!(r.branches[0].results[0].rows_affected, 1);
    assert_eq!(r.branches[1].results[0].rows[0].values[0], int(OPENING + 30));
    assert!(r.pending.is_empty() && r.heuristic.is_empty());
    assert_eq!(Bank::total(&bank.a).await, ACCOUNTS * OPENING - 30);
    assert_eq!(Bank::total(&bank.b).await, ACCOUNTS * OPENING + 30);

    // Overdraw in accounts_a: the CHECK fails, both sides abort.
    let r = client.transact(transfer(2, 2, 1000)).await.unwrap().into_inner();
    assert_eq!(r.outcome, pb::Outcome::Aborted as i32, "{r:?}");
    assert!(r.reason.contains("balances_balance_check"), "{}", r.reason);
    assert_eq!(Bank::total(&bank.a).await, ACCOUNTS * OPENING - 30);
    assert_eq!(Bank::total(&bank.b).await, ACCOUNTS * OPENING + 30);
    bank.no_prepared_left().await;

    // Retrying with an idempotency key never applies a transfer twice.
    let mut keyed = transfer(3, 3, 5);
    keyed.idempotency_key = "order-77".into();
    let first = client.transact(keyed.clone()).await.unwrap().into_inner();
    assert_eq!(first.outcome, pb::Outcome::Committed as i32);
    let again = client.transact(keyed).await.unwrap().into_inner();
    assert_eq!(again.outcome, pb::Outcome::Committed as i32, "{again:?}");
    assert!(again.duplicate && again.txid == first.txid && again.branches.is_empty(), "{again:?}");
    assert_eq!(Bank::total(&bank.a).await, ACCOUNTS * OPENING - 35);
    bank.no_prepared_left().await;

    // The same through the CLI, options paired by their order.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["txn", "transact", "--nodes", &bank.cluster.addrs().join(",")])
        .args(["--participant", "accounts_a", "--sql", "UPDATE balances SET balance = balance - $1 WHERE id = $2"])
        .args(["--param", "int:4", "--param", "int:5"])
        .args([
            "--participant",
            "accounts_b",
            "--sql",
            "UPDATE balances SET balance = balance + $1 WHERE id = $2 RETURNING id, balance",
        ])
        .args(["--param", "int:4", "--param", "int:5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("COMMITTED"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("5 | 104"), "{stdout}");
    assert_eq!(Bank::total(&bank.a).await, ACCOUNTS * OPENING - 39);

    // Bad input: INVALID_ARGUMENT, nothing changes.
    let mut unknown = transfer(1, 1, 1);
    unknown.branches[1].participant = "nowhere".into();
    let mut control = transfer(1, 1, 1);
    control.branches[0].statements.push(stmt("COMMIT", vec![]));
    let mut wrong_type = transfer(1, 1, 1);
    wrong_type.branches[1].statements[0].params[0] = pb::Value { kind: Some(pb::value::Kind::String("ten".into())) };
    let mut empty_branch = transfer(1, 1, 1);
    empty_branch.branches[1].statements.clear();
    let mut too_big = transfer(1, 1, 1);
    too_big.branches[0].statements[0].sql.push_str(&" ".repeat(2 << 20));
    for (name, req) in [
        ("unknown participant", unknown),
        ("transaction control", control),
        ("wrong parameter type", wrong_type),
        ("empty branch", empty_branch),
        ("no branch", pb::TransactRequest::default()),
        ("over the size limit", too_big),
    ] {
        let status = client.transact(req).await.expect_err(name);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}: {status:?}");
    }
    assert_eq!(Bank::total(&bank.a).await, ACCOUNTS * OPENING - 39);
    assert_eq!(Bank::total(&bank.b).await, ACCOUNTS * OPENING + 39);
    bank.no_prepared_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_keep_the_total_exact() {
    let bank = Bank::start().await;
    let mut tasks = Vec::new();
    for i in 0..32i64 {
        let mut client = bank.client(1 + (i as u64 % 3)).await;
        tasks.push(tokio::spawn(async move {
            // Some overdraw and abort; accounts shared by a few transfers
            // serialise, and the deadline breaks cross-database deadlocks.
            let amount = if i % 5 == 0 { 500 } else { 1 + i % 7 };
            let r =
                client.transact(transfer(1 + i % ACCOUNTS, 1 + (i * 7) % ACCOUNTS, amount)).await.unwrap().into_inner();
            (r.outcome == pb::Outcome::Committed as i32, amount)
        }));
    }
    let mut moved = 0;
    let mut committed = 0;
    for t in tasks {
        let (ok, amount) = t.await.unwrap();
        if ok {
            moved += amount;
            committed += 1;
        }
    }
    assert!(committed > 0);
    assert_eq!(Bank::total(&bank.a).await, ACCOUNTS * OPENING - moved);
    assert_eq!(Bank::total(&bank.b).await, ACCOUNTS * OPENING + moved);
    assert_eq!(Bank::total(&bank.a).await + Bank::total(&bank.b).await, 2 * ACCOUNTS * OPENING);
    bank.no_prepared_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_settles_prepared_branches_by_the_log() {
    let bank = Bank::start_with(300).await;
    let (a, b) = (bank.a.client("accounts").await, bank.b.client("accounts").await);
    // An orphan: prepared with this cluster's prefix, no decision recorded.
    a.batch_execute("BEGIN; UPDATE balances SET balance = 0 WHERE id = 9; PREPARE TRANSACTION 'tdm_test_orphan1_0'")
        .await
        .unwrap();
    // Prepared on both sides with a COMMIT recorded, as if the leader died
    // between the decision and COMMIT PREPARED.
    a.batch_execute(
        "BEGIN; UPDATE balances SET balance = balance - 1 WHERE id = 10; PREPARE TRANSACTION 'tdm_test_decided1_0'",
    )
    .await
    .unwrap();
    b.batch_execute(
        "BEGIN; UPDATE balances SET balance = balance + 1 WHERE id = 10; PREPARE TRANSACTION 'tdm_test_decided1_1'",
    )
    .await
    .unwrap();
    let decided = tandem::txn::TxId::parse("decided1").unwrap();
    let commit = tandem::txn::Decision::Commit {
        branches: ["accounts_a", "accounts_b"].map(tandem::txn::Branch::new).to_vec(),
        idempotency_key: None,
    };
    let mut log = bank.cluster.client();
    log.decide(&decided, &commit).await.unwrap();
    // Another cluster's branch is none of our business.
    a.batch_execute("BEGIN; UPDATE balances SET balance = 7 WHERE id = 8; PREPARE TRANSACTION 'tdm_other_x1_0'")
        .await
        .unwrap();

    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let ours: i64 = a
            .query_one("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'tdm_test_%'", &[])
            .await
            .unwrap()
            .get(0);
        if ours + Bank::prepared(&bank.b).await == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "reconciliation left {ours} branches in accounts_a");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let get = |row: tokio_postgres::Row| row.get::<_, i64>(0);
    let q = "SELECT balance FROM balances WHERE id = $1";
    assert_eq!(get(a.query_one(q, &[&9i64]).await.unwrap()), OPENING, "the orphan was rolled back");
    assert_eq!(get(a.query_one(q, &[&10i64]).await.unwrap()), OPENING - 1, "the decided branch was committed");
    assert_eq!(get(b.query_one(q, &[&10i64]).await.unwrap()), OPENING + 1, "the decided branch was committed");
    let orphan = log.get_record(&tandem::txn::TxId::parse("orphan1").unwrap(), false).await.unwrap().unwrap();
    assert!(!orphan.decision.is_commit(), "ABORT is recorded for the orphan: {orphan:?}");
    // With every branch committed, the record is completed.
    let deadline = std::time::Instant::now() + common::WAIT;
    while log.get_record(&decided, false).await.unwrap().unwrap().completed_unix_ms.is_none() {
        assert!(std::time::Instant::now() < deadline, "decided1 never completed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The foreign branch is still there.
    let foreign: i64 =
        a.query_one("SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'tdm_other_x1_0'", &[]).await.unwrap().get(0);
    assert_eq!(foreign, 1);
    a.batch_execute("ROLLBACK PREPARED 'tdm_other_x1_0'").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_during_transfers_keeps_every_transfer_atomic() {
    let mut bank = Bank::start_with(500).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..6i64 {
        let stop = stop.clone();
        let addrs = bank.cluster.addrs();
        writers.push(tokio::spawn(async move {
            let (mut committed, mut unknown) = (0, 0);
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                // Any node; a dead one or a lost answer is an unknown outcome.
                let addr = &addrs[((w + i) as usize) % addrs.len()];
                let Ok(mut client) = TransactionsClient::connect(format!("http://{addr}")).await else {
                    // The killed node: nothing was sent.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                match client.transact(transfer(1 + (w + i) % ACCOUNTS, 1 + i % ACCOUNTS, 1)).await {
                    Ok(r) if r.get_ref().outcome == pb::Outcome::Committed as i32 => committed += 1,
                    Ok(_) => {}
                    Err(_) => {
                        unknown += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
            (committed, unknown)
        }));
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let leader = bank.cluster.leader().await;
    bank.cluster.kill(leader);
    let new_leader = bank.cluster.leader().await;
    assert_ne!(leader, new_leader);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut committed, mut unknown) = (0, 0);
    for w in writers {
        let (c, u) = w.await.unwrap();
        committed += c;
        unknown += u;
    }
    eprintln!("{committed} committed, {unknown} unknown");
    assert!(committed > 0);

    // The new leader's reconciliation settles whatever the old one left
    // prepared; then every transfer is on both sides or on neither.
    bank.no_prepared_left().await;
    let (a, b) = (Bank::total(&bank.a).await, Bank::total(&bank.b).await);
    assert_eq!(a + b, 2 * ACCOUNTS * OPENING, "a transfer landed on one side only: a={a} b={b}");
    let moved = ACCOUNTS * OPENING - a;
    assert!(moved >= committed, "acknowledged commits missing: moved {moved} < {committed} committed");
    assert!(moved <= committed + unknown, "moved {moved} > {committed} committed + {unknown} unknown");
}

/// The counters of node `id` once its counter `name` reaches `at_least`.
async fn counter_reaches(bank: &Bank, id: u64, name: &str, at_least: u64) -> std::collections::HashMap<String, u64> {
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let counters = bank.cluster.status(id).await.map(|s| s.counters).unwrap_or_default();
        if counters.get(name).copied().unwrap_or(0) >= at_least {
            return counters;
        }
        assert!(std::time::Instant::now() < deadline, "node {id}'s {name} stayed under {at_least}: {counters:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn incomplete_commits(bank: &Bank) -> usize {
    let open = bank.cluster.client().list_all_records(Some(tandem::txn::RecordState::Committed), false).await;
    open.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_completes_what_it_finds_many_records_to_an_entry() {
    use tandem::coordinator::recovery::COMPLETIONS_PER_ROUND;
    use tandem::txn::Branch;
    use tandem::txn::Decision;
    use tandem::txn::TxId;
    // Rounds only on leadership: each leader below runs exactly one, and the
    // first one's is over before anything is decided.
    let mut bank = Bank::start_with(3_600_000).await;
    let first = bank.cluster.leader().await;
    counter_reaches(&bank, first, "recovery_rounds", 1).await;
    let commit = |names: &[&str]| Decision::Commit {
        branches: names.iter().map(|n| Branch::new(*n)).collect(),
        idempotency_key: None,
    };
    let mut log = bank.cluster.client();
    // First in txid order, never complete: a participant no node has. It
    // does not count against a round's budget.
    log.decide(&TxId::parse("aaanowhere").unwrap(), &commit(&["nowhere"])).await.unwrap();
    // A branch still prepared: committed by the round, then completed.
    let a = bank.a.client("accounts").await;
    a.batch_execute(
        "BEGIN; UPDATE balances SET balance = balance - 5 WHERE id = 3; PREPARE TRANSACTION 'tdm_test_held1_0'",
    )
    .await
    .unwrap();
    log.decide(&TxId::parse("held1").unwrap(), &commit(&["accounts_a"])).await.unwrap();
    // COMMITs whose branches are no longer prepared, as if their driver
    // died between COMMIT PREPARED and COMPLETE: more than one round's worth.
    const LEFT_OVER: usize = 600;
    let records = COMPLETIONS_PER_ROUND - 1 + LEFT_OVER;
    let mut deciders = Vec::new();
    for w in 0..16 {
        let (mut log, commit) = (bank.cluster.client(), commit(&["accounts_a", "accounts_b"]));
        deciders.push(tokio::spawn(async move {
            for i in (w..records).step_by(16) {
                let (won, _) = log.decide(&TxId::parse(&format!("left{i}")).unwrap(), &commit).await.unwrap();
                assert!(won);
            }
        }));
    }
    for d in deciders {
        d.await.unwrap();
    }
    assert_eq!(incomplete_commits(&bank).await, records + 2);

    // The next leader's round completes its most, 512 to an entry: held1
    // and the first records left.
    bank.cluster.kill(first);
    let second = bank.cluster.leader().await;
    let counters = counter_reaches(&bank, second, "completions", COMPLETIONS_PER_ROUND as u64).await;
    assert_eq!(counters["completions"], COMPLETIONS_PER_ROUND as u64, "{counters:?}");
    assert_eq!(counters["completion_entries"], COMPLETIONS_PER_ROUND.div_ceil(512) as u64, "{counters:?}");
    assert_eq!(incomplete_commits(&bank).await, LEFT_OVER + 1);
    let balance: i64 = a.query_one("SELECT balance FROM balances WHERE id = 3", &[]).await.unwrap().get(0);
    assert_eq!(balance, OPENING - 5, "the prepared branch was committed");
    assert_eq!(Bank::prepared(&bank.a).await, 0);

    // The next round (on the next leader) completes the rest but the one
    // it cannot.
    bank.cluster.start_node(first);
    bank.cluster.wait_converged(&[1, 2, 3]).await;
    bank.cluster.kill(second);
    let third = bank.cluster.leader().await;
    let counters = counter_reaches(&bank, third, "completions", LEFT_OVER as u64).await;
    assert_eq!(counters["completion_entries"], LEFT_OVER.div_ceil(512) as u64, "{counters:?}");
    let open = bank.cluster.client().list_all_records(Some(tandem::txn::RecordState::Committed), false).await;
    let open: Vec<String> = open.unwrap().into_iter().map(|r| r.txid.to_string()).collect();
    assert_eq!(open, ["aaanowhere"]);
}
