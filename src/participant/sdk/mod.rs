//! The participant SDK: what a service author uses to take part in Tandem
//! transactions (`proto/tandem/v1/participant.proto`).
//!
//! A service with its own storage (say an inventory service with its own
//! PostgreSQL) joins a global transaction as a *branch*: it does its work
//! under the transaction's txid, calls `Transactions.Enlist` with its
//! endpoint and a branch name, and from then on the coordinator drives the
//! branch through `tandem.v1.Participant`: `Prepare`, then `Commit` or
//! `Abort`. The author implements one small trait, [`Resource`], for their
//! storage; [`ParticipantService`] serves the protocol on top of it and
//! takes care of its hard parts, and [`spawn_resolver`] settles branches
//! left in doubt. [`postgres::PgResource`] is a ready [`Resource`] for a
//! service that keeps its data in PostgreSQL.
//!
//! # Why the protocol is harder than it looks
//!
//! Every call may arrive twice, late, or out of order, because the
//! coordinator retries any call that failed or got no answer, and a retry may
//! overtake the original. So the service must:
//!
//! - answer a *duplicate* the way it answered the original (a second
//!   `Prepare` of a prepared branch is PREPARED again, a second `Commit` is
//!   DONE);
//! - handle a *null compensation*: an `Abort` of a branch it has never seen
//!   (the work is still in flight, or never happened) must succeed, and be
//!   remembered durably (a *tombstone*);
//! - refuse a *hanging* branch: a `Prepare` that arrives after the `Abort`
//!   answered DONE must vote ABORT, never revive the branch;
//! - keep two calls for one branch from interleaving (a `Prepare` and an
//!   `Abort` racing on the same branch would otherwise leave it prepared
//!   after the `Abort` answered DONE).
//!
//! [`ParticipantService`] does all four: it serializes the calls of one
//! branch behind a per-branch lock, reads the branch's [`BranchState`] from
//! the resource, and decides from the state alone what to do:
//!
//! | state \ call | `Prepare` | `Commit` | `Abort` |
//! |---|---|---|---|
//! | [`Unknown`](BranchState::Unknown) | record tombstone, ABORT | UNKNOWN_BRANCH | record tombstone, DONE |
//! | [`Active`](BranchState::Active) | [`Resource::prepare`] votes | FAILED_PRECONDITION | [`Resource::abort`], DONE |
//! | [`Prepared`](BranchState::Prepared) | PREPARED | [`Resource::commit`], DONE | [`Resource::abort`], DONE |
//! | [`Committed`](BranchState::Committed) | PREPARED | DONE | FAILED_PRECONDITION |
//! | [`Aborted`](BranchState::Aborted) | ABORT | FAILED_PRECONDITION | DONE |
//!
//! A `Prepare` of an unknown branch records a tombstone before it votes
//! ABORT because the vote promises that the branch "is rolled back and will
//! stay so": work for the txid that is still in flight must not be able to
//! prepare later. For the same reason an ABORT vote of [`Resource::prepare`]
//! is followed by [`Resource::abort`]. A `Commit` of an aborted branch, or an
//! `Abort` of a committed one, means the outcome was decided against what the
//! branch did (or someone ended the branch by hand): it is logged as an error
//! and refused, never papered over.
//!
//! # In doubt
//!
//! A branch that is prepared waits for the decision. If the service restarts,
//! or the coordinator's `Commit` or `Abort` does not arrive for a while, the
//! branch is *in doubt*; [`resolve_in_doubt`] asks the cluster
//! (`Transactions.GetOutcome`) for each prepared branch and finishes it.
//! [`spawn_resolver`] runs it at start and then periodically.
//!
//! # What an author writes
//!
//! ```no_run
//! # async fn example() -> tandem::error::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use tandem::client::Client;
//! use tandem::participant::postgres::pg_error;
//! use tandem::participant::sdk::BranchId;
//! use tandem::participant::sdk::ParticipantService;
//! use tandem::participant::sdk::postgres::PgOptions;
//! use tandem::participant::sdk::postgres::PgResource;
//! use tandem::txn::TxId;
//!
//! // At start: the resource, the gRPC service the coordinator calls, the
//! // resolver for branches left in doubt.
//! let pg = Arc::new(PgResource::connect("postgres://postgres@127.0.0.1:5432/inventory", PgOptions::default())?);
//! pg.install().await?;
//! let service = ParticipantService::new(pg.clone());
//! let addr = "0.0.0.0:7101".parse().unwrap();
//! tokio::spawn(tonic::transport::Server::builder().add_service(service.into_server()).serve(addr));
//! let nodes = vec!["127.0.0.1:7001".to_string()];
//! tandem::participant::sdk::spawn_resolver(pg.clone(), nodes.clone(), "local", Duration::from_secs(30))?;
//!
//! // Per request, handed a txid: the work in a branch, then Enlist.
//! let txid = TxId::parse("01hx3k9q")?;
//! let id = BranchId::new("local", txid.as_str(), "inventory")?;
//! let branch = pg.begin(&id).await?;
//! let sql = "UPDATE stock SET available = available - 1 WHERE sku = $1 AND available >= 1";
//! branch.execute(sql, &[&"apple"]).await.map_err(|e| pg_error("inventory", e))?;
//! drop(branch); // parks the open branch until Prepare
//! Client::new(&nodes)?.enlist(&txid, "", "http://10.0.0.5:7101", &id.branch).await?;
//! # Ok(())
//! # }
//! ```

