//! The state machine: the decision log.
//!
//! Applying a [`Command`] changes transaction records, and nothing else:
//!
//! - `Decide` is a compare-and-set. With no record for the txid, it records
//!   the decision (and binds a COMMIT's idempotency key to the txid, unless
//!   another committed txid holds the key: then nothing is recorded). With a
//!   record, nothing changes. Either way the answer carries the record that
//!   holds, so every caller learns the one decision. A new record enters the
//!   `sm_open` index of incomplete records.
//! - `Complete` stamps the completion time once, and takes the record out of
//!   `sm_open`; repeating it changes nothing.
//! - `Forget` drops completed records completed before a time, with their
//!   idempotency keys, walking the `sm_completed` index in time order.
//!
//! Apply reads and writes only RocksDB and takes its time from the command
//! (see the module docs of [`crate::raft`]). The writes of one batch of
//! entries, and the new `last_applied`, go to RocksDB in one atomic write
//! batch.
//!
//! A snapshot is a RocksDB checkpoint of the state machine (see
//! [`super::snapshot`]); it travels as the list of records, and the applied
//! position and membership as its meta. The key index, the completion index
//! and the open index are derived from the records when a snapshot is
//! installed. While one is installed, local reads on that node may miss
//! records (the indexes are emptied before the records). `sm_meta` names the
//! current checkpoint, so that it survives a restart and can be sent to a
//! lagging follower.

use std::collections::HashMap;
use std::io;
use std::io::Read;
use std::io::Seek;
use std::io::SeekFrom;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use futures::Stream;
use futures::TryStreamExt;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::entry::RaftEntry;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use openraft::type_config::alias::EntryOf;
use openraft::type_config::alias::LogIdOf;
use openraft::type_config::alias::SnapshotMetaOf;
use openraft::type_config::alias::SnapshotOf;
use openraft::type_config::alias::StoredMembershipOf;
use rocksdb::DB;
use rocksdb::IteratorMode;
use rocksdb::WriteBatch;
use serde::Deserialize;

use super::COMMAND_VERSION;
use super::COMMAND_VERSION_MIN;
use super::COMPLETE_BATCH_MAX;
use super::Command;
use super::CommandResponse;
use super::Op;
use super::TypeConfig;
use super::batcher::DECIDE_BATCH_MAX;
use super::cf;
use super::log_store::decode;
use super::log_store::encode;
use super::snapshot;
use super::snapshot::SnapshotFile;
use crate::error::Error;
use crate::error::Result;
use crate::txn::Decision;
use crate::txn::HeuristicBranch;
use crate::txn::RecordState;
use crate::txn::TxId;
use crate::txn::TxnInfo;
use crate::txn::TxnRecord;

const KEY_LAST_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const KEY_SNAPSHOT_META: &[u8] = b"snapshot_meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"snapshot_data";
const KEY_SNAPSHOT_LEGACY: &[u8] = b"snapshot";
const KEY_SNAPSHOT_FILE: &[u8] = b"snapshot_file";
/// Set while a received snapshot is loaded: the meta and file to finish with.
const KEY_SNAPSHOT_INSTALLING: &[u8] = b"snapshot_installing";
/// The `sm_open` key (no txid is empty) present once the index holds every
/// incomplete record: absent in a store an earlier build wrote, which
/// [`StateMachine::open`] then indexes. Kept in the index's own column
/// family, so that the family dropped by hand (to open the store with an
/// earlier build) is indexed again.
const OPEN_INDEXED: &[u8] = b"";
/// `sm_open` values: the decision of the incomplete record.
const OPEN_COMMIT: &[u8] = b"c";
const OPEN_ABORT: &[u8] = b"a";
/// Writes per RocksDB write batch while a snapshot is loaded.
const INSTALL_BATCH_WRITES: usize = 10_000;
/// Most entries applied in place on the state machine's task; see `apply`.
const APPLY_IN_PLACE_MAX: usize = 16;

/// The decision log, backed by the node's RocksDB.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<DB>,
    /// Held while the current snapshot is replaced: openraft may build a
    /// snapshot while another is being installed, and the older of the two
    /// must not overwrite the newer.
    snapshot_lock: Arc<std::sync::Mutex<()>>,
    /// Where the snapshots (checkpoints) and snapshot files are.
    snapshot_dir: Arc<PathBuf>,
}

/// How earlier builds kept a snapshot's data: `{"records": [...]}`, held
/// in `sm_meta`. Replaced by a checkpoint when the store opens, and still
/// read when an older leader sends it.
#[derive(Deserialize)]
struct LegacyData {
    records: Vec<TxnRecord>,
}

/// How the earliest builds kept the snapshot: meta and data in one JSON
/// value under `snapshot`, the data an array of numbers.
#[derive(Deserialize)]
struct LegacySnapshot {
    meta: SnapshotMetaOf<TypeConfig>,
    data: Vec<u8>,
}

/// A snapshot kept in `sm_meta` by an earlier build, if any.
fn read_legacy(db: &DB) -> io::Result<Option<(SnapshotMetaOf<TypeConfig>, Vec<u8>)>> {
    let cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
    if let (Some(meta), Some(data)) = (
        db.get_cf(&cf, KEY_SNAPSHOT_META).map_err(io::Error::other)?,
        db.get_cf(&cf, KEY_SNAPSHOT_DATA).map_err(io::Error::other)?,
    ) {
        return Ok(Some((decode(&meta)?, data)));
    }
    match db.get_cf(&cf, KEY_SNAPSHOT_LEGACY).map_err(io::Error::other)? {
        Some(b) => {
            let legacy: LegacySnapshot = decode(&b)?;
            Ok(Some((legacy.meta, legacy.data)))
        }
        None => Ok(None),
    }
}

/// The current snapshot's meta and file name, read at one point in time.
fn read_current(db: &DB) -> io::Result<Option<(SnapshotMetaOf<TypeConfig>, String)>> {
    let cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
    let at = db.snapshot();
    let Some(name) = at.get_cf(&cf, KEY_SNAPSHOT_FILE).map_err(io::Error::other)? else { return Ok(None) };
    let meta = at
        .get_cf(&cf, KEY_SNAPSHOT_META)
        .map_err(io::Error::other)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "snapshot file named without its meta"))?;
    let name = String::from_utf8(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((decode(&meta)?, name)))
}

/// Names `name` the current snapshot, with `batch`'s writes, durably; then
/// removes the snapshots it replaces.
fn make_current(
    db: &DB,
    dir: &Path,
    meta: &SnapshotMetaOf<TypeConfig>,
    name: &str,
    mut batch: WriteBatch,
) -> io::Result<()> {
    let cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
    batch.put_cf(&cf, KEY_SNAPSHOT_META, encode(meta)?);
    batch.put_cf(&cf, KEY_SNAPSHOT_FILE, name.as_bytes());
    for old in [KEY_SNAPSHOT_DATA, KEY_SNAPSHOT_LEGACY, KEY_SNAPSHOT_INSTALLING] {
        batch.delete_cf(&cf, old);
    }
    write_synced(db, batch)?;
    snapshot::remove_others(dir, Some(name), false)
}

fn write_synced(db: &DB, batch: WriteBatch) -> io::Result<()> {
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(batch, &opts).map_err(io::Error::other)
}

/// Replaces the state machine with the snapshot in file `name`: the records
/// a write at a time, then the applied position, durably; then a checkpoint
/// of the result becomes the current snapshot. Run again after a stop part
/// way (see [`StateMachine::open`]), it finishes the job: the file stays
/// until the checkpoint is named current. Returns the number of records.
fn load(db: &DB, dir: &Path, meta: &SnapshotMetaOf<TypeConfig>, name: &str) -> io::Result<u64> {
    // The indexes first: meanwhile a local read may miss a record, but
    // finds no index entry without its record.
    clear(db, &[cf::SM_OPEN, cf::SM_COMPLETED, cf::SM_KEYS, cf::SM_RECORDS])?;
    let records_cf = db.cf_handle(cf::SM_RECORDS).expect("sm_records column family");
    let keys_cf = db.cf_handle(cf::SM_KEYS).expect("sm_keys column family");
    let completed_cf = db.cf_handle(cf::SM_COMPLETED).expect("sm_completed column family");
    let open_cf = db.cf_handle(cf::SM_OPEN).expect("sm_open column family");
    let mut batch = WriteBatch::default();
    let mut count = 0;
    for line in SnapshotFile::open(&dir.join(name))?.records()? {
        let line = line?;
        let record: TxnRecord = decode(&line)?;
        batch.put_cf(&records_cf, record.txid.as_str(), &line);
        if let Decision::Commit { idempotency_key: Some(k), .. } = &record.decision {
            batch.put_cf(&keys_cf, k.as_bytes(), record.txid.as_str().as_bytes());
        }
        match record.completed_unix_ms {
            Some(at) => batch.put_cf(&completed_cf, completed_key(at, &record.txid), completed_value(&record.decision)),
            None => batch.put_cf(&open_cf, record.txid.as_str(), open_value(&record.decision)),
        }
        count += 1;
        if batch.len() >= INSTALL_BATCH_WRITES {
            db.write(std::mem::take(&mut batch)).map_err(io::Error::other)?;
        }
    }
    let meta_cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
    batch.put_cf(&meta_cf, KEY_LAST_APPLIED, encode(&meta.last_log_id)?);
    batch.put_cf(&meta_cf, KEY_MEMBERSHIP, encode(&meta.last_membership)?);
    batch.put_cf(&open_cf, OPEN_INDEXED, []);
    write_synced(db, batch)?;
    // The installed state is the new current snapshot; the file goes.
    let checkpoint = snapshot::create_checkpoint(db, dir)?;
    make_current(db, dir, meta, &checkpoint, WriteBatch::default())?;
    Ok(count)
}

