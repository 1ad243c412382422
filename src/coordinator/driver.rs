//! The driver of one transaction: the state machine's actions carried out as
//! tasks whose results come back as events.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use crate::error::Error;
use crate::error::Result;
use crate::participant::Participant;
use crate::participant::Phase2;
use crate::participant::Statement;
use crate::participant::StatementResult;
use crate::participant::guard::refuse_transaction_control;
use crate::raft::CommandResponse;
use crate::raft::Op;
use crate::server::Node;
use crate::server::now_unix_ms;
use crate::txn::Decision;
use crate::txn::TxId;
use crate::txn::gid::Gid;
use crate::txn::machine::Action;
use crate::txn::machine::Backoff;
use crate::txn::machine::Event;
use crate::txn::machine::Outcome;
use crate::txn::machine::Phase;
use crate::txn::machine::Txn;

/// Most statements one branch may carry.
pub const STATEMENTS_PER_BRANCH_MAX: usize = 1000;
/// Timeout when a request names none, and the longest one allowed.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
pub const TIMEOUT_MAX: Duration = Duration::from_secs(600);
/// Tries at proposing a decision before the outcome is reported unknown.
const PROPOSE_ATTEMPTS: u32 = 5;
/// Deadline of one proposal through Raft.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one phase-2 call or outcome check on a participant.
const PARTICIPANT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct BranchSpec {
    pub participant: String,
    pub statements: Vec<Statement>,
}

pub struct TransactSpec {
    pub branches: Vec<BranchSpec>,
    pub timeout: Option<Duration>,
    pub idempotency_key: Option<String>,
}

#[derive(Debug)]
pub struct TransactOutcome {
    pub txid: TxId,
    /// `None` if committed, else why it aborted.
    pub aborted: Option<String>,
    /// Per branch, the statements' results (committed only).
    pub results: Vec<Vec<StatementResult>>,
    /// Branches whose COMMIT PREPARED is still being retried.
    pub pending: Vec<usize>,
    /// Branches that ended against the decision.
    pub heuristic: Vec<usize>,
}

pub struct Coordinator {
    pub(super) node: Arc<Node>,
    /// Transactions this node's drivers are running: recovery leaves them
    /// alone.
    in_flight: Arc<Mutex<std::collections::HashSet<TxId>>>,
    /// Makes txids unique within this process.
    sequence: AtomicU64,
    backoff: Backoff,
}

impl Coordinator {
    pub fn new(node: Arc<Node>) -> Self {
        Self {
            node,
            in_flight: Arc::default(),
            sequence: AtomicU64::new(0),
            backoff: Backoff { first_ms: 100, max_ms: 10_000 },
        }
    }

    pub(super) fn in_flight(&self, txid: &TxId) -> bool {
        self.in_flight.lock().expect("in-flight lock").contains(txid)
    }

    /// A new txid: time, Raft term, node and a per-process sequence, in base
    /// 36. Unique without trusting the clock: one leader per term, and a
    /// restarted node leads again only in a later term.
    fn new_txid(&self) -> TxId {
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        let term = self.node.raft.metrics().borrow_watched().current_term;
        let s = format!("{}t{}n{}s{}", base36(now_unix_ms()), base36(term), base36(self.node.config.id), base36(seq));
        TxId::parse(&s).expect("base 36 is within the txid alphabet")
    }

    /// Runs one transaction; answers when the state machine has an outcome.
    pub async fn transact(&self, spec: TransactSpec) -> Result<TransactOutcome> {
        if spec.branches.is_empty() {
            return Err(Error::InvalidInput("a transaction needs at least one branch".into()));
        }
        if spec.branches.len() > crate::txn::BRANCHES_MAX {
            return Err(Error::InvalidInput(format!(
                "{} branches, over the limit of {}",
                spec.branches.len(),
                crate::txn::BRANCHES_MAX
            )));
        }
        let mut participants = Vec::new();
        for (i, b) in spec.branches.iter().enumerate() {
            participants.push(self.node.participants.get(&b.participant)?);
            if b.statements.is_empty() {
                return Err(Error::InvalidInput(format!("branch {i} ({}) has no statement", b.participant)));
            }
            if b.statements.len() > STATEMENTS_PER_BRANCH_MAX {
                return Err(Error::InvalidInput(format!(
                    "branch {i} has {} statements, over the limit of {STATEMENTS_PER_BRANCH_MAX}",
                    b.statements.len()
                )));
            }
            for s in &b.statements {
                refuse_transaction_control(&s.sql)?;
            }
        }
        if let Some(key) = &spec.idempotency_key {
            crate::txn::validate_idempotency_key(key)?;
        }
        let timeout = spec.timeout.unwrap_or(TIMEOUT_DEFAULT);
        if timeout.is_zero() || timeout > TIMEOUT_MAX {
            return Err(Error::InvalidInput(format!("timeout must be above 0 and at most {TIMEOUT_MAX:?}")));
        }
        // Only the leader runs transactions; a follower's request is forwarded.
        if !self.node.raft.is_leader() {
            return Err(self.node.not_leader_now());
        }

        let txid = self.new_txid();
        self.in_flight.lock().expect("in-flight lock").insert(txid.clone());
        let (answer_tx, answer_rx) = oneshot::channel();
        let driver = Driver {
            node: self.node.clone(),
            txid: txid.clone(),
            machine: Txn::new(
                spec.branches.iter().map(|b| b.participant.clone()).collect(),
                spec.idempotency_key,
                self.backoff,
            ),
            participants,
            statements: spec.branches.into_iter().map(|b| b.statements).collect(),
            results: Arc::default(),
            answer: Some(answer_tx),
        };
        let in_flight = InFlight { set: self.in_flight.clone(), txid: txid.clone() };
        tokio::spawn(async move {
            // Dropped when the driver ends, also by a panic.
            let _in_flight = in_flight;
            driver.run(timeout).await;
        });
        answer_rx
            .await
            .map_err(|_| Error::OutcomeUnknown(format!("transaction {txid}: the driver stopped before an outcome")))?
    }
}

