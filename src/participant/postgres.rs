//! The PostgreSQL participant: branches are local transactions prepared with
//! `PREPARE TRANSACTION`.
//!
//! - Every statement runs with parameters sent as text, which PostgreSQL
//!   converts to each parameter's type, so a client's integer, timestamp or
//!   JSON lands in whatever column type the statement needs, and a value that
//!   does not fit is PostgreSQL's clear error.
//! - The branch reads its full transaction id (`pg_current_xact_id()`)
//!   with a statement the connection keeps prepared, pipelined right
//!   before its PREPARE; in a failed transaction it fails, and so does the
//!   session's reset queued behind it, so PREPARE, behind the reset, does
//!   not run (PREPARE of a failed transaction would roll back silently).
//! - A one-shot branch whose statements return no rows goes out pipelined,
//!   BEGIN to PREPARE: one round trip
//!   ([`BranchSession::run_and_prepare`]).
//! - Each pooled connection keeps the statements it ran prepared (at most
//!   256), so a statement costs one round trip. A statement whose plan a
//!   schema change made stale fails once, and is then prepared afresh on
//!   every connection.
//! - A branch's session is reset (settings, role, session advisory locks)
//!   in the same query string as its PREPARE or ROLLBACK, so that no
//!   setting, role or advisory lock a branch left outlives it into another
//!   client's branch on the pooled connection, and every prepared branch
//!   belongs to the connection's own user and role.
//! - COMMIT/ROLLBACK PREPARED run on a free branch connection, or, when
//!   none is free at once, on a separate control connection, so that a
//!   transaction needs one connection per database at a time, and phase 2
//!   never waits for a connection held by a branch waiting on its locks.
//! - gids are spliced into `PREPARE TRANSACTION '…'` and `COMMIT PREPARED
//!   '…'` only after [`Gid::validated`]: `[a-z0-9_]`, nothing to escape.
//! - The server needs `max_prepared_transactions` above 0; [`check`]
//!   says so when it is not.
//!
//! [`check`]: Participant::check

use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use deadpool_postgres::Manager;
use deadpool_postgres::ManagerConfig;
use deadpool_postgres::Object;
use deadpool_postgres::Pool;
use deadpool_postgres::RecyclingMethod;
use deadpool_postgres::Timeouts;
use tokio_postgres::NoTls;
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Format;
use tokio_postgres::types::IsNull;
use tokio_postgres::types::ToSql;
use tokio_postgres::types::Type;

use super::BranchFailed;
use super::BranchSession;
use super::Participant;
use super::Phase2;
use super::Prepared;
use super::Statement;
use super::StatementResult;
use super::Value;
use super::run_then_prepare;
use crate::error::Error;
use crate::error::Result;
use crate::txn::gid::Gid;

/// Most connections of a participant's control pool (phase 2, listing,
/// outcome checks): half the branch pool, at most this.
const CONTROL_POOL_MAX: usize = 128;

/// Most statements a connection keeps prepared; past it, the cache starts
/// afresh.
const STATEMENT_CACHE_MAX: usize = 256;

/// What a branch reads before PREPARE: its full transaction id, and the
/// release of session advisory locks (see [`end_and_prepare`]). Sent as a
/// prepared statement, kept in the connection's statement cache, so that
/// PostgreSQL does not parse and plan it for every branch; every name is
/// qualified, so that no function the branch created on its `search_path`
/// stands in. In a failed transaction it fails, and so does the reset that
/// follows it, so PREPARE never runs there (PREPARE of a failed transaction
/// would roll it back and still succeed).
const BEFORE_PREPARE: &str =
    "SELECT pg_catalog.pg_current_xact_id()::pg_catalog.text, pg_catalog.pg_advisory_unlock_all()";

