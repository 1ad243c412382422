//! [`PgResource`]: a ready [`Resource`] for a service that keeps its data in
//! its own PostgreSQL. Its branch is a PostgreSQL transaction that becomes a
//! prepared transaction at `Prepare`.
//!
//! # Using it
//!
//! [`PgResource::install`] once at start (it creates the bookkeeping table
//! and checks the server can prepare transactions). Per request, the service
//! takes the branch with [`PgResource::begin`], runs its own SQL on the
//! [`PgBranch`] (a connection inside `BEGIN`), drops the `PgBranch` to park
//! the branch until the coordinator's `Prepare` (or takes it again with
//! `begin` for more work under the same txid), and enlists it. Never run
//! transaction control (`COMMIT`, `ROLLBACK`, `PREPARE TRANSACTION`, …) on a
//! branch: the resource does that.
//!
//! # What is durable, and where
//!
//! The table `tandem_branches (cluster_id, txid, branch, state, at)` with the
//! primary key `(cluster_id, txid, branch)` remembers how branches ended:
//!
//! - At `Prepare` the branch INSERTs its own row with state `committed`,
//!   inside its own transaction, and then runs `PREPARE TRANSACTION`. The
//!   row therefore becomes visible exactly when `COMMIT PREPARED` commits
//!   the branch's work, and vanishes with it on `ROLLBACK PREPARED`: "the
//!   branch committed" is recorded atomically with the commit itself.
//! - An `Abort` INSERTs a row with state `aborted` (a tombstone) in a
//!   transaction of its own. A branch that tries to prepare afterwards
//!   collides with it on the primary key and votes ABORT, also when it runs
//!   in another process of the service. While a branch is being prepared,
//!   its uncommitted row makes a concurrent tombstone wait for the outcome
//!   (bounded by [`PgOptions::busy_timeout`]), so one of the two always
//!   loses cleanly.
//! - Prepared branches are PostgreSQL's own prepared transactions, named
//!   `tdmp_<cluster_id>_<txid>_<branch>` ([`gid`]). Neither the cluster id
//!   nor the txid contains `_`, so a gid parses back by splitting at the
//!   first two `_` after the prefix; the prefix differs from the
//!   coordinator's own `tdm_`, so its recovery never touches these.
//!
//! So the state is: open in this process → active; the gid in
//! `pg_prepared_xacts` → prepared; a `committed` row → committed; an
//! `aborted` row → aborted; otherwise unknown. An open branch lives only in
//! this process: if the process dies, PostgreSQL rolls its transaction back
//! and the branch becomes unknown, and a later `Prepare` votes ABORT.
//!
//! The rows are small but grow with the number of transactions:
//! [`PgResource::forget_before`] deletes old ones. Forgetting a row is safe
//! once the coordinator is done with the transaction (a forgotten committed
//! branch answers a late `Commit` UNKNOWN_BRANCH, which the coordinator takes
//! as committed earlier); keep them at least as long as the cluster's
//! `completed_retention_s` (a day by default).
//!
//! # Bounds
//!
//! Every open branch holds a connection: at most
//! [`PgOptions::branches_open_max`] are open at once (more `begin`s get
//! RESOURCE_EXHAUSTED), and one nobody used for
//! [`PgOptions::branch_idle_timeout`] is rolled back. Phase 2 and
//! bookkeeping use a separate small pool, so committing prepared branches,
//! which releases their locks, never waits behind open branches waiting for
//! those very locks.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::Weak;
use std::time::Duration;
use std::time::Instant;

use async_trait::async_trait;
use deadpool_postgres::Manager;
use deadpool_postgres::ManagerConfig;
use deadpool_postgres::Object;
use deadpool_postgres::Pool;
use deadpool_postgres::RecyclingMethod;
use tokio::sync::OwnedMutexGuard;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::BranchId;
use super::BranchState;
use super::Resource;
use super::Vote;
use super::validate_cluster_id;
use crate::error::Error;
use crate::error::Result;

