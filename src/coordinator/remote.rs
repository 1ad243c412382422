//! Remote participants on the coordinator's side: `Enlist` adds a service's
//! branch to an open interactive transaction; `GetOutcome` answers a
//! participant left in doubt (cooperative termination).
//!
//! An enlisted branch is one more branch of the transaction: `Commit` sends
//! it `Prepare` with the others, its endpoint is recorded with the COMMIT,
//! and phase 2 and recovery reach it from the record.

use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use super::Coordinator;
use crate::error::Error;
use crate::error::Result;
use crate::participant::Participant;
use crate::participant::remote::RemoteBranchParticipant;
use crate::participant::remote::RemoteChannels;
use crate::proto as pb;
use crate::raft::CommandResponse;
use crate::raft::Op;
use crate::txn::Branch;
use crate::txn::Decision;
use crate::txn::RemoteBranch;
use crate::txn::TxId;
use crate::txn::machine::BranchState;

/// How long `Enlist` waits to connect to the endpoint.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What `Enlist` asks for.
pub struct EnlistSpec {
    /// A remote participant named in the configuration…
    pub participant: Option<String>,
    /// …or the endpoint of the service's `tandem.v1.Participant`.
    pub endpoint: Option<String>,
    /// The branch's name within the transaction.
    pub branch: String,
}

impl Coordinator {
    /// Adds a remote branch to the open interactive transaction `txid`.
    pub async fn enlist(self: &Arc<Self>, txid: &TxId, spec: EnlistSpec) -> Result<pb::BranchRef> {
        let remote = self.resolve_enlist(&spec).or_else(|e| self.refuse(e))?;
        // A branch is shown, and recorded, under its branch name: unique in
        // the transaction, even with several branches at one service.
        let name = remote.branch.clone();
        if !self.node.raft.is_leader() {
            return Err(self.node.not_leader_now());
        }
        let cluster_id = self.node.config.cluster_id.clone();
        let branch_ref =
            pb::BranchRef { cluster_id: cluster_id.clone(), txid: txid.to_string(), branch: remote.branch.clone() };
        if self.node.participants.get(&name).is_ok() {
            return self.refuse(Error::InvalidInput(format!(
                "branch name {name:?} is a configured participant's name; choose another"
            )));
        }
        let Some(live) = self.live_get(txid) else { return Err(self.not_open(txid).await) };
        let repeat = live.view.lock().is_ok_and(|v| v.participants.iter().any(|p| p == &name));
        if !repeat {
            // Connect before holding the transaction: a slow endpoint must
            // not block the transaction's other calls.
            let within = PROBE_TIMEOUT.min(live.deadline.saturating_duration_since(Instant::now()));
            RemoteChannels::probe(&remote.endpoint, within).await?;
        }

        let mut slot = self.lock_open(txid, &live).await?;
        let open = slot.as_mut().expect("lock_open checked it is open");
        for p in &open.participants {
            match p.remote() {
                Some(r) if r.branch == remote.branch && r.endpoint == remote.endpoint => return Ok(branch_ref),
                Some(r) if r.branch == remote.branch => {
                    return self.refuse(Error::InvalidInput(format!(
                        "branch {:?} is already enlisted in {txid} at {}",
                        r.branch, r.endpoint
                    )));
                }
                _ if p.name() == name => {
                    return self.refuse(Error::InvalidInput(format!(
                        "transaction {txid} already has a branch named {name:?}"
                    )));
                }
                _ => {}
            }
        }
        self.check_branches(open.participants.len() + 1)?;
        let timeout = Duration::from_millis(self.node.config.coordinator.remote_prepare_timeout_ms);
        let participant = RemoteBranchParticipant::new(&name, remote.clone(), &self.remote_channels, timeout)?;
        open.sessions.push(participant.enlisted(&cluster_id, txid));
        open.participants.push(Arc::new(participant));
        open.statements.push(0);
        live.update(|v| {
            v.participants.push(name.clone());
            v.branches.push(BranchState::Active);
        });
        tracing::info!(%txid, branch = %remote.branch, endpoint = %remote.endpoint, "remote branch enlisted");
        Ok(branch_ref)
    }

    /// The endpoint and branch name an `Enlist` names, checked.
    fn resolve_enlist(&self, spec: &EnlistSpec) -> Result<RemoteBranch> {
        crate::txn::validate_branch_name(&spec.branch)?;
        let endpoint = match (&spec.participant, &spec.endpoint) {
            (Some(name), None) => self
                .node
                .participants
                .remote_endpoint(name)
                .ok_or_else(|| Error::InvalidInput(format!("{name:?} is not a configured remote participant")))?
                .to_string(),
            (None, Some(endpoint)) => endpoint.clone(),
            (Some(_), Some(_)) => {
                return Err(Error::InvalidInput("give a participant or an endpoint, not both".into()));
            }
            (None, None) => return Err(Error::InvalidInput("give a participant or an endpoint".into())),
        };
        let remote = RemoteBranch { endpoint, branch: spec.branch.clone() };
        remote.validate()?;
        Ok(remote)
    }

    /// The decision for `txid`: `None` while it runs on this leader. With
    /// no decision and nothing running, ABORT is recorded first, so that an
    /// ABORTED answer is final.
    pub async fn get_outcome(self: &Arc<Self>, txid: &TxId) -> Result<Option<Decision>> {
        if !self.node.raft.is_leader() {
            return Err(self.node.not_leader_now());
        }
        if let Some(record) = self.node.state_machine.get(txid.clone()).await? {
            return Ok(Some(record.decision));
        }
        if self.in_flight(txid) {
            return Ok(None);
        }
        let reason = "no decision was recorded and the transaction was not running when a participant asked \
                      (presumed abort)"
            .to_string();
        let abort = Decision::Abort { reason };
        match self.node.propose(Op::Decide { txid: txid.clone(), decision: abort, info: Default::default() }).await? {
            CommandResponse::Decided { record, .. } => {
                tracing::info!(%txid, commit = record.decision.is_commit(), "outcome asked by a participant");
                Ok(Some(record.decision))
            }
            other => Err(Error::Internal(format!("unexpected answer to a decision: {other:?}"))),
        }
    }

    /// The participant that reaches a recorded branch: from its record for a
    /// remote branch, else the configured one.
    pub(super) fn branch_participant(&self, branch: &Branch) -> Result<Arc<dyn Participant>> {
        match &branch.remote {
            Some(remote) => {
                let timeout = Duration::from_millis(self.node.config.coordinator.remote_prepare_timeout_ms);
                let p =
                    RemoteBranchParticipant::new(&branch.participant, remote.clone(), &self.remote_channels, timeout)?;
                Ok(Arc::new(p))
            }
            None => self.node.participants.get(&branch.participant),
        }
    }
}
