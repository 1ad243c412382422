//! Atomic transactions across two PostgreSQL databases through a real
//! three-node cluster.

mod common;

use common::Options;
use common::TestCluster;
use common::postgres::PgServer;
use tandem::proto as pb;
use tandem::proto::transactions_client::TransactionsClient;

const ACCOUNTS: i64 = 10;
const OPENING: i64 = 100;

struct Bank {
    a: PgServer,
    b: PgServer,
    cluster: TestCluster,
}

impl Bank {
    async fn start() -> Self {
        let (a, b) = (PgServer::start(64), PgServer::start(64));
        for pg in [&a, &b] {
            pg.create_database("accounts").await;
            pg.client("accounts")
                .await
                .batch_execute(&format!(
                    "CREATE TABLE balances (id bigint PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));
                     INSERT INTO balances SELECT g, {OPENING} FROM generate_series(1, {ACCOUNTS}) g;"
                ))
                .await
                .unwrap();
        }
        let participant = |name: &str, pg: &PgServer| {
            format!(
                "[[participants]]\nname = \"{name}\"\nkind = \"postgres\"\nurl = \"{}\"\npool_size = 8\n",
                pg.url("accounts")
            )
        };
        let opts = Options {
            extra_config: format!("{}{}", participant("accounts_a", &a), participant("accounts_b", &b)),
            ..Options::default()
        };
        let cluster = TestCluster::start(3, opts).await;
        Self { a, b, cluster }
    }

    async fn client(&self, node: u64) -> TransactionsClient<tonic::transport::Channel> {
        TransactionsClient::connect(format!("http://{}", self.cluster.addr(node))).await.unwrap()
    }

    async fn total(pg: &PgServer) -> i64 {
        pg.client("accounts").await.query_one("SELECT sum(balance)::bigint FROM balances", &[]).await.unwrap().get(0)
    }

    async fn prepared(pg: &PgServer) -> i64 {
        pg.client("accounts").await.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await.unwrap().get(0)
    }

    /// Waits until neither database holds a prepared branch. An ABORTED
    /// answer comes before the rollback of branches that were prepared, so
    /// this is awaited, with a generous deadline.
    async fn no_prepared_left(&self) {
        let deadline = std::time::Instant::now() + common::WAIT;
        loop {
            let left = Self::prepared(&self.a).await + Self::prepared(&self.b).await;
            if left == 0 {
                return;
            }
            if std::time::Instant::now() >= deadline {
                let gids: Vec<String> = self
                    .a
                    .client("accounts")
                    .await
                    .query("SELECT gid FROM pg_prepared_xacts", &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let logs: Vec<String> = (1..=3).map(|id| self.cluster.log_tail(id)).collect();
                panic!("{left} prepared branches left ({gids:?} in a); logs:\n{}", logs.join("\n---\n"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

fn int(i: i64) -> pb::Value {
    pb::Value { kind: Some(pb::value::Kind::Int64(i)) }
}

fn stmt(sql: &str, params: Vec<pb::Value>) -> pb::Statement {
    pb::Statement { sql: sql.into(), params }
}

/// Moves `amount` from account `from` in accounts_a to account `to` in accounts_b.
fn transfer(from: i64, to: i64, amount: i64) -> pb::TransactRequest {
    pb::TransactRequest {
        branches: vec![
            pb::BranchRequest {
                participant: "accounts_a".into(),
                statements: vec![stmt(
                    "UPDATE balances SET balance = balance - $1 WHERE id = $2",
                    vec![int(amount), int(from)],
                )],
            },
            pb::BranchRequest {
                participant: "accounts_b".into(),
                statements: vec![stmt(
                    "UPDATE balances SET balance = balance + $1 WHERE id = $2 RETURNING balance",
                    vec![int(amount), int(to)],
                )],
            },
        ],
        // Branches on two databases can deadlock across them, which neither
        // database sees; the transaction's deadline breaks such a cycle.
        timeout_ms: 5_000,
        ..Default::default()
    }
}

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
    assert_eq!(again.outcome, pb::Outcome::Aborted as i32);
    assert!(again.reason.contains(&first.txid), "{}", again.reason);
    assert_eq!(Bank::total(&bank.a).await, ACCOUNTS * OPENING - 35);
    bank.no_prepared_left().await;

    // Bad input: INVALID_ARGUMENT, nothing changes.
    let mut unknown = transfer(1, 1, 1);
    unknown.branches[1].participant = "nowhere".into();
    let mut control = transfer(1, 1, 1);
    control.branches[0].statements.push(stmt("COMMIT", vec![]));
    for (name, req) in [
        ("unknown participant", unknown),
        ("transaction control", control),
        ("no branch", pb::TransactRequest::default()),
    ] {
        let status = client.transact(req).await.expect_err(name);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}: {status:?}");
    }
    assert_eq!(Bank::total(&bank.a).await, ACCOUNTS * OPENING - 35);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_keep_the_total_exact() {
    let bank = Bank::start().await;
    let mut tasks = Vec::new();
    for i in 0..32i64 {
        let mut client = bank.client(1 + (i as u64 % 3)).await;
        tasks.push(tokio::spawn(async move {
            // Some overdraw and abort; contended accounts serialise.
            let amount = if i % 5 == 0 { 500 } else { 1 + i % 7 };
            let r = client.transact(transfer(1 + i % 4, 1 + i % 3, amount)).await.unwrap().into_inner();
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
