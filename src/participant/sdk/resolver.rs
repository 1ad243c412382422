//! Settling branches left in doubt: prepared, and not told the decision.
//!
//! The coordinator retries `Commit` and `Abort` until they are answered, so
//! a prepared branch normally hears its decision. The resolver covers the
//! rest: a service that restarts with prepared branches and is not asked
//! again soon, or a coordinator that is down for a while. For each prepared
//! branch it asks `Transactions.GetOutcome`: COMMITTED commits the branch,
//! ABORTED aborts it; no answer yet (the transaction is still running, e.g.
//! the branch was prepared a moment ago and the decision is being made)
//! leaves it alone. ABORTED is final: for a txid that is neither running nor
//! decided, the leader records ABORT before it answers, so the transaction
//! can never commit afterwards.
//!
//! The resolver calls the resource directly, not through the service's
//! per-branch lock, so it re-reads each branch's state before acting and
//! relies on [`Resource::commit`] and [`Resource::abort`] accepting a branch
//! already ended the same way (by the coordinator's call racing it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;

use super::BranchId;
use super::BranchState;
use super::Resource;
use super::validate_cluster_id;
use crate::client::Client;
use crate::error::Result;
use crate::txn::TxId;

/// The shortest interval between two runs of [`spawn_resolver`].
pub const RESOLVE_INTERVAL_MIN: Duration = Duration::from_secs(1);

/// An active (unprepared) branch unused for this long is asked about
/// ([`Resource::idle`]).
pub const ACTIVE_IDLE_ASK_AFTER: Duration = Duration::from_secs(5);

/// What one run of [`resolve_in_doubt`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolveReport {
    /// Prepared branches found.
    pub prepared: usize,
    /// Branches committed because their transaction committed.
    pub committed: usize,
    /// Branches rolled back because their transaction aborted.
    pub aborted: usize,
    /// Branches left prepared because their transaction is still running.
    pub still_running: usize,
    /// Branches ended meanwhile by someone else (the coordinator's call).
    pub ended_meanwhile: usize,
    /// Branches left prepared because asking or acting failed (logged);
    /// the next run tries again.
    pub failed: usize,
    /// Idle active branches rolled back because their transaction was over.
    pub idle_rolled_back: usize,
}

/// Settles every prepared branch of cluster `cluster_id` whose transaction
/// has an outcome: commits those that committed, aborts those that aborted,
/// leaves the others (still running) prepared. An error of one branch is
/// logged and counted in [`ResolveReport::failed`]; only failing to list the
/// prepared branches fails the whole run.
pub async fn resolve_in_doubt<R: Resource>(
    resource: &R,
    client: &mut Client,
    cluster_id: &str,
) -> Result<ResolveReport> {
    resolve(resource, client, cluster_id).await
}

/// Where the resolver learns outcomes: the cluster, or a test's table.
#[async_trait]
trait Outcomes: Send {
    /// `Some(true)` committed, `Some(false)` aborted (final), `None` still
    /// running.
    async fn outcome(&mut self, txid: &TxId) -> Result<Option<bool>>;
}

#[async_trait]
impl Outcomes for Client {
    async fn outcome(&mut self, txid: &TxId) -> Result<Option<bool>> {
        self.get_outcome(txid).await
    }
}

