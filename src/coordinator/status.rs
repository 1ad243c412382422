//! What a transaction looks like from outside: `GetTransaction` and
//! `ListTransactions`.
//!
//! Two sources, both on the leader: the transactions it is running (open,
//! preparing, in phase 2), whose every branch state it knows, and the
//! decision log, which holds every decided transaction until its record
//! passes retention. A transaction that ended without a decision (rolled
//! back, timed out, failed to prepare) is remembered for a while on the
//! leader that ran it, then only as "no record": presumed aborted.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;

use super::Coordinator;
use crate::error::Error;
use crate::error::Result;
use crate::txn::Decision;
use crate::txn::RecordState;
use crate::txn::TxId;
use crate::txn::TxnInfo;
use crate::txn::TxnRecord;
use crate::txn::machine::BranchState;
use crate::txn::machine::Phase;

/// How many transactions that ended without a decision the leader
/// remembers for `GetTransaction`.
const ENDED_REMEMBERED: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TxnState {
    /// Open: statements may run (interactive transactions).
    Active,
    /// PREPARE sent; no decision yet.
    Preparing,
    /// COMMIT decided; COMMIT PREPARED not yet done on every branch.
    Committing,
    /// COMMIT decided and done on every branch.
    Committed,
    /// Rolling back (with or without a recorded ABORT).
    Aborting,
    /// Rolled back everywhere, or never decided (presumed abort).
    Aborted,
}

impl TxnState {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "active" => Self::Active,
            "preparing" => Self::Preparing,
            "committing" => Self::Committing,
            "committed" => Self::Committed,
            "aborting" => Self::Aborting,
            "aborted" => Self::Aborted,
            _ => {
                return Err(Error::InvalidInput(format!(
                    "unknown transaction state {s:?} (active, preparing, committing, committed, aborting, aborted)"
                )));
            }
        })
    }

    fn of_record(r: &TxnRecord) -> Self {
        match r.state() {
            RecordState::Committed => Self::Committing,
            RecordState::Aborted => Self::Aborting,
            RecordState::Completed if r.decision.is_commit() => Self::Committed,
            RecordState::Completed => Self::Aborted,
        }
    }
}

