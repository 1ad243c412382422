//! Participants: the systems that take part in a transaction, behind one
//! trait.
//!
//! A participant adapter can open a branch and run statements in it
//! ([`BranchSession`]), prepare the branch under a gid, commit or roll back a
//! prepared branch by gid, list the prepared branches it holds that carry
//! this cluster's prefix (for recovery), and tell how a branch ended when its
//! gid has vanished (for heuristic detection). PostgreSQL ([`postgres`]) is
//! the first adapter; remote services and MySQL/MariaDB XA will implement the
//! same trait.

pub mod guard;
pub mod postgres;
pub mod remote;
pub mod sdk;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::ParticipantConfig;
use crate::config::ParticipantKind;
use crate::error::Error;
use crate::error::Result;
use crate::txn::gid::Gid;

/// A statement parameter or a returned value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int64(i64),
    Double(f64),
    String(String),
    Bytes(Vec<u8>),
    /// Text the database converts to the parameter's type: timestamps,
    /// uuids, numerics, JSON.
    Text(String),
}

/// One statement with its parameters (`$1`, `$2`, … in PostgreSQL).
#[derive(Clone, Debug, PartialEq)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Value>,
}

/// What a statement did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatementResult {
    pub rows_affected: u64,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl StatementResult {
    /// About how many bytes the result takes in an answer.
    pub fn approx_bytes(&self) -> usize {
        let value = |v: &Value| match v {
            Value::String(s) | Value::Text(s) => s.len() + 4,
            Value::Bytes(b) => b.len() + 4,
            _ => 10,
        };
        self.columns.iter().map(|c| c.len() + 4).sum::<usize>()
            + self.rows.iter().map(|r| r.iter().map(value).sum::<usize>() + 4).sum::<usize>()
            + 16
    }
}

/// A prepared branch, as the participant confirmed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The participant's own id of the branch's transaction, kept to learn
    /// how the branch ended if its gid vanishes.
    pub xid: Option<u64>,
}

/// The answer to COMMIT PREPARED or ROLLBACK PREPARED.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase2 {
    Done,
    /// No prepared branch of that gid: it ended earlier, one way or the
    /// other (see [`Participant::branch_outcome`]).
    GidMissing,
}

/// A branch open on a participant, until it is prepared or rolled back.
#[async_trait]
pub trait BranchSession: Send {
    async fn execute(&mut self, statement: &Statement) -> Result<StatementResult>;

    /// Prepares the branch under `gid` and confirms it really is prepared (a
    /// PREPARE of a failed transaction rolls back without an error).
    async fn prepare(self: Box<Self>, gid: &Gid) -> Result<Prepared>;

    /// Rolls back the unprepared branch.
    async fn rollback(self: Box<Self>) -> Result<()>;

    /// Runs a branch's `statements`, all known up front (a one-shot
    /// transaction), then prepares it under `gid`: [`run_then_prepare`],
    /// unless an adapter sends them together (PostgreSQL pipelines them).
    /// The returned rows may take at most `result_bytes_max` bytes. On a
    /// failed statement the branch is rolled back.
    async fn run_and_prepare(
        self: Box<Self>,
        statements: &[Statement],
        gid: &Gid,
        result_bytes_max: usize,
    ) -> std::result::Result<(Vec<StatementResult>, Prepared), BranchFailed> {
        run_then_prepare(self, statements, gid, result_bytes_max).await
    }
}

/// Why a branch did not prepare: a statement's error, or PREPARE's.
#[derive(Debug)]
pub struct BranchFailed {
    /// The index of the statement that failed; `None` if PREPARE did.
    pub statement: Option<usize>,
    pub error: Error,
}

/// Runs `statements` one at a time, each awaited, then prepares under
/// `gid`: what [`BranchSession::run_and_prepare`] does unless an adapter
/// does better.
pub async fn run_then_prepare<S: BranchSession + ?Sized>(
    mut session: Box<S>,
    statements: &[Statement],
    gid: &Gid,
    result_bytes_max: usize,
) -> std::result::Result<(Vec<StatementResult>, Prepared), BranchFailed> {
    let mut out = Vec::with_capacity(statements.len());
    let mut bytes = 0;
    for (i, s) in statements.iter().enumerate() {
        let result = session.execute(s).await.and_then(|r| {
            bytes += r.approx_bytes();
            check_result_bytes(bytes, result_bytes_max)?;
            Ok(r)
        });
        match result {
            Ok(r) => out.push(r),
            Err(error) => {
                session.rollback().await.ok();
                return Err(BranchFailed { statement: Some(i), error });
            }
        }
    }
    crate::failpoint::hit("coordinator::before_prepare").await;
    let prepared = session.prepare(gid).await.map_err(|error| BranchFailed { statement: None, error })?;
    Ok((out, prepared))
}