/// The query string that ends a branch to be prepared, pipelined right
/// behind [`BEFORE_PREPARE`]: the session's reset, then PREPARE.
///
/// The reset undoes what the branch's statements left on the pooled
/// connection's session, which the next branch on it, whoever's it is,
/// would inherit: the guard refuses `SET` and `RESET`, but
/// `set_config(…, false)` in a statement or a function gets past it
/// (`role`, `search_path`, `statement_timeout`, …), and a session-level
/// advisory lock survives PREPARE (released by [`BEFORE_PREPARE`]).
/// Settings go back to the connection's
/// own (its URL's options, the role's and database's settings), and the
/// user and role back to the connection's before PREPARE (`RESET ALL`
/// leaves `role` alone; `RESET SESSION AUTHORIZATION` puts back the
/// connection's own, one set for its user with `ALTER ROLE … SET role`
/// included), so that the prepared transaction belongs to the
/// role phase 2 runs as on any of the participant's connections, who can
/// then finish it (a role the branch switched to could not). The resets
/// run inside the transaction and take effect when it is prepared; one
/// that is rolled back undoes its own settings (`ROLLBACK`).
fn end_and_prepare(gid: &str) -> String {
    format!("RESET SESSION AUTHORIZATION; RESET ALL; PREPARE TRANSACTION '{gid}'")
}

/// Rolls a branch back. Its settings go with its transaction; session-level
/// advisory locks do not, and are released.
const ROLLBACK: &str = "ROLLBACK; SELECT pg_catalog.pg_advisory_unlock_all()";

pub struct PostgresParticipant {
    name: String,
    /// Connections for branches, held from BEGIN to PREPARE, and for
    /// COMMIT/ROLLBACK PREPARED when one is free.
    pool: Pool,
    /// Connections for everything else (phase 2 when no branch connection
    /// is free, listing, outcome checks), so that finishing prepared
    /// branches, which releases their locks, never waits behind branches
    /// that wait on those very locks.
    control: Pool,
}

impl PostgresParticipant {
    /// A participant for the database at `url`, with at most `pool_size`
    /// branch connections, and half as many control connections (at least
    /// 2, at most `CONTROL_POOL_MAX`).
    pub fn new(name: &str, url: &str, pool_size: usize) -> Result<Self> {
        let config: tokio_postgres::Config =
            url.parse().map_err(|e| Error::InvalidInput(format!("participant {name}: bad url: {e}")))?;
        let pool_of = |size: usize| {
            let manager =
                Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
            Pool::builder(manager)
                .max_size(size)
                .wait_timeout(Some(Duration::from_secs(10)))
                .create_timeout(Some(Duration::from_secs(5)))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|e| Error::InvalidInput(format!("participant {name}: {e}")))
        };
        let pool = pool_of(pool_size.max(1))?;
        // When the branch pool is busy, each COMMIT PREPARED takes a control
        // connection: a few, as there once were, made phase 2 the queue at a
        // few hundred clients.
        let control = pool_of((pool_size / 2).clamp(2, CONTROL_POOL_MAX))?;
        Ok(Self { name: name.to_string(), pool, control })
    }

    async fn get(&self, pool: &Pool) -> Result<Object> {
        pool.get().await.map_err(|e| Error::Unavailable {
            message: format!("participant {}: no connection: {e}", self.name),
            leader: None,
        })
    }

    /// A connection for a branch.
    async fn connection(&self) -> Result<Object> {
        self.get(&self.pool).await
    }

    /// A connection for phase 2 and bookkeeping.
    async fn control_connection(&self) -> Result<Object> {
        self.get(&self.control).await
    }

    /// A branch connection for COMMIT or ROLLBACK PREPARED, if one is free
    /// now; phase 2 takes a control connection otherwise.
    ///
    /// A branch's connection is back in the branch pool once it is prepared,
    /// so phase 2 on that pool needs no connections beyond the branches'
    /// own. Each PostgreSQL backend costs the server CPU and memory: with a
    /// pool of its own, phase 2 doubled the backends at 64 clients, and
    /// Tandem's throughput was about a tenth lower (README, Benchmark). It
    /// never waits for a branch connection to be handed back, since they
    /// may all be held by branches waiting on the locks this very commit
    /// releases. When the pool is below its size and none is idle, it opens
    /// one, within the pool's create timeout.
    async fn free_branch_connection(&self) -> Option<Object> {
        let now = Timeouts { wait: Some(Duration::ZERO), ..self.pool.timeouts() };
        self.pool.timeout_get(&now).await.ok()
    }

    async fn finish_prepared(&self, verb: &str, gid: &Gid) -> Result<Phase2> {
        let gid = gid.validated()?;
        let sql = format!("{verb} PREPARED '{gid}'");
        if let Some(conn) = self.free_branch_connection().await {
            let result = conn.batch_execute(&sql).await;
            match result {
                // Refused by the server: again on a control connection,
                // which runs no client statement. Branches' session state
                // is reset before their connection is pooled
                // (`end_and_prepare`), and no state the reset misses that
                // could make COMMIT PREPARED fail is known; should one be
                // found, it would fail there every time, so that
                // connection is closed, not reused. The retry is
                // harmless even if the refused attempt took effect
                // (PostgreSQL can report an error after the commit record
                // is written): it then finds the gid gone, and the caller
                // asks how the branch ended.
                Err(e) if e.as_db_error().is_some() && e.code() != Some(&SqlState::UNDEFINED_OBJECT) => {
                    tracing::warn!(participant = %self.name, %gid, error = %e,
                        "phase 2 failed on a branch connection; closing it and trying a control connection");
                    drop(Object::take(conn));
                }
                result => return self.phase2_answer(result),
            }
        }
        let conn = self.control_connection().await?;
        self.phase2_answer(conn.batch_execute(&sql).await)
    }

    /// What COMMIT or ROLLBACK PREPARED answered.
    fn phase2_answer(&self, result: std::result::Result<(), tokio_postgres::Error>) -> Result<Phase2> {
        match result {
            Ok(()) => Ok(Phase2::Done),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => Ok(Phase2::GidMissing),
            Err(e) => Err(pg_error(&self.name, e)),
        }
    }
}