/// Empties column families `names`, a write batch at a time.
fn clear(db: &DB, names: &[&str]) -> io::Result<()> {
    for name in names {
        let cf = db.cf_handle(name).expect("state machine column family");
        let mut batch = WriteBatch::default();
        for item in db.iterator_cf(&cf, IteratorMode::Start) {
            let (key, _) = item.map_err(io::Error::other)?;
            batch.delete_cf(&cf, key);
            if batch.len() >= INSTALL_BATCH_WRITES {
                db.write(std::mem::take(&mut batch)).map_err(io::Error::other)?;
            }
        }
        db.write(batch).map_err(io::Error::other)?;
    }
    Ok(())
}

/// Fills `sm_open` from the records, for a store an earlier build wrote
/// (nothing is applied meanwhile: the node is opening). Run again after a
/// stop part way, it starts over. Returns the number of incomplete records.
fn index_open(db: &DB) -> io::Result<u64> {
    clear(db, &[cf::SM_OPEN])?;
    let records_cf = db.cf_handle(cf::SM_RECORDS).expect("sm_records column family");
    let open_cf = db.cf_handle(cf::SM_OPEN).expect("sm_open column family");
    let mut batch = WriteBatch::default();
    let mut count = 0;
    for item in db.iterator_cf(&records_cf, IteratorMode::Start) {
        let (key, value) = item.map_err(io::Error::other)?;
        let record: TxnRecord = decode(&value)?;
        if record.completed_unix_ms.is_none() {
            batch.put_cf(&open_cf, key, open_value(&record.decision));
            count += 1;
            if batch.len() >= INSTALL_BATCH_WRITES {
                db.write(std::mem::take(&mut batch)).map_err(io::Error::other)?;
            }
        }
    }
    batch.put_cf(&open_cf, OPEN_INDEXED, []);
    write_synced(db, batch)?;
    Ok(count)
}

/// The applied position and membership a checkpoint holds: its snapshot's
/// meta.
fn checkpoint_meta(path: &Path) -> io::Result<SnapshotMetaOf<TypeConfig>> {
    let (last_log_id, last_membership) = StateMachine::applied_state_blocking(&snapshot::open_checkpoint(path)?)?;
    Ok(SnapshotMetaOf::<TypeConfig> { last_log_id, last_membership })
}

/// Makes a checkpoint of the state as it is the current snapshot.
fn checkpoint_now(db: &DB, dir: &Path) -> io::Result<SnapshotMetaOf<TypeConfig>> {
    let name = snapshot::create_checkpoint(db, dir)?;
    let meta = checkpoint_meta(&dir.join(&name))?;
    make_current(db, dir, &meta, &name, WriteBatch::default())?;
    Ok(meta)
}

/// The records' JSON of a snapshot's data: a snapshot file, or the data of
/// an earlier build (from a leader not yet upgraded), read whole.
fn received_records(snapshot: SnapshotFile) -> io::Result<Box<dyn Iterator<Item = io::Result<Vec<u8>>>>> {
    let mut file = snapshot.into_file()?;
    let mut first = [0u8; 1];
    let n = file.read(&mut first)?;
    file.seek(SeekFrom::Start(0))?;
    if n == 1 && first[0] == b'{' {
        let legacy: LegacyData = serde_json::from_reader(io::BufReader::new(file))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        return Ok(Box::new(legacy.records.into_iter().map(|r| encode(&r))));
    }
    Ok(Box::new(snapshot::Records::new(file)?))
}

/// Checks a received snapshot file whole (header, trailer, every record)
/// before it is handed to Raft: installing a damaged one would fail part
/// way, which stops the node. Returns the number of records.
pub fn check_received(path: &Path) -> io::Result<u64> {
    let mut count = 0;
    for line in received_records(SnapshotFile::open(path)?)? {
        let _: TxnRecord = decode(&line?)?;
        count += 1;
    }
    Ok(count)
}

impl StateMachine {
    /// The state machine in `db`, its snapshots in `data_dir`. Finishes a
    /// snapshot install a stop interrupted, replaces a snapshot an earlier
    /// build kept in RocksDB (or as a file) with a checkpoint, indexes the
    /// incomplete records of a store an earlier build wrote, and removes
    /// leftovers.
    pub(crate) fn open(db: Arc<DB>, data_dir: &Path) -> Result<Self> {
        let dir = snapshot::dir(data_dir)?;
        let cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
        if let Some(bytes) = db.get_cf(&cf, KEY_SNAPSHOT_INSTALLING)? {
            let (meta, name): (SnapshotMetaOf<TypeConfig>, String) = decode(&bytes)?;
            tracing::warn!(last_log_id = ?meta.last_log_id, "finishing a snapshot install that a stop interrupted");
            load(&db, &dir, &meta, &name)?;
        } else {
            // A snapshot kept in RocksDB, or as a file, by an earlier build:
            // the state holds all it held, and a checkpoint of the state
            // replaces it.
            let current = read_current(&db)?;
            let earlier = match &current {
                Some((_, name)) => !snapshot::is_checkpoint(name),
                None => read_legacy(&db)?.is_some(),
            };
            if earlier {
                let meta = checkpoint_now(&db, &dir)?;
                tracing::info!(last_log_id = ?meta.last_log_id, "replaced an earlier build's snapshot with a checkpoint");
            }
        }
        let open_cf = db.cf_handle(cf::SM_OPEN).expect("sm_open column family");
        if db.get_cf(&open_cf, OPEN_INDEXED)?.is_none() {
            let records_cf = db.cf_handle(cf::SM_RECORDS).expect("sm_records column family");
            let any = db.iterator_cf(&records_cf, IteratorMode::Start).next().is_some();
            if any {
                tracing::info!("indexing the incomplete records of a store an earlier build wrote");
            }
            let count = index_open(&db)?;
            if any {
                tracing::info!(count, "indexed the incomplete records");
            }
        }
        let current = read_current(&db)?.map(|(_, name)| name);
        snapshot::remove_others(&dir, current.as_deref(), true)?;
        Ok(Self { db, snapshot_lock: Arc::default(), snapshot_dir: Arc::new(dir) })
    }

    /// RocksDB's memory, in bytes, as `tandem cluster status` shows it:
    /// memtables, the block cache (index and filter blocks included), and
    /// table readers outside it.
    pub fn memory(&self) -> Vec<(&'static str, u64)> {
        let sum = |property: &str| -> u64 {
            cf::ALL
                .iter()
                .filter_map(|name| self.db.cf_handle(name))
                .filter_map(|cf| self.db.property_int_value_cf(&cf, property).ok().flatten())
                .sum()
        };
        let cache = self
            .db
            .cf_handle(cf::SM_RECORDS)
            .and_then(|cf| self.db.property_int_value_cf(&cf, "rocksdb.block-cache-usage").ok().flatten())
            .unwrap_or(0);
        vec![
            ("rocksdb_memtable_bytes", sum("rocksdb.cur-size-all-mem-tables")),
            ("rocksdb_block_cache_bytes", cache),
            ("rocksdb_table_readers_bytes", sum("rocksdb.estimate-table-readers-mem")),
        ]
    }

    /// Where received snapshots are written before they are installed.
    pub fn snapshot_dir(&self) -> &Path {
        &self.snapshot_dir
    }

    /// Reads one record from this node's state machine (no Raft round-trip).
    pub async fn get(&self, txid: TxId) -> Result<Option<TxnRecord>> {
        let db = self.db.clone();
        blocking(move || read_record(&db, &txid)).await
    }

    /// The txid whose COMMIT holds idempotency key `key`, if any.
    pub async fn key_owner(&self, key: String) -> Result<Option<TxId>> {
        let db = self.db.clone();
        blocking(move || {
            let cf = db.cf_handle(cf::SM_KEYS).expect("sm_keys column family");
            match db.get_cf(&cf, key.as_bytes())? {
                Some(bytes) => Ok(Some(TxId::parse(std::str::from_utf8(&bytes).map_err(Error::storage)?)?)),
                None => Ok(None),
            }
        })
        .await
    }

