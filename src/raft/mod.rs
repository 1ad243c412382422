//! Raft: the replicated, durable decision log.
//!
//! Every Tandem node runs one openraft instance. The leader appends commands
//! to the log; once a majority has them durably on disk the entry is
//! committed, and every node applies it, in log order, to its state machine,
//! the *decision log* ([`state_machine`]).
//!
//! All openraft wiring lives in this module:
//!
//! - [`TypeConfig`]: the types openraft is instantiated with. A node is a
//!   `u64` id plus the address (`host:port`) of its gRPC server.
//! - [`log_store`]: the Raft log and vote in RocksDB. An append is written to
//!   RocksDB before it returns (so it can be read back) and reported durable
//!   only after the write-ahead log is fsynced; one fsync covers every append
//!   queued behind it (group commit). The newest entries are also kept in
//!   memory, decoded, for replication and apply to read back.
//! - [`state_machine`]: applies [`Command`]s to transaction records in RocksDB,
//!   builds and installs snapshots, which are checkpoints ([`snapshot`]). Once a
//!   snapshot covers a stretch of log, openraft purges that stretch, so disk
//!   use stays bounded.
//! - [`network`]: node-to-node RPC (vote, append, snapshot) over tonic, one
//!   cached channel per peer; [`service`] is the server side. Replication
//!   runs over a long-lived stream per follower, so that an entry goes out
//!   while the answers to earlier ones are on their way.
//!
//! # Why apply must be deterministic
//!
//! Every node applies the same entries, at start-up again from its last
//! applied point, and a lagging node from a snapshot. If apply consulted the
//! clock, a participant or anything but the command and the state machine
//! itself, two nodes could reach different decisions for one transaction,
//! and a new leader would act on a decision the old one never made. So a
//! command carries every input apply needs, including the time, which the
//! leader stamps when it proposes the command.
//!
//! # Storage layout
//!
//! One RocksDB database per node, with column families:
//!
//! | column family | key | value |
//! |---|---|---|
//! | `raft_log` | log index (u64, big-endian) | entry (JSON) |
//! | `raft_meta` | `vote`, `last_purged` (data from earlier versions may also hold `committed`, no longer read) | JSON |
//! | `sm_records` | txid | [`crate::txn::TxnRecord`] (JSON) |
//! | `sm_keys` | idempotency key | txid |
//! | `sm_completed` | completed time (u64 BE) + txid | `k` + the record's idempotency key, or `-` |
//! | `sm_open` | txid of an incomplete record | `c` (COMMIT) or `a` (ABORT) |
//! | `sm_open` | empty: the index is whole | empty |
//! | `sm_meta` | `last_applied`, `membership`, `snapshot_meta` | JSON |
//! | `sm_meta` | `snapshot_file` | the current snapshot's checkpoint |
//! | `sm_meta` | `snapshot_installing` | a received snapshot being installed (JSON) |
//!
//! Snapshots are RocksDB checkpoints in the `snapshots` directory beside
//! RocksDB's own files (see [`snapshot`]).
//!
//! The log and the state machine share one write-ahead log, so a crash
//! recovers a prefix of all writes: the state machine is never ahead of a
//! purge, and whatever it lost is re-applied from the log.

pub mod batcher;
pub mod log_store;
pub mod network;
pub mod service;
pub mod snapshot;
pub mod state_machine;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rocksdb::ColumnFamilyDescriptor;
use rocksdb::DB;
use rocksdb::Options;
use serde::Deserialize;
use serde::Serialize;

use crate::error::Result;
use crate::txn::Decision;
use crate::txn::HeuristicBranch;
use crate::txn::TxId;
use crate::txn::TxnInfo;
use crate::txn::TxnRecord;

pub use log_store::LogStore;
pub use state_machine::StateMachine;

/// The node description carried in the membership: where it serves gRPC.
pub type Node = openraft::impls::BasicNode;
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// openraft instantiated for Tandem.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = Node,
);

pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// The command encoding this build writes. Version 2 added `Decide.info`,
/// branch xids and `CompleteBatch`; version 3 remote branches
/// (`Branch.remote`); version 4 `DecideBatch` (only those entries carry it).
/// An older node stops at the first newer entry rather than misread it, so
/// upgrade every node before the new leader writes.
pub const COMMAND_VERSION: u32 = 4;
/// The version of every entry but a batch of decisions: the previous
/// build's, so that it reads them.
const COMMAND_VERSION_UNBATCHED: u32 = 3;
/// The oldest encoding this build still reads (its new fields default).
pub const COMMAND_VERSION_MIN: u32 = 1;