/// Every gid of this adapter starts with this, then `_<cluster_id>_`.
pub const GID_MAGIC: &str = "tdmp";
/// The bookkeeping table.
pub const TABLE: &str = "tandem_branches";

const CREATE_TABLE: &str = "
CREATE TABLE IF NOT EXISTS tandem_branches (
    cluster_id text NOT NULL,
    txid text NOT NULL,
    branch text NOT NULL,
    state text NOT NULL CHECK (state IN ('committed', 'aborted')),
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cluster_id, txid, branch)
);
CREATE INDEX IF NOT EXISTS tandem_branches_at ON tandem_branches (at);
";

const SELECT_ROW: &str = "SELECT state FROM tandem_branches WHERE cluster_id = $1 AND txid = $2 AND branch = $3";
const SELECT_PREPARED: &str = "SELECT 1 FROM pg_prepared_xacts WHERE gid = $1 AND database = current_database()";

/// The limits of a [`PgResource`].
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Most branches open at once (begun, not yet prepared or ended). Each
    /// holds a connection; a `begin` beyond it gets RESOURCE_EXHAUSTED.
    pub branches_open_max: usize,
    /// An open branch nobody has used for this long is rolled back (its
    /// connection closed), so a forgotten branch never holds locks for
    /// long; a later `Prepare` of it votes ABORT. Keep it above the longest
    /// time between the service's work and the coordinator's `Prepare`
    /// (the transaction's deadline).
    pub branch_idle_timeout: Duration,
    /// How long a call waits for a branch another request of the service is
    /// using, and for a row lock when recording a tombstone; past it the
    /// call fails UNAVAILABLE and the coordinator asks again.
    pub busy_timeout: Duration,
    /// Connections for phase 2 and bookkeeping ([`PgResource::connect`]
    /// only).
    pub control_pool_size: usize,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            branches_open_max: 32,
            branch_idle_timeout: Duration::from_secs(120),
            busy_timeout: Duration::from_secs(5),
            control_pool_size: 4,
        }
    }
}

/// A [`Resource`] whose branches are PostgreSQL transactions; see the
/// [module docs](self). Cheap to clone: clones share the branches.
#[derive(Clone)]
pub struct PgResource {
    inner: Arc<Inner>,
}

struct Inner {
    /// Connections of open branches.
    branches: Pool,
    /// Connections for everything else.
    control: Pool,
    open: Mutex<HashMap<BranchId, Arc<tokio::sync::Mutex<Slot>>>>,
    options: PgOptions,
}

/// One open branch. `conn` is `None` while the branch is being begun, and
/// once it has ended (the slot is then out of the map, or about to be).
struct Slot {
    conn: Option<Object>,
    /// Last use, for the idle timeout.
    touched: Instant,
}

impl Drop for Slot {
    /// A connection inside an open transaction never goes back to the pool:
    /// it is closed, and PostgreSQL rolls the transaction back.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            close(conn);
        }
    }
}

fn close(conn: Object) {
    drop(Object::take(conn));
}

/// A connection inside the branch's transaction, closed (so rolled back) if
/// dropped before [`Closing::release`].
struct Closing(Option<Object>);

impl Closing {
    fn conn(&self) -> &Object {
        self.0.as_ref().expect("a Closing holds its connection until released")
    }

    /// The transaction has ended: the connection may go back to the pool.
    fn release(mut self) {
        self.0.take();
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            close(conn);
        }
    }
}

