//! The PostgreSQL participant against a real, throwaway PostgreSQL server.

mod common;

use common::postgres::PgServer;
use tandem::error::Error;
use tandem::participant::Participant;
use tandem::participant::Phase2;
use tandem::participant::Statement;
use tandem::participant::Value;
use tandem::participant::postgres::PostgresParticipant;
use tandem::txn::TxId;
use tandem::txn::gid::Gid;

const CLUSTER: &str = "test";

fn gid(txid: &str, branch: u32) -> Gid {
    Gid::new(CLUSTER, &TxId::parse(txid).unwrap(), branch)
}

fn stmt(sql: &str, params: Vec<Value>) -> Statement {
    Statement { sql: sql.into(), params }
}

async fn setup() -> (PgServer, PostgresParticipant) {
    let pg = PgServer::start(16);
    pg.create_database("accounts").await;
    pg.client("accounts")
        .await
        .batch_execute(
            "CREATE TABLE balances (id bigint PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));
             INSERT INTO balances SELECT g, 100 FROM generate_series(1, 10) g;
             CREATE TABLE events (id uuid PRIMARY KEY, at timestamptz, amount numeric(12,2), body jsonb, small int);",
        )
        .await
        .unwrap();
    let participant = PostgresParticipant::new("accounts_a", &pg.url("accounts"), 4).unwrap();
    participant.check().await.expect("max_prepared_transactions > 0");
    (pg, participant)
}

async fn balance(pg: &PgServer, id: i64) -> i64 {
    pg.client("accounts").await.query_one("SELECT balance FROM balances WHERE id = $1", &[&id]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_then_commit_prepared() {
    let (pg, p) = setup().await;
    let mut branch = p.begin().await.unwrap();
    let r = branch
        .execute(&stmt(
            "UPDATE balances SET balance = balance - $1 WHERE id = $2",
            vec![Value::Int64(30), Value::Int64(1)],
        ))
        .await
        .unwrap();
    assert_eq!(r.rows_affected, 1);
    let r =
        branch.execute(&stmt("SELECT id, balance FROM balances WHERE id = $1", vec![Value::Int64(1)])).await.unwrap();
    assert_eq!(r.columns, ["id", "balance"]);
    assert_eq!(r.rows, vec![vec![Value::Int64(1), Value::Int64(70)]]);

    let g = gid("t1", 0);
    let prepared = branch.prepare(&g).await.unwrap();
    assert!(prepared.xid.is_some());
    assert_eq!(p.prepared_branches(CLUSTER).await.unwrap(), vec![g.clone()]);
    // Prepared, not committed: invisible outside.
    assert_eq!(balance(&pg, 1).await, 100);

    assert_eq!(p.commit_prepared(&g).await.unwrap(), Phase2::Done);
    assert_eq!(balance(&pg, 1).await, 70);
    assert!(p.prepared_branches(CLUSTER).await.unwrap().is_empty());
    // Again: the gid is gone, and the branch is known to have committed.
    assert_eq!(p.commit_prepared(&g).await.unwrap(), Phase2::GidMissing);
    assert_eq!(p.branch_outcome(prepared.xid.unwrap()).await.unwrap(), Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_statement_leaves_nothing_prepared() {
    let (pg, p) = setup().await;
    let mut branch = p.begin().await.unwrap();
    // Violates the CHECK constraint: valid, but the data does not allow it.
    let err =
        branch.execute(&stmt("UPDATE balances SET balance = balance - 500 WHERE id = 2", vec![])).await.unwrap_err();
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains("balances_balance_check")), "{err:?}");
    let err = branch.prepare(&gid("t2", 0)).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_) | Error::FailedPrecondition(_)), "{err:?}");
    assert!(p.prepared_branches(CLUSTER).await.unwrap().is_empty());
    assert_eq!(balance(&pg, 2).await, 100);
}