    /// Lists records ordered by txid, after `after`, at most `limit`, those in
    /// `state` if given. Incomplete records (committed or aborted) are found
    /// through the `sm_open` index, reading only those; the rest by a scan
    /// of every record in key order, which reads the records it skips.
    pub async fn list(&self, state: Option<RecordState>, after: Option<TxId>, limit: usize) -> Result<Vec<TxnRecord>> {
        let db = self.db.clone();
        blocking(move || {
            let mode = match &after {
                Some(a) => IteratorMode::From(a.as_str().as_bytes(), rocksdb::Direction::Forward),
                None => IteratorMode::Start,
            };
            let is_after = |key: &[u8]| after.as_ref().is_some_and(|a| a.as_str().as_bytes() == key);
            let mut out = Vec::new();
            if let Some((state, wanted)) = state.and_then(|s| Some((s, open_state_value(s)?))) {
                // The index and the records read at one point in time.
                let at = db.snapshot();
                let open_cf = db.cf_handle(cf::SM_OPEN).expect("sm_open column family");
                let records_cf = db.cf_handle(cf::SM_RECORDS).expect("sm_records column family");
                for item in at.iterator_cf(&open_cf, mode) {
                    let (key, value) = item?;
                    // (The marker's empty value matches no state.)
                    if is_after(&key) || &*value != wanted {
                        continue;
                    }
                    // Written and removed with its record, so this holds;
                    // should it not, one stray entry must not stop
                    // recovery.
                    let Some(bytes) = at.get_cf(&records_cf, &key)? else {
                        tracing::warn!(txid = %String::from_utf8_lossy(&key), "sm_open names a txid with no record");
                        continue;
                    };
                    let record: TxnRecord = decode(&bytes)?;
                    if record.state() != state {
                        tracing::warn!(txid = %record.txid, "sm_open disagrees with the record");
                        continue;
                    }
                    out.push(record);
                    if out.len() >= limit {
                        break;
                    }
                }
                return Ok(out);
            }
            let cf = db.cf_handle(cf::SM_RECORDS).expect("sm_records column family");
            for item in db.iterator_cf(&cf, mode) {
                let (key, value) = item?;
                if is_after(&key) {
                    continue;
                }
                let record: TxnRecord = decode(&value)?;
                if state.is_none_or(|s| record.state() == s) {
                    out.push(record);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// A `Forget` time, at most `before`, that drops about `limit` records:
    /// `before` itself if that drops no more than `limit`; otherwise the
    /// completion time of the record after the first `limit` in completion
    /// order, but past the first record's, so that it drops at least one.
    /// (Records completed in the same millisecond go together, so one round
    /// may drop a completion entry's worth more than `limit`.) Read from
    /// this node's state, which the leader's `Forget` rounds consult: each
    /// round's `Forget` still drops, on every node, exactly what its own
    /// time selects.
    pub async fn forget_cutoff(&self, before: u64, limit: usize) -> Result<u64> {
        let db = self.db.clone();
        blocking(move || {
            let cf = db.cf_handle(cf::SM_COMPLETED).expect("sm_completed column family");
            let mut read = rocksdb::ReadOptions::default();
            read.set_iterate_upper_bound(before.to_be_bytes());
            let mut first = None;
            for (n, item) in db.iterator_cf_opt(&cf, read, IteratorMode::Start).enumerate() {
                let (key, _) = item?;
                let (at, _) = parse_completed_key(&key)?;
                let first = *first.get_or_insert(at);
                if n == limit {
                    return Ok(at.max(first.saturating_add(1)).min(before));
                }
            }
            Ok(before)
        })
        .await
    }

    /// How many records this node holds (RocksDB's estimate).
    pub async fn record_count_estimate(&self) -> Result<u64> {
        let db = self.db.clone();
        blocking(move || {
            let cf = db.cf_handle(cf::SM_RECORDS).expect("sm_records column family");
            Ok(db.property_int_value_cf(&cf, "rocksdb.estimate-num-keys")?.unwrap_or(0))
        })
        .await
    }

    fn applied_state_blocking(db: &DB) -> io::Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>)> {
        let cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
        let last_applied = match db.get_cf(&cf, KEY_LAST_APPLIED).map_err(io::Error::other)? {
            Some(b) => decode(&b)?,
            None => None,
        };
        let membership = match db.get_cf(&cf, KEY_MEMBERSHIP).map_err(io::Error::other)? {
            Some(b) => decode(&b)?,
            None => StoredMembershipOf::<TypeConfig>::default(),
        };
        Ok((last_applied, membership))
    }
}

async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(Error::internal)?
}

fn read_record(db: &DB, txid: &TxId) -> Result<Option<TxnRecord>> {
    let cf = db.cf_handle(cf::SM_RECORDS).expect("sm_records column family");
    match db.get_cf(&cf, txid.as_str())? {
        Some(bytes) => Ok(Some(decode(&bytes)?)),
        None => Ok(None),
    }
}

/// One batch of applies: reads see the batch's own earlier writes.
struct Applier<'a> {
    db: &'a DB,
    batch: WriteBatch,
    records: HashMap<TxId, Option<TxnRecord>>,
    keys: HashMap<String, Option<TxId>>,
}

impl<'a> Applier<'a> {
    fn new(db: &'a DB) -> Self {
        Self { db, batch: WriteBatch::default(), records: HashMap::new(), keys: HashMap::new() }
    }

    fn record(&mut self, txid: &TxId) -> Result<Option<TxnRecord>> {
        if let Some(r) = self.records.get(txid) {
            return Ok(r.clone());
        }
        let r = read_record(self.db, txid)?;
        self.records.insert(txid.clone(), r.clone());
        Ok(r)
    }

    fn key_owner(&mut self, key: &str) -> Result<Option<TxId>> {
        if let Some(owner) = self.keys.get(key) {
            return Ok(owner.clone());
        }
        let cf = self.db.cf_handle(cf::SM_KEYS).expect("sm_keys column family");
        let owner = match self.db.get_cf(&cf, key)? {
            Some(bytes) => Some(TxId::parse(std::str::from_utf8(&bytes).map_err(Error::storage)?)?),
            None => None,
        };
        self.keys.insert(key.to_string(), owner.clone());
        Ok(owner)
    }

    fn put_record(&mut self, record: &TxnRecord) -> Result<()> {
        let cf = self.db.cf_handle(cf::SM_RECORDS).expect("sm_records column family");
        self.batch.put_cf(&cf, record.txid.as_str(), encode(record)?);
        self.records.insert(record.txid.clone(), Some(record.clone()));
        Ok(())
    }

    fn apply(&mut self, log_index: u64, cmd: &Command) -> Result<CommandResponse> {
        if !(COMMAND_VERSION_MIN..=COMMAND_VERSION).contains(&cmd.version) {
            // Skipping an entry this node cannot read would make it diverge
            // from nodes that can: stop instead.
            return Err(Error::Storage(format!(
                "log entry {log_index} has command version {}, this node understands {COMMAND_VERSION}; upgrade it",
                cmd.version
            )));
        }
        match &cmd.op {
            Op::Decide { txid, decision, info } => self.decide(log_index, cmd.at_unix_ms, txid, decision, info),
            Op::DecideBatch { items } => {
                if items.len() > DECIDE_BATCH_MAX {
                    return Ok(CommandResponse::Invalid {
                        reason: format!("{} decisions in one entry, over {DECIDE_BATCH_MAX}", items.len()),
                    });
                }
                let mut responses = Vec::with_capacity(items.len());
                for item in items {
                    responses.push(self.decide(log_index, cmd.at_unix_ms, &item.txid, &item.decision, &item.info)?);
                }
                Ok(CommandResponse::DecidedBatch { responses })
            }
            Op::Complete { txid } => self.complete(cmd.at_unix_ms, txid, &[]),
            Op::CompleteBatch { items } => {
                if items.len() > COMPLETE_BATCH_MAX {
                    return Ok(CommandResponse::Invalid {
                        reason: format!("{} completions in one entry, over {COMPLETE_BATCH_MAX}", items.len()),
                    });
                }
                let mut responses = Vec::with_capacity(items.len());
                for item in items {
                    responses.push(self.complete(cmd.at_unix_ms, &item.txid, &item.heuristic)?);
                }
                Ok(CommandResponse::CompletedBatch { responses })
            }
            // Nothing completes after the command's own time.
            Op::Forget { before_unix_ms } => self.forget((*before_unix_ms).min(cmd.at_unix_ms)),
        }
    }

    fn decide(
        &mut self,
        log_index: u64,
        at: u64,
        txid: &TxId,
        decision: &Decision,
        info: &TxnInfo,
    ) -> Result<CommandResponse> {
        if let Some(existing) = self.record(txid)? {
            // Every ABORT means the same outcome, whatever its reason; a
            // COMMIT wins only with the recorded branch list and key.
            let won = existing.decision.same_as(decision);
            return Ok(CommandResponse::Decided { won, record: existing });
        }
        if let Err(e) = decision.validate().and_then(|()| info.validate()) {
            return Ok(CommandResponse::Invalid { reason: e.to_string() });
        }
        if let Decision::Commit { idempotency_key: Some(key), .. } = decision {
            if let Some(owner) = self.key_owner(key)?
                && &owner != txid
            {
                return Ok(CommandResponse::IdempotencyConflict { key: key.clone(), txid: owner });
            }
            let cf = self.db.cf_handle(cf::SM_KEYS).expect("sm_keys column family");
            self.batch.put_cf(&cf, key.as_bytes(), txid.as_str().as_bytes());
            self.keys.insert(key.clone(), Some(txid.clone()));
        }
        let record = TxnRecord {
            txid: txid.clone(),
            decision: decision.clone(),
            decided_unix_ms: at,
            completed_unix_ms: None,
            decided_log_index: log_index,
            info: info.clone(),
            heuristic: Vec::new(),
        };
        self.put_record(&record)?;
        let cf = self.db.cf_handle(cf::SM_OPEN).expect("sm_open column family");
        self.batch.put_cf(&cf, txid.as_str(), open_value(decision));
        Ok(CommandResponse::Decided { won: true, record })
    }

    fn complete(&mut self, at: u64, txid: &TxId, heuristic: &[HeuristicBranch]) -> Result<CommandResponse> {
        let Some(mut record) = self.record(txid)? else {
            return Ok(CommandResponse::NotFound { txid: txid.clone() });
        };
        if record.completed_unix_ms.is_none() {
            record.completed_unix_ms = Some(at);
            record.heuristic = heuristic.to_vec();
            self.put_record(&record)?;
            let cf = self.db.cf_handle(cf::SM_COMPLETED).expect("sm_completed column family");
            self.batch.put_cf(&cf, completed_key(at, txid), completed_value(&record.decision));
            let cf = self.db.cf_handle(cf::SM_OPEN).expect("sm_open column family");
            self.batch.delete_cf(&cf, txid.as_str());
        }
        Ok(CommandResponse::Completed { record })
    }

    /// Drops records completed before `before`. Reads the completion index
    /// from RocksDB, so the caller writes out the batch so far first (see
    /// [`apply_entries`]).
    fn forget(&mut self, before: u64) -> Result<CommandResponse> {
        let cf_completed = self.db.cf_handle(cf::SM_COMPLETED).expect("sm_completed column family");
        let mut doomed = Vec::new();
        let mut read = rocksdb::ReadOptions::default();
        read.set_iterate_upper_bound(before.to_be_bytes());
        for item in self.db.iterator_cf_opt(&cf_completed, read, IteratorMode::Start) {
            let (key, value) = item?;
            let (at, txid) = parse_completed_key(&key)?;
            if at >= before {
                break;
            }
            doomed.push((at, txid, parse_completed_value(&value)?));
        }
        if !doomed.is_empty() {
            // The index entries before `before`, as one range deletion: the
            // next scan skips it at once, where point deletions would each
            // be stepped over until compaction drops them.
            self.batch.delete_range_cf(&cf_completed, &[][..], &before.to_be_bytes()[..]);
        }
        let mut count = 0;
        for (at, txid, indexed) in doomed {
            let key = match indexed {
                // The entry names the record's key: the record need not be
                // read (an entry describes its record while both exist:
                // they are written, installed and forgotten together).
                Some(key) if self.records.get(&txid).is_none_or(Option::is_some) => key,
                // An entry of an earlier build, or a record this batch
                // already dropped: the record decides.
                _ => {
                    let Some(record) = self.record(&txid)? else { continue };
                    if record.completed_unix_ms != Some(at) {
                        continue;
                    }
                    match &record.decision {
                        Decision::Commit { idempotency_key: Some(k), .. } => Some(k.clone()),
                        _ => None,
                    }
                }
            };
            if let Some(k) = key {
                let cf_keys = self.db.cf_handle(cf::SM_KEYS).expect("sm_keys column family");
                self.batch.delete_cf(&cf_keys, k.as_bytes());
                self.keys.insert(k, None);
            }
            let cf_records = self.db.cf_handle(cf::SM_RECORDS).expect("sm_records column family");
            self.batch.delete_cf(&cf_records, txid.as_str());
            self.records.insert(txid, None);
            count += 1;
        }
        Ok(CommandResponse::Forgotten { count })
    }

    /// Writes the batch so far, with the applied position and membership, in
    /// one atomic RocksDB write. The read caches stay valid: they hold what
    /// was just written.
    fn write(
        &mut self,
        last_applied: Option<LogIdOf<TypeConfig>>,
        membership: Option<&StoredMembershipOf<TypeConfig>>,
    ) -> Result<()> {
        let meta_cf = self.db.cf_handle(cf::SM_META).expect("sm_meta column family");
        if let Some(applied) = last_applied {
            self.batch.put_cf(&meta_cf, KEY_LAST_APPLIED, encode(&Some(applied))?);
        }
        if let Some(m) = membership {
            self.batch.put_cf(&meta_cf, KEY_MEMBERSHIP, encode(m)?);
        }
        self.db.write(std::mem::take(&mut self.batch))?;
        Ok(())
    }
}

fn completed_key(at: u64, txid: &TxId) -> Vec<u8> {
    let mut key = at.to_be_bytes().to_vec();
    key.extend_from_slice(txid.as_str().as_bytes());
    key
}

/// A completion index entry's value: the record's idempotency key, so that
/// Forget need not read the record (`k` and the key, or `-` for none).
fn completed_value(decision: &Decision) -> Vec<u8> {
    match decision {
        Decision::Commit { idempotency_key: Some(k), .. } => [b"k".as_slice(), k.as_bytes()].concat(),
        _ => b"-".to_vec(),
    }
}

/// An `sm_open` value: the incomplete record's decision.
fn open_value(decision: &Decision) -> &'static [u8] {
    match decision {
        Decision::Commit { .. } => OPEN_COMMIT,
        Decision::Abort { .. } => OPEN_ABORT,
    }
}

/// The `sm_open` value of records in `state`; `None` for completed ones,
/// which are not in the index.
fn open_state_value(state: RecordState) -> Option<&'static [u8]> {
    match state {
        RecordState::Committed => Some(OPEN_COMMIT),
        RecordState::Aborted => Some(OPEN_ABORT),
        RecordState::Completed => None,
    }
}

