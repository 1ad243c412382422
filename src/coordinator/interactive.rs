//! Interactive transactions: `Begin`, `Execute`, `Commit`, `Rollback`.
//!
//! `Begin` registers the transaction on the leader and answers its txid.
//! Each `Execute` runs one statement on the named participant's branch,
//! opening the branch (a pooled connection inside `BEGIN`) on first use.
//! `Commit` hands the open branches to a driver, which prepares them and
//! runs the rest of two-phase commit exactly as for a one-shot transaction.
//!
//! Until `Commit`, nothing is decided and nothing is prepared, so the
//! transaction lives only in the leader's memory:
//! - a statement that fails rolls the whole transaction back (PostgreSQL has
//!   aborted that branch anyway), and says so;
//! - at its deadline, an open transaction is rolled back by the reaper;
//! - a leader change rolls back every open transaction: a deposed leader's
//!   reaper rolls its own back, and a killed leader's connections close,
//!   which rolls them back in PostgreSQL. The new leader answers any later
//!   call for such a txid with a clear FAILED_PRECONDITION.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Weak;
use std::time::Duration;
use std::time::Instant;

use super::Coordinator;
use super::Metrics;
use super::driver::LiveGuard;
use super::driver::TransactOutcome;
use super::status::Live;
use crate::error::Error;
use crate::error::Result;
use crate::participant::BranchSession;
use crate::participant::Participant;
use crate::participant::Statement;
use crate::participant::StatementResult;
use crate::participant::check_result_bytes;
use crate::participant::guard::refuse_transaction_control;
use crate::raft::CommandResponse;
use crate::raft::Op;
use crate::txn::Decision;
use crate::txn::TxId;
use crate::txn::machine::BranchState;
use crate::txn::machine::Phase;
use crate::txn::validate_labels;

/// How often the reaper looks for open transactions to roll back.
const REAP_INTERVAL: Duration = Duration::from_millis(250);

pub struct BeginSpec {
    pub timeout: Option<Duration>,
    pub idempotency_key: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// An interactive transaction's open branches.
pub(crate) struct Open {
    pub(super) guard: LiveGuard,
    pub(super) participants: Vec<Arc<dyn Participant>>,
    pub(super) sessions: Vec<Box<dyn BranchSession>>,
    pub(super) statements: Vec<usize>,
}

impl Coordinator {
    /// Begins an interactive transaction and answers its txid.
    pub async fn begin(self: &Arc<Self>, spec: BeginSpec) -> Result<TxId> {
        if let Some(key) = &spec.idempotency_key {
            crate::txn::validate_idempotency_key(key).or_else(|e| self.refuse(e))?;
        }
        validate_labels(&spec.labels).or_else(|e| self.refuse(e))?;
        let timeout = self.timeout(spec.timeout)?;
        let (live, guard) = self.admit(timeout, spec.idempotency_key, spec.labels, Vec::new(), true)?;
        *live.open.lock().await =
            Some(Open { guard, participants: Vec::new(), sessions: Vec::new(), statements: Vec::new() });
        tracing::debug!(txid = %live.txid, "interactive transaction begun");
        Ok(live.txid.clone())
    }

    /// Runs one statement in `txid`'s branch on `participant`, opening the
    /// branch on first use.
    pub async fn execute(
        self: &Arc<Self>,
        txid: &TxId,
        participant: &str,
        statement: Statement,
    ) -> Result<StatementResult> {
        refuse_transaction_control(&statement.sql).or_else(|e| self.refuse(e))?;
        if !self.node.raft.is_leader() {
            return Err(self.node.not_leader_now());
        }
        let Some(live) = self.live_get(txid) else { return Err(self.not_open(txid).await) };
        let mut slot = self.lock_open(txid, &live).await?;
        let open = slot.as_mut().expect("lock_open checked it is open");
        // Statements go to configured databases, never to an enlisted branch.
        let branch = match open.participants.iter().position(|p| p.name() == participant && p.remote().is_none()) {
            Some(b) => b,
            None => {
                let p = self.node.participants.get(participant).or_else(|e| self.refuse(e))?;
                self.check_branches(open.participants.len() + 1)?;
                let session = match tokio::time::timeout_at(live.deadline.into(), p.begin()).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(e.context(&format!("opening the branch on {participant}"))),
                    Err(_) => {
                        return Err(Error::Unavailable {
                            message: format!("opening the branch on {participant}: no connection before the deadline"),
                            leader: None,
                        });
                    }
                };
                open.participants.push(p);
                open.sessions.push(session);
                open.statements.push(0);
                live.update(|v| {
                    v.participants.push(participant.to_string());
                    v.branches.push(BranchState::Active);
                });
                open.participants.len() - 1
            }
        };
        self.check_statements(participant, open.statements[branch] + 1)?;
        open.statements[branch] += 1;
        let run = open.sessions[branch].execute(&statement);
        let max = self.node.config.limits.result_bytes_max;
        let error = match tokio::time::timeout_at(live.deadline.into(), run).await {
            Ok(Ok(result)) => match check_result_bytes(result.approx_bytes(), max) {
                Ok(()) => return Ok(result),
                Err(e) => e,
            },
            Ok(Err(e)) => e,
            Err(_) => Error::FailedPrecondition("the transaction passed its deadline".into()),
        };
        let open = slot.take();
        drop(slot);
        let reason = format!("a statement on {participant} failed: {error}");
        live.update(|v| v.last_error = Some(error.to_string()));
        self.roll_back_open(&live, open, &reason).await;
        // The transaction is gone: repeating the statement cannot help.
        let error = match error {
            Error::Unavailable { message, .. } => Error::FailedPrecondition(message),
            e => e,
        };
        Err(error.context(&format!("transaction {txid} was rolled back")))
    }