impl PgResource {
    /// A resource for the database at `url` (`postgres://user@host:port/db`),
    /// with a pool of `branches_open_max` connections for branches and one
    /// of `control_pool_size` for the rest. Must be called inside a Tokio
    /// runtime: it starts the task that rolls back idle branches.
    pub fn connect(url: &str, options: PgOptions) -> Result<Self> {
        let config: tokio_postgres::Config =
            url.parse().map_err(|e| Error::InvalidInput(format!("bad PostgreSQL url: {e}")))?;
        let pool_of = |size: usize| {
            let manager =
                Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
            Pool::builder(manager)
                .max_size(size.max(1))
                .wait_timeout(Some(options.busy_timeout))
                .create_timeout(Some(Duration::from_secs(5)))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|e| Error::InvalidInput(format!("PostgreSQL pool: {e}")))
        };
        let branches = pool_of(options.branches_open_max)?;
        let control = pool_of(options.control_pool_size)?;
        Self::start(branches, control, options)
    }

    /// A resource using `pool` for branches and everything else. The pool
    /// must have more connections than `branches_open_max`, so that phase 2
    /// always finds one; the pool should have a wait timeout. Must be called
    /// inside a Tokio runtime.
    pub fn new(pool: Pool, options: PgOptions) -> Result<Self> {
        let size = pool.status().max_size;
        if size <= options.branches_open_max {
            return Err(Error::InvalidInput(format!(
                "the pool has {size} connections; it needs more than branches_open_max ({}) to leave room for \
                 phase 2",
                options.branches_open_max
            )));
        }
        Self::start(pool.clone(), pool, options)
    }

    fn start(branches: Pool, control: Pool, options: PgOptions) -> Result<Self> {
        if options.branches_open_max == 0 || options.branch_idle_timeout.is_zero() {
            return Err(Error::InvalidInput("branches_open_max and branch_idle_timeout must be above 0".into()));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Internal("PgResource must be created inside a Tokio runtime".into()))?;
        let inner = Arc::new(Inner { branches, control, open: Mutex::new(HashMap::new()), options });
        runtime.spawn(reap_idle(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// Creates the bookkeeping table if missing, and checks that the server
    /// can prepare transactions (`max_prepared_transactions` above 0).
    pub async fn install(&self) -> Result<()> {
        let conn = self.inner.control().await?;
        let row = conn.query_one("SHOW max_prepared_transactions", &[]).await.map_err(|e| pg_error("install", e))?;
        if row.get::<_, &str>(0).trim() == "0" {
            return Err(Error::FailedPrecondition(
                "the PostgreSQL server has max_prepared_transactions = 0, so it cannot prepare branches; set it \
                 above 0 (e.g. to max_connections) and restart it"
                    .into(),
            ));
        }
        // Checked in the catalog first: even with IF NOT EXISTS, CREATE INDEX
        // locks the table, and would wait forever for the prepared branches
        // (holding row locks in it) that this very process is to finish.
        let installed = conn
            .query_one("SELECT to_regclass('tandem_branches_at') IS NOT NULL", &[])
            .await
            .map_err(|e| pg_error("install", e))?;
        if installed.get::<_, bool>(0) {
            return Ok(());
        }
        let mut conn = conn;
        // Dropped without commit on an error, the transaction rolls back.
        let tx = conn.transaction().await.map_err(|e| pg_error("install", e))?;
        let created = match tx.batch_execute(&format!("{}; {CREATE_TABLE}", self.inner.set_lock_timeout())).await {
            Ok(()) => tx.commit().await,
            Err(e) => Err(e),
        };
        match created {
            Ok(()) => Ok(()),
            // Two processes creating it at once: one wins, which is enough.
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(()),
            Err(e) => Err(pg_error("install", e)),
        }
    }

    /// The open branch `id`, begun (in a new transaction) if it is not open
    /// yet: [`PgBranch::is_new`] tells which. Waits up to
    /// [`PgOptions::busy_timeout`] while another request uses the branch.
    ///
    /// Fails with RESOURCE_EXHAUSTED at [`PgOptions::branches_open_max`] open
    /// branches, FAILED_PRECONDITION if the branch was aborted already (an
    /// `Abort` overtook the work: the transaction is over), ALREADY_EXISTS
    /// if it is prepared or committed already.
    pub async fn begin(&self, id: &BranchId) -> Result<PgBranch> {
        let (slot, fresh) = {
            let mut open = self.inner.open.lock().expect("open branches poisoned");
            match open.get(id) {
                Some(slot) => (slot.clone(), false),
                None => {
                    let max = self.inner.options.branches_open_max;
                    if open.len() >= max {
                        return Err(Error::ResourceExhausted(format!(
                            "{max} branches are open already (branches_open_max); retry later"
                        )));
                    }
                    let slot = Arc::new(tokio::sync::Mutex::new(Slot { conn: None, touched: Instant::now() }));
                    open.insert(id.clone(), slot.clone());
                    (slot, true)
                }
            }
        };
        let mut guard = self.inner.lock_slot(id, slot.clone()).await?;
        if fresh {
            match self.inner.open_branch(id).await {
                Ok(conn) => guard.conn = Some(conn),
                Err(e) => {
                    self.inner.remove_if_same(id, &slot);
                    return Err(e);
                }
            }
        } else if guard.conn.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "branch {id} has ended (prepared, rolled back or expired) while waiting for it"
            )));
        }
        guard.touched = Instant::now();
        Ok(PgBranch { id: id.clone(), slot: guard, inner: self.inner.clone(), fresh })
    }

    /// How many branches are open now.
    pub fn open_branches(&self) -> usize {
        self.inner.open.lock().expect("open branches poisoned").len()
    }

    /// Deletes the rows of branches that ended (committed, or were aborted)
    /// more than `age` ago; answers how many. For a committed branch the
    /// time is when its transaction began. See the [module docs](self) for
    /// how long to keep them.
    pub async fn forget_before(&self, age: Duration) -> Result<u64> {
        let conn = self.inner.control().await?;
        conn.execute("DELETE FROM tandem_branches WHERE at < now() - make_interval(secs => $1)", &[&age.as_secs_f64()])
            .await
            .map_err(|e| pg_error("forgetting old branches", e))
    }
}