/// INVALID_ARGUMENT if a branch's returned rows, `bytes` so far, are over
/// `max` (`limits.result_bytes_max`).
pub fn check_result_bytes(bytes: usize, max: usize) -> Result<()> {
    if bytes > max {
        return Err(Error::InvalidInput(format!("the returned rows are over {max} bytes (limits.result_bytes_max)")));
    }
    Ok(())
}

#[async_trait]
pub trait Participant: Send + Sync {
    fn name(&self) -> &str;

    /// Checks the participant can take part in two-phase commit.
    async fn check(&self) -> Result<()>;

    async fn begin(&self) -> Result<Box<dyn BranchSession>>;

    async fn commit_prepared(&self, gid: &Gid) -> Result<Phase2>;

    async fn rollback_prepared(&self, gid: &Gid) -> Result<Phase2>;

    /// The prepared branches this participant holds with cluster
    /// `cluster_id`'s prefix.
    async fn prepared_branches(&self, cluster_id: &str) -> Result<Vec<Gid>>;

    /// How the branch with this xid ended: `Some(true)` committed,
    /// `Some(false)` rolled back, `None` unknown or still in progress.
    async fn branch_outcome(&self, xid: u64) -> Result<Option<bool>>;

    /// Where a remote participant's branch lives, recorded with the COMMIT
    /// so any leader can finish it; `None` for a configured database.
    fn remote(&self) -> Option<crate::txn::RemoteBranch> {
        None
    }
}

/// The configured participants, by name.
#[derive(Clone, Default)]
pub struct Registry {
    by_name: BTreeMap<String, Arc<dyn Participant>>,
    /// Configured remote participants: name → endpoint. Their branches are
    /// enlisted, not opened here.
    remotes: BTreeMap<String, String>,
}

impl Registry {
    pub fn from_config(list: &[ParticipantConfig]) -> Result<Self> {
        let mut by_name: BTreeMap<String, Arc<dyn Participant>> = BTreeMap::new();
        let mut remotes = BTreeMap::new();
        for p in list {
            match p.kind {
                ParticipantKind::Postgres => {
                    let participant = postgres::PostgresParticipant::new(&p.name, &p.url, p.pool_size)?;
                    by_name.insert(p.name.clone(), Arc::new(participant));
                }
                ParticipantKind::Remote => {
                    remotes.insert(p.name.clone(), p.url.clone());
                }
            }
        }
        Ok(Self { by_name, remotes })
    }

    /// The endpoint of the configured remote participant `name`.
    pub fn remote_endpoint(&self, name: &str) -> Option<&str> {
        self.remotes.get(name).map(String::as_str)
    }

    /// The configured remote participants: (name, endpoint).
    pub fn remotes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.remotes.iter().map(|(n, e)| (n.as_str(), e.as_str()))
    }

    /// The participant called `name`, or INVALID_ARGUMENT naming the known
    /// ones.
    pub fn get(&self, name: &str) -> Result<Arc<dyn Participant>> {
        if let Some(endpoint) = self.remotes.get(name) {
            return Err(Error::InvalidInput(format!(
                "participant {name:?} is remote ({endpoint}): its service runs its own work and enlists \
                 its branch (Transactions.Enlist); Tandem runs no statements on it"
            )));
        }
        self.by_name.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
            Error::InvalidInput(format!("unknown participant {name:?} (configured: {})", known.join(", ")))
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Checks every participant and logs what is wrong with each, clearly:
    /// run at start-up, so a misconfigured database is known before the
    /// first transaction needs it.
    pub async fn check_all(&self) {
        for (name, p) in &self.by_name {
            match p.check().await {
                Ok(()) => tracing::info!(participant = %name, "participant ready for two-phase commit"),
                Err(e) => tracing::error!(participant = %name, "participant cannot take part in transactions: {e}"),
            }
        }
    }
}