impl std::fmt::Display for TxnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::Preparing => "preparing",
            Self::Committing => "committing",
            Self::Committed => "committed",
            Self::Aborting => "aborting",
            Self::Aborted => "aborted",
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BranchStatus {
    pub participant: String,
    /// `active`, `preparing`, `prepared`, `committed`, `rolled-back`,
    /// `retrying(N)`, `heuristic(…)`, …; `unknown` when only the decision
    /// log speaks and it does not say.
    pub state: String,
    pub xid: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TransactionStatus {
    pub txid: TxId,
    pub state: TxnState,
    /// Why it aborted.
    pub reason: Option<String>,
    pub branches: Vec<BranchStatus>,
    pub labels: BTreeMap<String, String>,
    pub started_unix_ms: u64,
    pub deadline_unix_ms: Option<u64>,
    pub decided_unix_ms: Option<u64>,
    pub completed_unix_ms: Option<u64>,
    /// The last error a branch met (a failed statement, PREPARE or phase-2
    /// call), while the leader that ran it remembers.
    pub last_error: Option<String>,
    /// Participants whose branch ended against the decision.
    pub heuristic: Vec<String>,
    pub interactive: bool,
}

/// The part of a running transaction others may look at.
#[derive(Clone, Debug)]
pub struct View {
    pub phase: Phase,
    pub participants: Vec<String>,
    pub branches: Vec<BranchState>,
    pub last_error: Option<String>,
    pub abort_reason: Option<String>,
    pub committed: bool,
}

/// A transaction this leader runs: open, preparing or in phase 2.
pub struct Live {
    pub txid: TxId,
    pub info: TxnInfo,
    pub idempotency_key: Option<String>,
    pub deadline: Instant,
    pub deadline_unix_ms: u64,
    pub interactive: bool,
    pub view: Mutex<View>,
    /// An interactive transaction's open branches, until `Commit` or
    /// `Rollback` takes them.
    pub(super) open: tokio::sync::Mutex<Option<super::interactive::Open>>,
}

impl Live {
    pub fn update(&self, f: impl FnOnce(&mut View)) {
        f(&mut self.view.lock().expect("view lock"));
    }

    pub(super) fn status(&self, record: Option<&TxnRecord>) -> TransactionStatus {
        let view = self.view.lock().expect("view lock").clone();
        let mut state = match view.phase {
            Phase::Active => TxnState::Active,
            Phase::Preparing | Phase::Deciding => TxnState::Preparing,
            Phase::Committing => TxnState::Committing,
            Phase::Aborting => TxnState::Aborting,
            Phase::Done if view.committed => TxnState::Committed,
            Phase::Done => TxnState::Aborted,
        };
        // The log is the truth on what was decided; the view on how far
        // phase 2 has come.
        match record.map(|r| &r.decision) {
            Some(Decision::Commit { .. }) if state < TxnState::Committing => state = TxnState::Committing,
            Some(Decision::Abort { .. }) if state < TxnState::Aborting => state = TxnState::Aborting,
            _ => {}
        }
        let heuristic = view
            .branches
            .iter()
            .zip(&view.participants)
            .filter(|(s, _)| matches!(s, BranchState::Heuristic { .. }))
            .map(|(_, p)| p.clone())
            .collect();
        TransactionStatus {
            txid: self.txid.clone(),
            state,
            reason: record
                .and_then(|r| match &r.decision {
                    Decision::Abort { reason } => Some(reason.clone()),
                    Decision::Commit { .. } => None,
                })
                .or(view.abort_reason),
            branches: view
                .participants
                .iter()
                .zip(view.branches.iter().map(Some).chain(std::iter::repeat(None)))
                .map(|(p, s)| BranchStatus {
                    participant: p.clone(),
                    state: s.map_or("active".to_string(), |s| strip_xid(&s.to_string())),
                    xid: s.and_then(BranchState::xid),
                })
                .collect(),
            labels: self.info.labels.clone(),
            started_unix_ms: self.info.started_unix_ms,
            deadline_unix_ms: Some(self.deadline_unix_ms),
            decided_unix_ms: record.map(|r| r.decided_unix_ms),
            completed_unix_ms: record.and_then(|r| r.completed_unix_ms),
            last_error: view.last_error,
            heuristic,
            interactive: self.interactive,
        }
    }
}

/// `prepared(xid=7)` reads `prepared`; the xid has its own field.
fn strip_xid(s: &str) -> String {
    match s.find("(xid=") {
        Some(i) => s[..i].to_string(),
        None => s.to_string(),
    }
}

/// What the decision log alone says.
fn status_of_record(r: &TxnRecord) -> TransactionStatus {
    let state = TxnState::of_record(r);
    let (branches, reason) = match &r.decision {
        Decision::Commit { branches, .. } => (
            branches
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let heuristic = r.heuristic.iter().find(|h| h.branch as usize == i);
                    let state = match (heuristic, state) {
                        (Some(h), _) if h.committed => "heuristic(committed)",
                        (Some(_), _) => "heuristic(rolled-back)",
                        (None, TxnState::Committed) => "committed",
                        _ => "prepared",
                    };
                    BranchStatus { participant: b.participant.clone(), state: state.into(), xid: b.xid }
                })
                .collect(),
            None,
        ),
        Decision::Abort { reason } => (Vec::new(), Some(reason.clone())),
    };
    let heuristic = match &r.decision {
        Decision::Commit { branches, .. } => {
            r.heuristic.iter().filter_map(|h| branches.get(h.branch as usize).map(|b| b.participant.clone())).collect()
        }
        Decision::Abort { .. } => Vec::new(),
    };
    TransactionStatus {
        txid: r.txid.clone(),
        state,
        reason,
        branches,
        labels: r.info.labels.clone(),
        started_unix_ms: r.info.started_unix_ms,
        deadline_unix_ms: None,
        decided_unix_ms: Some(r.decided_unix_ms),
        completed_unix_ms: r.completed_unix_ms,
        last_error: None,
        heuristic,
        interactive: false,
    }
}