    /// Commits an interactive transaction. Repeating it (an answer lost)
    /// answers the outcome again.
    pub async fn commit(self: &Arc<Self>, txid: &TxId) -> Result<TransactOutcome> {
        if !self.node.raft.is_leader() {
            return Err(self.node.not_leader_now());
        }
        let Some(live) = self.live_get(txid) else { return self.settled_outcome(txid).await };
        let Some(open) = live.open.lock().await.take() else { return self.settled_outcome(txid).await };
        if Instant::now() >= live.deadline {
            let reason = "the transaction passed its deadline";
            self.roll_back_open(&live, Some(open), reason).await;
            return Ok(TransactOutcome::aborted(txid.clone(), reason.into()));
        }
        if open.participants.is_empty() {
            let reason = "the transaction ran no statement";
            self.roll_back_open(&live, Some(open), reason).await;
            return Ok(TransactOutcome::aborted(txid.clone(), reason.into()));
        }
        match self.key_owner(&live.idempotency_key).await {
            Ok(Some(owner)) => {
                self.roll_back_open(&live, Some(open), &format!("a repeat of committed transaction {owner}")).await;
                return Ok(TransactOutcome::duplicate_of(owner));
            }
            Ok(None) => {}
            Err(e) => {
                // Still open: the client may retry the commit.
                *live.open.lock().await = Some(open);
                return Err(e);
            }
        }
        let n = open.participants.len();
        let sessions = open.sessions.into_iter().map(Some).collect();
        self.drive(live.clone(), open.guard, open.participants, sessions, vec![Vec::new(); n]).await
    }

    /// Rolls back an open interactive transaction. Rolling back one that
    /// already ended without committing is fine.
    pub async fn rollback(self: &Arc<Self>, txid: &TxId) -> Result<()> {
        if !self.node.raft.is_leader() {
            return Err(self.node.not_leader_now());
        }
        if let Some(live) = self.live_get(txid) {
            let open = live.open.lock().await.take();
            if open.is_some() {
                self.roll_back_open(&live, open, "rolled back by the client").await;
                return Ok(());
            }
        }
        // Not open here: whatever is decided holds; record ABORT if nothing
        // is, so that it never commits.
        let outcome = self.settled_outcome(txid).await?;
        match outcome.aborted {
            Some(_) => Ok(()),
            None => Err(Error::FailedPrecondition(format!("transaction {txid} already committed"))),
        }
    }

