//! The driver of one transaction: the state machine's actions carried out as
//! tasks whose results come back as events.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::Weak;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use openraft::async_runtime::WatchReceiver;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use super::Metrics;
use super::completer::Completer;
use super::status::Ended;
use super::status::Live;
use super::status::View;
use crate::error::Error;
use crate::error::Result;
use crate::failpoint;
use crate::participant::BranchSession;
use crate::participant::Participant;
use crate::participant::Phase2;
use crate::participant::Statement;
use crate::participant::StatementResult;
use crate::participant::guard::refuse_transaction_control;
use crate::raft::CommandResponse;
use crate::raft::Completion;
use crate::raft::Op;
use crate::server::Node;
use crate::server::now_unix_ms;
use crate::txn::Decision;
use crate::txn::HeuristicBranch;
use crate::txn::TxId;
use crate::txn::TxnInfo;
use crate::txn::gid::Gid;
use crate::txn::machine::Action;
use crate::txn::machine::Backoff;
use crate::txn::machine::BranchState;
use crate::txn::machine::Event;
use crate::txn::machine::Outcome;
use crate::txn::machine::Phase;
use crate::txn::machine::Txn;
use crate::txn::validate_labels;

/// Tries at proposing a decision before the outcome is reported unknown.
const PROPOSE_ATTEMPTS: u32 = 5;
/// Deadline of one proposal through Raft.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one phase-2 call or outcome check on a participant.
pub(super) const PARTICIPANT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct BranchSpec {
    pub participant: String,
    pub statements: Vec<Statement>,
}

pub struct TransactSpec {
    pub branches: Vec<BranchSpec>,
    pub timeout: Option<Duration>,
    pub idempotency_key: Option<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug)]
pub struct TransactOutcome {
    pub txid: TxId,
    /// `None` if committed, else why it aborted.
    pub aborted: Option<String>,
    /// Per branch, the statements' results (committed one-shot transactions
    /// only).
    pub results: Vec<Vec<StatementResult>>,
    /// Participants whose COMMIT PREPARED is still being retried.
    pub pending: Vec<String>,
    /// Participants whose branch ended against the decision.
    pub heuristic: Vec<String>,
    /// The request's idempotency key already belonged to a committed
    /// transaction (`txid`): nothing was applied again.
    pub duplicate: bool,
}

impl TransactOutcome {
    pub(super) fn aborted(txid: TxId, reason: String) -> Self {
        Self {
            txid,
            aborted: Some(reason),
            results: Vec::new(),
            pending: Vec::new(),
            heuristic: Vec::new(),
            duplicate: false,
        }
    }

    pub(super) fn duplicate_of(txid: TxId) -> Self {
        Self { aborted: None, duplicate: true, ..Self::aborted(txid, String::new()) }
    }
}

pub struct Coordinator {
    pub(super) node: Arc<Node>,
    /// Transactions this node runs (open, preparing, in phase 2): recovery
    /// leaves them alone, and their number is bounded by
    /// `limits.transactions_in_flight_max`.
    pub(super) live: Mutex<HashMap<TxId, Arc<Live>>>,
    /// Transactions that ended here without a decision, for
    /// `GetTransaction`.
    pub(super) ended: Mutex<Ended>,
    /// Makes txids unique within this process.
    sequence: AtomicU64,
    backoff: Backoff,
    completer: Completer,
    /// Channels to remote participants' endpoints.
    pub(super) remote_channels: crate::participant::remote::RemoteChannels,
    pub metrics: Arc<Metrics>,
}

impl Coordinator {
    /// A coordinator for `node`; starts the COMPLETE batcher and the reaper
    /// of open transactions, so it must be created inside the runtime.
    pub fn new(node: Arc<Node>) -> Arc<Self> {
        let metrics = Arc::new(Metrics::default());
        let c = &node.config.coordinator;
        let coordinator = Arc::new(Self {
            completer: Completer::start(node.clone(), metrics.clone()),
            backoff: Backoff { first_ms: c.retry_first_ms, max_ms: c.retry_max_ms },
            node,
            live: Mutex::default(),
            ended: Mutex::default(),
            sequence: AtomicU64::new(0),
            remote_channels: Default::default(),
            metrics,
        });
        tokio::spawn(super::interactive::reap(Arc::downgrade(&coordinator)));
        coordinator
    }

