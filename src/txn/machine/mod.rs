//! The two-phase-commit state machine of one transaction, without I/O.
//!
//! The coordinator's driver feeds it [`Event`]s (a participant answered, a
//! decision was applied from the log, a timer fired) and carries out the
//! [`Action`]s it returns (prepare a branch, propose a decision, commit a
//! prepared branch, answer the client). Everything that can go wrong in
//! between is an event too, so every path is tested here without PostgreSQL
//! or Raft, by the scripts in `src/txn/testdata/`.
//!
//! ```text
//!  Active --commit--> Preparing --all prepared--> Deciding --COMMIT applied--> Committing --all done--> Done
//!    |                   |                          |                            (retries, heuristics)
//!    |                   +--a prepare failed--+     +--ABORT applied--+
//!    +--rollback/timeout---------------------+----------------------+--> Aborting --all rolled back--> Done
//! ```
//!
//! The rules that make it safe:
//! - COMMIT is proposed only when every branch is prepared, and phase 2 acts
//!   only on the decision *applied* from the log ([`Event::Decided`]), which
//!   may differ from the one proposed (someone else decided first). Under a
//!   COMMIT, whoever recorded it, no branch is rolled back.
//! - Without a recorded decision a transaction is presumed aborted: rolling
//!   back before any decision needs no log record.
//! - A phase-2 failure is retried with capped exponential backoff, forever;
//!   a branch whose gid vanished is checked for how it really ended, and one
//!   that ended against the decision is a heuristic outcome, reported.

use std::fmt;

use super::Branch;
use super::Decision;

/// Capped exponential backoff for phase-2 retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub first_ms: u64,
    pub max_ms: u64,
}