impl Inner {
    /// Bounds lock waits in the current transaction by the busy timeout.
    fn set_lock_timeout(&self) -> String {
        format!("SET LOCAL lock_timeout = {}", self.options.busy_timeout.as_millis().max(1))
    }

    async fn control(&self) -> Result<Object> {
        self.control.get().await.map_err(|e| Error::Unavailable { message: format!("PostgreSQL: {e}"), leader: None })
    }

    async fn lock_slot(&self, id: &BranchId, slot: Arc<tokio::sync::Mutex<Slot>>) -> Result<OwnedMutexGuard<Slot>> {
        tokio::time::timeout(self.options.busy_timeout, slot.lock_owned()).await.map_err(|_| Error::Unavailable {
            message: format!("branch {id} is in use by another request of the service"),
            leader: None,
        })
    }

    /// Removes `id` from the open branches if it is still `slot`.
    fn remove_if_same(&self, id: &BranchId, slot: &Arc<tokio::sync::Mutex<Slot>>) {
        let mut open = self.open.lock().expect("open branches poisoned");
        if open.get(id).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            open.remove(id);
        }
    }

    /// Ends the open branch `id` in this process, if any: takes its
    /// connection (still inside the transaction) out of the open branches.
    async fn take_open(&self, id: &BranchId) -> Result<Option<Option<Closing>>> {
        let Some(slot) = self.open.lock().expect("open branches poisoned").get(id).cloned() else { return Ok(None) };
        let mut guard = self.lock_slot(id, slot.clone()).await?;
        let conn = guard.conn.take().map(|c| Closing(Some(c)));
        self.remove_if_same(id, &slot);
        Ok(Some(conn))
    }

    /// A connection inside `BEGIN` for a new branch, after checking that the
    /// branch has not ended already.
    async fn open_branch(&self, id: &BranchId) -> Result<Object> {
        let gid = gid(id)?;
        let conn = self.branches.get().await.map_err(|e| Error::Unavailable {
            message: format!("no PostgreSQL connection for branch {id}: {e}"),
            leader: None,
        })?;
        let conn = Closing(Some(conn));
        let c = conn.conn();
        let ended = c
            .query_one(
                "SELECT (SELECT state FROM tandem_branches WHERE cluster_id = $1 AND txid = $2 AND branch = $3), \
                 EXISTS (SELECT 1 FROM pg_prepared_xacts WHERE gid = $4 AND database = current_database())",
                &[&id.cluster_id, &id.txid, &id.branch, &gid],
            )
            .await
            .map_err(|e| pg_error(&format!("beginning branch {id}"), e))?;
        let refused = match (ended.get::<_, Option<&str>>(0), ended.get::<_, bool>(1)) {
            (Some("aborted"), _) => Some(Error::FailedPrecondition(format!(
                "branch {id} is aborted already (an Abort overtook the work): its transaction is over"
            ))),
            (Some(state), _) => Some(Error::AlreadyExists(format!("branch {id} is {state} already"))),
            (None, true) => Some(Error::AlreadyExists(format!("branch {id} is prepared already"))),
            (None, false) => None,
        };
        if let Some(e) = refused {
            // Not inside a transaction yet: the connection may be reused.
            conn.release();
            return Err(e);
        }
        c.batch_execute("BEGIN").await.map_err(|e| pg_error(&format!("beginning branch {id}"), e))?;
        let mut conn = conn;
        Ok(conn.0.take().expect("held until here"))
    }

    /// Records the tombstone of `id`; fails if the branch is committed.
    async fn tombstone(&self, id: &BranchId) -> Result<()> {
        let context = format!("recording branch {id} as aborted");
        let mut conn = self.control().await?;
        let tx = conn.transaction().await.map_err(|e| pg_error(&context, e))?;
        tx.batch_execute(&self.set_lock_timeout()).await.map_err(|e| pg_error(&context, e))?;
        tx.execute(
            "INSERT INTO tandem_branches (cluster_id, txid, branch, state) VALUES ($1, $2, $3, 'aborted') \
             ON CONFLICT (cluster_id, txid, branch) DO NOTHING",
            &[&id.cluster_id, &id.txid, &id.branch],
        )
        .await
        .map_err(|e| pg_error(&context, e))?;
        let row = tx
            .query_one(SELECT_ROW, &[&id.cluster_id, &id.txid, &id.branch])
            .await
            .map_err(|e| pg_error(&context, e))?;
        if row.get::<_, &str>(0) == "committed" {
            return Err(Error::FailedPrecondition(format!("branch {id} is committed and cannot be aborted")));
        }
        tx.commit().await.map_err(|e| pg_error(&context, e))
    }

    /// Rolls back every open branch unused for the idle timeout. A branch in
    /// use (locked) is skipped: its user touches it when done.
    fn reap(&self) {
        let idle = self.options.branch_idle_timeout;
        let mut open = self.open.lock().expect("open branches poisoned");
        open.retain(|id, slot| {
            let Ok(mut s) = slot.try_lock() else { return true };
            if s.touched.elapsed() < idle {
                return true;
            }
            if let Some(conn) = s.conn.take() {
                tracing::warn!(branch = %id, ?idle, "open branch idle too long: rolled back");
                close(conn);
            }
            false
        });
    }
}

