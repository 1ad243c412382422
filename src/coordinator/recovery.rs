//! Recovery and reconciliation, on the leader: on becoming leader and every
//! `coordinator.recovery_interval_ms`.
//!
//! 1. Wait until this leader has applied every decision a previous leader
//!    made (a linearizable read barrier).
//! 2. Scan every participant for prepared branches with this cluster's gid
//!    prefix. For each whose transaction is not in flight on this leader:
//!    with no decision recorded, record ABORT through Raft (presumed abort;
//!    the compare-and-set then says what really holds), and finish the
//!    branch the way the decision that holds says.
//! 3. Re-drive the incomplete records decided before the listing began (the
//!    last entry applied after step 1) and not in flight here. A COMMIT:
//!    COMMIT PREPARED on each branch it names, except a PostgreSQL branch
//!    its participant's listing answered without (it had ended: a branch
//!    prepares before its decision, and a gid is used once) or that step 2
//!    just committed; a branch whose gid is gone is checked by the xid the
//!    decision recorded: rolled back means a heuristic outcome, logged and
//!    kept in the record. An ABORT is complete once no branch of it is
//!    prepared anywhere. The records found complete are recorded up to
//!    [`COMPLETE_BATCH_MAX`] to an entry and at most
//!    [`COMPLETIONS_PER_ROUND`] of each decision to a round; the records
//!    past that wait for the next round (step 2 still settles, every round,
//!    every prepared branch a listing shows).
//!
//! Every action follows a decision that was applied, so a deposed leader
//! that is still driving the same transaction cannot make it go both ways.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;

use super::Coordinator;
use super::Metrics;
use super::driver::PARTICIPANT_CALL_TIMEOUT;
use crate::error::Error;
use crate::error::Result;
use crate::participant::Phase2;
use crate::participant::remote;
use crate::raft::COMPLETE_BATCH_MAX;
use crate::raft::CommandResponse;
use crate::raft::Completion;
use crate::raft::Op;
use crate::txn::Branch;
use crate::txn::Decision;
use crate::txn::HeuristicBranch;
use crate::txn::RecordState;
use crate::txn::TxId;
use crate::txn::gid::Gid;

/// What a round learnt before it re-drives incomplete records.
struct Listing<'a> {
    /// Prepared branches by txid, as the participants listed them.
    prepared: &'a BTreeMap<TxId, Vec<(String, Gid)>>,
    /// The participants whose listing answered.
    answered: &'a BTreeSet<String>,
    /// Branches this round has already committed.
    settled: &'a BTreeSet<Gid>,
}

impl Listing<'_> {
    /// Whether `gid`, a branch of a decision applied by the barrier, had
    /// already ended when `participant` was listed: it prepared before its
    /// decision, so only an end removes it from the listing. Asking would
    /// only be told it is gone.
    fn shows_ended(&self, gid: &Gid, participant: &str) -> bool {
        self.answered.contains(participant)
            && !self.prepared.get(&gid.txid).is_some_and(|listed| listed.iter().any(|(_, g)| g == gid))
    }
}

/// A participant call bounded by [`PARTICIPANT_CALL_TIMEOUT`], so that one
/// participant that does not answer cannot stall a whole round.
async fn bounded<T>(call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(PARTICIPANT_CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(Error::Unavailable { message: "no answer in time".into(), leader: None }))
}

/// Incomplete records read at a time.
const PAGE: usize = 1000;
/// Most records of each decision one round completes. A large backlog
/// (after a long outage, or from a client of the decision log that never
/// completes) is worked off over several rounds rather than in one burst
/// that would crowd out the transactions running meanwhile.
pub const COMPLETIONS_PER_ROUND: usize = 8 * COMPLETE_BATCH_MAX;

/// Runs recovery rounds while the node lives: at once when it becomes
/// leader (what a previous leader left in doubt holds locks that new
/// transactions wait on), then every `interval`.
pub async fn run(coordinator: Arc<Coordinator>, interval: Duration) {
    const LEADERSHIP_POLL: Duration = Duration::from_millis(100);
    let mut was_leader = false;
    let mut next_round = tokio::time::Instant::now() + interval;
    loop {
        tokio::time::sleep(LEADERSHIP_POLL.min(interval)).await;
        let leader = coordinator.node.raft.is_leader();
        let became_leader = leader && !was_leader && coordinator.node.config.coordinator.recover_on_leadership;
        was_leader = leader;
        if !leader || (!became_leader && tokio::time::Instant::now() < next_round) {
            continue;
        }
        if became_leader {
            tracing::info!("became leader: recovering what the previous leader left");
        }
        if let Err(e) = coordinator.recover_once().await {
            tracing::warn!(error = %e, "recovery round failed; will retry");
        }
        next_round = tokio::time::Instant::now() + interval;
    }
}