/// Sorts a PostgreSQL error: the statement's fault (bad SQL, a constraint,
/// a value of the wrong type) is the client's; a lost connection is not.
pub fn pg_error(participant: &str, e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => {
            let message = format!("{participant}: {} ({})", db.message(), db.code().code());
            match db.code().code().get(..2) {
                // The request's own fault: data exceptions (a parameter of
                // the wrong type), syntax errors and undefined objects,
                // invalid transaction state.
                Some("22" | "42" | "25") => Error::InvalidInput(message),
                // Valid, but the data does not allow it: integrity
                // violations (a CHECK, a unique key), raised exceptions.
                Some("23" | "2B" | "P0") => Error::FailedPrecondition(message),
                // Serialization failures and deadlocks: worth retrying.
                Some("40") => Error::Unavailable { message, leader: None },
                _ => Error::FailedPrecondition(message),
            }
        }
        None => Error::Unavailable { message: format!("{participant}: {e}"), leader: None },
    }
}

/// A parameter sent in text format, whatever its type.
#[derive(Debug)]
struct TextParam(Option<String>);

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(s) => {
                out.extend_from_slice(s.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    tokio_postgres::types::to_sql_checked!();
}

fn text_param(v: &Value) -> TextParam {
    TextParam(match v {
        Value::Null => None,
        Value::Bool(b) => Some(b.to_string()),
        Value::Int64(i) => Some(i.to_string()),
        Value::Double(d) => Some(d.to_string()),
        Value::String(s) | Value::Text(s) => Some(s.clone()),
        Value::Bytes(b) => Some(format!("\\x{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())),
    })
}

fn column_value(row: &tokio_postgres::Row, i: usize) -> Result<Value> {
    let ty = row.columns()[i].type_();
    let bad = |e: tokio_postgres::Error| Error::Internal(format!("decoding column {i}: {e}"));
    let v = match *ty {
        Type::BOOL => row.try_get::<_, Option<bool>>(i).map_err(bad)?.map(Value::Bool),
        Type::INT2 => row.try_get::<_, Option<i16>>(i).map_err(bad)?.map(|v| Value::Int64(v.into())),
        Type::INT4 => row.try_get::<_, Option<i32>>(i).map_err(bad)?.map(|v| Value::Int64(v.into())),
        Type::INT8 => row.try_get::<_, Option<i64>>(i).map_err(bad)?.map(Value::Int64),
        Type::FLOAT4 => row.try_get::<_, Option<f32>>(i).map_err(bad)?.map(|v| Value::Double(v.into())),
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(i).map_err(bad)?.map(Value::Double),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            row.try_get::<_, Option<String>>(i).map_err(bad)?.map(Value::String)
        }
        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i).map_err(bad)?.map(Value::Bytes),
        ref other => {
            return Err(Error::InvalidInput(format!(
                "column {:?} has type {other}, which is not returned as is; cast it in the query (e.g. {}::text)",
                row.columns()[i].name(),
                row.columns()[i].name()
            )));
        }
    };
    Ok(v.unwrap_or(Value::Null))
}

#[async_trait]
impl Participant for PostgresParticipant {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> Result<()> {
        let conn = self.control_connection().await?;
        let row = conn.query_one("SHOW max_prepared_transactions", &[]).await.map_err(|e| pg_error(&self.name, e))?;
        let value: String = row.get(0);
        if value.trim() == "0" {
            return Err(Error::FailedPrecondition(format!(
                "participant {}: the server has max_prepared_transactions = 0, so it cannot take part in \
                 two-phase commit; set it above 0 (e.g. to max_connections) and restart PostgreSQL",
                self.name
            )));
        }
        Ok(())
    }

    async fn begin(&self) -> Result<Box<dyn BranchSession>> {
        let conn = self.connection().await?;
        // BEGIN goes out with the branch's first statement (see `execute`).
        Ok(Box::new(PostgresBranch {
            participant: self.name.clone(),
            conn: Some(conn),
            pool: self.pool.clone(),
            begun: false,
            prepare_queued: false,
        }))
    }

    async fn commit_prepared(&self, gid: &Gid) -> Result<Phase2> {
        self.finish_prepared("COMMIT", gid).await
    }

    async fn rollback_prepared(&self, gid: &Gid) -> Result<Phase2> {
        self.finish_prepared("ROLLBACK", gid).await
    }

    async fn prepared_branches(&self, cluster_id: &str) -> Result<Vec<Gid>> {
        let conn = self.control_connection().await?;
        let prefix = Gid::cluster_prefix(cluster_id);
        let rows = conn
            .query(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND starts_with(gid, $1)",
                &[&prefix],
            )
            .await
            .map_err(|e| pg_error(&self.name, e))?;
        Ok(rows.iter().filter_map(|r| Gid::parse(cluster_id, r.get::<_, &str>(0))).collect())
    }

    async fn branch_outcome(&self, xid: u64) -> Result<Option<bool>> {
        let conn = self.control_connection().await?;
        let row = conn
            .query_one("SELECT pg_xact_status($1::text::xid8)", &[&xid.to_string()])
            .await
            .map_err(|e| pg_error(&self.name, e))?;
        Ok(match row.get::<_, Option<&str>>(0) {
            Some("committed") => Some(true),
            Some("aborted") => Some(false),
            _ => None,
        })
    }
}

/// An open PostgreSQL branch: a pooled connection inside `BEGIN`.
struct PostgresBranch {
    participant: String,
    /// Taken when the branch ends (prepared or rolled back).
    conn: Option<Object>,
    /// The pool it came from, whose connections' statement caches a stale
    /// statement is dropped from.
    pool: Pool,
    /// Whether BEGIN has been sent. It is sent in the same write as the
    /// first statement (the two pipelined, one round trip instead of two,
    /// as PgJDBC does), or, for a branch with no statement, with PREPARE.
    begun: bool,
    /// Whether PREPARE went out behind the statements and its answer has
    /// not been read ([`BranchSession::run_and_prepare`]).
    prepare_queued: bool,
}

impl Drop for PostgresBranch {
    /// A branch dropped while its transaction is open (a deadline, a lost
    /// client) must not hand that connection back to the pool: it is closed
    /// instead, and PostgreSQL rolls the transaction back.
    ///
    /// Closing the socket is not enough when PREPARE was queued behind the
    /// statements: a server waiting on a lock does not notice the client
    /// has gone, and it has the queued messages already, so once the lock
    /// is free it would run the statement, then PREPARE, and only learn of
    /// the closed socket when it answers. The running statement is
    /// cancelled instead: it fails, the transaction is aborted, and the
    /// queued PREPARE fails with it. The cancel can miss (it lands between
    /// two statements, or once PREPARE runs); then the branch may be
    /// prepared after the driver's ROLLBACK PREPARED found nothing, and the
    /// leader's reconciliation rolls it back (presumed abort) within
    /// `coordinator.recovery_interval_ms`.
    fn drop(&mut self) {
        self.close();
    }
}

impl PostgresBranch {
    fn conn(&self) -> Result<&Object> {
        self.conn.as_ref().ok_or_else(|| Error::Internal("branch already ended".into()))
    }

    /// Closes the branch's connection, if it still has one, instead of
    /// returning it to the pool; cancels the running statement if PREPARE
    /// waits behind it (see the drop guard).
    fn close(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if self.prepare_queued {
            let cancel = conn.cancel_token();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { cancel.cancel_query(NoTls).await.ok() });
            }
        }
        drop(Object::take(conn));
    }

    /// `sql` prepared on this branch's connection, which keeps its
    /// statements prepared up to a bound.
    async fn prepare_cached(&self, sql: &str) -> Result<tokio_postgres::Statement> {
        let conn = self.conn()?;
        let cache = &conn.statement_cache;
        if cache.size() >= STATEMENT_CACHE_MAX {
            cache.clear();
        }
        conn.prepare_cached(sql).await.map_err(|e| self.statement_failed(sql, e))
    }

    /// The error of a failed statement `sql`. A plan made stale by a schema
    /// change ("cached plan must not change result type"), or a statement
    /// deallocated, is dropped from every connection's cache, so that it
    /// fails once, not once per connection.
    fn statement_failed(&self, sql: &str, e: tokio_postgres::Error) -> Error {
        let stale = [SqlState::FEATURE_NOT_SUPPORTED, SqlState::INVALID_SQL_STATEMENT_NAME];
        if e.code().is_some_and(|c| stale.contains(c)) {
            self.pool.manager().statement_caches.remove(sql, &[]);
        }
        pg_error(&self.participant, e)
    }

    /// PREPARE's answer, from the answers to the requests pipelined to end
    /// the branch: BEGIN if it had not begun (`Ok` when BEGIN went earlier),
    /// [`BEFORE_PREPARE`], then [`end_and_prepare`]'s string. The first
    /// error is the answer, [`BEFORE_PREPARE`]'s before PREPARE's; the
    /// transaction id comes from [`BEFORE_PREPARE`]'s row.
    fn prepared(
        &self,
        begun: std::result::Result<(), tokio_postgres::Error>,
        read: std::result::Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
        prepared: std::result::Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>,
    ) -> Result<Prepared> {
        begun.map_err(|e| pg_error(&self.participant, e))?;
        let rows = read.map_err(|e| self.statement_failed(BEFORE_PREPARE, e))?;
        prepared.map_err(|e| pg_error(&self.participant, e))?;
        let xid = rows.first().and_then(|r| r.try_get::<_, &str>(0).ok()).and_then(|x| x.parse::<u64>().ok());
        Ok(Prepared { xid })
    }
}