/// `Some(key)` from a value of [`completed_value`]; `None` for the empty
/// value of earlier builds.
fn parse_completed_value(value: &[u8]) -> Result<Option<Option<String>>> {
    match value.split_first() {
        None => Ok(None),
        Some((b'-', [])) => Ok(Some(None)),
        Some((b'k', key)) => {
            Ok(Some(Some(String::from_utf8(key.to_vec()).map_err(|e| Error::Storage(e.to_string()))?)))
        }
        Some(_) => Err(Error::Storage("unreadable sm_completed value".into())),
    }
}

fn parse_completed_key(key: &[u8]) -> Result<(u64, TxId)> {
    if key.len() <= 8 {
        return Err(Error::Storage("sm_completed key too short".into()));
    }
    let at = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
    let txid = TxId::parse(std::str::from_utf8(&key[8..]).map_err(Error::storage)?)?;
    Ok((at, txid))
}

/// Applies entries in order and returns one response per entry. Their
/// writes go to RocksDB atomically with the new applied position: in one
/// write, or, where a `Forget` must scan what came before it, in one write up
/// to the entry before the `Forget` and one after. Either way the result is
/// the same whatever batches a node's entries arrive in.
fn apply_entries<'e>(
    db: &DB,
    entries: impl Iterator<Item = &'e EntryOf<TypeConfig>>,
) -> io::Result<Vec<CommandResponse>> {
    let mut applier = Applier::new(db);
    let mut responses = Vec::new();
    let mut last_applied = None;
    let mut membership = None;
    for entry in entries {
        let log_id = entry.log_id();
        let response = match &entry.payload {
            EntryPayload::Blank => CommandResponse::Empty,
            EntryPayload::Normal(cmd) => {
                if matches!(cmd.op, Op::Forget { .. }) {
                    applier.write(last_applied.take(), membership.take().as_ref()).map_err(to_io)?;
                }
                applier.apply(log_id.index(), cmd).map_err(to_io)?
            }
            EntryPayload::Membership(m) => {
                membership = Some(StoredMembershipOf::<TypeConfig>::new(Some(log_id), m.clone()));
                CommandResponse::Empty
            }
        };
        last_applied = Some(log_id);
        responses.push(response);
    }
    applier.write(last_applied, membership.as_ref()).map_err(to_io)?;
    Ok(responses)
}