/// Rolls back idle branches until the resource is dropped.
async fn reap_idle(inner: Weak<Inner>) {
    let every = match inner.upgrade() {
        Some(i) => (i.options.branch_idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(30)),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        match inner.upgrade() {
            Some(i) => i.reap(),
            None => return,
        }
    }
}

/// An open branch, taken by one request of the service: a connection inside
/// the branch's transaction (it derefs to [`tokio_postgres::Client`]). Drop
/// it to park the branch until `Prepare`, or [`rollback`](Self::rollback) it
/// to end it now. While a request holds it, the coordinator's calls for the
/// branch wait (up to [`PgOptions::busy_timeout`]), and the idle timeout does
/// not run: hold it only while running statements.
pub struct PgBranch {
    id: BranchId,
    slot: OwnedMutexGuard<Slot>,
    inner: Arc<Inner>,
    fresh: bool,
}

impl PgBranch {
    /// The branch.
    pub fn id(&self) -> &BranchId {
        &self.id
    }

    /// Whether [`PgResource::begin`] began the branch (rather than taking
    /// back one open already).
    pub fn is_new(&self) -> bool {
        self.fresh
    }

    /// The connection, inside the branch's transaction.
    pub fn client(&self) -> &tokio_postgres::Client {
        self.slot.conn.as_ref().expect("a PgBranch holds its connection")
    }