impl Backoff {
    /// The delay before retry number `attempt` (1 for the first retry).
    pub fn delay_ms(&self, attempt: u32) -> u64 {
        let shift = attempt.saturating_sub(1).min(32);
        self.first_ms.saturating_mul(1u64 << shift).min(self.max_ms)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Branches open; statements may run.
    Active,
    /// PREPAREs sent.
    Preparing,
    /// Every branch prepared; COMMIT proposed, not yet applied.
    Deciding,
    /// COMMIT applied; COMMIT PREPARED under way.
    Committing,
    /// Rolling back, with or without a recorded ABORT.
    Aborting,
    /// Nothing left to do.
    Done,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BranchState {
    Active,
    Preparing,
    /// Prepared; `xid` is the participant's own transaction id, kept to learn
    /// later how the branch ended if its gid vanishes.
    Prepared {
        xid: Option<u64>,
    },
    /// PREPARE failed, or its answer was lost: the branch is most likely
    /// rolled back, but may be prepared (a PREPARE that succeeded just before
    /// a deadline or a broken connection), so it is rolled back by gid too.
    MaybePrepared,
    /// Phase 2 failed `attempts` times; a retry is due after a delay.
    Retrying {
        attempts: u32,
        xid: Option<u64>,
    },
    /// The gid vanished; asking the participant how the branch ended.
    /// `attempts` counts the phase-2 tries so far, for the backoff.
    Checking {
        attempts: u32,
        xid: Option<u64>,
    },
    Committed,
    RolledBack,
    /// Ended against the decision, by a hand other than ours.
    Heuristic {
        committed: bool,
    },
}

impl BranchState {
    /// No more work on this branch.
    fn settled(&self) -> bool {
        matches!(self, BranchState::Committed | BranchState::RolledBack | BranchState::Heuristic { .. })
    }

    fn attempts(&self) -> u32 {
        match self {
            BranchState::Retrying { attempts, .. } | BranchState::Checking { attempts, .. } => *attempts,
            _ => 0,
        }
    }

    /// The participant's id of the branch's transaction, once prepared.
    pub fn xid(&self) -> Option<u64> {
        match self {
            BranchState::Prepared { xid } | BranchState::Retrying { xid, .. } | BranchState::Checking { xid, .. } => {
                *xid
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The client asked to commit.
    CommitRequested,
    /// The client asked to roll back, or a statement failed.
    RollbackRequested {
        reason: String,
    },
    /// The transaction's deadline passed.
    TimedOut,
    Prepared {
        branch: usize,
        xid: Option<u64>,
    },
    PrepareFailed {
        branch: usize,
        reason: String,
    },
    /// The decision that holds, as applied from the log.
    Decided(Decision),
    /// COMMIT PREPARED or ROLLBACK PREPARED succeeded.
    Phase2Done {
        branch: usize,
    },
    /// Phase 2 failed with an error worth retrying.
    Phase2Failed {
        branch: usize,
        error: String,
    },
    /// Phase 2 found no prepared branch of that gid.
    GidMissing {
        branch: usize,
    },
    /// How a branch whose gid vanished ended; `None` if the participant
    /// cannot tell (yet).
    BranchEnded {
        branch: usize,
        committed: Option<bool>,
    },
    /// A retry's delay is over.
    RetryDue {
        branch: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Prepare {
        branch: usize,
    },
    /// ROLLBACK an unprepared branch on its session.
    RollbackActive {
        branch: usize,
    },
    ProposeDecision(Decision),
    CommitPrepared {
        branch: usize,
    },
    RollbackPrepared {
        branch: usize,
    },
    /// Send [`Event::RetryDue`] after the delay.
    ScheduleRetry {
        branch: usize,
        after_ms: u64,
    },
    /// Ask the participant how the branch with this xid ended.
    CheckOutcome {
        branch: usize,
        xid: Option<u64>,
    },
    /// Log, count and list a branch that ended against the decision.
    ReportHeuristic {
        branch: usize,
        decided_commit: bool,
    },
    /// Record COMPLETE (batched by the driver).
    ProposeComplete,
    /// Answer the client.
    Answer(Outcome),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Committed. `pending` branches still await COMMIT PREPARED (retried
    /// in the background); `heuristic` branches were rolled back by another
    /// hand against the decision.
    Committed {
        pending: Vec<usize>,
        heuristic: Vec<usize>,
    },
    Aborted {
        reason: String,
    },
}

/// One transaction as the leader drives it.
#[derive(Clone, Debug)]
pub struct Txn {
    participants: Vec<String>,
    branches: Vec<BranchState>,
    phase: Phase,
    /// The decision applied from the log, once there is one.
    decided: Option<Decision>,
    idempotency_key: Option<String>,
    abort_reason: Option<String>,
    answered: bool,
    backoff: Backoff,
}

impl Txn {
    /// A transaction with one active branch per participant.
    pub fn new(participants: Vec<String>, idempotency_key: Option<String>, backoff: Backoff) -> Self {
        let branches = vec![BranchState::Active; participants.len()];
        Self {
            participants,
            branches,
            phase: Phase::Active,
            decided: None,
            idempotency_key,
            abort_reason: None,
            answered: false,
            backoff,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the decision applied from the log is this transaction's
    /// COMMIT.
    pub fn decided_commit(&self) -> bool {
        self.decided.as_ref().is_some_and(Decision::is_commit)
    }

    pub fn abort_reason(&self) -> Option<&str> {
        self.abort_reason.as_deref()
    }

    pub fn branches(&self) -> &[BranchState] {
        &self.branches
    }

    /// Opens one more branch (interactive transactions); returns its number.
    pub fn add_branch(&mut self, participant: String) -> Option<usize> {
        if self.phase != Phase::Active {
            return None;
        }
        self.participants.push(participant);
        self.branches.push(BranchState::Active);
        Some(self.branches.len() - 1)
    }

    /// Applies one event and returns what to do. Events that do not fit the
    /// current state (a late or duplicated answer) change nothing.
    pub fn step(&mut self, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        match (self.phase, event) {
            (Phase::Active, Event::CommitRequested) => {
                if self.branches.is_empty() {
                    self.abort_unprepared("the transaction has no branch".into(), &mut actions);
                } else {
                    self.phase = Phase::Preparing;
                    for (branch, state) in self.branches.iter_mut().enumerate() {
                        *state = BranchState::Preparing;
                        actions.push(Action::Prepare { branch });
                    }
                }
            }
            (Phase::Active, Event::RollbackRequested { reason }) => self.abort_unprepared(reason, &mut actions),
            (Phase::Active, Event::TimedOut) => self.abort_unprepared("the transaction timed out".into(), &mut actions),
            (Phase::Preparing, Event::Prepared { branch, xid })
                if self.is(branch, |s| *s == BranchState::Preparing) =>
            {
                self.branches[branch] = BranchState::Prepared { xid };
                if self.branches.iter().all(|s| matches!(s, BranchState::Prepared { .. })) {
                    self.phase = Phase::Deciding;
                    actions.push(Action::ProposeDecision(self.commit_decision()));
                }
            }
            (Phase::Preparing, Event::PrepareFailed { branch, reason })
                if self.is(branch, |s| *s == BranchState::Preparing) =>
            {
                self.branches[branch] = BranchState::MaybePrepared;
                self.start_abort(
                    format!("branch {branch} ({}) failed to prepare: {reason}", self.participants[branch]),
                    &mut actions,
                );
            }
            (Phase::Preparing, Event::TimedOut) => {
                self.start_abort("the transaction timed out while preparing".into(), &mut actions)
            }
            // Late prepare answers after the abort started.
            (Phase::Aborting, Event::Prepared { branch, xid }) if self.is(branch, |s| *s == BranchState::Preparing) => {
                self.branches[branch] = BranchState::Prepared { xid };
                actions.push(Action::RollbackPrepared { branch });
            }
            (Phase::Aborting, Event::PrepareFailed { branch, .. })
                if self.is(branch, |s| *s == BranchState::Preparing) =>
            {
                self.branches[branch] = BranchState::MaybePrepared;
                actions.push(Action::RollbackPrepared { branch });
            }
            (Phase::Deciding, Event::Decided(decision)) => {
                self.decided = Some(decision.clone());
                match decision {
                    // Any COMMIT recorded for this txid commits its branches:
                    // a gid names branch i of this txid, and under a COMMIT
                    // no branch is ever rolled back. (One recorded by another
                    // hand, an operator's, may differ from the one proposed.)
                    Decision::Commit { .. } => {
                        self.phase = Phase::Committing;
                        for branch in 0..self.branches.len() {
                            actions.push(Action::CommitPrepared { branch });
                        }
                    }
                    Decision::Abort { reason } => self.start_abort(reason, &mut actions),
                }
            }
            (Phase::Committing | Phase::Aborting, Event::Phase2Done { branch }) if self.in_phase2(branch) => {
                self.branches[branch] =
                    if self.phase == Phase::Committing { BranchState::Committed } else { BranchState::RolledBack };
                self.answer_if_first_round_done(&mut actions);
                self.finish_if_settled(&mut actions);
            }
            (Phase::Committing | Phase::Aborting, Event::Phase2Failed { branch, .. }) if self.in_phase2(branch) => {
                let attempts = self.branches[branch].attempts() + 1;
                let xid = self.branches[branch].xid();
                self.branches[branch] = BranchState::Retrying { attempts, xid };
                actions.push(Action::ScheduleRetry { branch, after_ms: self.backoff.delay_ms(attempts) });
                self.answer_if_first_round_done(&mut actions);
            }
            (Phase::Committing | Phase::Aborting, Event::RetryDue { branch })
                if self.is(branch, |s| matches!(s, BranchState::Retrying { .. })) =>
            {
                actions.push(self.phase2_action(branch));
            }
            // No xid to ask by (a branch never confirmed prepared, or a
            // participant without one): a vanished gid is taken as having
            // ended the way phase 2 drives it, most likely by an earlier call
            // whose answer was lost. Recovery takes it the same way. (A hand
            // that ended it the other way goes unseen: only an xid tells.)
            (Phase::Committing | Phase::Aborting, Event::GidMissing { branch })
                if self.in_phase2(branch) && self.branches[branch].xid().is_none() =>
            {
                self.branches[branch] =
                    if self.phase == Phase::Committing { BranchState::Committed } else { BranchState::RolledBack };
                self.answer_if_first_round_done(&mut actions);
                self.finish_if_settled(&mut actions);
            }
            (Phase::Committing | Phase::Aborting, Event::GidMissing { branch }) if self.in_phase2(branch) => {
                let (attempts, xid) = (self.branches[branch].attempts(), self.branches[branch].xid());
                self.branches[branch] = BranchState::Checking { attempts, xid };
                actions.push(Action::CheckOutcome { branch, xid });
            }
            (Phase::Committing | Phase::Aborting, Event::BranchEnded { branch, committed })
                if self.is(branch, |s| matches!(s, BranchState::Checking { .. })) =>
            {
                let decided_commit = self.phase == Phase::Committing;
                match committed {
                    Some(c) if c == decided_commit => {
                        self.branches[branch] = if c { BranchState::Committed } else { BranchState::RolledBack };
                    }
                    Some(c) => {
                        self.branches[branch] = BranchState::Heuristic { committed: c };
                        actions.push(Action::ReportHeuristic { branch, decided_commit });
                    }
                    None => {
                        // Cannot tell yet: try phase 2 again later.
                        let attempts = self.branches[branch].attempts() + 1;
                        let xid = self.branches[branch].xid();
                        self.branches[branch] = BranchState::Retrying { attempts, xid };
                        actions.push(Action::ScheduleRetry { branch, after_ms: self.backoff.delay_ms(attempts) });
                    }
                }
                self.answer_if_first_round_done(&mut actions);
                self.finish_if_settled(&mut actions);
            }
            _ => {}
        }
        actions
    }

    fn is(&self, branch: usize, f: impl Fn(&BranchState) -> bool) -> bool {
        self.branches.get(branch).is_some_and(f)
    }

    /// A branch waiting on a phase-2 answer.
    fn in_phase2(&self, branch: usize) -> bool {
        self.is(branch, |s| {
            matches!(s, BranchState::Prepared { .. } | BranchState::MaybePrepared | BranchState::Retrying { .. })
        })
    }

    /// The phase-2 call for a branch. Retried after a vanished gid too: it
    /// answers "gid missing" again and the outcome is checked again.
    fn phase2_action(&self, branch: usize) -> Action {
        if self.phase == Phase::Committing {
            Action::CommitPrepared { branch }
        } else {
            Action::RollbackPrepared { branch }
        }
    }

    fn commit_decision(&self) -> Decision {
        Decision::Commit {
            branches: self
                .participants
                .iter()
                .zip(&self.branches)
                .map(|(p, s)| Branch { participant: p.clone(), xid: s.xid(), remote: None })
                .collect(),
            idempotency_key: self.idempotency_key.clone(),
        }
    }

    /// Rolls back a transaction none of whose branches is prepared.
    fn abort_unprepared(&mut self, reason: String, actions: &mut Vec<Action>) {
        for (branch, state) in self.branches.iter_mut().enumerate() {
            *state = BranchState::RolledBack;
            actions.push(Action::RollbackActive { branch });
        }
        self.phase = Phase::Done;
        self.abort_reason = Some(reason.clone());
        self.answer(Outcome::Aborted { reason }, actions);
    }

    /// Rolls back every prepared branch; branches still preparing are rolled
    /// back when their answer comes.
    fn start_abort(&mut self, reason: String, actions: &mut Vec<Action>) {
        self.phase = Phase::Aborting;
        self.abort_reason = Some(reason.clone());
        for (branch, state) in self.branches.iter().enumerate() {
            if matches!(state, BranchState::Prepared { .. } | BranchState::MaybePrepared) {
                actions.push(Action::RollbackPrepared { branch });
            }
        }
        self.answer(Outcome::Aborted { reason }, actions);
        self.finish_if_settled(actions);
    }

    /// Once every branch has had its first phase-2 attempt, answers the
    /// client of a commit, naming the branches still pending.
    fn answer_if_first_round_done(&mut self, actions: &mut Vec<Action>) {
        if self.phase != Phase::Committing || self.answered {
            return;
        }
        let first_round_done =
            self.branches.iter().all(|s| !matches!(s, BranchState::Prepared { .. } | BranchState::Checking { .. }));
        if first_round_done {
            let pending = (0..self.branches.len()).filter(|b| !self.branches[*b].settled()).collect();
            let heuristic = (0..self.branches.len())
                .filter(|b| matches!(self.branches[*b], BranchState::Heuristic { .. }))
                .collect();
            self.answer(Outcome::Committed { pending, heuristic }, actions);
        }
    }

    fn answer(&mut self, outcome: Outcome, actions: &mut Vec<Action>) {
        if !self.answered {
            self.answered = true;
            actions.push(Action::Answer(outcome));
        }
    }

    /// When every branch is settled: done, and COMPLETE if a decision was
    /// recorded (without one there is nothing to complete).
    fn finish_if_settled(&mut self, actions: &mut Vec<Action>) {
        if self.phase == Phase::Done || !self.branches.iter().all(BranchState::settled) {
            return;
        }
        self.phase = Phase::Done;
        if self.decided.is_some() {
            actions.push(Action::ProposeComplete);
        }
    }
}

impl fmt::Display for BranchState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BranchState::Active => write!(f, "active"),
            BranchState::Preparing => write!(f, "preparing"),
            BranchState::Prepared { xid: Some(x) } => write!(f, "prepared(xid={x})"),
            BranchState::Prepared { xid: None } => write!(f, "prepared"),
            BranchState::MaybePrepared => write!(f, "maybe-prepared"),
            BranchState::Retrying { attempts, .. } => write!(f, "retrying({attempts})"),
            BranchState::Checking { .. } => write!(f, "checking"),
            BranchState::Committed => write!(f, "committed"),
            BranchState::RolledBack => write!(f, "rolled-back"),
            BranchState::Heuristic { committed: true } => write!(f, "heuristic(committed)"),
            BranchState::Heuristic { committed: false } => write!(f, "heuristic(rolled-back)"),
        }
    }
}

#[cfg(test)]
mod tests;