/// Transactions that ended here without a decision, newest last.
#[derive(Default)]
pub struct Ended {
    order: VecDeque<TxId>,
    by_txid: BTreeMap<TxId, TransactionStatus>,
}

impl Ended {
    pub fn remember(&mut self, status: TransactionStatus) {
        if self.by_txid.insert(status.txid.clone(), status.clone()).is_none() {
            self.order.push_back(status.txid);
        }
        while self.order.len() > ENDED_REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.by_txid.remove(&old);
            }
        }
    }

    pub fn get(&self, txid: &TxId) -> Option<&TransactionStatus> {
        self.by_txid.get(txid)
    }
}

impl Coordinator {
    pub(super) fn live_get(&self, txid: &TxId) -> Option<Arc<Live>> {
        self.live.lock().expect("live lock").get(txid).cloned()
    }

    /// A transaction as the leader sees it.
    pub async fn get_transaction(&self, txid: &TxId) -> Result<TransactionStatus> {
        self.node.linearize().await?;
        let record = self.node.state_machine.get(txid.clone()).await?;
        if let Some(live) = self.live_get(txid) {
            return Ok(live.status(record.as_ref()));
        }
        if let Some(r) = &record {
            return Ok(status_of_record(r));
        }
        if let Some(s) = self.ended.lock().expect("ended lock").get(txid) {
            return Ok(s.clone());
        }
        Err(Error::NotFound(format!(
            "no transaction {txid}: the leader is not running it and the decision log has no record of it \
             (never begun, ended without a decision, or its record passed retention)"
        )))
    }

    /// Transactions in txid order after `after`, at most `limit`, those in
    /// `state` if given: the ones running here merged with the decision
    /// log's records.
    pub async fn list_transactions(
        &self,
        state: Option<TxnState>,
        after: Option<TxId>,
        limit: usize,
    ) -> Result<Vec<TransactionStatus>> {
        self.node.linearize().await?;
        let past = |t: &TxId| after.as_ref().is_none_or(|a| t > a);
        let mut running: Vec<Arc<Live>> =
            self.live.lock().expect("live lock").values().filter(|l| past(&l.txid)).cloned().collect();
        running.sort_by(|a, b| a.txid.cmp(&b.txid));
        let mut out: BTreeMap<TxId, TransactionStatus> = BTreeMap::new();
        for live in running {
            let record = self.node.state_machine.get(live.txid.clone()).await?;
            let s = live.status(record.as_ref());
            if state.is_none_or(|st| s.state == st) {
                out.insert(s.txid.clone(), s);
            }
            if out.len() >= limit {
                break;
            }
        }
        // Records, page by page, until `limit` match or they run out.
        let record_state = match state {
            None => None,
            Some(TxnState::Active | TxnState::Preparing) => return Ok(out.into_values().take(limit).collect()),
            Some(TxnState::Committing) => Some(RecordState::Committed),
            Some(TxnState::Aborting) => Some(RecordState::Aborted),
            Some(TxnState::Committed | TxnState::Aborted) => Some(RecordState::Completed),
        };
        let mut cursor = after.clone();
        let mut found = 0;
        loop {
            let page = self.node.state_machine.list(record_state, cursor.clone(), limit).await?;
            let full = page.len() == limit;
            cursor = page.last().map(|r| r.txid.clone());
            for r in &page {
                let s = status_of_record(r);
                if state.is_none_or(|st| s.state == st) && !out.contains_key(&r.txid) {
                    out.insert(r.txid.clone(), s);
                    found += 1;
                }
            }
            if !full || found >= limit {
                break;
            }
        }
        Ok(out.into_values().take(limit).collect())
    }
}