fn to_io(e: Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<TypeConfig, SnapshotFile>> {
        let db = self.db.clone();
        let dir = self.snapshot_dir.clone();
        let lock = self.snapshot_lock.clone();
        let (meta, path, built) = tokio::task::spawn_blocking(move || -> io::Result<_> {
            // Under the lock: an install replaces the checkpoints, and its
            // half-loaded state must never become a snapshot.
            let _guard = lock.lock().map_err(|_| io::Error::other("snapshot lock poisoned"))?;
            let cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
            if db.get_cf(&cf, KEY_SNAPSHOT_INSTALLING).map_err(io::Error::other)?.is_some() {
                return Err(io::Error::other("a snapshot install has not finished; no snapshot is built meanwhile"));
            }
            // A checkpoint is consistent: its records and applied position
            // are of one point in time.
            let name = snapshot::create_checkpoint(&db, &dir)?;
            let path = dir.join(&name);
            let meta = checkpoint_meta(&path)?;
            match read_current(&db)? {
                // One as new was installed or built meanwhile: it stays.
                Some((current, current_name)) if current.last_log_id >= meta.last_log_id => {
                    std::fs::remove_dir_all(&path).ok();
                    Ok((current, dir.join(current_name), false))
                }
                _ => {
                    make_current(&db, &dir, &meta, &name, WriteBatch::default())?;
                    Ok((meta, path, true))
                }
            }
        })
        .await
        .map_err(io::Error::other)??;
        tracing::info!(last_log_id = ?meta.last_log_id, built, "built snapshot");
        Ok(SnapshotOf::<TypeConfig, _> { meta, snapshot: SnapshotFile::checkpoint(path) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> io::Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>)> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || Self::applied_state_blocking(&db)).await.map_err(io::Error::other)?
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let mut batch = Vec::new();
        while let Some(item) = entries.try_next().await? {
            batch.push(item);
        }
        if batch.is_empty() {
            return Ok(());
        }
        // A few entries without a Forget (the commit path of a decision)
        // are applied in place: point reads and one unsynced write, which
        // cost less than a hand-off to the blocking pool and back. A Forget
        // scans and deletes many records: it, and long batches (a follower
        // catching up), go to the blocking pool.
        let in_place = batch.len() <= APPLY_IN_PLACE_MAX
            && batch
                .iter()
                .all(|(e, _)| !matches!(&e.payload, EntryPayload::Normal(c) if matches!(c.op, Op::Forget { .. })));
        let (batch, responses) = if in_place {
            let responses = apply_entries(&self.db, batch.iter().map(|(entry, _)| entry))?;
            (batch, responses)
        } else {
            let db = self.db.clone();
            tokio::task::spawn_blocking(move || -> io::Result<_> {
                let responses = apply_entries(&db, batch.iter().map(|(entry, _)| entry))?;
                Ok((batch, responses))
            })
            .await
            .map_err(io::Error::other)??
        };
        for ((_, responder), response) in batch.into_iter().zip(responses) {
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMetaOf<TypeConfig>, snapshot: SnapshotFile) -> io::Result<()> {
        let db = self.db.clone();
        let dir = self.snapshot_dir.clone();
        let lock = self.snapshot_lock.clone();
        let meta = meta.clone();
        let (meta, count) = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let _guard = lock.lock().map_err(|_| io::Error::other("snapshot lock poisoned"))?;
            // A durable copy of this node's own, every record checked before
            // anything of the state machine changes.
            let mut writer = snapshot::Writer::create(&dir)?;
            for line in received_records(snapshot)? {
                let line = line?;
                let _: TxnRecord = decode(&line)?;
                writer.record(&line)?;
            }
            let (name, _) = writer.finish()?;
            // From here on the install is finished even if the node stops
            // part way: opening the store runs `load` again.
            let cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
            let mut batch = WriteBatch::default();
            batch.put_cf(&cf, KEY_SNAPSHOT_INSTALLING, encode(&(&meta, &name))?);
            write_synced(&db, batch)?;
            let count = load(&db, &dir, &meta, &name)?;
            Ok((meta, count))
        })
        .await
        .map_err(io::Error::other)??;
        tracing::info!(last_log_id = ?meta.last_log_id, records = count, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<SnapshotOf<TypeConfig, SnapshotFile>>> {
        let db = self.db.clone();
        let dir = self.snapshot_dir.clone();
        let lock = self.snapshot_lock.clone();
        tokio::task::spawn_blocking(move || -> io::Result<_> {
            // The records are written out only when the snapshot is sent
            // (openraft also asks for the meta alone). Should a newer
            // snapshot replace this one first, that send fails and the
            // next one sends the newer.
            let _guard = lock.lock().map_err(|_| io::Error::other("snapshot lock poisoned"))?;
            let Some((meta, name)) = read_current(&db)? else { return Ok(None) };
            Ok(Some(SnapshotOf::<TypeConfig, _> { meta, snapshot: SnapshotFile::checkpoint(dir.join(name)) }))
        })
        .await
        .map_err(io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use futures::stream;

    use super::*;
    use crate::raft::Completion;
    use crate::raft::DecideItem;
    use crate::txn::Branch;

    fn commit(key: Option<&str>) -> Decision {
        Decision::Commit {
            branches: vec![Branch::new("a"), Branch::new("b")],
            idempotency_key: key.map(str::to_string),
        }
    }

    fn abort() -> Decision {
        Decision::Abort { reason: "test".into() }
    }

    fn txid(s: &str) -> TxId {
        TxId::parse(s).unwrap()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        sm: StateMachine,
        index: u64,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (_, sm) = crate::raft::open_store(dir.path()).unwrap();
            Self { _dir: dir, sm, index: 0 }
        }

        /// Applies commands as one batch and returns their responses.
        async fn apply(&mut self, cmds: Vec<Command>) -> Vec<CommandResponse> {
            let entries: Vec<_> = cmds
                .into_iter()
                .map(|cmd| {
                    self.index += 1;
                    EntryOf::<TypeConfig>::new_normal(openraft::testing::log_id::<TypeConfig>(1, 1, self.index), cmd)
                })
                .collect();
            apply_entries(&self.sm.db, entries.iter()).unwrap()
        }

        /// Closes the store and opens it again.
        fn reopen(self) -> Self {
            let Fixture { _dir, sm, index } = self;
            drop(sm);
            let (_, sm) = crate::raft::open_store(_dir.path()).unwrap();
            Self { _dir, sm, index }
        }

        async fn one(&mut self, at: u64, op: Op) -> CommandResponse {
            self.apply(vec![Command::new(at, op)]).await.pop().unwrap()
        }
    }

    #[tokio::test]
    async fn first_decision_wins() {
        let mut f = Fixture::new();
        let r = f.one(10, Op::Decide { txid: txid("t1"), decision: commit(None), info: TxnInfo::default() }).await;
        assert!(matches!(r, CommandResponse::Decided { won: true, .. }));
        let r = f.one(11, Op::Decide { txid: txid("t1"), decision: abort(), info: TxnInfo::default() }).await;
        let CommandResponse::Decided { won, record } = r else { panic!("{r:?}") };
        assert!(!won);
        assert!(record.decision.is_commit());
        assert_eq!(record.decided_unix_ms, 10);
        assert_eq!(record.decided_log_index, 1);
    }

    #[tokio::test]
    async fn a_decide_batch_answers_each_decision_as_its_own_entry_would() {
        let item = |t: &str, decision: Decision| DecideItem { txid: txid(t), decision, info: TxnInfo::default() };
        let items = vec![
            item("t1", commit(Some("k"))),
            item("t1", abort()),
            item("t2", commit(Some("k"))),
            item("t3", Decision::Commit { branches: Vec::new(), idempotency_key: None }),
            item("t4", abort()),
        ];
        let mut alone = Fixture::new();
        let mut expected = Vec::new();
        for i in &items {
            let op = Op::Decide { txid: i.txid.clone(), decision: i.decision.clone(), info: i.info.clone() };
            expected.push(alone.one(5, op).await);
        }
        let mut batched = Fixture::new();
        let r = batched.one(5, Op::DecideBatch { items: items.clone() }).await;
        let CommandResponse::DecidedBatch { responses } = r else { panic!("{r:?}") };
        assert_eq!(responses.len(), expected.len());
        for (got, want) in responses.iter().zip(&expected) {
            match (got, want) {
                (
                    CommandResponse::Decided { won, record },
                    CommandResponse::Decided { won: want_won, record: want_record },
                ) => {
                    assert_eq!(won, want_won);
                    assert_eq!(record.decision, want_record.decision);
                    // Every decision of the batch has the batch's index.
                    assert_eq!(record.decided_log_index, 1);
                }
                (got, want) => assert_eq!(got, want),
            }
        }
        assert!(matches!(responses[2], CommandResponse::IdempotencyConflict { .. }));
        assert!(matches!(responses[3], CommandResponse::Invalid { .. }));
        // Only a batch needs the newer encoding: a node of the previous
        // build reads the rest.
        assert_eq!(Command::new(1, Op::DecideBatch { items: Vec::new() }).version, COMMAND_VERSION);
        assert_eq!(Command::new(1, Op::Forget { before_unix_ms: 1 }).version, 3);
        let too_many = vec![item("t9", abort()); DECIDE_BATCH_MAX + 1];
        let r = batched.one(6, Op::DecideBatch { items: too_many }).await;
        assert!(matches!(r, CommandResponse::Invalid { .. }));
        assert_eq!(batched.sm.get(txid("t9")).await.unwrap(), None);
    }

    #[tokio::test]
    async fn conflicting_decisions_in_one_batch() {
        let mut f = Fixture::new();
        let rs = f
            .apply(vec![
                Command::new(1, Op::Decide { txid: txid("t1"), decision: abort(), info: TxnInfo::default() }),
                Command::new(1, Op::Decide { txid: txid("t1"), decision: commit(None), info: TxnInfo::default() }),
            ])
            .await;
        assert!(matches!(&rs[0], CommandResponse::Decided { won: true, .. }));
        let CommandResponse::Decided { won: false, record } = &rs[1] else { panic!("{rs:?}") };
        assert!(!record.decision.is_commit());
    }

    #[tokio::test]
    async fn idempotency_key_refuses_second_txid() {
        let mut f = Fixture::new();
        f.one(1, Op::Decide { txid: txid("t1"), decision: commit(Some("k")), info: TxnInfo::default() }).await;
        let r = f.one(2, Op::Decide { txid: txid("t2"), decision: commit(Some("k")), info: TxnInfo::default() }).await;
        assert_eq!(r, CommandResponse::IdempotencyConflict { key: "k".into(), txid: txid("t1") });
        assert_eq!(f.sm.get(txid("t2")).await.unwrap(), None);
        // The same txid retrying with its own key gets its record back.
        let r = f.one(3, Op::Decide { txid: txid("t1"), decision: commit(Some("k")), info: TxnInfo::default() }).await;
        assert!(matches!(r, CommandResponse::Decided { won: true, .. }));
        // An abort does not bind a key.
        f.one(4, Op::Decide { txid: txid("t3"), decision: abort(), info: TxnInfo::default() }).await;
        let r = f.one(5, Op::Decide { txid: txid("t4"), decision: commit(Some("k2")), info: TxnInfo::default() }).await;
        assert!(matches!(r, CommandResponse::Decided { won: true, .. }));
    }

    #[tokio::test]
    async fn complete_and_forget() {
        let mut f = Fixture::new();
        f.one(1, Op::Decide { txid: txid("t1"), decision: commit(Some("k")), info: TxnInfo::default() }).await;
        f.one(1, Op::Decide { txid: txid("t2"), decision: abort(), info: TxnInfo::default() }).await;
        let r = f.one(5, Op::Complete { txid: txid("t1") }).await;
        let CommandResponse::Completed { record } = r else { panic!("{r:?}") };
        assert_eq!(record.completed_unix_ms, Some(5));
        assert_eq!(record.state(), RecordState::Completed);
        // Completing again keeps the first time.
        let r = f.one(9, Op::Complete { txid: txid("t1") }).await;
        let CommandResponse::Completed { record } = r else { panic!("{r:?}") };
        assert_eq!(record.completed_unix_ms, Some(5));
        assert_eq!(
            f.one(9, Op::Complete { txid: txid("nope") }).await,
            CommandResponse::NotFound { txid: txid("nope") }
        );

        // Not yet past retention: nothing goes.
        assert_eq!(f.one(10, Op::Forget { before_unix_ms: 5 }).await, CommandResponse::Forgotten { count: 0 });
        assert_eq!(f.one(10, Op::Forget { before_unix_ms: 6 }).await, CommandResponse::Forgotten { count: 1 });
        assert_eq!(f.sm.get(txid("t1")).await.unwrap(), None);
        // The incomplete abort stays; the key is free again.
        assert!(f.sm.get(txid("t2")).await.unwrap().is_some());
        let r = f.one(11, Op::Decide { txid: txid("t3"), decision: commit(Some("k")), info: TxnInfo::default() }).await;
        assert!(matches!(r, CommandResponse::Decided { won: true, .. }));
    }

    /// Rounds of `Forget` at [`StateMachine::forget_cutoff`]'s times drop
    /// at most the limit each (but for records sharing a millisecond), at
    /// least one, and together exactly what one `Forget` drops.
    #[tokio::test]
    async fn forget_rounds_are_bounded_and_drop_what_one_forget_would() {
        let mut f = Fixture::new();
        assert_eq!(f.sm.forget_cutoff(25, 4).await.unwrap(), 25, "nothing completed");
        // t0..=t8 completed at 10..=18, t9 never, t10..=t12 together at 20,
        // t13 at 30 (after the cut).
        for i in 0..14 {
            let id = txid(&format!("t{i}"));
            f.one(1, Op::Decide { txid: id.clone(), decision: commit(None), info: TxnInfo::default() }).await;
            let at = match i {
                9 => continue,
                10..=12 => 20,
                13 => 30,
                _ => 10 + i,
            };
            f.one(at, Op::Complete { txid: id }).await;
        }
        let before = 25;
        assert_eq!(f.sm.forget_cutoff(before, 100).await.unwrap(), before, "under the limit: all at once");
        // The limit falls inside the three at 20: the round stops short of
        // them (9 records).
        assert_eq!(f.sm.forget_cutoff(before, 10).await.unwrap(), 20);
        let mut rounds = Vec::new();
        loop {
            let cutoff = f.sm.forget_cutoff(before, 4).await.unwrap();
            let CommandResponse::Forgotten { count } = f.one(100, Op::Forget { before_unix_ms: cutoff }).await else {
                panic!()
            };
            rounds.push((cutoff, count));
            if cutoff >= before {
                break;
            }
        }
        assert_eq!(rounds, vec![(14, 4), (18, 4), (25, 4)]);
        for i in 0..14 {
            let kept = f.sm.get(txid(&format!("t{i}"))).await.unwrap().is_some();
            assert_eq!(kept, i == 9 || i == 13, "t{i}");
        }
        // More records in one millisecond than the limit: a round takes
        // them all rather than none.
        f.one(100, Op::Forget { before_unix_ms: 31 }).await;
        for i in 0..6 {
            let id = txid(&format!("u{i}"));
            f.one(40, Op::Decide { txid: id.clone(), decision: commit(None), info: TxnInfo::default() }).await;
            f.one(50, Op::Complete { txid: id }).await;
        }
        assert_eq!(f.sm.forget_cutoff(60, 2).await.unwrap(), 51);
        assert_eq!(f.one(100, Op::Forget { before_unix_ms: 51 }).await, CommandResponse::Forgotten { count: 6 });
    }

    #[tokio::test]
    async fn a_complete_batch_answers_each_completion_as_its_own_entry_would() {
        let items: Vec<Completion> = ["t1", "nope", "t1", "t2"]
            .into_iter()
            .map(|t| Completion { txid: txid(t), heuristic: Vec::new() })
            .collect();
        let decide = |t: &str| Op::Decide { txid: txid(t), decision: commit(None), info: TxnInfo::default() };
        let (mut alone, mut batched) = (Fixture::new(), Fixture::new());
        let mut expected = Vec::new();
        for f in [&mut alone, &mut batched] {
            f.one(1, decide("t1")).await;
            f.one(1, decide("t2")).await;
        }
        for item in &items {
            expected.push(alone.one(5, Op::Complete { txid: item.txid.clone() }).await);
        }
        let r = batched.one(5, Op::CompleteBatch { items }).await;
        assert_eq!(r, CommandResponse::CompletedBatch { responses: expected.clone() });
        assert_eq!(expected[1], CommandResponse::NotFound { txid: txid("nope") });
        let CommandResponse::Completed { record } = &expected[2] else { panic!("{expected:?}") };
        assert_eq!(record.completed_unix_ms, Some(5));
        // Both stores hold the same records afterwards.
        assert_eq!(alone.sm.list(None, None, 10).await.unwrap(), batched.sm.list(None, None, 10).await.unwrap());
    }

    /// Determinism: the same entries give the same state however they are
    /// batched.
    #[tokio::test]
    async fn complete_then_forget_in_one_batch_or_two_agree() {
        let cmds = || {
            vec![
                Command::new(1, Op::Decide { txid: txid("t1"), decision: commit(Some("k")), info: TxnInfo::default() }),
                Command::new(5, Op::Complete { txid: txid("t1") }),
                Command::new(9, Op::Forget { before_unix_ms: 6 }),
                Command::new(9, Op::Decide { txid: txid("t2"), decision: commit(Some("k")), info: TxnInfo::default() }),
            ]
        };
        let mut one = Fixture::new();
        let together = one.apply(cmds()).await;
        let mut two = Fixture::new();
        let mut apart = Vec::new();
        for cmd in cmds() {
            apart.extend(two.apply(vec![cmd]).await);
        }
        assert_eq!(together, apart);
        assert_eq!(together[2], CommandResponse::Forgotten { count: 1 });
        assert!(matches!(together[3], CommandResponse::Decided { won: true, .. }));
        assert_eq!(one.sm.list(None, None, 10).await.unwrap(), two.sm.list(None, None, 10).await.unwrap());
    }

    #[tokio::test]
    async fn forget_reads_records_only_for_index_entries_of_earlier_builds() {
        for earlier in [false, true] {
            let mut f = Fixture::new();
            f.one(1, Op::Decide { txid: txid("t1"), decision: commit(Some("k")), info: TxnInfo::default() }).await;
            f.one(2, Op::Complete { txid: txid("t1") }).await;
            f.one(3, Op::Decide { txid: txid("t2"), decision: abort(), info: TxnInfo::default() }).await;
            f.one(4, Op::Complete { txid: txid("t2") }).await;
            let cf = f.sm.db.cf_handle(cf::SM_COMPLETED).unwrap();
            if earlier {
                // Earlier builds left the value empty.
                f.sm.db.put_cf(&cf, completed_key(2, &txid("t1")), []).unwrap();
                f.sm.db.put_cf(&cf, completed_key(4, &txid("t2")), []).unwrap();
            } else {
                let value = f.sm.db.get_cf(&cf, completed_key(2, &txid("t1"))).unwrap().unwrap();
                assert_eq!(value, b"kk");
            }
            assert_eq!(f.one(5, Op::Forget { before_unix_ms: 5 }).await, CommandResponse::Forgotten { count: 2 });
            assert_eq!(f.sm.get(txid("t1")).await.unwrap(), None);
            assert_eq!(f.sm.get(txid("t2")).await.unwrap(), None);
            // The key is free again.
            let r =
                f.one(6, Op::Decide { txid: txid("t3"), decision: commit(Some("k")), info: TxnInfo::default() }).await;
            assert!(matches!(r, CommandResponse::Decided { won: true, .. }), "{r:?}");
        }
    }

    #[tokio::test]
    async fn forget_never_reaches_past_its_own_time() {
        let mut f = Fixture::new();
        f.one(1, Op::Decide { txid: txid("t1"), decision: abort(), info: TxnInfo::default() }).await;
        f.one(5, Op::Complete { txid: txid("t1") }).await;
        // Stamped at 4: a cut-off in the future is clamped to 4.
        assert_eq!(f.one(4, Op::Forget { before_unix_ms: u64::MAX }).await, CommandResponse::Forgotten { count: 0 });
        assert_eq!(f.one(6, Op::Forget { before_unix_ms: u64::MAX }).await, CommandResponse::Forgotten { count: 1 });
    }

    #[tokio::test]
    async fn a_commit_with_other_branches_does_not_win() {
        let mut f = Fixture::new();
        f.one(1, Op::Decide { txid: txid("t1"), decision: commit(None), info: TxnInfo::default() }).await;
        let other = Decision::Commit { branches: vec![Branch::new("c")], idempotency_key: None };
        let r = f.one(2, Op::Decide { txid: txid("t1"), decision: other, info: TxnInfo::default() }).await;
        assert!(matches!(r, CommandResponse::Decided { won: false, .. }), "{r:?}");
        let r = f.one(3, Op::Decide { txid: txid("t1"), decision: commit(None), info: TxnInfo::default() }).await;
        assert!(matches!(r, CommandResponse::Decided { won: true, .. }), "{r:?}");
        f.one(4, Op::Decide { txid: txid("t2"), decision: abort(), info: TxnInfo::default() }).await;
        let r = f
            .one(
                5,
                Op::Decide {
                    txid: txid("t2"),
                    decision: Decision::Abort { reason: "other".into() },
                    info: TxnInfo::default(),
                },
            )
            .await;
        assert!(matches!(r, CommandResponse::Decided { won: true, .. }), "{r:?}");
    }

    #[tokio::test]
    async fn list_by_state_in_pages() {
        let mut f = Fixture::new();
        for i in 0..10 {
            let d = if i % 2 == 0 { commit(None) } else { abort() };
            f.one(1, Op::Decide { txid: txid(&format!("t{i}")), decision: d, info: TxnInfo::default() }).await;
        }
        f.one(2, Op::Complete { txid: txid("t0") }).await;
        let committed = f.sm.list(Some(RecordState::Committed), None, 100).await.unwrap();
        assert_eq!(committed.iter().map(|r| r.txid.as_str()).collect::<Vec<_>>(), ["t2", "t4", "t6", "t8"]);
        let page1 = f.sm.list(None, None, 4).await.unwrap();
        let page2 = f.sm.list(None, Some(page1[3].txid.clone()), 4).await.unwrap();
        assert_eq!(page1.len(), 4);
        assert_eq!(page2[0].txid.as_str(), "t4");
    }

    /// The `sm_open` index as it stands, txid and value; it must be whole
    /// (hold its marker).
    fn open_index(sm: &StateMachine) -> Vec<(String, Vec<u8>)> {
        let cf = sm.db.cf_handle(cf::SM_OPEN).unwrap();
        assert_eq!(sm.db.get_cf(&cf, OPEN_INDEXED).unwrap(), Some(Vec::new()), "the index is marked whole");
        sm.db
            .iterator_cf(&cf, IteratorMode::Start)
            .map(|item| {
                let (k, v) = item.unwrap();
                (String::from_utf8(k.to_vec()).unwrap(), v.to_vec())
            })
            .filter(|(k, _)| !k.is_empty())
            .collect()
    }

    /// The txids `list` gives for `state`, in pages of two, and the ones a
    /// scan of every record finds in that state: they must agree.
    async fn listed_and_scanned(sm: &StateMachine, state: RecordState) -> (Vec<String>, Vec<String>) {
        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let page = sm.list(Some(state), after.clone(), 2).await.unwrap();
            after = page.last().map(|r| r.txid.clone());
            listed.extend(page.iter().map(|r| r.txid.as_str().to_string()));
            if page.len() < 2 {
                break;
            }
        }
        let scanned = sm.list(None, None, usize::MAX).await.unwrap();
        let scanned = scanned.iter().filter(|r| r.state() == state).map(|r| r.txid.as_str().to_string()).collect();
        (listed, scanned)
    }

    #[tokio::test]
    async fn the_open_index_holds_exactly_the_incomplete_records() {
        let mut f = Fixture::new();
        let item = |t: &str, decision: Decision| DecideItem { txid: txid(t), decision, info: TxnInfo::default() };
        f.one(1, Op::Decide { txid: txid("t1"), decision: commit(Some("k1")), info: TxnInfo::default() }).await;
        f.one(1, Op::Decide { txid: txid("t2"), decision: abort(), info: TxnInfo::default() }).await;
        let batch = vec![item("t3", commit(None)), item("t4", abort()), item("t5", commit(None))];
        f.one(2, Op::DecideBatch { items: batch }).await;
        // Decided and completed in one batch of entries; a repeated
        // decision, a refused one (the key is held) and a completion of an
        // unknown txid change nothing.
        f.apply(vec![
            Command::new(3, Op::Decide { txid: txid("t6"), decision: commit(None), info: TxnInfo::default() }),
            Command::new(3, Op::Complete { txid: txid("t6") }),
            Command::new(3, Op::Decide { txid: txid("t2"), decision: commit(None), info: TxnInfo::default() }),
            Command::new(3, Op::Decide { txid: txid("t7"), decision: commit(Some("k1")), info: TxnInfo::default() }),
            Command::new(3, Op::Complete { txid: txid("t8") }),
        ])
        .await;
        let items = ["t3", "t4"].map(|t| Completion { txid: txid(t), heuristic: Vec::new() }).to_vec();
        f.one(4, Op::CompleteBatch { items }).await;
        f.one(5, Op::Complete { txid: txid("t1") }).await;
        let expected = [("t2", OPEN_ABORT), ("t5", OPEN_COMMIT)].map(|(t, v)| (t.to_string(), v.to_vec()));
        assert_eq!(open_index(&f.sm), expected);
        for state in [RecordState::Committed, RecordState::Aborted] {
            let (listed, scanned) = listed_and_scanned(&f.sm, state).await;
            assert_eq!(listed, scanned, "{state}");
        }
        assert_eq!(listed_and_scanned(&f.sm, RecordState::Committed).await.0, ["t5"]);
        // Forgetting completed records leaves the index alone.
        assert_eq!(f.one(9, Op::Forget { before_unix_ms: 9 }).await, CommandResponse::Forgotten { count: 4 });
        assert_eq!(open_index(&f.sm), expected);

        // `list` by state reads the index, not the records: an incomplete
        // record out of it is not listed; an entry with no record, or one
        // that names the wrong decision, is passed over.
        let cf = f.sm.db.cf_handle(cf::SM_OPEN).unwrap();
        f.sm.db.delete_cf(&cf, "t5").unwrap();
        f.sm.db.put_cf(&cf, "t9", OPEN_COMMIT).unwrap();
        f.sm.db.put_cf(&cf, "t2", OPEN_COMMIT).unwrap();
        assert!(f.sm.list(Some(RecordState::Committed), None, 10).await.unwrap().is_empty());
        assert!(f.sm.list(Some(RecordState::Aborted), None, 10).await.unwrap().is_empty());
        let scanned = f.sm.list(None, None, 10).await.unwrap();
        assert_eq!(scanned.iter().map(|r| r.txid.as_str()).collect::<Vec<_>>(), ["t2", "t5"]);
    }

    #[tokio::test]
    async fn a_store_an_earlier_build_wrote_is_indexed_on_open() {
        let mut f = Fixture::new();
        for i in 0..25 {
            let decision = if i % 3 == 0 { abort() } else { commit(None) };
            f.one(1, Op::Decide { txid: txid(&format!("t{i:02}")), decision, info: TxnInfo::default() }).await;
            if i % 4 == 0 {
                f.one(2, Op::Complete { txid: txid(&format!("t{i:02}")) }).await;
            }
        }
        let expected = open_index(&f.sm);
        assert_eq!(expected.len(), 18);
        // As an earlier build left it: no index, no marker; and an index
        // entry left over from an open cut short.
        let open_cf = f.sm.db.cf_handle(cf::SM_OPEN).unwrap();
        for (k, _) in &expected {
            f.sm.db.delete_cf(&open_cf, k).unwrap();
        }
        f.sm.db.put_cf(&open_cf, "t00", OPEN_ABORT).unwrap();
        f.sm.db.delete_cf(&open_cf, OPEN_INDEXED).unwrap();
        let f = f.reopen();
        // (open_index checks the marker is back.)
        assert_eq!(open_index(&f.sm), expected);
        for state in [RecordState::Committed, RecordState::Aborted] {
            let (listed, scanned) = listed_and_scanned(&f.sm, state).await;
            assert_eq!(listed, scanned, "{state}");
        }
    }

    #[tokio::test]
    async fn unknown_command_version_stops_apply() {
        let mut f = Fixture::new();
        let mut cmd = Command::new(1, Op::Complete { txid: txid("t1") });
        cmd.version = 99;
        let entry = EntryOf::<TypeConfig>::new_normal(openraft::testing::log_id::<TypeConfig>(1, 1, 1), cmd);
        assert!(f.sm.apply(stream::iter(vec![Ok((entry, None))])).await.is_err());
    }

    #[tokio::test]
    async fn snapshot_round_trip_rebuilds_indexes() {
        let mut f = Fixture::new();
        f.one(1, Op::Decide { txid: txid("t1"), decision: commit(Some("k")), info: TxnInfo::default() }).await;
        f.one(2, Op::Complete { txid: txid("t1") }).await;
        f.one(3, Op::Decide { txid: txid("t5"), decision: abort(), info: TxnInfo::default() }).await;
        let snap = f.sm.build_snapshot().await.unwrap();

        let mut g = Fixture::new();
        // Incomplete before the install, and not in the snapshot.
        g.one(1, Op::Decide { txid: txid("t0"), decision: commit(None), info: TxnInfo::default() }).await;
        g.sm.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
        assert_eq!(g.sm.get(txid("t1")).await.unwrap(), f.sm.get(txid("t1")).await.unwrap());
        assert_eq!(open_index(&g.sm), open_index(&f.sm));
        assert_eq!(open_index(&g.sm), [("t5".to_string(), OPEN_ABORT.to_vec())]);
        g.index = 3;
        let r = g.one(3, Op::Decide { txid: txid("t2"), decision: commit(Some("k")), info: TxnInfo::default() }).await;
        assert!(matches!(r, CommandResponse::IdempotencyConflict { .. }));
        assert_eq!(g.one(4, Op::Forget { before_unix_ms: 3 }).await, CommandResponse::Forgotten { count: 1 });
        let current = g.sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snap.meta);
    }

    fn current_path(sm: &StateMachine) -> PathBuf {
        let (_, name) = read_current(&sm.db).unwrap().unwrap();
        sm.snapshot_dir().join(name)
    }

    async fn records_of(snapshot: SnapshotFile) -> Vec<TxnRecord> {
        snapshot.records().unwrap().map(|l| decode(&l.unwrap()).unwrap()).collect()
    }

    #[tokio::test]
    async fn a_snapshot_kept_in_rocksdb_by_an_earlier_build_becomes_a_checkpoint() {
        let mut f = Fixture::new();
        f.one(1, Op::Decide { txid: txid("t1"), decision: abort(), info: TxnInfo::default() }).await;
        let built = f.sm.build_snapshot().await.unwrap();
        let record = f.sm.get(txid("t1")).await.unwrap().unwrap();
        let data = serde_json::to_vec(&serde_json::json!({ "records": [record] })).unwrap();
        // Both earlier layouts: meta and data under two keys, and both in
        // one JSON value with the data as an array of numbers.
        for whole in [false, true] {
            let cf = f.sm.db.cf_handle(cf::SM_META).unwrap();
            f.sm.db.delete_cf(&cf, KEY_SNAPSHOT_FILE).unwrap();
            if whole {
                f.sm.db.delete_cf(&cf, KEY_SNAPSHOT_META).unwrap();
                let legacy = serde_json::json!({ "meta": built.meta, "data": data });
                f.sm.db.put_cf(&cf, KEY_SNAPSHOT_LEGACY, serde_json::to_vec(&legacy).unwrap()).unwrap();
            } else {
                f.sm.db.put_cf(&cf, KEY_SNAPSHOT_DATA, &data).unwrap();
            }
            f = f.reopen();
            let read = f.sm.get_current_snapshot().await.unwrap().unwrap();
            assert_eq!(read.meta, built.meta);
            assert_eq!(records_of(read.snapshot).await, vec![record.clone()]);
            let cf = f.sm.db.cf_handle(cf::SM_META).unwrap();
            assert!(f.sm.db.get_cf(&cf, KEY_SNAPSHOT_DATA).unwrap().is_none());
            assert!(f.sm.db.get_cf(&cf, KEY_SNAPSHOT_LEGACY).unwrap().is_none());
            assert_eq!(std::fs::read_dir(f.sm.snapshot_dir()).unwrap().count(), 1, "old files removed");
        }
    }

    #[tokio::test]
    async fn data_from_a_leader_of_an_earlier_build_installs() {
        let mut f = Fixture::new();
        f.one(1, Op::Decide { txid: txid("t1"), decision: commit(Some("k")), info: TxnInfo::default() }).await;
        let built = f.sm.build_snapshot().await.unwrap();
        let record = f.sm.get(txid("t1")).await.unwrap().unwrap();
        let mut g = Fixture::new();
        let (file, path) = SnapshotFile::create_received(g.sm.snapshot_dir()).unwrap();
        serde_json::to_writer(file, &serde_json::json!({ "records": [record] })).unwrap();
        g.sm.install_snapshot(&built.meta, SnapshotFile::received(path).unwrap()).await.unwrap();
        assert_eq!(g.sm.get(txid("t1")).await.unwrap(), Some(record));
        assert_eq!(std::fs::read_dir(g.sm.snapshot_dir()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn an_install_cut_short_by_a_stop_is_finished_on_open() {
        let mut f = Fixture::new();
        f.one(1, Op::Decide { txid: txid("t1"), decision: commit(Some("k")), info: TxnInfo::default() }).await;
        f.one(2, Op::Complete { txid: txid("t1") }).await;
        let built = f.sm.build_snapshot().await.unwrap();

        let mut g = Fixture::new();
        g.one(1, Op::Decide { txid: txid("t9"), decision: abort(), info: TxnInfo::default() }).await;
        // Stopped right after the install's own copy and its marker were
        // durable, before the state machine changed.
        let mut sent = f.sm.get_current_snapshot().await.unwrap().unwrap().snapshot.into_file().unwrap();
        let mut copy = std::fs::File::create(g.sm.snapshot_dir().join("snapshot-copy")).unwrap();
        std::io::copy(&mut sent, &mut copy).unwrap();
        let cf = g.sm.db.cf_handle(cf::SM_META).unwrap();
        g.sm.db.put_cf(&cf, KEY_SNAPSHOT_INSTALLING, encode(&(&built.meta, "snapshot-copy")).unwrap()).unwrap();
        let mut g = g.reopen();

        assert_eq!(g.sm.get(txid("t1")).await.unwrap(), f.sm.get(txid("t1")).await.unwrap());
        assert_eq!(g.sm.get(txid("t9")).await.unwrap(), None);
        assert_eq!(g.sm.applied_state().await.unwrap().0, built.meta.last_log_id);
        assert_eq!(g.sm.get_current_snapshot().await.unwrap().unwrap().meta, built.meta);
        let cf = g.sm.db.cf_handle(cf::SM_META).unwrap();
        assert!(g.sm.db.get_cf(&cf, KEY_SNAPSHOT_INSTALLING).unwrap().is_none());
        // The indexes came back with the records.
        g.index = 2;
        let r = g.one(3, Op::Decide { txid: txid("t2"), decision: commit(Some("k")), info: TxnInfo::default() }).await;
        assert!(matches!(r, CommandResponse::IdempotencyConflict { .. }));
        assert_eq!(g.one(4, Op::Forget { before_unix_ms: 3 }).await, CommandResponse::Forgotten { count: 1 });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_is_of_one_point_in_time() {
        let mut f = Fixture::new();
        let db = f.sm.db.clone();
        // Each entry writes a record and the applied position in one write;
        // a snapshot taken meanwhile holds as many records as its position.
        const ENTRIES: u64 = 30_000;
        let writer = std::thread::spawn(move || {
            for i in 1..=ENTRIES {
                let op = Op::Decide { txid: txid(&format!("t{i}")), decision: abort(), info: TxnInfo::default() };
                let log_id = openraft::testing::log_id::<TypeConfig>(1, 1, i);
                let entry = EntryOf::<TypeConfig>::new_normal(log_id, Command::new(i, op));
                apply_entries(&db, std::iter::once(&entry)).unwrap();
            }
        });
        let mut mid_way = 0;
        while !writer.is_finished() {
            let built = f.sm.build_snapshot().await.unwrap();
            let at = built.meta.last_log_id.map_or(0, |l| l.index());
            assert_eq!(records_of(built.snapshot).await.len() as u64, at);
            if at > 0 && at < ENTRIES {
                mid_way += 1;
            }
        }
        assert!(mid_way > 0, "no snapshot was taken while entries were applied");
        writer.join().unwrap();
    }

    #[tokio::test]
    async fn a_newer_snapshot_replaces_the_older() {
        let mut f = Fixture::new();
        f.one(1, Op::Decide { txid: txid("t1"), decision: abort(), info: TxnInfo::default() }).await;
        f.sm.build_snapshot().await.unwrap();
        let first_path = current_path(&f.sm);
        // One being sent (written out) and one only asked for.
        let sending = f.sm.get_current_snapshot().await.unwrap().unwrap().snapshot.into_file().unwrap();
        let asked = f.sm.get_current_snapshot().await.unwrap().unwrap();
        f.one(2, Op::Decide { txid: txid("t2"), decision: abort(), info: TxnInfo::default() }).await;
        let newer = f.sm.build_snapshot().await.unwrap();
        assert!(!first_path.exists());
        // The one being sent still reads whole; the other is gone, and its
        // send fails (the next one sends the newer).
        assert_eq!(snapshot::Records::new(sending).unwrap().count(), 1);
        assert!(asked.snapshot.into_file().is_err());
        let read = f.sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(read.meta, newer.meta);
        assert_eq!(records_of(read.snapshot).await.len(), 2);
        // The built one reads the same, and building again with nothing
        // new applied keeps it.
        assert_eq!(records_of(newer.snapshot).await.len(), 2);
        let again = f.sm.build_snapshot().await.unwrap();
        assert_eq!(again.meta, newer.meta);
        assert_eq!(records_of(again.snapshot).await.len(), 2);
        let left: Vec<_> = std::fs::read_dir(f.sm.snapshot_dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1, "only the current one is kept: {left:?}");
    }

    #[tokio::test]
    async fn no_snapshot_is_built_over_an_unfinished_install() {
        let mut f = Fixture::new();
        f.one(1, Op::Decide { txid: txid("t1"), decision: abort(), info: TxnInfo::default() }).await;
        let cf = f.sm.db.cf_handle(cf::SM_META).unwrap();
        f.sm.db.put_cf(&cf, KEY_SNAPSHOT_INSTALLING, b"x").unwrap();
        assert!(f.sm.build_snapshot().await.is_err());
    }
}