    /// Rolls the branch back and ends it: a later `Prepare` votes ABORT.
    pub async fn rollback(mut self) -> Result<()> {
        let conn = Closing(self.slot.conn.take());
        self.inner.remove_if_same(&self.id, OwnedMutexGuard::mutex(&self.slot));
        conn.conn().batch_execute("ROLLBACK").await.map_err(|e| pg_error(&format!("rolling back {}", self.id), e))?;
        conn.release();
        tracing::info!(branch = %self.id, "branch rolled back by the service");
        Ok(())
    }
}

impl std::fmt::Debug for PgBranch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBranch").field("id", &self.id).field("new", &self.fresh).finish()
    }
}

impl std::ops::Deref for PgBranch {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &tokio_postgres::Client {
        self.client()
    }
}

impl Drop for PgBranch {
    fn drop(&mut self) {
        self.slot.touched = Instant::now();
    }
}

#[async_trait]
impl Resource for PgResource {
    async fn state(&self, id: &BranchId) -> Result<BranchState> {
        if self.inner.open.lock().expect("open branches poisoned").contains_key(id) {
            return Ok(BranchState::Active);
        }
        self.durable_state(id).await
    }

    /// Any failure before `PREPARE TRANSACTION` is sent votes ABORT: the
    /// branch's connection is then closed, which rolls it back. Only a lost
    /// connection during `PREPARE` itself is an error (outcome unknown; the
    /// retry reads the state).
    async fn prepare(&self, id: &BranchId) -> Result<Vote> {
        let gid = gid(id)?;
        let conn = match self.inner.take_open(id).await? {
            Some(Some(conn)) => conn,
            Some(None) | None => {
                // Not open (any more): what is durable decides. A branch
                // found open a moment ago may be one a `begin` was checking
                // (which refuses a prepared branch): a prepared branch is
                // never rolled back here.
                return Ok(match self.durable_state(id).await? {
                    BranchState::Prepared | BranchState::Committed => Vote::Prepared,
                    _ => Vote::Abort(format!(
                        "branch {id} is not open here (never begun, rolled back after being idle, or lost in a restart)"
                    )),
                });
            }
        };
        self.prepare_open(id, &gid, conn).await
    }

    async fn commit(&self, id: &BranchId) -> Result<()> {
        self.commit_prepared(id).await
    }

    async fn abort(&self, id: &BranchId) -> Result<()> {
        self.abort_branch(id).await
    }

    async fn idle(&self, cluster_id: &str, idle: Duration) -> Result<Vec<BranchId>> {
        self.idle_branches(cluster_id, idle)
    }

    async fn prepared(&self, cluster_id: &str) -> Result<Vec<BranchId>> {
        self.prepared_branches(cluster_id).await
    }
}

impl PgResource {
    /// The branch's state as PostgreSQL holds it, open branches aside.
    async fn durable_state(&self, id: &BranchId) -> Result<BranchState> {
        let context = format!("reading the state of branch {id}");
        let conn = self.inner.control().await?;
        // Prepared first, then the row, in two statements: once the gid has
        // left pg_prepared_xacts, a new snapshot sees the commit's row.
        if conn.query_opt(SELECT_PREPARED, &[&gid(id)?]).await.map_err(|e| pg_error(&context, e))?.is_some() {
            return Ok(BranchState::Prepared);
        }
        let row = conn
            .query_opt(SELECT_ROW, &[&id.cluster_id, &id.txid, &id.branch])
            .await
            .map_err(|e| pg_error(&context, e))?;
        Ok(match row.as_ref().map(|r| r.get::<_, &str>(0)) {
            Some("committed") => BranchState::Committed,
            Some("aborted") => BranchState::Aborted,
            _ => BranchState::Unknown,
        })
    }