/// Awaits `futures`, first polling each in the order given: a query sends
/// its request when first polled, so the requests go out in that order.
pub(crate) async fn in_order<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(|f| Box::pin(futures::future::maybe_done(f))).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for f in &mut futures {
            done &= f.as_mut().poll(cx).is_ready();
        }
        if done { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
    futures.iter_mut().map(|f| f.as_mut().take_output().expect("polled to completion")).collect()
}

#[async_trait]
impl BranchSession for PostgresBranch {
    async fn execute(&mut self, statement: &Statement) -> Result<StatementResult> {
        // BEGIN goes out with this statement if it is the first (below).
        // From here on the branch counts as begun, even if this call is cut
        // short (a deadline), so that its rollback sends ROLLBACK and the
        // connection never goes back to the pool inside a transaction.
        let first = !self.begun;
        self.begun = true;
        let conn = self.conn()?;
        let params: Vec<TextParam> = statement.params.iter().map(text_param).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let prepared = self.prepare_cached(&statement.sql).await?;
        // The first statement is pipelined behind BEGIN (`biased`: BEGIN is
        // polled, so queued, first): PostgreSQL runs them in order on this
        // connection, so the statement runs inside the transaction.
        let begin = async {
            match first {
                false => Ok(()),
                true => conn.batch_execute("BEGIN").await,
            }
        };
        enum Ran {
            Affected(u64),
            Rows(Vec<tokio_postgres::Row>),
        }
        let (begun, ran) = if prepared.columns().is_empty() {
            let (begun, n) = tokio::join!(biased; begin, conn.execute(&prepared, &refs));
            (begun, n.map(Ran::Affected))
        } else {
            let (begun, rows) = tokio::join!(biased; begin, conn.query(&prepared, &refs));
            (begun, rows.map(Ran::Rows))
        };
        let ran = ran.map_err(|e| self.statement_failed(&statement.sql, e));
        if let Err(e) = begun {
            // Only a broken connection fails BEGIN, and the statement with
            // it; the connection is closed, never reused.
            self.close();
            return Err(pg_error(&self.participant, e));
        }
        let rows = match ran? {
            Ran::Affected(n) => return Ok(StatementResult { rows_affected: n, ..Default::default() }),
            Ran::Rows(rows) => rows,
        };
        let columns = prepared.columns().iter().map(|c| c.name().to_string()).collect();
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push((0..row.len()).map(|i| column_value(row, i)).collect::<Result<Vec<_>>>()?);
        }
        Ok(StatementResult { rows_affected: rows.len() as u64, columns, rows: out })
    }

    /// The connection stays in `self` until PREPARE has returned: on any
    /// early exit (an error, or the future dropped at a deadline) the drop
    /// guard closes it, so a connection inside an open transaction never goes
    /// back to the pool.
    async fn prepare(mut self: Box<Self>, gid: &Gid) -> Result<Prepared> {
        let gid_text = gid.validated()?;
        let before = self.prepare_cached(BEFORE_PREPARE).await?;
        let conn = self.conn()?;
        let begin = async {
            match self.begun {
                true => Ok(()),
                false => conn.batch_execute("BEGIN").await,
            }
        };
        let prepare = end_and_prepare(&gid_text);
        // `biased`: polled, so queued, in this order, pipelined.
        let (begun, read, prepared) =
            tokio::join!(biased; begin, conn.query(&before, &[]), conn.simple_query(&prepare));
        // An error leaves the transaction open (or, after a successful
        // PREPARE, the branch prepared) and the drop guard closes the
        // connection, which rolls an open transaction back; a prepared
        // branch whose PREPARE is reported failed is rolled back by gid.
        let prepared = self.prepared(begun, read, prepared)?;
        // Out of the transaction now: the connection may go back to the pool.
        self.conn.take();
        Ok(prepared)
    }

    /// A fresh branch whose statements return no rows (their results are
    /// counts, so the result limit cannot be passed) goes out pipelined:
    /// BEGIN, every statement, then the transaction id and PREPARE, one round
    /// trip in all. PostgreSQL runs them in order; after a failed statement
    /// the rest fail too (the transaction is aborted), the SELECT before
    /// PREPARE with them, so PREPARE never runs. Any other branch runs its
    /// statements one at a time ([`run_then_prepare`]).
    async fn run_and_prepare(
        mut self: Box<Self>,
        statements: &[Statement],
        gid: &Gid,
        result_bytes_max: usize,
    ) -> std::result::Result<(Vec<StatementResult>, Prepared), BranchFailed> {
        let fail = |statement, error| BranchFailed { statement, error };
        let gid_text = gid.validated().map_err(|e| fail(None, e))?;
        let counts_only = statements.len() * StatementResult::default().approx_bytes() <= result_bytes_max;
        if self.begun || statements.is_empty() || !counts_only {
            return run_then_prepare(self, statements, gid, result_bytes_max).await;
        }
        let mut prepared = Vec::with_capacity(statements.len());
        for statement in statements {
            match self.prepare_cached(&statement.sql).await {
                Ok(p) if p.columns().is_empty() && p.params().len() == statement.params.len() => prepared.push(p),
                // One at a time instead, if a statement returns rows (the
                // limit is checked before PREPARE), if its parameters do
                // not match (the client refuses it before sending; had it
                // refused one in the pipeline, the rest and PREPARE would
                // still have gone), or if it cannot be prepared yet: it may
                // need an earlier statement to have run (a table that
                // statement creates, a `SET LOCAL search_path`), and the
                // statements' errors must come in their order.
                _ => return run_then_prepare(self, statements, gid, result_bytes_max).await,
            }
        }
        let before = self.prepare_cached(BEFORE_PREPARE).await.map_err(|e| fail(None, e))?;
        crate::failpoint::hit("coordinator::before_prepare").await;
        // From here the branch is begun: an early exit (a deadline) drops
        // it, and the drop guard closes the connection and cancels what
        // PREPARE waits behind.
        self.begun = true;
        self.prepare_queued = true;
        let conn = self.conn().map_err(|e| fail(Some(0), e))?;
        let params: Vec<Vec<TextParam>> =
            statements.iter().map(|s| s.params.iter().map(text_param).collect()).collect();
        let refs: Vec<Vec<&(dyn ToSql + Sync)>> =
            params.iter().map(|ps| ps.iter().map(|p| p as &(dyn ToSql + Sync)).collect()).collect();
        let runs = in_order(prepared.iter().zip(&refs).map(|(p, r)| conn.execute(p, r)).collect());
        let prepare = end_and_prepare(&gid_text);
        // `biased`: polled, so queued, in this order.
        let (begun, ran, read, messages) = tokio::join!(biased;
            conn.batch_execute("BEGIN"), runs, conn.query(&before, &[]), conn.simple_query(&prepare));
        self.prepare_queued = false;
        if let Err(e) = begun {
            // Only a broken connection fails BEGIN; it is closed, never
            // reused.
            self.close();
            return Err(fail(Some(0), pg_error(&self.participant, e)));
        }
        let mut out = Vec::with_capacity(ran.len());
        for (i, n) in ran.into_iter().enumerate() {
            match n {
                Ok(n) => out.push(StatementResult { rows_affected: n, ..Default::default() }),
                Err(e) => {
                    let e = self.statement_failed(&statements[i].sql, e);
                    if messages.is_ok() {
                        // Cannot happen unless the client refused a
                        // statement unsent; the branch is prepared, and
                        // the driver rolls back a branch that failed by gid.
                        tracing::warn!(%gid, error = %e, "a pipelined branch prepared although a statement failed");
                    }
                    self.rollback().await.ok();
                    return Err(fail(Some(i), e));
                }
            }
        }
        // Every statement ran, so an error here is PREPARE's (or the
        // connection's): the drop guard closes the connection.
        let prepared = self.prepared(Ok(()), read, messages).map_err(|e| fail(None, e))?;
        // Out of the transaction now: the connection may go back to the pool.
        self.conn.take();
        Ok((out, prepared))
    }

    async fn rollback(mut self: Box<Self>) -> Result<()> {
        // On failure the drop guard closes the connection, which rolls back.
        if self.begun {
            self.conn()?.batch_execute(ROLLBACK).await.map_err(|e| pg_error(&self.participant, e))?;
        }
        self.conn.take();
        Ok(())
    }
}
