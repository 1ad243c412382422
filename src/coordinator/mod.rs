//! The coordinator: runs two-phase commit on the leader.
//!
//! [`Coordinator::transact`] validates a request, makes a txid and hands the
//! transaction to a driver task, which feeds the pure state machine
//! ([`crate::txn::machine`]) with what participants and the log answer, and
//! carries out the actions it returns: statements and PREPARE on every
//! branch in parallel, the COMMIT decision through Raft, COMMIT PREPARED on
//! every branch in parallel, retries with capped exponential backoff, a
//! COMPLETE record at the end. The client is answered as soon as the state
//! machine says so; the driver keeps going until every branch is settled.
//!
//! [`recovery`] settles what a driver left: on the leader, periodically, it
//! resolves orphan prepared branches (recording ABORT where no decision
//! exists) and re-drives decided, incomplete transactions.
//!
//! Not yet here: interactive transactions, batching of COMPLETE records,
//! outcome checks (heuristics) during recovery.

pub mod driver;
pub mod recovery;

pub use driver::BranchSpec;
pub use driver::Coordinator;
pub use driver::TransactOutcome;
pub use driver::TransactSpec;