pub mod memory;
pub mod postgres;
mod resolver;
mod service;

use std::fmt;

use async_trait::async_trait;

pub use memory::MemoryResource;
pub use resolver::RESOLVE_INTERVAL_MIN;
pub use resolver::ResolveReport;
pub use resolver::resolve_in_doubt;
pub use resolver::spawn_resolver;
pub use service::IN_FLIGHT_MAX_DEFAULT;
pub use service::ParticipantService;

use crate::config::CLUSTER_ID_LEN_MAX;
use crate::error::Error;
use crate::error::Result;
use crate::proto as pb;
use crate::txn::TXID_LEN_MAX;

/// Longest branch name: the name a branch is enlisted under.
pub const BRANCH_NAME_LEN_MAX: usize = 64;

/// One branch of one global transaction, as the coordinator names it in
/// every call (`BranchRef`). Txids are unique within a cluster, branch names
/// within a transaction, so the three together name a branch uniquely.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BranchId {
    /// The coordinator cluster's id: 1 to 16 of `[a-z0-9]`.
    pub cluster_id: String,
    /// The global transaction's id: 1 to 48 of `[a-z0-9]`.
    pub txid: String,
    /// The name the branch was enlisted under: 1 to 64 of `[a-z0-9_-]`.
    pub branch: String,
}

impl BranchId {
    /// A branch id, checked: an invalid part is INVALID_ARGUMENT.
    pub fn new(cluster_id: &str, txid: &str, branch: &str) -> Result<Self> {
        validate_cluster_id(cluster_id)?;
        check_part("txid", txid, TXID_LEN_MAX, |b| b.is_ascii_lowercase() || b.is_ascii_digit())?;
        check_part("branch name", branch, BRANCH_NAME_LEN_MAX, |b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
        })?;
        Ok(Self { cluster_id: cluster_id.to_string(), txid: txid.to_string(), branch: branch.to_string() })
    }

    /// The branch a request names; a missing `BranchRef` is INVALID_ARGUMENT.
    pub fn from_request(branch: Option<&pb::BranchRef>) -> Result<Self> {
        match branch {
            Some(b) => Self::try_from(b),
            None => Err(Error::InvalidInput("the request names no branch (BranchRef is missing)".into())),
        }
    }

    /// The protobuf form.
    pub fn to_pb(&self) -> pb::BranchRef {
        pb::BranchRef { cluster_id: self.cluster_id.clone(), txid: self.txid.clone(), branch: self.branch.clone() }
    }
}

impl TryFrom<&pb::BranchRef> for BranchId {
    type Error = Error;
    fn try_from(b: &pb::BranchRef) -> Result<Self> {
        Self::new(&b.cluster_id, &b.txid, &b.branch)
    }
}

