//! Tandem: a distributed transaction coordinator.
//!
//! A Raft-replicated cluster of coordinator nodes (normally three) that runs
//! two-phase commit across the databases and services taking part in one
//! business operation, so the operation lands everywhere or nowhere, also when
//! a coordinator node dies in the middle of it.
//!
//! The crate holds the replicated, durable *decision log* and the cluster
//! that keeps it, and on top two-phase commit across PostgreSQL
//! participants and remote services: one-shot `Transact`, interactive
//! `Begin`/`Execute`/`Enlist`/`Commit`/`Rollback`, `GetTransaction`/
//! `ListTransactions`, `GetOutcome` for participants in doubt, and recovery
//! on every new leader.
//!
//! # Module map
//!
//! | module | what it holds |
//! |---|---|
//! | [`txn`] | the transaction model: txids, decisions, records, gids, the 2PC state machine (no I/O) |
//! | [`participant`] | the participant adapter trait, the PostgreSQL adapter, remote branches (`participant.proto`) and the SDK for services ([`participant::sdk`]) |
//! | [`raft`] | openraft wiring: RocksDB log and state machine, node-to-node gRPC |
//! | [`coordinator`] | the 2PC driver on the leader: one-shot and interactive transactions, `Enlist` and `GetOutcome`, their status, recovery, COMPLETE batching, counters |
//! | [`server`] | the node process: gRPC services, forwarding to the leader, upkeep |
//! | [`client`] | the Rust client: any node, follows the leader, safe retries |
//! | [`workload`] | the bank workload and the checker of its invariants (`tandem workload`, `scripts/chaos.sh`) |
//! | [`config`] | node configuration (TOML, flags, environment) |
//! | [`error`] | the one error type and its gRPC status mapping |
//! | [`failpoint`] | named points where tests stop a node dead (compiled in with the `failpoints` feature) |
//! | [`proto`] | generated protobuf/gRPC code (`proto/tandem/v1`) |
//!
//! # Glossary
//!
//! | word | meaning |
//! |---|---|
//! | node | one Tandem process; the Raft leader drives transactions |
//! | participant | a system that takes part in a transaction (a PostgreSQL database, a remote service) |
//! | branch | one participant's share of one global transaction |
//! | txid | the global transaction id, made by the coordinator: 1–48 of `[a-z0-9]` |
//! | gid | the name of a prepared branch inside a participant, derived from cluster id + txid + branch number |
//! | decision | COMMIT or ABORT for a txid, written once to the replicated log |
//! | in doubt | a branch that is prepared and has not yet been told the decision |
//!
//! # Life of a decision
//!
//! 1. A request reaches any node. A follower forwards it to the leader (or
//!    answers UNAVAILABLE with the leader's address).
//! 2. The leader validates it, stamps the time, and proposes a
//!    [`raft::Command`] through Raft; decisions that wait together go as one
//!    entry ([`raft::batcher`]).
//! 3. Once a majority has the entry fsynced, it is committed; every node
//!    applies it to its [`raft::StateMachine`]. A decision is a
//!    compare-and-set: the first one for a txid holds, and the answer carries
//!    the one that holds.
//! 4. Later a `Complete` command marks phase 2 done (completions that wait
//!    together share an entry too), and after the retention time the
//!    leader's `Forget` commands drop the record and its idempotency key
//!    (in rounds of a bounded number of records, since applying one holds
//!    up the entries after it).
//!
//! # Life of a transaction (one-shot `Transact`)
//!
//! 1. Any node takes the request; a follower forwards it to the leader.
//! 2. The leader checks it (known participants, limits, no
//!    transaction-control SQL) and makes a txid
//!    ([`coordinator::Coordinator::transact`]).
//! 3. For every branch in parallel: BEGIN, the statements, `PREPARE
//!    TRANSACTION` under a gid derived from cluster id, txid and branch
//!    ([`txn::gid`]), and a check that the branch really is prepared.
//! 4. Any failure: every branch is rolled back (by gid), the client is told
//!    ABORTED; nothing is written to the log (presumed abort).
//! 5. All prepared: COMMIT is recorded through Raft; phase 2 follows the
//!    decision *applied*, which may be another one that was recorded first.
//! 6. `COMMIT PREPARED` on every branch in parallel, then the answer; a
//!    branch that fails is retried with capped backoff and named as pending.
//! 7. A `Complete` record, batched with other transactions'; after the
//!    retention time, `Forget`.
//!
//! An interactive transaction (`Begin`, `Execute`…, `Commit`) opens its
//! branches one `Execute` at a time and keeps them open on the leader; at
//! `Commit` they go through steps 3–7 like a one-shot transaction's.
//!
//! The transitions are plain data ([`txn::machine`]); the driver only
//! carries out the actions they return.

pub mod client;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod failpoint;
pub mod participant;
pub mod proto;
pub mod raft;
pub mod server;
pub mod txn;
pub mod workload;
