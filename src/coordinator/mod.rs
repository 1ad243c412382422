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
//! Not yet here: interactive transactions, recovery on a new leader and the
//! reconciliation of orphan prepared branches (a transaction whose leader
//! dies mid-way is left to them), batching of COMPLETE records.

pub mod driver;

pub use driver::BranchSpec;
pub use driver::Coordinator;
pub use driver::TransactOutcome;
pub use driver::TransactSpec;