impl TryFrom<pb::BranchRef> for BranchId {
    type Error = Error;
    fn try_from(b: pb::BranchRef) -> Result<Self> {
        Self::try_from(&b)
    }
}

impl From<BranchId> for pb::BranchRef {
    fn from(b: BranchId) -> Self {
        pb::BranchRef { cluster_id: b.cluster_id, txid: b.txid, branch: b.branch }
    }
}

impl fmt::Display for BranchId {
    /// `cluster/txid/branch`, for logs and messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.cluster_id, self.txid, self.branch)
    }
}

/// Checks a cluster id: 1 to 16 of `[a-z0-9]`.
pub fn validate_cluster_id(cluster_id: &str) -> Result<()> {
    check_part("cluster id", cluster_id, CLUSTER_ID_LEN_MAX, |b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn check_part(what: &str, s: &str, len_max: usize, allowed: impl Fn(u8) -> bool) -> Result<()> {
    if s.is_empty() || s.len() > len_max {
        return Err(Error::InvalidInput(format!("{what} {s:?} must be 1 to {len_max} bytes")));
    }
    if !s.bytes().all(allowed) {
        let set = if what == "branch name" { "[a-z0-9_-]" } else { "[a-z0-9]" };
        return Err(Error::InvalidInput(format!("{what} {s:?} has characters outside {set}")));
    }
    Ok(())
}

/// A resource's answer to [`Resource::prepare`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vote {
    /// The branch's work, and the fact that it is prepared, are durable; the
    /// resource will commit or roll it back on request and does neither on
    /// its own.
    Prepared,
    /// The branch changed nothing and the resource has already ended it; it
    /// may forget it (later calls find it [`BranchState::Unknown`]).
    ReadOnly,
    /// The branch cannot commit and the resource has rolled it back; the
    /// string says why (it reaches the coordinator and its logs).
    Abort(String),
}

/// What a resource durably knows of a branch, as [`Resource::state`] reports
/// it. The service decides every answer from this alone (see the table in
/// the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BranchState {
    /// Nothing: never begun here, lost before it was prepared (a crash), or
    /// ended and forgotten (read-only, or past retention).
    Unknown,
    /// Begun, its work not yet prepared: it vanishes if the service or its
    /// storage crashes.
    Active,
    /// Prepared: survives crashes, waits for commit or abort.
    Prepared,
    /// Committed (and remembered as such).
    Committed,
    /// Rolled back and remembered as such (a tombstone): will never prepare.
    Aborted,
}

impl fmt::Display for BranchState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BranchState::Unknown => "unknown",
            BranchState::Active => "active",
            BranchState::Prepared => "prepared",
            BranchState::Committed => "committed",
            BranchState::Aborted => "aborted",
        })
    }
}