    /// The outcome of a transaction that is no longer open: wait while a
    /// driver decides it, then what the log holds; with no decision, record
    /// ABORT (presumed abort, made durable so a late COMMIT cannot win).
    async fn settled_outcome(&self, txid: &TxId) -> Result<TransactOutcome> {
        let give_up = Instant::now() + Duration::from_millis(self.node.config.coordinator.timeout_max_ms);
        loop {
            self.node.linearize().await?;
            if let Some(record) = self.node.state_machine.get(txid.clone()).await? {
                return Ok(outcome_of(txid, &record.decision));
            }
            let running = self.live_get(txid).is_some_and(|l| l.view.lock().is_ok_and(|v| v.phase != Phase::Done));
            if !running {
                break;
            }
            if Instant::now() >= give_up {
                return Err(Error::Unavailable {
                    message: format!("transaction {txid} is still deciding"),
                    leader: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reason = self
            .ended
            .lock()
            .expect("ended lock")
            .get(txid)
            .and_then(|s| s.reason.clone())
            .unwrap_or_else(|| "no decision was recorded: the transaction was not open on the leader".into());
        let abort = Decision::Abort { reason: crate::txn::abort_reason(reason) };
        match self.node.propose(Op::Decide { txid: txid.clone(), decision: abort, info: Default::default() }).await? {
            CommandResponse::Decided { record, .. } => Ok(outcome_of(txid, &record.decision)),
            other => Err(Error::Internal(format!("unexpected answer to a decision: {other:?}"))),
        }
    }

    /// The open transaction `live`, locked; refused if it is no longer
    /// open, and rolled back if it is past its deadline.
    pub(super) async fn lock_open<'a>(
        &self,
        txid: &TxId,
        live: &'a Live,
    ) -> Result<tokio::sync::MutexGuard<'a, Option<Open>>> {
        let mut slot = live.open.lock().await;
        if slot.is_none() {
            return Err(self.not_open(txid).await);
        }
        if Instant::now() >= live.deadline {
            let open = slot.take();
            drop(slot);
            self.roll_back_open(live, open, "the transaction passed its deadline").await;
            return Err(Error::FailedPrecondition(format!(
                "transaction {txid} passed its deadline and was rolled back"
            )));
        }
        Ok(slot)
    }

    /// The error for a call on a transaction that is not open here.
    pub(super) async fn not_open(&self, txid: &TxId) -> Error {
        if let Ok(Some(record)) = self.node.state_machine.get(txid.clone()).await {
            let outcome = if record.decision.is_commit() { "committed" } else { "aborted" };
            return Error::FailedPrecondition(format!("transaction {txid} is already {outcome}"));
        }
        if let Some(reason) = self.ended.lock().expect("ended lock").get(txid).and_then(|s| s.reason.clone()) {
            return Error::FailedPrecondition(format!("transaction {txid} was rolled back: {reason}"));
        }
        Error::FailedPrecondition(format!(
            "transaction {txid} is not open on the leader (node {}): an open transaction is rolled back when the \
             leader changes or its deadline passes, and nothing of it commits; begin a new one",
            self.node.config.id
        ))
    }

    /// Rolls back an open transaction's branches and lets it go.
    pub(super) async fn roll_back_open(&self, live: &Live, open: Option<Open>, reason: &str) {
        let Some(open) = open else { return };
        let rollbacks = open.sessions.into_iter().map(|s| s.rollback());
        for result in futures::future::join_all(rollbacks).await {
            if let Err(e) = result {
                // Its connection is closed instead, which rolls it back.
                tracing::warn!(txid = %live.txid, error = %e, "rolling back a branch failed");
            }
        }
        live.update(|v| {
            v.phase = Phase::Done;
            v.abort_reason = Some(crate::txn::abort_reason(reason));
            for b in &mut v.branches {
                *b = BranchState::RolledBack;
            }
        });
        Metrics::add(&self.metrics.aborted, 1);
        tracing::info!(txid = %live.txid, reason, "interactive transaction rolled back");
        // Dropping the guard forgets the transaction.
        drop(open.guard);
    }
}

fn outcome_of(txid: &TxId, decision: &Decision) -> TransactOutcome {
    match decision {
        Decision::Commit { .. } => {
            TransactOutcome { aborted: None, ..TransactOutcome::aborted(txid.clone(), String::new()) }
        }
        Decision::Abort { reason } => TransactOutcome::aborted(txid.clone(), reason.clone()),
    }
}

/// Rolls back open transactions past their deadline, and all of them when
/// this node stops being leader. Ends with the coordinator.
pub(super) async fn reap(coordinator: Weak<Coordinator>) {
    loop {
        tokio::time::sleep(REAP_INTERVAL).await;
        let Some(c) = coordinator.upgrade() else { return };
        let leader = c.node.raft.is_leader();
        let now = Instant::now();
        let open: Vec<Arc<Live>> = c
            .live
            .lock()
            .expect("live lock")
            .values()
            .filter(|l| l.interactive && (!leader || now >= l.deadline))
            .cloned()
            .collect();
        for live in open {
            let Ok(mut slot) = live.open.try_lock() else { continue };
            let Some(taken) = slot.take() else { continue };
            drop(slot);
            let reason = if leader {
                "the transaction passed its deadline".to_string()
            } else {
                format!("node {} stopped being leader; open transactions are rolled back", c.node.config.id)
            };
            Metrics::add(&c.metrics.rolled_back_open, 1);
            c.roll_back_open(&live, Some(taken), &reason).await;
        }
    }
}