/// A replicated command: one entry of the decision log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Encoding version. A node that meets a version it does not know stops
    /// applying (fail-stop) rather than skip the entry and diverge.
    pub version: u32,
    /// Unix milliseconds, stamped by the leader when it proposed the command.
    /// The only clock apply ever sees.
    pub at_unix_ms: u64,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Record a decision: a compare-and-set, the first one for a txid holds.
    /// `info` is kept with the record when this decision is the first.
    Decide {
        txid: TxId,
        decision: Decision,
        #[serde(default)]
        info: TxnInfo,
    },
    /// Several decisions, each applied as its own `Decide` would be, in
    /// order (see [`batcher`]).
    DecideBatch { items: Vec<DecideItem> },
    /// Phase 2 is done on every branch.
    Complete { txid: TxId },
    /// Phase 2 is done on every branch of each transaction; the leader
    /// batches completions into one entry, off the transactions' critical
    /// path.
    CompleteBatch { items: Vec<Completion> },
    /// Drop completed records completed before this time, with their
    /// idempotency keys.
    Forget { before_unix_ms: u64 },
}

/// One decision of a [`Op::DecideBatch`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecideItem {
    pub txid: TxId,
    pub decision: Decision,
    #[serde(default)]
    pub info: TxnInfo,
}

/// One transaction of a [`Op::CompleteBatch`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub txid: TxId,
    /// Branches that ended against the decision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heuristic: Vec<HeuristicBranch>,
}

/// Most completions one entry carries.
pub const COMPLETE_BATCH_MAX: usize = 512;

impl Command {
    /// Stamped with the oldest version that has `op`, so that a node of the
    /// previous build reads every entry but a batch of decisions.
    pub fn new(at_unix_ms: u64, op: Op) -> Self {
        let version = if matches!(op, Op::DecideBatch { .. }) { COMMAND_VERSION } else { COMMAND_VERSION_UNBATCHED };
        Self { version, at_unix_ms, op }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            Op::Decide { txid, decision, .. } => {
                let kind = if decision.is_commit() { "commit" } else { "abort" };
                write!(f, "decide {txid} {kind}")
            }
            Op::DecideBatch { items } => write!(f, "decide {} transactions", items.len()),
            Op::Complete { txid } => write!(f, "complete {txid}"),
            Op::CompleteBatch { items } => write!(f, "complete {} transactions", items.len()),
            Op::Forget { before_unix_ms } => write!(f, "forget before {before_unix_ms}"),
        }
    }
}

/// What applying a command answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// The decision that holds for the txid. `won` is true if it is the
    /// decision (commit or abort) the command asked for.
    Decided {
        won: bool,
        record: TxnRecord,
    },
    /// The COMMIT's idempotency key belongs to another committed txid;
    /// nothing was recorded.
    IdempotencyConflict {
        key: String,
        txid: TxId,
    },
    /// A [`Op::DecideBatch`]'s answers, one per decision, in order.
    DecidedBatch {
        responses: Vec<CommandResponse>,
    },
    Completed {
        record: TxnRecord,
    },
    /// `Complete` for a txid with no record.
    NotFound {
        txid: TxId,
    },
    /// A [`Op::CompleteBatch`]'s answers, one per transaction, in order:
    /// each `Completed` or `NotFound`, as its own `Complete` would be.
    CompletedBatch {
        responses: Vec<CommandResponse>,
    },
    Forgotten {
        count: u64,
    },
    /// The command was refused as invalid; nothing changed. Only a
    /// misbehaving proposer gets this: the API validates first.
    Invalid {
        reason: String,
    },
    /// Blank and membership entries.
    Empty,
}

/// Column families of the node's database.
pub(crate) mod cf {
    pub const RAFT_LOG: &str = "raft_log";
    pub const RAFT_META: &str = "raft_meta";
    pub const SM_RECORDS: &str = "sm_records";
    pub const SM_KEYS: &str = "sm_keys";
    pub const SM_COMPLETED: &str = "sm_completed";
    /// The incomplete records (decided, phase 2 not complete), by txid.
    pub const SM_OPEN: &str = "sm_open";
    pub const SM_META: &str = "sm_meta";
    pub const ALL: [&str; 7] = [RAFT_LOG, RAFT_META, SM_RECORDS, SM_KEYS, SM_COMPLETED, SM_OPEN, SM_META];
}

