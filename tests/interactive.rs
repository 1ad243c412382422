//! Interactive transactions (`Begin`/`Execute`/`Commit`/`Rollback`) across
//! two PostgreSQL databases, and the limits on transactions in flight.

mod common;

use std::time::Duration;

use common::bank::ACCOUNTS;
use common::bank::Bank;
use common::bank::OPENING;
use common::bank::balance;
use common::bank::int;
use common::bank::stmt;
use tandem::error::Error;
use tandem::proto as pb;

fn begin(timeout_ms: u32) -> pb::BeginRequest {
    let labels = [("order".to_string(), "o-1".to_string())].into();
    pb::BeginRequest { timeout_ms, labels, ..Default::default() }
}

fn debit(amount: i64, id: i64) -> pb::Statement {
    stmt("UPDATE balances SET balance = balance - $1 WHERE id = $2", vec![int(amount), int(id)])
}

fn credit(amount: i64, id: i64) -> pb::Statement {
    stmt("UPDATE balances SET balance = balance + $1 WHERE id = $2", vec![int(amount), int(id)])
}

/// Whether an UPDATE of account `id` gets its row lock within a few
/// seconds: no transaction left holding it.
async fn row_free(pg: &common::postgres::PgServer, id: i64) -> bool {
    let c = pg.client("accounts").await;
    c.batch_execute("SET lock_timeout = '5s'").await.unwrap();
    c.execute("UPDATE balances SET balance = balance WHERE id = $1", &[&id]).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_modify_write_across_two_databases() {
    let bank = Bank::start().await;
    let mut client = bank.cluster.client();

    let txid = client.begin(begin(10_000)).await.unwrap();
    let read = stmt("SELECT balance FROM balances WHERE id = $1 FOR UPDATE", vec![int(1)]);
    let row = client.execute(&txid, "accounts_a", read).await.unwrap();
    assert_eq!(row.columns, vec!["balance".to_string()]);
    let Some(pb::value::Kind::Int64(before)) = row.rows[0].values[0].kind else { panic!("{row:?}") };
    // Move half of what account 1 holds.
    let half = before / 2;
    let set = stmt("UPDATE balances SET balance = $1 WHERE id = $2", vec![int(before - half), int(1)]);
    assert_eq!(client.execute(&txid, "accounts_a", set).await.unwrap().rows_affected, 1);
    assert_eq!(client.execute(&txid, "accounts_b", credit(half, 1)).await.unwrap().rows_affected, 1);

    // Bad input leaves the transaction open and unchanged.
    for (participant, statement, what) in [
        ("accounts_a", stmt("COMMIT", vec![]), "transaction control"),
        ("nowhere", credit(1, 1), "unknown participant"),
    ] {
        let e = client.execute(&txid, participant, statement).await.expect_err(what);
        assert!(matches!(e, Error::InvalidInput(_)), "{what}: {e:?}");
    }

    let t = client.get_transaction(&txid).await.unwrap();
    assert_eq!(t.state, pb::TransactionState::Active as i32, "{t:?}");
    assert!(t.interactive && t.labels["order"] == "o-1", "{t:?}");
    assert_eq!(t.branches.iter().map(|b| b.participant.as_str()).collect::<Vec<_>>(), ["accounts_a", "accounts_b"]);

    let r = client.commit(&txid).await.unwrap();
    assert_eq!(r.outcome, pb::Outcome::Committed as i32, "{r:?}");
    let first = txid.clone();
    assert_eq!(balance(&bank.a, 1).await, OPENING - half);
    assert_eq!(balance(&bank.b, 1).await, OPENING + half);
    // A repeated commit answers the same; the transaction takes no more.
    assert_eq!(client.commit(&txid).await.unwrap().outcome, pb::Outcome::Committed as i32);
    let e = client.execute(&txid, "accounts_a", debit(1, 1)).await.expect_err("after commit");
    assert!(matches!(&e, Error::FailedPrecondition(m) if m.contains("committed")), "{e:?}");
    let t = client.get_transaction(&txid).await.unwrap();
    assert!(t.decided_unix_ms.is_some() && t.labels["order"] == "o-1", "{t:?}");

    // A failing statement rolls the whole transaction back.
    let txid = client.begin(begin(10_000)).await.unwrap();
    client.execute(&txid, "accounts_b", credit(5, 2)).await.unwrap();
    let e = client.execute(&txid, "accounts_a", debit(1_000, 2)).await.expect_err("overdraw");
    assert!(e.to_string().contains("rolled back") && e.to_string().contains("balances_balance_check"), "{e}");
    let r = client.commit(&txid).await.unwrap();
    assert_eq!(r.outcome, pb::Outcome::Aborted as i32, "{r:?}");
    assert_eq!(balance(&bank.b, 2).await, OPENING);

    // A parameter of the wrong type: INVALID_ARGUMENT, rolled back; a long
    // error message still makes a valid ABORT.
    let txid = client.begin(begin(10_000)).await.unwrap();
    let long = pb::Value { kind: Some(pb::value::Kind::String("x".repeat(5000))) };
    let bad = stmt("UPDATE balances SET balance = $1 WHERE id = 2", vec![long]);
    let e = client.execute(&txid, "accounts_a", bad).await.expect_err("wrong type");
    assert!(matches!(&e, Error::InvalidInput(m) if m.contains("rolled back")), "{e:?}");
    let r = client.commit(&txid).await.unwrap();
    assert_eq!(r.outcome, pb::Outcome::Aborted as i32, "{r:?}");

    // Rollback.
    let txid = client.begin(begin(10_000)).await.unwrap();
    client.execute(&txid, "accounts_a", debit(5, 3)).await.unwrap();
    client.rollback(&txid).await.unwrap();
    assert_eq!(balance(&bank.a, 3).await, OPENING);
    assert!(row_free(&bank.a, 3).await);
    let t = client.get_transaction(&txid).await.unwrap();
    assert_eq!(t.state, pb::TransactionState::Aborted as i32, "{t:?}");

    // Listed by state: the committed one is there once phase 2 is complete.
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let committed = client.list_transactions(pb::TransactionState::Committed, None, 100).await.unwrap();
        assert!(committed.iter().all(|t| t.state == pb::TransactionState::Committed as i32), "{committed:?}");
        if committed.iter().any(|t| t.txid == first.as_str()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{first} not listed: {committed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(Bank::total(&bank.a).await + Bank::total(&bank.b).await, 2 * ACCOUNTS * OPENING);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_idle_past_its_deadline_is_rolled_back() {
    let bank = Bank::start().await;
    let mut client = bank.cluster.client();
    let txid = client.begin(begin(1_500)).await.unwrap();
    client.execute(&txid, "accounts_a", debit(10, 4)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The reaper rolled it back and released its row lock.
    assert!(row_free(&bank.a, 4).await);
    let e = client.execute(&txid, "accounts_b", credit(10, 4)).await.expect_err("after the deadline");
    assert!(matches!(&e, Error::FailedPrecondition(m) if m.contains("deadline")), "{e:?}");
    let t = client.get_transaction(&txid).await.unwrap();
    assert_eq!(t.state, pb::TransactionState::Aborted as i32, "{t:?}");
    assert!(t.reason.contains("deadline"), "{t:?}");
    assert_eq!(client.commit(&txid).await.unwrap().outcome, pb::Outcome::Aborted as i32);
    assert_eq!(balance(&bank.a, 4).await, OPENING);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_change_aborts_an_open_transaction() {
    let mut bank = Bank::start().await;
    let mut client = bank.cluster.client();
    let txid = client.begin(begin(60_000)).await.unwrap();
    client.execute(&txid, "accounts_a", debit(10, 5)).await.unwrap();
    client.execute(&txid, "accounts_b", credit(10, 5)).await.unwrap();
    let leader = bank.cluster.leader().await;
    bank.cluster.kill(leader);
    let new_leader = bank.cluster.leader().await;
    assert_ne!(leader, new_leader);

    let e = client.execute(&txid, "accounts_a", debit(1, 5)).await.expect_err("on the new leader");
    assert!(matches!(&e, Error::FailedPrecondition(m) if m.contains("not open on the leader")), "{e:?}");
    let r = client.commit(&txid).await.unwrap();
    assert_eq!(r.outcome, pb::Outcome::Aborted as i32, "{r:?}");
    // The killed leader's connections closed: nothing applied, nothing held.
    assert!(row_free(&bank.a, 5).await && row_free(&bank.b, 5).await);
    assert_eq!((balance(&bank.a, 5).await, balance(&bank.b, 5).await), (OPENING, OPENING));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_with_a_message_naming_the_knob() {
    let bank = Bank::start_custom(
        1_000,
        "timeout_max_ms = 60000",
        "[limits]\ntransactions_in_flight_max = 2\nbranches_per_transaction_max = 1\nstatements_per_branch_max = 2\n",
    )
    .await;
    let mut client = bank.cluster.client();
    let first = client.begin(begin(60_000)).await.unwrap();
    let second = client.begin(begin(60_000)).await.unwrap();
    let e = client.begin(begin(30_000)).await.expect_err("a third");
    assert!(matches!(&e, Error::ResourceExhausted(m) if m.contains("transactions_in_flight_max")), "{e:?}");

    client.execute(&first, "accounts_a", debit(1, 6)).await.unwrap();
    let e = client.execute(&first, "accounts_b", credit(1, 6)).await.expect_err("a second branch");
    assert!(matches!(&e, Error::InvalidInput(m) if m.contains("branches_per_transaction_max")), "{e:?}");
    client.execute(&first, "accounts_a", debit(1, 6)).await.unwrap();
    let e = client.execute(&first, "accounts_a", debit(1, 6)).await.expect_err("a third statement");
    assert!(matches!(&e, Error::InvalidInput(m) if m.contains("statements_per_branch_max")), "{e:?}");
    let e = client.begin(begin(120_000)).await.expect_err("a long timeout");
    assert!(matches!(&e, Error::InvalidInput(m) if m.contains("timeout_max_ms")), "{e:?}");

    // Refused requests left nothing half-done: the open ones still commit.
    client.rollback(&second).await.unwrap();
    assert_eq!(client.commit(&first).await.unwrap().outcome, pb::Outcome::Committed as i32);
    assert_eq!(balance(&bank.a, 6).await, OPENING - 2);

    let leader = bank.cluster.leader().await;
    let status = bank.cluster.status(leader).await.unwrap();
    assert!(status.counters["rejected_in_flight_limit"] >= 1, "{:?}", status.counters);
    assert!(status.counters["transactions_committed"] >= 1, "{:?}", status.counters);
}