async fn resolve<R: Resource>(resource: &R, source: &mut impl Outcomes, cluster_id: &str) -> Result<ResolveReport> {
    validate_cluster_id(cluster_id)?;
    let branches = resource.prepared(cluster_id).await.map_err(|e| e.context("listing prepared branches"))?;
    let mut report = ResolveReport::default();
    // Several branches may share a transaction: ask once.
    let mut outcomes: HashMap<String, Option<bool>> = HashMap::new();
    for id in branches.iter().filter(|b| b.cluster_id == cluster_id) {
        report.prepared += 1;
        let outcome = match outcomes.get(&id.txid) {
            Some(o) => *o,
            None => match ask_outcome(source, id).await {
                Ok(o) => {
                    outcomes.insert(id.txid.clone(), o);
                    o
                }
                Err(e) => {
                    tracing::warn!(branch = %id, error = %e, "in doubt: cannot learn the outcome; will ask again");
                    report.failed += 1;
                    continue;
                }
            },
        };
        let Some(commit) = outcome else {
            tracing::debug!(branch = %id, "in doubt: the transaction is still running; left prepared");
            report.still_running += 1;
            continue;
        };
        match settle(resource, id, commit).await {
            Ok(true) if commit => report.committed += 1,
            Ok(true) => report.aborted += 1,
            Ok(false) => report.ended_meanwhile += 1,
            Err(e) => {
                tracing::warn!(branch = %id, commit, error = %e, "in doubt: cannot finish the branch; will try again");
                report.failed += 1;
            }
        }
    }
    // Active branches nobody uses: a transaction that is over (decided, or
    // rolled back before PREPARE with its `Abort` lost) will never prepare
    // them. One still running answers "not yet" and is left alone.
    for id in resource.idle(cluster_id, ACTIVE_IDLE_ASK_AFTER).await.unwrap_or_default() {
        let outcome = match outcomes.get(&id.txid) {
            Some(o) => *o,
            None => match ask_outcome(source, &id).await {
                Ok(o) => {
                    outcomes.insert(id.txid.clone(), o);
                    o
                }
                Err(_) => continue,
            },
        };
        if outcome.is_none() {
            continue;
        }
        // Still active once the outcome is known: the branch is not part of
        // it (a COMMIT names only prepared branches).
        match resource.state(&id).await {
            Ok(BranchState::Active) => match resource.abort(&id).await {
                Ok(()) => {
                    tracing::info!(branch = %id, "an idle branch of a transaction that is over; rolled back");
                    report.idle_rolled_back += 1;
                }
                Err(e) => tracing::warn!(branch = %id, error = %e, "cannot roll back an idle branch; will try again"),
            },
            Ok(BranchState::Prepared) => {
                if let Ok(true) = settle(resource, &id, outcome == Some(true)).await {
                    report.committed += usize::from(outcome == Some(true));
                    report.aborted += usize::from(outcome == Some(false));
                }
            }
            _ => {}
        }
    }
    Ok(report)
}

async fn ask_outcome(source: &mut impl Outcomes, id: &BranchId) -> Result<Option<bool>> {
    source.outcome(&TxId::parse(&id.txid)?).await
}

/// Commits or aborts `id` if it is still prepared; answers whether it did.
async fn settle<R: Resource>(resource: &R, id: &BranchId, commit: bool) -> Result<bool> {
    if resource.state(id).await? != BranchState::Prepared {
        return Ok(false);
    }
    if commit {
        resource.commit(id).await?;
        tracing::info!(branch = %id, "in doubt: the transaction committed; branch committed");
    } else {
        resource.abort(id).await?;
        tracing::info!(branch = %id, "in doubt: the transaction aborted; branch rolled back");
    }
    Ok(true)
}