    pub(super) fn in_flight(&self, txid: &TxId) -> bool {
        self.live.lock().expect("live lock").contains_key(txid)
    }

    /// How many transactions this node runs now.
    pub fn in_flight_count(&self) -> usize {
        self.live.lock().expect("live lock").len()
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

    /// Counts a refused request and passes its error on.
    pub fn refuse<T>(&self, e: Error) -> Result<T> {
        Metrics::add(&self.metrics.rejected_invalid, 1);
        Err(e)
    }

    /// The deadline a request asks for, checked against the configured
    /// default and maximum.
    pub(super) fn timeout(&self, asked: Option<Duration>) -> Result<Duration> {
        let c = &self.node.config.coordinator;
        let timeout = asked.unwrap_or(Duration::from_millis(c.timeout_default_ms));
        let max = Duration::from_millis(c.timeout_max_ms);
        if timeout.is_zero() || timeout > max {
            return self.refuse(Error::InvalidInput(format!(
                "timeout {timeout:?} must be above 0 and at most {max:?} (coordinator.timeout_max_ms)"
            )));
        }
        Ok(timeout)
    }

    /// Checks a branch count against `limits.branches_per_transaction_max`.
    pub(super) fn check_branches(&self, n: usize) -> Result<()> {
        let max = self.node.config.limits.branches_per_transaction_max;
        if n > max {
            return self.refuse(Error::InvalidInput(format!(
                "{n} branches, over the limit of {max} (limits.branches_per_transaction_max)"
            )));
        }
        Ok(())
    }

    /// Checks a statement count against `limits.statements_per_branch_max`.
    pub(super) fn check_statements(&self, participant: &str, n: usize) -> Result<()> {
        let max = self.node.config.limits.statements_per_branch_max;
        if n > max {
            return self.refuse(Error::InvalidInput(format!(
                "branch {participant} has {n} statements, over the limit of {max} (limits.statements_per_branch_max)"
            )));
        }
        Ok(())
    }

    /// If a committed transaction already holds `key`, its txid. Read after
    /// a linearizable barrier, so a key committed by an earlier leader is
    /// seen.
    pub(super) async fn key_owner(&self, key: &Option<String>) -> Result<Option<TxId>> {
        let Some(key) = key else { return Ok(None) };
        self.node.linearize().await?;
        self.node.state_machine.key_owner(key.clone()).await
    }

    /// Registers a new transaction, within `limits.transactions_in_flight_max`.
    pub(super) fn admit(
        self: &Arc<Self>,
        timeout: Duration,
        idempotency_key: Option<String>,
        labels: BTreeMap<String, String>,
        participants: Vec<String>,
        interactive: bool,
    ) -> Result<(Arc<Live>, LiveGuard)> {
        if !self.node.raft.is_leader() {
            return Err(self.node.not_leader_now());
        }
        let txid = self.new_txid();
        let now = now_unix_ms();
        let live = Arc::new(Live {
            txid: txid.clone(),
            info: TxnInfo { started_unix_ms: now, labels },
            idempotency_key,
            deadline: Instant::now() + timeout,
            deadline_unix_ms: now + timeout.as_millis() as u64,
            interactive,
            view: std::sync::Mutex::new(View {
                phase: Phase::Active,
                branches: vec![BranchState::Active; participants.len()],
                participants,
                last_error: None,
                abort_reason: None,
                committed: false,
            }),
            open: tokio::sync::Mutex::new(None),
        });
        let max = self.node.config.limits.transactions_in_flight_max;
        let mut map = self.live.lock().expect("live lock");
        if map.len() >= max {
            Metrics::add(&self.metrics.rejected_in_flight, 1);
            return Err(Error::ResourceExhausted(format!(
                "{} transactions in flight on the leader, the limit (limits.transactions_in_flight_max); retry later",
                map.len()
            )));
        }
        map.insert(txid.clone(), live.clone());
        Metrics::add(&self.metrics.started, 1);
        let guard = LiveGuard { coordinator: Arc::downgrade(self), live: live.clone() };
        Ok((live, guard))
    }

    /// Runs one transaction; answers when the state machine has an outcome.
    pub async fn transact(self: &Arc<Self>, spec: TransactSpec) -> Result<TransactOutcome> {
        if spec.branches.is_empty() {
            return self.refuse(Error::InvalidInput("a transaction needs at least one branch".into()));
        }
        self.check_branches(spec.branches.len())?;
        let mut participants = Vec::new();
        for (i, b) in spec.branches.iter().enumerate() {
            if spec.branches[..i].iter().any(|o| o.participant == b.participant) {
                return self.refuse(Error::InvalidInput(format!(
                    "participant {} is named by two branches; put its statements in one",
                    b.participant
                )));
            }
            participants.push(self.node.participants.get(&b.participant).or_else(|e| self.refuse(e))?);
            if b.statements.is_empty() {
                return self.refuse(Error::InvalidInput(format!("branch {i} ({}) has no statement", b.participant)));
            }
            self.check_statements(&b.participant, b.statements.len())?;
            for s in &b.statements {
                refuse_transaction_control(&s.sql).or_else(|e| self.refuse(e))?;
            }
        }
        if let Some(key) = &spec.idempotency_key {
            crate::txn::validate_idempotency_key(key).or_else(|e| self.refuse(e))?;
        }
        validate_labels(&spec.labels).or_else(|e| self.refuse(e))?;
        let timeout = self.timeout(spec.timeout)?;
        // Only the leader runs transactions; a follower's request is forwarded.
        if !self.node.raft.is_leader() {
            return Err(self.node.not_leader_now());
        }
        // A retry of a request that committed: answer it, run nothing.
        if let Some(owner) = self.key_owner(&spec.idempotency_key).await? {
            return Ok(TransactOutcome::duplicate_of(owner));
        }

        let names: Vec<String> = spec.branches.iter().map(|b| b.participant.clone()).collect();
        let (live, guard) = self.admit(timeout, spec.idempotency_key, spec.labels, names, false)?;
        let statements = spec.branches.into_iter().map(|b| b.statements).collect();
        let sessions = participants.iter().map(|_| None).collect();
        self.drive(live, guard, participants, sessions, statements).await
    }

    /// Commits a transaction whose branches are `participants`, opened
    /// already (`sessions`) or to be run from `statements`.
    pub(super) async fn drive(
        self: &Arc<Self>,
        live: Arc<Live>,
        guard: LiveGuard,
        participants: Vec<Arc<dyn Participant>>,
        sessions: Vec<Option<Box<dyn BranchSession>>>,
        statements: Vec<Vec<Statement>>,
    ) -> Result<TransactOutcome> {
        let txid = live.txid.clone();
        let (answer_tx, answer_rx) = oneshot::channel();
        let driver = Driver {
            coordinator: self.clone(),
            node: self.node.clone(),
            txid: txid.clone(),
            machine: Txn::new(
                participants.iter().map(|p| p.name().to_string()).collect(),
                live.idempotency_key.clone(),
                self.backoff,
            ),
            live,
            participants,
            sessions,
            statements,
            results: Arc::default(),
            invalid: Arc::default(),
            duplicate_of: None,
            answer: Some(answer_tx),
        };
        tokio::spawn(async move {
            // Dropped when the driver ends, also by a panic.
            let _guard = guard;
            driver.run().await;
        });
        answer_rx
            .await
            .map_err(|_| Error::OutcomeUnknown(format!("transaction {txid}: the driver stopped before an outcome")))?
    }

    /// Remembers how a transaction that ended without a decision looked.
    fn remember_ended(&self, live: &Live) {
        let status = live.status(None);
        self.ended.lock().expect("ended lock").remember(status);
    }
}

/// Removes a transaction from the live set when dropped (also by a panic),
/// remembering it unless it committed.
pub(super) struct LiveGuard {
    coordinator: Weak<Coordinator>,
    live: Arc<Live>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let Some(c) = self.coordinator.upgrade() else { return };
        if let Ok(mut map) = c.live.lock() {
            map.remove(&self.live.txid);
        }
        // Still open: its request was cancelled before it ended, and its
        // dropped sessions closed their connections, rolling it back.
        let committed = self.live.view.lock().map_or(true, |mut v| {
            if v.phase == Phase::Active {
                v.phase = Phase::Done;
                v.abort_reason.get_or_insert_with(|| "the request was cancelled; the branches were rolled back".into());
            }
            v.committed
        });
        // A committed transaction has its record; the others (rolled back,
        // or in doubt after a decision that could not be recorded) are
        // remembered for GetTransaction.
        if !committed {
            c.remember_ended(&self.live);
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

/// When a transaction passed the points of [`Metrics`]' time split.
struct PhaseClock {
    started: Instant,
    prepared: Option<Instant>,
    decided: Option<Instant>,
}

impl PhaseClock {
    fn new() -> Self {
        Self { started: Instant::now(), prepared: None, decided: None }
    }

    /// Adds a committed transaction's split to the metrics.
    fn record(&self, metrics: &Metrics) {
        let (Some(prepared), Some(decided)) = (self.prepared, self.decided) else { return };
        let us = |from: Instant, to: Instant| to.saturating_duration_since(from).as_micros() as u64;
        Metrics::add(&metrics.timed_commits, 1);
        Metrics::add(&metrics.prepare_us, us(self.started, prepared));
        Metrics::add(&metrics.decide_us, us(prepared, decided));
        Metrics::add(&metrics.phase2_us, us(decided, Instant::now()));
    }
}

/// What reaches the driver: the state machine's events, or news that the
/// decision could not be recorded.
enum Input {
    Event(Event),
    /// Proposing the decision failed; whether it holds is unknown here.
    DecisionUnknown(Error),
    /// The COMMIT was refused: a committed transaction holds its
    /// idempotency key. An ABORT is recorded instead.
    KeyOwnedBy(TxId),
}

struct Driver {
    coordinator: Arc<Coordinator>,
    node: Arc<Node>,
    txid: TxId,
    live: Arc<Live>,
    machine: Txn,
    participants: Vec<Arc<dyn Participant>>,
    /// Per branch, an interactive transaction's open session, taken by its
    /// prepare task.
    sessions: Vec<Option<Box<dyn BranchSession>>>,
    /// Per branch, a one-shot transaction's statements, taken by its prepare
    /// task.
    statements: Vec<Vec<Statement>>,
    results: Arc<Mutex<Vec<Option<Vec<StatementResult>>>>>,
    /// A statement refused as invalid (bad SQL, a parameter of the wrong
    /// type): the client is answered INVALID_ARGUMENT instead of ABORTED.
    invalid: Arc<Mutex<Option<Error>>>,
    duplicate_of: Option<TxId>,
    answer: Option<oneshot::Sender<Result<TransactOutcome>>>,
}

impl Driver {
    async fn run(mut self) {
        *self.results.lock().expect("results lock") = vec![None; self.participants.len()];
        // Bounded by what is in flight: one answer per branch per action,
        // plus the timer.
        let (events, mut inbox) = mpsc::unbounded_channel();
        let timer = {
            let events = events.clone();
            let deadline = self.live.deadline;
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline.into()).await;
                events.send(Input::Event(Event::TimedOut)).ok();
            })
        };
        let mut actions = self.machine.step(Event::CommitRequested);
        let mut clock = PhaseClock::new();
        loop {
            self.publish(None);
            for action in actions {
                if matches!(action, Action::ProposeDecision(_)) {
                    clock.prepared = Some(Instant::now());
                }
                self.perform(action, &events).await;
            }
            if self.machine.phase() == Phase::Done {
                if self.machine.decided_commit() {
                    clock.record(&self.coordinator.metrics);
                }
                break;
            }
            match inbox.recv().await {
                Some(Input::Event(event)) => {
                    if matches!(event, Event::Decided(_)) {
                        clock.decided = Some(Instant::now());
                    }
                    let error = match &event {
                        Event::PrepareFailed { reason, .. } => Some(reason.clone()),
                        Event::Phase2Failed { error, .. } => Some(error.clone()),
                        _ => None,
                    };
                    self.publish(error);
                    actions = self.machine.step(event);
                }
                Some(Input::KeyOwnedBy(owner)) => {
                    self.duplicate_of = Some(owner);
                    actions = Vec::new();
                }
                Some(Input::DecisionUnknown(e)) => {
                    // Leave the prepared branches to the leader's recovery,
                    // which acts on what the log holds.
                    tracing::error!(txid = %self.txid, error = %e, "could not record the decision");
                    Metrics::add(&self.coordinator.metrics.outcome_unknown, 1);
                    self.publish(Some(e.to_string()));
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
        self.publish(None);
        timer.abort();
        tracing::debug!(txid = %self.txid, "transaction done");
    }

    /// Shows the machine's state (and the last error) to `GetTransaction`.
    fn publish(&self, error: Option<String>) {
        let machine = &self.machine;
        self.live.update(|v| {
            v.phase = machine.phase();
            v.branches = machine.branches().to_vec();
            v.committed = machine.decided_commit();
            v.abort_reason = machine.abort_reason().map(str::to_string);
            if error.is_some() {
                v.last_error = error;
            }
        });
    }

    fn gid(&self, branch: usize) -> Gid {
        Gid::new(&self.node.config.cluster_id, &self.txid, branch as u32)
    }

    async fn perform(&mut self, action: Action, events: &mpsc::UnboundedSender<Input>) {
        let events = events.clone();
        let deadline = self.live.deadline;
        match action {
            Action::Prepare { branch } => {
                let participant = self.participants[branch].clone();
                let session = self.sessions[branch].take();
                let statements = std::mem::take(&mut self.statements[branch]);
                let results = self.results.clone();
                let invalid = self.invalid.clone();
                let gid = self.gid(branch);
                let result_bytes_max = self.node.config.limits.result_bytes_max;
                tokio::spawn(async move {
                    let work = async {
                        let session = match session {
                            Some(s) => s,
                            None => participant.begin().await?,
                        };
                        let (out, prepared) = session
                            .run_and_prepare(&statements, &gid, result_bytes_max)
                            .await
                            .map_err(|failed| match failed.statement {
                                Some(i) => {
                                    let e = failed.error.context(&format!("branch {branch} statement {i}"));
                                    if matches!(e, Error::InvalidInput(_)) {
                                        invalid.lock().expect("invalid lock").get_or_insert(e.clone());
                                    }
                                    e
                                }
                                None => failed.error,
                            })?;
                        if let Some(slot) = results.lock().expect("results lock").get_mut(branch) {
                            *slot = Some(out);
                        }
                        failpoint::hit("coordinator::after_prepare").await;
                        Ok::<_, Error>(prepared)
                    };
                    // The branch's work is bounded by the transaction's
                    // deadline; a dropped session closes its connection.
                    let event = match tokio::time::timeout_at(deadline.into(), work).await {
                        Ok(Ok(prepared)) => Event::Prepared { branch, xid: prepared.xid },
                        Ok(Err(e)) => Event::PrepareFailed { branch, reason: e.to_string() },
                        Err(_) => Event::PrepareFailed { branch, reason: "timed out".into() },
                    };
                    events.send(Input::Event(event)).ok();
                });
            }
            Action::RollbackActive { branch } => {
                // One-shot branches are begun and ended inside their prepare
                // task; an interactive one may still be open here.
                if let Some(session) = self.sessions[branch].take() {
                    tokio::spawn(async move { session.rollback().await.ok() });
                }
            }
            Action::ProposeDecision(mut decision) => {
                // A remote branch is recorded with its endpoint, so that any
                // leader can finish it.
                if let Decision::Commit { branches, .. } = &mut decision {
                    for (b, p) in branches.iter_mut().zip(&self.participants) {
                        b.remote = p.remote();
                    }
                }
                let node = self.node.clone();
                let txid = self.txid.clone();
                let info = self.live.info.clone();
                tokio::spawn(async move {
                    let input = match propose_decision(&node, &txid, decision, info, &events).await {
                        Ok(held) => Input::Event(Event::Decided(held)),
                        Err(e) => Input::DecisionUnknown(e),
                    };
                    events.send(input).ok();
                });
            }
            Action::CommitPrepared { branch } | Action::RollbackPrepared { branch } => {
                let commit = matches!(action, Action::CommitPrepared { .. });
                if commit && branch == 0 {
                    failpoint::hit("coordinator::before_commit_prepared").await;
                }
                let participant = self.participants[branch].clone();
                let gid = self.gid(branch);
                let metrics = self.coordinator.metrics.clone();
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
                        Ok(Phase2::Done) => {
                            if commit {
                                failpoint::hit("coordinator::after_commit_prepared").await;
                            }
                            Event::Phase2Done { branch }
                        }
                        Ok(Phase2::GidMissing) => Event::GidMissing { branch },
                        Err(e) => {
                            tracing::warn!(%gid, error = %e, "phase 2 failed; will retry");
                            Metrics::add(&metrics.phase2_retries, 1);
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
                Metrics::add(&self.coordinator.metrics.heuristic, 1);
                tracing::error!(
                    txid = %self.txid,
                    gid = %self.gid(branch),
                    participant = %self.participants[branch].name(),
                    decided = if decided_commit { "commit" } else { "abort" },
                    "HEURISTIC OUTCOME: a branch ended against the decision"
                );
            }
            Action::ProposeComplete => {
                let heuristic = self
                    .machine
                    .branches()
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| match s {
                        BranchState::Heuristic { committed } => {
                            Some(HeuristicBranch { branch: i as u32, committed: *committed })
                        }
                        _ => None,
                    })
                    .collect();
                self.coordinator.completer.complete(Completion { txid: self.txid.clone(), heuristic });
            }
            Action::Answer(outcome) => {
                if let Some(answer) = self.answer.take() {
                    let name = |i: usize| self.participants[i].name().to_string();
                    let outcome = match outcome {
                        Outcome::Committed { pending, heuristic } => {
                            Metrics::add(&self.coordinator.metrics.committed, 1);
                            failpoint::hit("coordinator::before_answer").await;
                            TransactOutcome {
                                txid: self.txid.clone(),
                                aborted: None,
                                // Every branch has prepared: every result is in.
                                results: std::mem::take(&mut *self.results.lock().expect("results lock"))
                                    .into_iter()
                                    .map(Option::unwrap_or_default)
                                    .collect(),
                                pending: pending.into_iter().map(name).collect(),
                                heuristic: heuristic.into_iter().map(name).collect(),
                                duplicate: false,
                            }
                        }
                        // The request repeated a key that committed: that
                        // commit is its answer; this attempt was rolled back.
                        Outcome::Aborted { .. } if self.duplicate_of.is_some() => {
                            TransactOutcome::duplicate_of(self.duplicate_of.clone().expect("checked"))
                        }
                        Outcome::Aborted { reason } => {
                            if let Some(e) = self.invalid.lock().expect("invalid lock").take() {
                                Metrics::add(&self.coordinator.metrics.rejected_invalid, 1);
                                answer.send(Err(e)).ok();
                                return;
                            }
                            // An earlier attempt of this request (same key) may
                            // have been in doubt when this one began, and have
                            // committed since (its prepared rows can be what made
                            // this one fail): then that commit is the answer.
                            match self.coordinator.key_owner(&self.live.idempotency_key).await {
                                Ok(Some(owner)) if owner != self.txid => TransactOutcome::duplicate_of(owner),
                                _ => {
                                    Metrics::add(&self.coordinator.metrics.aborted, 1);
                                    TransactOutcome::aborted(self.txid.clone(), reason)
                                }
                            }
                        }
                    };
                    answer.send(Ok(outcome)).ok();
                }
            }
        }
    }
}

/// Records `decision` for `txid` and returns the decision that holds. An
/// idempotency key that another committed txid holds turns this COMMIT into
/// a recorded ABORT (and the owner is sent as [`Input::KeyOwnedBy`]).
async fn propose_decision(
    node: &Node,
    txid: &TxId,
    decision: Decision,
    info: TxnInfo,
    events: &mpsc::UnboundedSender<Input>,
) -> Result<Decision> {
    let mut attempt = 0;
    let mut decision = decision;
    loop {
        attempt += 1;
        if decision.is_commit() {
            failpoint::hit("coordinator::before_commit_decision").await;
            // A moment after the entry is handed to Raft, before it is known
            // applied.
            #[cfg(feature = "failpoints")]
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                failpoint::hit("coordinator::after_commit_proposed").await;
            });
        }
        let proposal = node.propose(Op::Decide { txid: txid.clone(), decision: decision.clone(), info: info.clone() });
        let result = tokio::time::timeout(PROPOSE_TIMEOUT, proposal)
            .await
            .unwrap_or_else(|_| Err(Error::OutcomeUnknown(format!("no decision applied in {PROPOSE_TIMEOUT:?}"))));
        match result {
            Ok(CommandResponse::Decided { record, .. }) => {
                if record.decision.is_commit() {
                    failpoint::hit("coordinator::after_commit_decision").await;
                }
                return Ok(record.decision);
            }
            Ok(CommandResponse::IdempotencyConflict { key, txid: owner }) => {
                events.send(Input::KeyOwnedBy(owner.clone())).ok();
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