/// Removes a txid from the in-flight set when dropped.
struct InFlight {
    set: Arc<Mutex<std::collections::HashSet<TxId>>>,
    txid: TxId,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.txid);
        }
    }
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ASCII digits")
}

/// What reaches the driver: the state machine's events, or news that the
/// decision could not be recorded.
enum Input {
    Event(Event),
    /// Proposing the decision failed; whether it holds is unknown here.
    DecisionUnknown(Error),
}

struct Driver {
    node: Arc<Node>,
    txid: TxId,
    machine: Txn,
    participants: Vec<Arc<dyn Participant>>,
    /// Per branch, taken by its prepare task.
    statements: Vec<Vec<Statement>>,
    results: Arc<Mutex<Vec<Option<Vec<StatementResult>>>>>,
    answer: Option<oneshot::Sender<Result<TransactOutcome>>>,
}

impl Driver {
    async fn run(mut self, timeout: Duration) {
        *self.results.lock().expect("results lock") = vec![None; self.participants.len()];
        // Bounded by what is in flight: one answer per branch per action,
        // plus the timer.
        let (events, mut inbox) = mpsc::unbounded_channel();
        let timer = {
            let events = events.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                events.send(Input::Event(Event::TimedOut)).ok();
            })
        };
        let mut actions = self.machine.step(Event::CommitRequested);
        loop {
            for action in actions {
                self.perform(action, &events, timeout);
            }
            if self.machine.phase() == Phase::Done {
                break;
            }
            match inbox.recv().await {
                Some(Input::Event(event)) => actions = self.machine.step(event),
                Some(Input::DecisionUnknown(e)) => {
                    // Leave the prepared branches to the leader's recovery,
                    // which acts on what the log holds.
                    tracing::error!(txid = %self.txid, error = %e, "could not record the decision");
                    if let Some(answer) = self.answer.take() {
                        answer
                            .send(Err(Error::OutcomeUnknown(format!(
                                "transaction {}: the decision could not be recorded ({e}); \
                                 the outcome is settled by recovery",
                                self.txid
                            ))))
                            .ok();
                    }
                    break;
                }
                None => break,
            }
        }
        timer.abort();
        tracing::debug!(txid = %self.txid, "transaction done");
    }

    fn gid(&self, branch: usize) -> Gid {
        Gid::new(&self.node.config.cluster_id, &self.txid, branch as u32)
    }

    fn perform(&mut self, action: Action, events: &mpsc::UnboundedSender<Input>, timeout: Duration) {
        let events = events.clone();
        match action {
            Action::Prepare { branch } => {
                let participant = self.participants[branch].clone();
                let statements = std::mem::take(&mut self.statements[branch]);
                let results = self.results.clone();
                let gid = self.gid(branch);
                tokio::spawn(async move {
                    let work = async {
                        let mut session = participant.begin().await?;
                        let mut out = Vec::with_capacity(statements.len());
                        for (i, s) in statements.iter().enumerate() {
                            match session.execute(s).await {
                                Ok(r) => out.push(r),
                                Err(e) => {
                                    session.rollback().await.ok();
                                    return Err(Error::InvalidInput(format!("statement {i}: {e}")));
                                }
                            }
                        }
                        let prepared = session.prepare(&gid).await?;
                        if let Some(slot) = results.lock().expect("results lock").get_mut(branch) {
                            *slot = Some(out);
                        }
                        Ok(prepared)
                    };
                    // The branch's work is bounded by the transaction's
                    // deadline; a dropped session closes its connection.
                    let event = match tokio::time::timeout(timeout, work).await {
                        Ok(Ok(prepared)) => Event::Prepared { branch, xid: prepared.xid },
                        Ok(Err(e)) => Event::PrepareFailed { branch, reason: e.to_string() },
                        Err(_) => Event::PrepareFailed { branch, reason: "timed out".into() },
                    };
                    events.send(Input::Event(event)).ok();
                });
            }
            Action::RollbackActive { .. } => {
                // One-shot branches are begun and ended inside their prepare
                // task; nothing is open outside it.
            }
            Action::ProposeDecision(decision) => {
                let node = self.node.clone();
                let txid = self.txid.clone();
                tokio::spawn(async move {
                    let input = match propose_decision(&node, &txid, decision).await {
                        Ok(held) => Input::Event(Event::Decided(held)),
                        Err(e) => Input::DecisionUnknown(e),
                    };
                    events.send(input).ok();
                });
            }
            Action::CommitPrepared { branch } | Action::RollbackPrepared { branch } => {
                let commit = matches!(action, Action::CommitPrepared { .. });
                let participant = self.participants[branch].clone();
                let gid = self.gid(branch);
                tokio::spawn(async move {
                    let call = async {
                        if commit {
                            participant.commit_prepared(&gid).await
                        } else {
                            participant.rollback_prepared(&gid).await
                        }
                    };
                    let result = tokio::time::timeout(PARTICIPANT_CALL_TIMEOUT, call).await.unwrap_or_else(|_| {
                        Err(Error::Unavailable { message: "no answer in time".into(), leader: None })
                    });
                    let event = match result {
                        Ok(Phase2::Done) => Event::Phase2Done { branch },
                        Ok(Phase2::GidMissing) => Event::GidMissing { branch },
                        Err(e) => {
                            tracing::warn!(%gid, error = %e, "phase 2 failed; will retry");
                            Event::Phase2Failed { branch, error: e.to_string() }
                        }
                    };
                    events.send(Input::Event(event)).ok();
                });
            }
            Action::ScheduleRetry { branch, after_ms } => {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(after_ms)).await;
                    events.send(Input::Event(Event::RetryDue { branch })).ok();
                });
            }
            Action::CheckOutcome { branch, xid } => {
                let participant = self.participants[branch].clone();
                tokio::spawn(async move {
                    let committed = match xid {
                        Some(xid) => tokio::time::timeout(PARTICIPANT_CALL_TIMEOUT, participant.branch_outcome(xid))
                            .await
                            .ok()
                            .and_then(|r| r.ok())
                            .flatten(),
                        None => None,
                    };
                    events.send(Input::Event(Event::BranchEnded { branch, committed })).ok();
                });
            }
            Action::ReportHeuristic { branch, decided_commit } => {
                tracing::error!(
                    txid = %self.txid,
                    gid = %self.gid(branch),
                    participant = %self.participants[branch].name(),
                    decided = if decided_commit { "commit" } else { "abort" },
                    "HEURISTIC OUTCOME: a branch ended against the decision"
                );
            }
            Action::ProposeComplete => {
                let node = self.node.clone();
                let txid = self.txid.clone();
                tokio::spawn(async move {
                    if let Err(e) = node.propose(Op::Complete { txid: txid.clone() }).await {
                        tracing::warn!(%txid, error = %e, "recording COMPLETE failed");
                    }
                });
            }
            Action::Answer(outcome) => {
                if let Some(answer) = self.answer.take() {
                    let outcome = match outcome {
                        Outcome::Committed { pending, heuristic } => TransactOutcome {
                            txid: self.txid.clone(),
                            aborted: None,
                            // Every branch has prepared: every result is in.
                            results: std::mem::take(&mut *self.results.lock().expect("results lock"))
                                .into_iter()
                                .map(Option::unwrap_or_default)
                                .collect(),
                            pending,
                            heuristic,
                        },
                        Outcome::Aborted { reason } => TransactOutcome {
                            txid: self.txid.clone(),
                            aborted: Some(reason),
                            results: Vec::new(),
                            pending: Vec::new(),
                            heuristic: Vec::new(),
                        },
                    };
                    answer.send(Ok(outcome)).ok();
                }
            }
        }
    }
}

