//! Two throwaway PostgreSQL servers, each with a database `accounts` holding
//! a table of balances, and a three-node cluster with them as participants
//! `accounts_a` and `accounts_b`.

use super::Options;
use super::TestCluster;
use super::postgres::PgServer;
use tandem::proto as pb;
use tandem::proto::transactions_client::TransactionsClient;

pub const ACCOUNTS: i64 = 10;
pub const OPENING: i64 = 100;

pub struct Bank {
    pub a: PgServer,
    pub b: PgServer,
    pub cluster: TestCluster,
}

impl Bank {
    pub async fn start() -> Self {
        Self::start_with(1_000).await
    }

    pub async fn start_with(recovery_interval_ms: u64) -> Self {
        Self::start_custom(recovery_interval_ms, "", "").await
    }

    /// `coordinator` is added to the `[coordinator]` table, `extra` to the
    /// end of the config (e.g. a `[limits]` table).
    pub async fn start_custom(recovery_interval_ms: u64, coordinator: &str, extra: &str) -> Self {
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
            extra_config: format!("{}{}\n{extra}", participant("accounts_a", &a), participant("accounts_b", &b)),
            recovery_interval_ms,
            recover_on_leadership: true,
            coordinator_config: coordinator.to_string(),
            ..Options::default()
        };
        let cluster = TestCluster::start(3, opts).await;
        Self { a, b, cluster }
    }

    pub async fn client(&self, node: u64) -> TransactionsClient<tonic::transport::Channel> {
        TransactionsClient::connect(format!("http://{}", self.cluster.addr(node))).await.unwrap()
    }

    pub async fn total(pg: &PgServer) -> i64 {
        pg.client("accounts").await.query_one("SELECT sum(balance)::bigint FROM balances", &[]).await.unwrap().get(0)
    }

    pub async fn prepared(pg: &PgServer) -> i64 {
        pg.client("accounts").await.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await.unwrap().get(0)
    }

    /// Waits until neither database holds a prepared branch. An ABORTED
    /// answer comes before the rollback of branches that were prepared, so
    /// this is awaited, with a generous deadline.
    pub async fn no_prepared_left(&self) {
        let deadline = std::time::Instant::now() + super::WAIT;
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

pub fn int(i: i64) -> pb::Value {
    pb::Value { kind: Some(pb::value::Kind::Int64(i)) }
}

pub fn stmt(sql: &str, params: Vec<pb::Value>) -> pb::Statement {
    pb::Statement { sql: sql.into(), params }
}

/// Moves `amount` from account `from` in accounts_a to account `to` in accounts_b.
pub fn transfer(from: i64, to: i64, amount: i64) -> pb::TransactRequest {
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

/// Account `id`'s balance in one database.
pub async fn balance(pg: &PgServer, id: i64) -> i64 {
    pg.client("accounts").await.query_one("SELECT balance FROM balances WHERE id = $1", &[&id]).await.unwrap().get(0)
}

/// The gids prepared in one database.
pub async fn prepared_gids(pg: &PgServer) -> Vec<String> {
    pg.client("accounts")
        .await
        .query("SELECT gid FROM pg_prepared_xacts ORDER BY gid", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}
