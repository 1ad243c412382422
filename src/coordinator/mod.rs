//! The coordinator: runs two-phase commit on the leader.
//!
//! [`Coordinator::transact`] validates a one-shot request, makes a txid and
//! hands the transaction to a driver task, which feeds the pure state machine
//! ([`crate::txn::machine`]) with what participants and the log answer, and
//! carries out the actions it returns: statements and PREPARE on every
//! branch in parallel, the COMMIT decision through Raft, COMMIT PREPARED on
//! every branch in parallel, retries with capped exponential backoff, a
//! COMPLETE record at the end (batched with others by [`completer`]). The
//! client is answered as soon as the state machine says so; the driver keeps
//! going until every branch is settled.
//!
//! [`interactive`] runs the same protocol for transactions a client builds
//! statement by statement (`Begin`, `Execute`, `Commit`, `Rollback`): their
//! branches stay open on the leader until `Commit` hands them to a driver.
//! They live only in the leader's memory: a leader change or the deadline
//! rolls them back, and since nothing of them was decided, nothing of them
//! can commit.
//!
//! [`status`] answers `GetTransaction` and `ListTransactions` from what the
//! leader is running and what the decision log holds.
//!
//! [`recovery`] settles what a driver left: on the leader, periodically, it
//! resolves orphan prepared branches (recording ABORT where no decision
//! exists) and re-drives decided, incomplete transactions, checking how a
//! branch ended when its gid has vanished (heuristic outcomes).

pub mod completer;
pub mod driver;
pub mod interactive;
pub mod recovery;
pub mod remote;
pub mod status;

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

pub use driver::BranchSpec;
pub use driver::Coordinator;
pub use driver::TransactOutcome;
pub use driver::TransactSpec;
pub use interactive::BeginSpec;
pub use remote::EnlistSpec;
pub use status::TransactionStatus;
pub use status::TxnState;

/// The coordinator's counters, ready to export as metrics (they are shown by
/// `tandem cluster status --json` today). Counted on the node that did the
/// work; they restart from zero with the process.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Transactions begun (one-shot and interactive).
    pub started: AtomicU64,
    pub committed: AtomicU64,
    pub aborted: AtomicU64,
    /// Transactions whose decision could not be recorded: recovery settles
    /// them.
    pub outcome_unknown: AtomicU64,
    /// Branches found to have ended against the decision.
    pub heuristic: AtomicU64,
    /// Requests refused by `limits.transactions_in_flight_max`.
    pub rejected_in_flight: AtomicU64,
    /// Requests refused as invalid or over a size limit.
    pub rejected_invalid: AtomicU64,
    /// Interactive transactions rolled back at their deadline or on a
    /// leader change.
    pub rolled_back_open: AtomicU64,
    /// Phase-2 calls retried.
    pub phase2_retries: AtomicU64,
    /// Prepared branches settled by recovery.
    pub reconciled: AtomicU64,
    /// Recovery rounds run to the end.
    pub recovery_rounds: AtomicU64,
    /// COMPLETE records proposed (by drivers and by recovery), and the log
    /// entries that carried them. A record recovery completes while its
    /// driver's completion is still queued counts twice.
    pub completions: AtomicU64,
    pub completion_entries: AtomicU64,
    /// Where a committed transaction's time goes on the leader, summed in
    /// microseconds over `timed_commits`: from the request to every branch
    /// prepared, the decision through Raft, and phase 2 until the answer.
    pub timed_commits: AtomicU64,
    pub prepare_us: AtomicU64,
    pub decide_us: AtomicU64,
    pub phase2_us: AtomicU64,
}

impl Metrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Every counter by name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("transactions_started", get(&self.started)),
            ("transactions_committed", get(&self.committed)),
            ("transactions_aborted", get(&self.aborted)),
            ("transactions_outcome_unknown", get(&self.outcome_unknown)),
            ("branches_heuristic", get(&self.heuristic)),
            ("rejected_in_flight_limit", get(&self.rejected_in_flight)),
            ("rejected_invalid", get(&self.rejected_invalid)),
            ("open_transactions_rolled_back", get(&self.rolled_back_open)),
            ("phase2_retries", get(&self.phase2_retries)),
            ("branches_reconciled", get(&self.reconciled)),
            ("recovery_rounds", get(&self.recovery_rounds)),
            ("completions", get(&self.completions)),
            ("completion_entries", get(&self.completion_entries)),
            ("timed_commits", get(&self.timed_commits)),
            ("prepare_us_total", get(&self.prepare_us)),
            ("decide_us_total", get(&self.decide_us)),
            ("phase2_us_total", get(&self.phase2_us)),
        ]
    }
}