/// What a service author implements for their storage; [`ParticipantService`]
/// serves the protocol on top of it.
///
/// The service calls the methods of one branch one at a time (behind a
/// per-branch lock), always reads [`state`](Resource::state) first, and
/// calls each other method only in the states named below, so a resource
/// need not handle duplicates or out-of-order calls itself. Two things it
/// must still tolerate: [`resolve_in_doubt`] calls `commit` and `abort`
/// without the service's lock, and several processes of one service may
/// share the storage; so `commit` of a branch found already committed, and
/// `abort` of one found already aborted, must succeed.
///
/// "Durable" means: it survives a crash of the service and of its storage's
/// process. An error (any [`Error`]) means "no answer": the service passes
/// it on as a gRPC error and the coordinator asks again later; the resource
/// must then be in a state from which the retry is answered correctly.
/// Every future may be dropped at any await point (the coordinator's
/// deadline), with the same requirement.
#[async_trait]
pub trait Resource: Send + Sync + 'static {
    /// What the resource knows of `branch`. Must be accurate for durable
    /// states: [`Prepared`](BranchState::Prepared) exactly when the branch
    /// is prepared, [`Committed`](BranchState::Committed) and
    /// [`Aborted`](BranchState::Aborted) from durable records.
    /// [`Unknown`](BranchState::Unknown) for a committed or aborted branch
    /// whose record is gone (forgotten) is fine.
    async fn state(&self, branch: &BranchId) -> Result<BranchState>;

    /// Called only for an [`Active`](BranchState::Active) branch. Makes the
    /// branch's work durable as prepared, together with the fact that it is
    /// prepared, and only then returns [`Vote::Prepared`]; from then on
    /// `state` says `Prepared`. A branch that changed nothing may instead be
    /// ended and answered [`Vote::ReadOnly`]. A branch that cannot prepare
    /// (a statement failed, a tombstone exists) is rolled back and answered
    /// [`Vote::Abort`]; the service then calls [`abort`](Resource::abort) to
    /// record it.
    async fn prepare(&self, branch: &BranchId) -> Result<Vote>;

    /// Called only for a [`Prepared`](BranchState::Prepared) branch. Commits
    /// it durably, and durably remembers that it committed, so that `state`
    /// says [`Committed`](BranchState::Committed) afterwards (until the
    /// record is forgotten). Succeeds if the branch is found committed
    /// already.
    async fn commit(&self, branch: &BranchId) -> Result<()>;

    /// Called for an [`Active`](BranchState::Active),
    /// [`Prepared`](BranchState::Prepared) or
    /// [`Unknown`](BranchState::Unknown) branch. Rolls back whatever exists
    /// of the branch and durably records a tombstone, so that `state` says
    /// [`Aborted`](BranchState::Aborted) afterwards and a later attempt to
    /// prepare the branch fails. The tombstone matters most for an unknown
    /// branch: its work may still be in flight. Succeeds if the branch is
    /// found aborted already; fails (without changing anything) if it is
    /// found committed.
    async fn abort(&self, branch: &BranchId) -> Result<()>;

    /// Every [`Prepared`](BranchState::Prepared) branch of cluster
    /// `cluster_id` the resource holds.
    async fn prepared(&self, cluster_id: &str) -> Result<Vec<BranchId>>;

    /// [`Active`](BranchState::Active) branches of cluster `cluster_id`
    /// nobody has used for `idle`: the resolver asks whether their
    /// transaction still runs, and rolls back those whose transaction is
    /// over (the coordinator's `Abort` was lost, or the branch was never
    /// enlisted), so that they do not hold locks until an idle timeout.
    /// The default lists none.
    async fn idle(&self, cluster_id: &str, idle: std::time::Duration) -> Result<Vec<BranchId>> {
        let _ = (cluster_id, idle);
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_id_validation() {
        assert!(BranchId::new("local", "01hx3k9q", "inventory_1-a").is_ok());
        assert!(BranchId::new(&"a".repeat(16), &"b".repeat(48), &"c".repeat(64)).is_ok());
        for (c, t, b) in [
            ("", "t", "b"),
            (&"a".repeat(17) as &str, "t", "b"),
            ("Local", "t", "b"),
            ("lo_cal", "t", "b"),
            ("c", "", "b"),
            ("c", &"t".repeat(49), "b"),
            ("c", "t-1", "b"),
            ("c", "t", ""),
            ("c", "t", &"b".repeat(65)),
            ("c", "t", "B"),
            ("c", "t", "b.1"),
            ("c", "t", "b'"),
        ] {
            assert!(matches!(BranchId::new(c, t, b), Err(Error::InvalidInput(_))), "{c:?} {t:?} {b:?}");
        }
    }

    #[test]
    fn branch_id_round_trips_pb() {
        let id = BranchId::new("local", "t1", "inv").unwrap();
        let pb: pb::BranchRef = id.clone().into();
        assert_eq!(BranchId::try_from(&pb).unwrap(), id);
        assert_eq!(id.to_pb(), pb);
        assert!(matches!(BranchId::from_request(None), Err(Error::InvalidInput(_))));
        let bad = pb::BranchRef { cluster_id: "local".into(), txid: "T".into(), branch: "x".into() };
        assert!(matches!(BranchId::from_request(Some(&bad)), Err(Error::InvalidInput(_))));
    }
}