/// Runs [`resolve_in_doubt`] now and then every `interval` (at least
/// [`RESOLVE_INTERVAL_MIN`]) until the task is aborted, asking the cluster at
/// `nodes` (`host:port` of any of its nodes). Fails at once on bad node
/// addresses or a bad cluster id; a failing run is logged and retried at the
/// next interval.
pub fn spawn_resolver<R: Resource>(
    resource: Arc<R>,
    nodes: Vec<String>,
    cluster_id: &str,
    interval: Duration,
) -> Result<JoinHandle<()>> {
    validate_cluster_id(cluster_id)?;
    let mut client = Client::new(&nodes)?;
    let cluster_id = cluster_id.to_string();
    let interval = interval.max(RESOLVE_INTERVAL_MIN);
    Ok(tokio::spawn(async move {
        loop {
            match resolve_in_doubt(resource.as_ref(), &mut client, &cluster_id).await {
                Ok(r) if r.committed + r.aborted + r.failed + r.idle_rolled_back > 0 => {
                    tracing::info!(?r, "in-doubt branches resolved")
                }
                Ok(r) => tracing::debug!(?r, "in-doubt check"),
                Err(e) => tracing::warn!(error = %e, "in-doubt check failed; will try again"),
            }
            tokio::time::sleep(interval).await;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::participant::sdk::MemoryResource;

    /// Outcomes from a table; a txid not in it fails (the cluster is down).
    struct Table(HashMap<String, Option<bool>>, usize);

    #[async_trait]
    impl Outcomes for Table {
        async fn outcome(&mut self, txid: &TxId) -> Result<Option<bool>> {
            self.1 += 1;
            self.0
                .get(txid.as_str())
                .copied()
                .ok_or_else(|| Error::Unavailable { message: "down".into(), leader: None })
        }
    }

    async fn prepared(r: &MemoryResource, txid: &str, branch: &str) -> BranchId {
        let id = BranchId::new("c1", txid, branch).unwrap();
        r.begin(&id).unwrap();
        assert_eq!(r.prepare(&id).await.unwrap(), crate::participant::sdk::Vote::Prepared);
        id
    }

    #[tokio::test]
    async fn settles_decided_branches_and_leaves_running_ones() {
        let r = MemoryResource::new();
        let committed_a = prepared(&r, "t1", "a").await;
        let committed_b = prepared(&r, "t1", "b").await;
        let aborted = prepared(&r, "t2", "a").await;
        let running = prepared(&r, "t3", "a").await;
        let unreachable = prepared(&r, "t4", "a").await;
        let other_cluster = BranchId::new("c2", "t1", "a").unwrap();
        r.begin(&other_cluster).unwrap();
        r.prepare(&other_cluster).await.unwrap();
        let mut table = Table(
            [("t1", Some(true)), ("t2", Some(false)), ("t3", None)]
                .into_iter()
                .map(|(t, o)| (t.to_string(), o))
                .collect(),
            0,
        );

        let report = resolve(&r, &mut table, "c1").await.unwrap();
        assert_eq!(
            report,
            ResolveReport {
                prepared: 5,
                committed: 2,
                aborted: 1,
                still_running: 1,
                ended_meanwhile: 0,
                failed: 1,
                idle_rolled_back: 0
            }
        );
        // One question per transaction.
        assert_eq!(table.1, 4);
        assert_eq!(r.state_of(&committed_a), BranchState::Committed);
        assert_eq!(r.state_of(&committed_b), BranchState::Committed);
        assert_eq!(r.state_of(&aborted), BranchState::Aborted);
        assert_eq!(r.state_of(&running), BranchState::Prepared);
        assert_eq!(r.state_of(&unreachable), BranchState::Prepared);
        assert_eq!(r.state_of(&other_cluster), BranchState::Prepared);

        // The next run finds only what is left.
        let report = resolve(&r, &mut table, "c1").await.unwrap();
        assert_eq!(report.prepared, 2);
        assert_eq!(report.committed + report.aborted, 0);
    }

    #[tokio::test]
    async fn a_failing_resource_is_counted_and_retried() {
        let r = MemoryResource::new();
        let id = prepared(&r, "t1", "a").await;
        let mut table = Table([("t1".to_string(), Some(true))].into_iter().collect(), 0);
        r.fail_next(crate::participant::sdk::memory::Operation::Commit, Error::Storage("disk".into()));
        assert_eq!(resolve(&r, &mut table, "c1").await.unwrap().failed, 1);
        assert_eq!(r.state_of(&id), BranchState::Prepared);
        assert_eq!(resolve(&r, &mut table, "c1").await.unwrap().committed, 1);
        assert_eq!(r.state_of(&id), BranchState::Committed);

        r.fail_next(crate::participant::sdk::memory::Operation::Prepared, Error::Storage("disk".into()));
        assert!(resolve(&r, &mut table, "c1").await.is_err());
        assert!(matches!(resolve(&r, &mut table, "C1").await, Err(Error::InvalidInput(_))));
    }
}