/// RocksDB's memtables, all column families together.
const MEMTABLES_BYTES_MAX: usize = 32 << 20;
/// RocksDB's block cache, shared by all column families.
const BLOCK_CACHE_BYTES: usize = 16 << 20;

/// Opens (or creates) the node's RocksDB and returns its log store and state
/// machine.
pub fn open_store(dir: &Path) -> Result<(LogStore, StateMachine)> {
    std::fs::create_dir_all(dir)?;
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_keep_log_file_num(4);
    // The write-ahead log reuses two spent files: an fsync after a write
    // that overwrites allocated blocks leaves the file's size alone, so it
    // needs no filesystem journal commit, and other fsyncs on the disk (the
    // participants' databases', when they share it) were shorter in the
    // traces taken (README, Benchmark). RocksDB honours it only under its
    // default point-in-time WAL recovery, which this store keeps.
    opts.set_recycle_log_file_num(2);
    // Bounded memory. Every column family gets the same small settings (a
    // column family left with defaults would take 64 MB memtables and its
    // own block cache), the memtables of all of them together are capped,
    // and one block cache serves them all.
    opts.set_db_write_buffer_size(MEMTABLES_BYTES_MAX);
    // The column families flush together, so a checkpoint (a snapshot) is
    // of one point in time across them.
    opts.set_atomic_flush(true);
    // One shard. By default the cache is split into shards of 512 kB, each
    // its own LRU, and a full shard evicts while the cache as a whole is
    // not full: a follower read table files' index blocks back from their
    // files (and decompressed them) 6.4 times per file opened, against once
    // with one shard (RocksDB's statistics; README, Benchmark).
    let mut cache_options = rocksdb::LruCacheOptions::default();
    cache_options.set_capacity(BLOCK_CACHE_BYTES);
    cache_options.set_num_shard_bits(0);
    let cache = rocksdb::Cache::new_lru_cache_opts(&cache_options);
    let cf_options = || {
        let mut o = Options::default();
        o.set_compression_type(rocksdb::DBCompressionType::Lz4);
        o.set_write_buffer_size(8 << 20);
        o.set_max_write_buffer_number(2);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        // Index and filter blocks count against the cache too, rather than
        // growing with the data outside it.
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        // Most lookups miss (a new txid's record, a new idempotency key):
        // a bloom filter answers them without reading data blocks.
        table.set_bloom_filter(10.0, false);
        o.set_block_based_table_factory(&table);
        o
    };
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let cfs = cf::ALL.iter().map(|name| ColumnFamilyDescriptor::new(*name, cf_options()));
    let db = Arc::new(DB::open_cf_descriptors(&opts, dir, cfs)?);
    let log_store = LogStore::new(db.clone());
    log_store.uncommit_vote()?;
    let state_machine = StateMachine::open(db, dir)?;
    Ok((log_store, state_machine))
}

/// The least time a snapshot transfer is given.
const SNAPSHOT_TRANSFER_TIMEOUT_MS: u64 = 10 * 60 * 1000;

/// Builds openraft's config from ours.
pub fn raft_config(config: &crate::config::NodeConfig) -> Result<openraft::Config> {
    let r = &config.raft;
    let raft = openraft::Config {
        cluster_name: config.cluster_id.clone(),
        election_timeout_min: r.election_timeout_ms_min,
        election_timeout_max: r.election_timeout_ms_max,
        heartbeat_interval: r.heartbeat_interval_ms,
        // Sending a snapshot writes out, streams and checks every record:
        // minutes for a large state.
        install_snapshot_timeout: (r.rpc_timeout_ms * 5).max(SNAPSHOT_TRANSFER_TIMEOUT_MS),
        max_payload_entries: r.append_entries_max,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_logs_since_last),
        max_in_snapshot_log_to_keep: r.logs_kept_after_snapshot,
        enable_pre_vote: Some(true),
        // The leader sends new entries to followers as soon as they are
        // written, while its own fsync runs, rather than after it: the two
        // fsyncs overlap. A commit still counts the leader only once its
        // fsync is done (Raft thesis, 10.2.1).
        broadcast_submitted_on_append: Some(true),
        ..Default::default()
    };
    raft.validate().map_err(|e| crate::error::Error::InvalidInput(format!("raft config: {e}")))
}