/// BEGIN goes out pipelined with the first statement: that statement must
/// still run inside the transaction (a rollback undoes it), and a branch
/// with no statement still prepares a transaction of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_statement_runs_inside_the_transaction() {
    let (pg, p) = setup().await;
    let mut branch = p.begin().await.unwrap();
    branch.execute(&stmt("UPDATE balances SET balance = 7 WHERE id = 5", vec![])).await.unwrap();
    branch.rollback().await.unwrap();
    assert_eq!(balance(&pg, 5).await, 100);

    let mut branch = p.begin().await.unwrap();
    let r = branch.execute(&stmt("SELECT balance FROM balances WHERE id = $1", vec![Value::Int64(5)])).await.unwrap();
    assert_eq!(r.rows, vec![vec![Value::Int64(100)]]);
    branch.execute(&stmt("UPDATE balances SET balance = 7 WHERE id = 5", vec![])).await.unwrap();
    branch.rollback().await.unwrap();
    assert_eq!(balance(&pg, 5).await, 100);

    let empty = p.begin().await.unwrap();
    let g = gid("t5", 0);
    let prepared = empty.prepare(&g).await.unwrap();
    assert!(prepared.xid.is_some());
    assert_eq!(p.prepared_branches(CLUSTER).await.unwrap(), vec![g.clone()]);
    assert_eq!(p.commit_prepared(&g).await.unwrap(), Phase2::Done);
    // A branch begun and rolled back before any statement.
    p.begin().await.unwrap().rollback().await.unwrap();
}

/// A first statement cut short by a deadline has had BEGIN sent with it:
/// the branch's rollback must still end that transaction, so that no
/// connection goes back to the pool inside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_statement_cut_short_leaves_no_transaction_open() {
    let (pg, p) = setup().await;
    let mut branch = p.begin().await.unwrap();
    let sleep = stmt("SELECT pg_sleep(1)", vec![]);
    let cut = tokio::time::timeout(std::time::Duration::from_millis(100), branch.execute(&sleep)).await;
    assert!(cut.is_err(), "the statement should still be running");
    branch.rollback().await.unwrap();
    // Long enough for the sleep to have ended on the server either way.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(open_transactions(&pg).await, 0, "a pooled connection was left inside a transaction");
}