    /// Prepares the open branch whose connection `conn` is.
    async fn prepare_open(&self, id: &BranchId, gid: &str, conn: Closing) -> Result<Vote> {
        let c = conn.conn();
        let failed = |e: tokio_postgres::Error| {
            Vote::Abort(match e.as_db_error() {
                Some(db) if db.code() == &SqlState::IN_FAILED_SQL_TRANSACTION => {
                    "a statement of the branch failed, so PostgreSQL rolled it back".to_string()
                }
                Some(db) if db.code() == &SqlState::UNIQUE_VIOLATION => {
                    "the branch was aborted before it could prepare (an Abort overtook the work)".to_string()
                }
                Some(db) => {
                    format!("PostgreSQL refused to prepare the branch: {} ({})", db.message(), db.code().code())
                }
                None => format!("lost the connection to PostgreSQL before preparing the branch: {e}"),
            })
        };
        let row = match c.query_one("SELECT pg_current_xact_id_if_assigned() IS NULL", &[]).await {
            Ok(row) => row,
            Err(e) => return Ok(failed(e)),
        };
        if row.get::<_, bool>(0) {
            return Ok(match c.batch_execute("ROLLBACK").await {
                Ok(()) => {
                    conn.release();
                    Vote::ReadOnly
                }
                Err(e) => failed(e),
            });
        }
        if let Err(e) = c.batch_execute(&self.inner.set_lock_timeout()).await {
            return Ok(failed(e));
        }
        if let Err(e) = c
            .execute(
                "INSERT INTO tandem_branches (cluster_id, txid, branch, state) VALUES ($1, $2, $3, 'committed')",
                &[&id.cluster_id, &id.txid, &id.branch],
            )
            .await
        {
            return Ok(failed(e));
        }
        if let Err(e) = c.batch_execute(&format!("PREPARE TRANSACTION '{gid}'")).await {
            if e.as_db_error().is_some() {
                return Ok(failed(e));
            }
            return Err(Error::OutcomeUnknown(format!(
                "branch {id}: lost the connection to PostgreSQL during PREPARE TRANSACTION: {e}"
            )));
        }
        // Out of the transaction now: the connection may go back to the pool
        // (a prepared transaction outlives its connection anyway).
        let found = conn.conn().query_opt(SELECT_PREPARED, &[&gid]).await;
        conn.release();
        match found {
            Ok(Some(_)) => Ok(Vote::Prepared),
            // PREPARE of a failed transaction rolls it back, successfully.
            Ok(None) => Ok(Vote::Abort("a statement of the branch failed, so PostgreSQL rolled it back".into())),
            Err(e) => Err(pg_error(&format!("checking that branch {id} is prepared"), e)),
        }
    }