/// Records `decision` for `txid` and returns the decision that holds. An
/// idempotency key that another committed txid holds turns this COMMIT into
/// a recorded ABORT.
async fn propose_decision(node: &Node, txid: &TxId, decision: Decision) -> Result<Decision> {
    let mut attempt = 0;
    let mut decision = decision;
    loop {
        attempt += 1;
        let proposal = node.propose(Op::Decide { txid: txid.clone(), decision: decision.clone() });
        let result = tokio::time::timeout(PROPOSE_TIMEOUT, proposal)
            .await
            .unwrap_or_else(|_| Err(Error::OutcomeUnknown(format!("no decision applied in {PROPOSE_TIMEOUT:?}"))));
        match result {
            Ok(CommandResponse::Decided { record, .. }) => return Ok(record.decision),
            Ok(CommandResponse::IdempotencyConflict { key, txid: owner }) => {
                decision = Decision::Abort {
                    reason: format!("idempotency key {key:?} already belongs to committed transaction {owner}"),
                };
            }
            Ok(other) => return Err(Error::Internal(format!("unexpected answer to a decision: {other:?}"))),
            // Safe to repeat: a decision is a compare-and-set.
            Err(e) if attempt < PROPOSE_ATTEMPTS && (e.is_retryable() || matches!(e, Error::OutcomeUnknown(_))) => {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