/// `pg`'s connections that match `condition` (on `pg_stat_activity`).
async fn connections(pg: &PgServer, condition: &str) -> i64 {
    pg.client("accounts")
        .await
        .query_one(&format!("SELECT count(*) FROM pg_stat_activity WHERE {condition}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Connections sitting inside a transaction.
async fn open_transactions(pg: &PgServer) -> i64 {
    connections(pg, "state LIKE 'idle in transaction%'").await
}

/// A one-shot branch whose statements return no rows goes out in one write
/// (BEGIN, the statements, PREPARE): they run in order inside one
/// transaction, which is prepared, not committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_branch_runs_its_statements_in_order_and_prepares() {
    let (pg, p) = setup().await;
    let statements = [
        stmt("UPDATE balances SET balance = balance - $1 WHERE id = $2", vec![Value::Int64(10), Value::Int64(1)]),
        // Sees the first statement's write: same transaction, after it.
        stmt("UPDATE balances SET balance = (SELECT balance FROM balances WHERE id = 1) WHERE id = 2", vec![]),
        stmt("UPDATE balances SET balance = 0 WHERE id > 100", vec![]),
    ];
    let g = gid("t6", 0);
    let (results, prepared) = p.begin().await.unwrap().run_and_prepare(&statements, &g, 1 << 20).await.unwrap();
    assert_eq!(results.iter().map(|r| r.rows_affected).collect::<Vec<_>>(), [1, 1, 0]);
    assert!(prepared.xid.is_some());
    assert_eq!(p.prepared_branches(CLUSTER).await.unwrap(), vec![g.clone()]);
    assert_eq!((balance(&pg, 1).await, balance(&pg, 2).await), (100, 100));
    assert_eq!(p.commit_prepared(&g).await.unwrap(), Phase2::Done);
    assert_eq!((balance(&pg, 1).await, balance(&pg, 2).await), (90, 90));

    // A statement that needs an earlier one to have run before it can be
    // parsed: one at a time.
    let statements = [
        stmt("CREATE TABLE notes (id bigint PRIMARY KEY)", vec![]),
        stmt("INSERT INTO notes VALUES ($1)", vec![Value::Int64(1)]),
    ];
    let g = gid("t12", 0);
    let (results, _) = p.begin().await.unwrap().run_and_prepare(&statements, &g, 1 << 20).await.unwrap();
    assert_eq!(results[1].rows_affected, 1);
    p.rollback_prepared(&g).await.unwrap();

    // A branch that returns rows runs one statement at a time, its rows
    // counted against the limit before PREPARE.
    let select = stmt("SELECT id FROM balances ORDER BY id", vec![]);
    let (results, _) =
        p.begin().await.unwrap().run_and_prepare(std::slice::from_ref(&select), &gid("t7", 0), 1 << 20).await.unwrap();
    assert_eq!(results[0].rows.len(), 10);
    p.rollback_prepared(&gid("t7", 0)).await.unwrap();
    let failed = p.begin().await.unwrap().run_and_prepare(&[select], &gid("t8", 0), 64).await.unwrap_err();
    assert_eq!(failed.statement, Some(0));
    assert!(matches!(&failed.error, Error::InvalidInput(m) if m.contains("result_bytes_max")), "{failed:?}");
    assert!(p.prepared_branches(CLUSTER).await.unwrap().is_empty());
    assert_eq!(open_transactions(&pg).await, 0);
}

/// A statement that fails in the middle of a one-shot branch: its error,
/// with its index, and nothing prepared, nothing applied, no connection
/// left inside a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_statement_in_a_one_shot_branch_prepares_nothing() {
    let (pg, p) = setup().await;
    let statements = [
        stmt("UPDATE balances SET balance = 1 WHERE id = 3", vec![]),
        // Violates the CHECK constraint.
        stmt("UPDATE balances SET balance = -1 WHERE id = 4", vec![]),
        stmt("UPDATE balances SET balance = 1 WHERE id = 5", vec![]),
    ];
    let failed = p.begin().await.unwrap().run_and_prepare(&statements, &gid("t9", 0), 1 << 20).await.unwrap_err();
    assert_eq!(failed.statement, Some(1));
    assert!(
        matches!(&failed.error, Error::FailedPrecondition(m) if m.contains("balances_balance_check")),
        "{failed:?}"
    );
    // Too few parameters: the client refuses it before sending anything.
    let short = [stmt("UPDATE balances SET balance = $1 WHERE id = $2", vec![Value::Int64(1)])];
    let failed = p.begin().await.unwrap().run_and_prepare(&short, &gid("t10", 0), 1 << 20).await.unwrap_err();
    assert_eq!(failed.statement, Some(0));
    assert!(p.prepared_branches(CLUSTER).await.unwrap().is_empty());
    for id in 3..=5 {
        assert_eq!(balance(&pg, id).await, 100);
    }
    assert_eq!(open_transactions(&pg).await, 0);
}

/// A one-shot branch cut short by a deadline while its statements wait on
/// a lock: its connection is closed, so PREPARE never runs, even once the
/// lock is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_branch_cut_short_prepares_nothing() {
    let (pg, p) = setup().await;
    let holder = pg.client("accounts").await;
    holder.batch_execute("BEGIN; SELECT * FROM balances WHERE id = 6 FOR UPDATE").await.unwrap();
    let statements = [stmt("UPDATE balances SET balance = 1 WHERE id = 6", vec![])];
    let g = gid("t11", 0);
    let run = p.begin().await.unwrap().run_and_prepare(&statements, &g, 1 << 20);
    let cut = tokio::time::timeout(std::time::Duration::from_millis(300), run).await;
    assert!(cut.is_err(), "the statement should be waiting on the lock");
    // The cancel lands: nothing waits on the lock any more. Without it, the
    // UPDATE would run once the lock is free, and the PREPARE queued behind
    // it.
    let watcher = pg.client("accounts").await;
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'";
    for _ in 0..100 {
        if watcher.query_one(waiting, &[]).await.unwrap().get::<_, i64>(0) == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(watcher.query_one(waiting, &[]).await.unwrap().get::<_, i64>(0), 0, "the statement was not cancelled");
    holder.batch_execute("ROLLBACK").await.unwrap();
    for _ in 0..10 {
        assert!(p.prepared_branches(CLUSTER).await.unwrap().is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(balance(&pg, 6).await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_prepared_and_a_hand_resolved_branch() {
    let (pg, p) = setup().await;
    let mut a = p.begin().await.unwrap();
    a.execute(&stmt("UPDATE balances SET balance = 0 WHERE id = 3", vec![])).await.unwrap();
    let ga = gid("t3", 0);
    let xa = a.prepare(&ga).await.unwrap().xid.unwrap();
    assert_eq!(p.rollback_prepared(&ga).await.unwrap(), Phase2::Done);
    assert_eq!(p.branch_outcome(xa).await.unwrap(), Some(false));
    assert_eq!(balance(&pg, 3).await, 100);

    // A DBA rolls back a prepared branch by hand: COMMIT PREPARED then finds
    // no gid, and the outcome says it was rolled back (a heuristic outcome
    // if the decision was COMMIT).
    let mut b = p.begin().await.unwrap();
    b.execute(&stmt("UPDATE balances SET balance = 1 WHERE id = 4", vec![])).await.unwrap();
    let gb = gid("t4", 1);
    let xb = b.prepare(&gb).await.unwrap().xid.unwrap();
    pg.client("accounts").await.batch_execute(&format!("ROLLBACK PREPARED '{gb}'")).await.unwrap();
    assert_eq!(p.commit_prepared(&gb).await.unwrap(), Phase2::GidMissing);
    assert_eq!(p.branch_outcome(xb).await.unwrap(), Some(false));
}

/// COMMIT PREPARED runs on a free branch connection (the one the branch
/// just handed back), so that a transaction at a time needs one connection
/// per database, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase_two_runs_on_a_free_branch_connection() {
    let (pg, _) = setup().await;
    let url = format!("{}?application_name=phase_two", pg.url("accounts"));
    let p = PostgresParticipant::new("accounts_a", &url, 4).unwrap();
    for i in 0..5 {
        let mut b = p.begin().await.unwrap();
        b.execute(&stmt("UPDATE balances SET balance = balance - 1 WHERE id = 8", vec![])).await.unwrap();
        let g = gid(&format!("t2{i}"), 0);
        b.prepare(&g).await.unwrap();
        assert_eq!(p.commit_prepared(&g).await.unwrap(), Phase2::Done);
    }
    assert_eq!(balance(&pg, 8).await, 95);
    // The participant's connections, told apart by their application name.
    assert_eq!(connections(&pg, "application_name = 'phase_two'").await, 1);
}

/// With every branch connection held by a branch that waits on a prepared
/// branch's lock, COMMIT PREPARED of that branch takes a control connection
/// instead of waiting for a branch connection that only it can free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase_two_does_not_wait_on_branches_that_wait_on_its_locks() {
    let (pg, _) = setup().await;
    let p = PostgresParticipant::new("accounts_a", &pg.url("accounts"), 1).unwrap();
    let mut a = p.begin().await.unwrap();
    a.execute(&stmt("UPDATE balances SET balance = 50 WHERE id = 9", vec![])).await.unwrap();
    let g = gid("t30", 0);
    a.prepare(&g).await.unwrap();
    // The only branch connection, waiting on the prepared branch's row lock.
    let mut b = p.begin().await.unwrap();
    let waiting = tokio::spawn(async move {
        let r = b.execute(&stmt("UPDATE balances SET balance = balance - 1 WHERE id = 9", vec![])).await;
        b.rollback().await.unwrap();
        r
    });
    let watcher = pg.client("accounts").await;
    let lock_waits = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'";
    for _ in 0..250 {
        if watcher.query_one(lock_waits, &[]).await.unwrap().get::<_, i64>(0) > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(watcher.query_one(lock_waits, &[]).await.unwrap().get::<_, i64>(0), 1, "the branch should be waiting");
    assert_eq!(p.commit_prepared(&g).await.unwrap(), Phase2::Done);
    assert_eq!(waiting.await.unwrap().unwrap().rows_affected, 1);
    assert_eq!(balance(&pg, 9).await, 50);
}

/// What a branch's statements set on their session (here through
/// `set_config(…, false)`, which the guard does not see) ends with the
/// branch: the next branch on the same pooled connection runs with the
/// connection's own settings, whether the first branch went through the
/// one-at-a-time path or the pipelined one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branchs_session_settings_end_with_it() {
    let (pg, _) = setup().await;
    pg.client("accounts").await.batch_execute("CREATE ROLE limited").await.unwrap();
    let url = format!("{}?application_name=reset&options=-c%20lock_timeout%3D4321", pg.url("accounts"));
    let p = PostgresParticipant::new("accounts_a", &url, 1).unwrap();
    let session = "SELECT current_user::text, current_setting('statement_timeout'), \
                   current_setting('search_path'), current_setting('lock_timeout')";
    let defaults = |r: &tandem::participant::StatementResult| {
        let text = |i: usize| match &r.rows[0][i] {
            Value::String(t) => t.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(text(0), "postgres", "role");
        assert_eq!(text(1), "0", "statement_timeout");
        assert_eq!(text(2), "\"$user\", public", "search_path");
        assert_eq!(text(3), "4321ms", "lock_timeout, from the connection's URL");
    };
    let change = "SELECT set_config('statement_timeout', '1234', false), set_config('search_path', 'pg_temp', \
                  false), set_config('lock_timeout', '99', false), set_config('role', 'limited', false)";
    // One statement at a time, then PREPARE.
    let mut a = p.begin().await.unwrap();
    a.execute(&stmt(change, vec![])).await.unwrap();
    let ga = gid("t40", 0);
    a.prepare(&ga).await.unwrap();
    let mut b = p.begin().await.unwrap();
    defaults(&b.execute(&stmt(session, vec![])).await.unwrap());
    b.rollback().await.unwrap();
    // Pipelined: BEGIN, the statements (they return no rows), PREPARE.
    let c = p.begin().await.unwrap();
    let changes = [stmt(&format!("DO $$ BEGIN PERFORM {}; END $$", &change["SELECT ".len()..]), vec![])];
    let gc = gid("t41", 0);
    c.run_and_prepare(&changes, &gc, 1 << 20).await.unwrap();
    let mut d = p.begin().await.unwrap();
    defaults(&d.execute(&stmt(session, vec![])).await.unwrap());
    // A setting made in a branch that is rolled back is undone by the
    // rollback itself; the reset covers what was set before it.
    d.execute(&stmt(change, vec![])).await.unwrap();
    d.rollback().await.unwrap();
    let mut e = p.begin().await.unwrap();
    defaults(&e.execute(&stmt(session, vec![])).await.unwrap());
    e.rollback().await.unwrap();
    // A role set for the transaction only, after one the session had.
    let mut f = p.begin().await.unwrap();
    f.execute(&stmt("SET LOCAL role limited", vec![])).await.unwrap();
    let gf = gid("t44", 0);
    f.prepare(&gf).await.unwrap();
    let mut g = p.begin().await.unwrap();
    defaults(&g.execute(&stmt(session, vec![])).await.unwrap());
    g.rollback().await.unwrap();
    assert_eq!(p.rollback_prepared(&gf).await.unwrap(), Phase2::Done);
    // Phase 2 ran on that same connection: no control connection was needed.
    assert_eq!(p.commit_prepared(&ga).await.unwrap(), Phase2::Done);
    assert_eq!(p.rollback_prepared(&gc).await.unwrap(), Phase2::Done);
    assert_eq!(connections(&pg, "application_name = 'reset'").await, 1);
}

/// The role that owns the prepared transaction `gid`.
async fn owner(pg: &PgServer, gid: &Gid) -> String {
    pg.client("accounts")
        .await
        .query_one("SELECT owner::text FROM pg_prepared_xacts WHERE gid = $1", &[&gid.to_string()])
        .await
        .unwrap()
        .get(0)
}

/// A prepared transaction can be finished only by its owner or a
/// superuser. A branch that switches its role (`set_config` gets past the
/// guard) is still prepared as the connection's user, so that phase 2,
/// which runs as that user, can finish it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_that_switches_role_is_prepared_as_the_connections_user() {
    let (pg, _) = setup().await;
    pg.client("accounts")
        .await
        .batch_execute(
            "CREATE ROLE app LOGIN; CREATE ROLE limited; GRANT limited TO app;
             GRANT SELECT, UPDATE ON balances TO app, limited;",
        )
        .await
        .unwrap();
    let url = pg.url("accounts").replace("postgres@", "app@");
    let p = PostgresParticipant::new("accounts_a", &url, 1).unwrap();
    let mut b = p.begin().await.unwrap();
    b.execute(&stmt("SELECT set_config('role', 'limited', false)", vec![])).await.unwrap();
    b.execute(&stmt("UPDATE balances SET balance = 41 WHERE id = 4", vec![])).await.unwrap();
    let g = gid("t43", 0);
    b.prepare(&g).await.unwrap();
    assert_eq!(owner(&pg, &g).await, "app");
    assert_eq!(p.commit_prepared(&g).await.unwrap(), Phase2::Done);
    assert_eq!(balance(&pg, 4).await, 41);
}

/// A connection whose user has a role set for it (`ALTER ROLE … SET
/// role`) runs every branch, and prepares it, as that role, also after a
/// branch switched to another: phase 2 on a control connection, which
/// runs as that role, can finish it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_set_for_the_connections_user_stays_across_branches() {
    let (pg, _) = setup().await;
    pg.client("accounts")
        .await
        .batch_execute(
            "CREATE ROLE app LOGIN; CREATE ROLE acting; CREATE ROLE other; GRANT acting, other TO app;
             GRANT SELECT, UPDATE ON balances TO acting, other; ALTER ROLE app SET role = 'acting';",
        )
        .await
        .unwrap();
    let url = format!("{}?application_name=acting", pg.url("accounts").replace("postgres@", "app@"));
    let p = PostgresParticipant::new("accounts_a", &url, 1).unwrap();
    let mut a = p.begin().await.unwrap();
    a.execute(&stmt("SELECT set_config('role', 'other', false)", vec![])).await.unwrap();
    a.execute(&stmt("UPDATE balances SET balance = 42 WHERE id = 3", vec![])).await.unwrap();
    let ga = gid("t45", 0);
    a.prepare(&ga).await.unwrap();
    // The only branch connection is taken, so phase 2 runs on a control
    // connection.
    let mut b = p.begin().await.unwrap();
    let who = b.execute(&stmt("SELECT current_user::text", vec![])).await.unwrap();
    assert_eq!(who.rows[0][0], Value::String("acting".into()));
    assert_eq!(owner(&pg, &ga).await, "acting");
    assert_eq!(p.commit_prepared(&ga).await.unwrap(), Phase2::Done);
    b.rollback().await.unwrap();
    assert_eq!(balance(&pg, 3).await, 42);
    assert_eq!(connections(&pg, "application_name = 'acting'").await, 2);
}

/// A session-level advisory lock a branch takes survives PREPARE and
/// ROLLBACK; it is released when the branch ends, not held for the pooled
/// connection's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branchs_session_advisory_locks_end_with_it() {
    let (pg, p) = setup().await;
    let other = pg.client("accounts").await;
    let free = |key: i64| {
        let other = &other;
        async move {
            let got: bool = other.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await.unwrap().get(0);
            if got {
                other.query_one("SELECT pg_advisory_unlock($1)", &[&key]).await.unwrap();
            }
            got
        }
    };
    let mut a = p.begin().await.unwrap();
    a.execute(&stmt("SELECT pg_advisory_lock(77)::text", vec![])).await.unwrap();
    assert!(!free(77).await, "the branch should hold the lock");
    let ga = gid("t42", 0);
    a.prepare(&ga).await.unwrap();
    assert!(free(77).await, "a prepared branch's session lock was kept");
    let mut b = p.begin().await.unwrap();
    b.execute(&stmt("SELECT pg_advisory_lock(78)::text", vec![])).await.unwrap();
    b.rollback().await.unwrap();
    assert!(free(78).await, "a rolled-back branch's session lock was kept");
    assert_eq!(p.rollback_prepared(&ga).await.unwrap(), Phase2::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_this_clusters_prepared_branches_are_listed() {
    let (pg, p) = setup().await;
    let mine = gid("t5", 0);
    let mut b = p.begin().await.unwrap();
    b.execute(&stmt("UPDATE balances SET balance = 5 WHERE id = 5", vec![])).await.unwrap();
    b.prepare(&mine).await.unwrap();
    let c = pg.client("accounts").await;
    c.batch_execute("BEGIN; UPDATE balances SET balance = 6 WHERE id = 6; PREPARE TRANSACTION 'tdm_other_t6_0'")
        .await
        .unwrap();
    c.batch_execute("BEGIN; UPDATE balances SET balance = 7 WHERE id = 7; PREPARE TRANSACTION 'not_ours'")
        .await
        .unwrap();
    assert_eq!(p.prepared_branches(CLUSTER).await.unwrap(), vec![mine.clone()]);
    p.rollback_prepared(&mine).await.unwrap();
    c.batch_execute("ROLLBACK PREPARED 'tdm_other_t6_0'").await.unwrap();
    c.batch_execute("ROLLBACK PREPARED 'not_ours'").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_parameters_convert_to_the_column_type() {
    let (pg, p) = setup().await;
    let mut b = p.begin().await.unwrap();
    let r = b
        .execute(&stmt(
            "INSERT INTO events (id, at, amount, body, small) VALUES ($1, $2, $3, $4, $5)",
            vec![
                Value::Text("0b5e4f0e-8b4a-4c61-9d36-5f0f1c3b9a11".into()),
                Value::Text("2026-11-26T10:00:00Z".into()),
                Value::Text("12.50".into()),
                Value::Text(r#"{"k": [1, 2]}"#.into()),
                Value::Int64(7),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(r.rows_affected, 1);
    let r = b
        .execute(&stmt("SELECT amount::text, body->>'k', small, NULL::text AS nothing FROM events", vec![]))
        .await
        .unwrap();
    assert_eq!(
        r.rows,
        vec![vec![Value::String("12.50".into()), Value::String("[1, 2]".into()), Value::Int64(7), Value::Null]]
    );
    // A value that does not fit its column is the client's error.
    let err = b.execute(&stmt("UPDATE events SET small = $1", vec![Value::Int64(1 << 40)])).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    b.rollback().await.unwrap();
    let count: i64 = pg.client("accounts").await.query_one("SELECT count(*) FROM events", &[]).await.unwrap().get(0);
    assert_eq!(count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_prepared_transactions_is_reported() {
    let pg = PgServer::start(0);
    let p = PostgresParticipant::new("legacy", &pg.url("postgres"), 1).unwrap();
    let err = p.check().await.unwrap_err();
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains("max_prepared_transactions = 0")), "{err:?}");
}