    async fn commit_prepared(&self, id: &BranchId) -> Result<()> {
        let gid = gid(id)?;
        let context = format!("committing branch {id}");
        let conn = self.inner.control().await?;
        match conn.batch_execute(&format!("COMMIT PREPARED '{gid}'")).await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {
                let row = conn
                    .query_opt(SELECT_ROW, &[&id.cluster_id, &id.txid, &id.branch])
                    .await
                    .map_err(|e| pg_error(&context, e))?;
                match row.as_ref().map(|r| r.get::<_, &str>(0)) {
                    Some("committed") => Ok(()),
                    other => Err(Error::FailedPrecondition(format!(
                        "branch {id} is not prepared (its record says {})",
                        other.unwrap_or("nothing")
                    ))),
                }
            }
            Err(e) => Err(pg_error(&context, e)),
        }
    }

    async fn abort_branch(&self, id: &BranchId) -> Result<()> {
        let gid = gid(id)?;
        let context = format!("aborting branch {id}");
        if let Some(Some(conn)) = self.inner.take_open(id).await? {
            // On failure the connection is closed, which rolls back too.
            if conn.conn().batch_execute("ROLLBACK").await.is_ok() {
                conn.release();
            }
        } else {
            let control = self.inner.control().await?;
            match control.batch_execute(&format!("ROLLBACK PREPARED '{gid}'")).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {}
                Err(e) => return Err(pg_error(&context, e)),
            }
        }
        self.inner.tombstone(id).await
    }

    fn idle_branches(&self, cluster_id: &str, idle: Duration) -> Result<Vec<BranchId>> {
        let open = self.inner.open.lock().expect("open branches poisoned");
        // A branch in use (its slot locked) is not idle.
        Ok(open
            .iter()
            .filter(|(id, slot)| {
                id.cluster_id == cluster_id
                    && slot.try_lock().is_ok_and(|s| s.conn.is_some() && s.touched.elapsed() >= idle)
            })
            .map(|(id, _)| id.clone())
            .collect())
    }

    async fn prepared_branches(&self, cluster_id: &str) -> Result<Vec<BranchId>> {
        validate_cluster_id(cluster_id)?;
        let conn = self.inner.control().await?;
        let prefix = format!("{GID_MAGIC}_{cluster_id}_");
        let rows = conn
            .query(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND starts_with(gid, $1) \
                 ORDER BY gid",
                &[&prefix],
            )
            .await
            .map_err(|e| pg_error("listing prepared branches", e))?;
        Ok(rows.iter().filter_map(|r| parse_gid(r.get::<_, &str>(0))).filter(|b| b.cluster_id == cluster_id).collect())
    }
}

/// The name of `id`'s prepared transaction: `tdmp_<cluster_id>_<txid>_<branch>`.
/// Checked to hold only `[a-z0-9_-]` (it is spliced into `PREPARE
/// TRANSACTION '…'`, so nothing may need quoting) and to fit PostgreSQL's
/// 200-byte limit.
pub fn gid(id: &BranchId) -> Result<String> {
    let gid = format!("{GID_MAGIC}_{}_{}_{}", id.cluster_id, id.txid, id.branch);
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-';
    if gid.len() >= 200 || !gid.bytes().all(allowed) {
        return Err(Error::InvalidInput(format!("gid {gid:?} must be under 200 bytes of [a-z0-9_-]")));
    }
    Ok(gid)
}

/// The branch a gid of this adapter names; `None` for any other text.
pub fn parse_gid(gid: &str) -> Option<BranchId> {
    let rest = gid.strip_prefix(GID_MAGIC)?.strip_prefix('_')?;
    let (cluster_id, rest) = rest.split_once('_')?;
    let (txid, branch) = rest.split_once('_')?;
    BranchId::new(cluster_id, txid, branch).ok()
}

/// A PostgreSQL error in context: a missing table says to install, the rest
/// as the coordinator's adapter sorts them (a lost connection is
/// UNAVAILABLE, so the coordinator asks again).
fn pg_error(context: &str, e: tokio_postgres::Error) -> Error {
    if e.code() == Some(&SqlState::UNDEFINED_TABLE) {
        return Error::FailedPrecondition(format!(
            "{context}: the table {TABLE} is missing; call PgResource::install() at start"
        ));
    }
    if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) {
        return Error::Unavailable { message: format!("{context}: waiting for a lock timed out"), leader: None };
    }
    crate::participant::postgres::pg_error(context, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_round_trips() {
        let id = BranchId::new("local", "01hx3k9q", "stock_eu-1").unwrap();
        let g = gid(&id).unwrap();
        assert_eq!(g, "tdmp_local_01hx3k9q_stock_eu-1");
        assert_eq!(parse_gid(&g), Some(id));
        let longest = BranchId::new(&"c".repeat(16), &"t".repeat(48), &"b".repeat(64)).unwrap();
        assert_eq!(parse_gid(&gid(&longest).unwrap()), Some(longest));
    }

    #[test]
    fn foreign_gids_are_not_parsed() {
        for g in
            ["tdm_local_t1_0", "tdmp_local_t1", "tdmp__t1_b", "tdmp_local__b", "tdmp_local_t1_", "tdmp_Local_t1_b", "x"]
        {
            assert_eq!(parse_gid(g), None, "{g}");
        }
    }
}