impl Coordinator {
    /// One round of recovery and reconciliation.
    pub async fn recover_once(&self) -> Result<()> {
        let node = &self.node;
        node.linearize().await?;
        // Every decision applied by now was made after its branches had
        // prepared, so before the listing below begins.
        let barrier = node.raft.metrics().borrow_watched().last_applied.map_or(0, |l| l.index);
        let cluster_id = node.config.cluster_id.clone();

        // Prepared branches, by txid. A participant that cannot be listed
        // leaves the picture incomplete: no ABORT is completed this round.
        let mut prepared: BTreeMap<TxId, Vec<(String, Gid)>> = BTreeMap::new();
        let mut answered = BTreeSet::new();
        let mut listed_all = true;
        for name in node.participants.names().map(str::to_string).collect::<Vec<_>>() {
            let participant = node.participants.get(&name)?;
            match bounded(participant.prepared_branches(&cluster_id)).await {
                Ok(gids) => {
                    answered.insert(name.clone());
                    for gid in gids {
                        prepared.entry(gid.txid.clone()).or_default().push((name.clone(), gid));
                    }
                }
                Err(e) => {
                    listed_all = false;
                    tracing::warn!(participant = %name, error = %e, "cannot list prepared branches");
                }
            }
        }

        // Branches this round committed here, so not asked again below.
        let mut settled = BTreeSet::new();
        for (txid, branches) in &prepared {
            if self.in_flight(txid) {
                continue;
            }
            let decision = self.decision_or_presumed_abort(txid).await?;
            for (name, gid) in branches {
                let participant = node.participants.get(name)?;
                let commit = match &decision {
                    // Under a COMMIT, a branch is never rolled back: the gid
                    // names branch i of the transaction, which the decision
                    // commits, whichever configured name reaches it.
                    Decision::Commit { branches, .. } if (gid.branch as usize) < branches.len() => true,
                    Decision::Commit { .. } => {
                        tracing::error!(%gid, participant = %name, "a prepared branch beyond the COMMIT's branch list; left for an operator");
                        continue;
                    }
                    Decision::Abort { .. } => false,
                };
                let result = if commit {
                    bounded(participant.commit_prepared(gid)).await
                } else {
                    bounded(participant.rollback_prepared(gid)).await
                };
                match result {
                    // Its driver finished it after the listing.
                    Ok(Phase2::GidMissing) => {}
                    Ok(Phase2::Done) => {
                        Metrics::add(&self.metrics.reconciled, 1);
                        if commit {
                            settled.insert(gid.clone());
                        }
                        tracing::info!(
                        %gid, participant = %name,
                        action = if commit { "committed" } else { "rolled back" },
                        "reconciled a prepared branch"
                        )
                    }
                    Err(e) => tracing::warn!(%gid, participant = %name, error = %e, "reconciling failed; will retry"),
                }
            }
        }

        // Configured remote participants' prepared branches.
        let mut remote_prepared = BTreeSet::new();
        let remotes: Vec<(String, String)> =
            node.participants.remotes().map(|(n, e)| (n.to_string(), e.to_string())).collect();
        for (name, endpoint) in remotes {
            let channel = self.remote_channels.get(&endpoint)?;
            let branches = match bounded(remote::list_prepared(channel.clone(), &cluster_id)).await {
                Ok(b) => b,
                Err(e) => {
                    listed_all = false;
                    tracing::warn!(participant = %name, error = %e, "cannot list prepared branches");
                    continue;
                }
            };
            for branch in branches {
                let Ok(txid) = TxId::parse(&branch.txid) else { continue };
                if branch.cluster_id != cluster_id {
                    continue;
                }
                remote_prepared.insert(txid.clone());
                if self.in_flight(&txid) {
                    continue;
                }
                let decision = self.decision_or_presumed_abort(&txid).await?;
                let commit = match &decision {
                    Decision::Commit { branches, .. } => {
                        let named =
                            branches.iter().any(|b| b.remote.as_ref().is_some_and(|r| r.branch == branch.branch));
                        if !named {
                            tracing::error!(%txid, branch = %branch.branch, participant = %name, "a prepared remote branch the COMMIT does not name; left for an operator");
                            continue;
                        }
                        true
                    }
                    Decision::Abort { .. } => false,
                };
                let reason = "settled by recovery";
                match bounded(remote::end_branch(channel.clone(), branch.clone(), commit, reason)).await {
                    Ok(Phase2::Done) => {
                        Metrics::add(&self.metrics.reconciled, 1);
                        tracing::info!(%txid, branch = %branch.branch, participant = %name,
                            action = if commit { "committed" } else { "rolled back" }, "reconciled a prepared remote branch");
                    }
                    Ok(Phase2::GidMissing) => {}
                    Err(e) => {
                        tracing::warn!(%txid, branch = %branch.branch, participant = %name, error = %e, "reconciling failed; will retry")
                    }
                }
            }
        }

        // Decided, incomplete transactions.
        let still_prepared: BTreeSet<&TxId> = prepared.keys().chain(remote_prepared.iter()).collect();
        let listing = Listing { prepared: &prepared, answered: &answered, settled: &settled };
        // Records naming participants this node does not know: one line per
        // round, not one per branch.
        let mut unknown_participants = BTreeSet::new();
        // Through the index of incomplete records, a page at a time: a round
        // reads only the records in doubt, and holds one page of them. Each
        // state has its own budget, so a backlog of one kind does not hold
        // up the other.
        for state in [RecordState::Committed, RecordState::Aborted] {
            let (mut done, mut completed) = (Vec::new(), 0);
            let mut after = None;
            'pages: loop {
                let page = node.state_machine.list(Some(state), after.take(), PAGE).await?;
                let full = page.len() == PAGE;
                after = page.last().map(|r| r.txid.clone());
                for record in page {
                    // Decided after the listing began: its driver is most
                    // likely still at work, and the listing cannot speak
                    // for it.
                    if record.decided_log_index > barrier || self.in_flight(&record.txid) {
                        continue;
                    }
                    let heuristic = match &record.decision {
                        Decision::Commit { branches, .. } => {
                            let unknown = &mut unknown_participants;
                            match self.commit_branches(&record.txid, branches, &listing, unknown).await {
                                Some(heuristic) => heuristic,
                                None => continue,
                            }
                        }
                        Decision::Abort { .. } if listed_all && !still_prepared.contains(&record.txid) => Vec::new(),
                        Decision::Abort { .. } => continue,
                    };
                    done.push(Completion { txid: record.txid, heuristic });
                    if done.len() >= COMPLETE_BATCH_MAX {
                        completed += done.len();
                        self.record_completions(std::mem::take(&mut done)).await?;
                        if completed >= COMPLETIONS_PER_ROUND {
                            tracing::info!(%state, completed, "recovery completed its most for one round; the rest next round");
                            break 'pages;
                        }
                    }
                }
                if !full {
                    break;
                }
            }
            if !done.is_empty() {
                self.record_completions(done).await?;
            }
        }
        if !unknown_participants.is_empty() {
            tracing::error!(
                participants = ?unknown_participants,
                "committed transactions name participants this node does not have; they stay incomplete"
            );
        }
        Metrics::add(&self.metrics.recovery_rounds, 1);
        Ok(())
    }

    /// Records `items` complete in one entry.
    async fn record_completions(&self, items: Vec<Completion>) -> Result<()> {
        let n = items.len() as u64;
        self.node.propose(Op::CompleteBatch { items }).await?;
        Metrics::add(&self.metrics.completions, n);
        Metrics::add(&self.metrics.completion_entries, 1);
        Ok(())
    }

    /// Commits every branch of a decided COMMIT that is still prepared.
    /// Returns the branches found to have ended against the decision once
    /// every branch is settled, or `None` while any is not.
    async fn commit_branches(
        &self,
        txid: &TxId,
        branches: &[Branch],
        listing: &Listing<'_>,
        unknown_participants: &mut BTreeSet<String>,
    ) -> Option<Vec<HeuristicBranch>> {
        let cluster_id = &self.node.config.cluster_id;
        let mut heuristic = Vec::new();
        let mut all = true;
        for (i, b) in branches.iter().enumerate() {
            let gid = Gid::new(cluster_id, txid, i as u32);
            if listing.settled.contains(&gid) {
                continue;
            }
            let Ok(participant) = self.branch_participant(b) else {
                unknown_participants.insert(b.participant.clone());
                all = false;
                continue;
            };
            let outcome = if b.remote.is_none() && listing.shows_ended(&gid, &b.participant) {
                Ok(Phase2::GidMissing)
            } else {
                bounded(participant.commit_prepared(&gid)).await
            };
            match outcome {
                Ok(Phase2::Done) => Metrics::add(&self.metrics.reconciled, 1),
                // Gone: committed by an earlier round or driver, or ended by
                // another hand. The xid tells.
                Ok(Phase2::GidMissing) => match b.xid {
                    None => {}
                    Some(xid) => match bounded(participant.branch_outcome(xid)).await {
                        Ok(Some(true)) => {}
                        Ok(Some(false)) => {
                            Metrics::add(&self.metrics.heuristic, 1);
                            tracing::error!(
                                %txid, %gid, participant = %b.participant, decided = "commit",
                                "HEURISTIC OUTCOME: a branch ended against the decision"
                            );
                            heuristic.push(HeuristicBranch { branch: i as u32, committed: false });
                        }
                        Ok(None) | Err(_) => all = false,
                    },
                },
                Err(e) => {
                    tracing::warn!(%gid, error = %e, "COMMIT PREPARED failed; will retry");
                    all = false;
                }
            }
        }
        all.then_some(heuristic)
    }

    /// The decision recorded for `txid`, recording ABORT first if there is
    /// none (presumed abort; the compare-and-set says what really holds).
    async fn decision_or_presumed_abort(&self, txid: &TxId) -> Result<Decision> {
        if let Some(record) = self.node.state_machine.get(txid.clone()).await? {
            return Ok(record.decision);
        }
        let reason = "no decision was recorded before its leader stopped (presumed abort)".to_string();
        let abort = Op::Decide { txid: txid.clone(), decision: Decision::Abort { reason }, info: Default::default() };
        match self.node.propose(abort).await? {
            CommandResponse::Decided { record, .. } => Ok(record.decision),
            other => Err(Error::Internal(format!("unexpected {other:?}"))),
        }
    }
}
