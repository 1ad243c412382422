//! The state machine: the decision log.
//!
//! Applying a [`Command`] changes transaction records, and nothing else:
//!
//! - `Decide` is a compare-and-set. With no record for the txid, it records
//!   the decision (and binds a COMMIT's idempotency key to the txid, unless
//!   another committed txid holds the key: then nothing is recorded). With a
//!   record, nothing changes. Either way the answer carries the record that
//!   holds, so every caller learns the one decision.
//! - `Complete` stamps the completion time once; repeating it changes
//!   nothing.
//! - `Forget` drops completed records completed before a time, with their
//!   idempotency keys, walking the `sm_completed` index in time order.
//!
//! Apply reads and writes only RocksDB and takes its time from the command
//! (see the module docs of [`crate::raft`]). The writes of one batch of
//! entries, and the new `last_applied`, go to RocksDB in one atomic write
//! batch.
//!
//! A snapshot is the list of records plus the applied position and
//! membership. The key index and the completion index are derived from the
//! records when a snapshot is installed. The current snapshot is kept in
//! `sm_meta` so that it survives a restart and can be sent to a lagging
//! follower.

use std::collections::HashMap;
use std::io;
use std::io::Cursor;
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
use serde::Serialize;

use super::COMMAND_VERSION;
use super::COMMAND_VERSION_MIN;
use super::COMPLETE_BATCH_MAX;
use super::Command;
use super::CommandResponse;
use super::Op;
use super::TypeConfig;
use super::cf;
use super::log_store::decode;
use super::log_store::encode;
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

/// The decision log, backed by the node's RocksDB.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<DB>,
    /// Held while the current snapshot is replaced: openraft may build a
    /// snapshot while another is being installed, and the older of the two
    /// must not overwrite the newer.
    snapshot_lock: Arc<std::sync::Mutex<()>>,
}

/// A snapshot's payload.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    records: Vec<TxnRecord>,
}

/// The current snapshot, kept in `sm_meta` as its meta (JSON, under
/// `snapshot_meta`) and its data as is (under `snapshot_data`).
struct StoredSnapshot {
    meta: SnapshotMetaOf<TypeConfig>,
    data: Vec<u8>,
}

/// How earlier builds kept the snapshot: both parts in one JSON value
/// under `snapshot`, where the data became an array of numbers, about four
/// times its size. Still read; replaced by the next snapshot.
#[derive(Deserialize)]
struct LegacySnapshot {
    meta: SnapshotMetaOf<TypeConfig>,
    data: Vec<u8>,
}

impl StoredSnapshot {
    /// The stored snapshot's meta, without reading its data.
    fn read_meta(db: &DB) -> io::Result<Option<SnapshotMetaOf<TypeConfig>>> {
        let cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
        match db.get_cf(&cf, KEY_SNAPSHOT_META).map_err(io::Error::other)? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(Self::read_legacy(db)?.map(|s| s.meta)),
        }
    }

    fn read(db: &DB) -> io::Result<Option<StoredSnapshot>> {
        let cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
        // Both keys from one point in time: a snapshot built meanwhile must
        // not pair this meta with its data.
        let at = db.snapshot();
        let Some(meta) = at.get_cf(&cf, KEY_SNAPSHOT_META).map_err(io::Error::other)? else {
            return Self::read_legacy(db);
        };
        let data = at
            .get_cf(&cf, KEY_SNAPSHOT_DATA)
            .map_err(io::Error::other)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "snapshot meta without its data"))?;
        Ok(Some(StoredSnapshot { meta: decode(&meta)?, data }))
    }

    fn read_legacy(db: &DB) -> io::Result<Option<StoredSnapshot>> {
        let cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
        match db.get_cf(&cf, KEY_SNAPSHOT_LEGACY).map_err(io::Error::other)? {
            Some(b) => {
                let legacy: LegacySnapshot = decode(&b)?;
                Ok(Some(StoredSnapshot { meta: legacy.meta, data: legacy.data }))
            }
            None => Ok(None),
        }
    }

    /// Adds writing this snapshot (in place of any earlier one) to `batch`.
    fn put(&self, db: &DB, batch: &mut WriteBatch) -> io::Result<()> {
        let cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
        batch.put_cf(&cf, KEY_SNAPSHOT_META, encode(&self.meta)?);
        batch.put_cf(&cf, KEY_SNAPSHOT_DATA, &self.data);
        batch.delete_cf(&cf, KEY_SNAPSHOT_LEGACY);
        Ok(())
    }
}

impl StateMachine {
    pub(crate) fn new(db: Arc<DB>) -> Self {
        Self { db, snapshot_lock: Arc::default() }
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
    /// `state` if given. Scans records in key order, so a filter by state
    /// reads the records it skips.
    pub async fn list(&self, state: Option<RecordState>, after: Option<TxId>, limit: usize) -> Result<Vec<TxnRecord>> {
        let db = self.db.clone();
        blocking(move || {
            let cf = db.cf_handle(cf::SM_RECORDS).expect("sm_records column family");
            let mode = match &after {
                Some(a) => IteratorMode::From(a.as_str().as_bytes(), rocksdb::Direction::Forward),
                None => IteratorMode::Start,
            };
            let mut out = Vec::new();
            for item in db.iterator_cf(&cf, mode) {
                let (key, value) = item?;
                if after.as_ref().is_some_and(|a| a.as_str().as_bytes() == &*key) {
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
            Op::Complete { txid } => self.complete(cmd.at_unix_ms, txid, &[]),
            Op::CompleteBatch { items } => {
                if items.len() > COMPLETE_BATCH_MAX {
                    return Ok(CommandResponse::Invalid {
                        reason: format!("{} completions in one entry, over {COMPLETE_BATCH_MAX}", items.len()),
                    });
                }
                let mut found = 0;
                for item in items {
                    if let CommandResponse::Completed { .. } =
                        self.complete(cmd.at_unix_ms, &item.txid, &item.heuristic)?
                    {
                        found += 1;
                    }
                }
                Ok(CommandResponse::CompletedBatch { found })
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
            self.batch.put_cf(&cf, completed_key(at, txid), []);
        }
        Ok(CommandResponse::Completed { record })
    }

    /// Drops records completed before `before`. Reads the completion index
    /// from RocksDB, so the caller writes out the batch so far first (see
    /// [`apply_entries`]).
    fn forget(&mut self, before: u64) -> Result<CommandResponse> {
        let cf_completed = self.db.cf_handle(cf::SM_COMPLETED).expect("sm_completed column family");
        let mut doomed = Vec::new();
        for item in self.db.iterator_cf(&cf_completed, IteratorMode::Start) {
            let (key, _) = item?;
            let (at, txid) = parse_completed_key(&key)?;
            if at >= before {
                break;
            }
            doomed.push((key.to_vec(), at, txid));
        }
        let mut count = 0;
        for (key, at, txid) in doomed {
            self.batch.delete_cf(&cf_completed, key);
            // The index entry must describe the record that holds now.
            let Some(record) = self.record(&txid)? else { continue };
            if record.completed_unix_ms != Some(at) {
                continue;
            }
            if let Decision::Commit { idempotency_key: Some(k), .. } = &record.decision {
                let cf_keys = self.db.cf_handle(cf::SM_KEYS).expect("sm_keys column family");
                self.batch.delete_cf(&cf_keys, k.as_bytes());
                self.keys.insert(k.clone(), None);
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
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<TypeConfig, Cursor<Vec<u8>>>> {
        let db = self.db.clone();
        let lock = self.snapshot_lock.clone();
        let stored = tokio::task::spawn_blocking(move || -> io::Result<StoredSnapshot> {
            // One RocksDB snapshot: the records and the applied position are
            // read at the same point.
            let snap = db.snapshot();
            let meta_cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
            let last_log_id: Option<LogIdOf<TypeConfig>> =
                match snap.get_cf(&meta_cf, KEY_LAST_APPLIED).map_err(io::Error::other)? {
                    Some(b) => decode(&b)?,
                    None => None,
                };
            let last_membership = match snap.get_cf(&meta_cf, KEY_MEMBERSHIP).map_err(io::Error::other)? {
                Some(b) => decode(&b)?,
                None => StoredMembershipOf::<TypeConfig>::default(),
            };
            let records_cf = db.cf_handle(cf::SM_RECORDS).expect("sm_records column family");
            // The records are stored as JSON already: the snapshot is
            // `SnapshotData`'s JSON spliced from them, without decoding.
            let mut data = b"{\"records\":[".to_vec();
            for (i, item) in snap.iterator_cf(&records_cf, IteratorMode::Start).enumerate() {
                let (_, value) = item.map_err(io::Error::other)?;
                if i > 0 {
                    data.push(b',');
                }
                data.extend_from_slice(&value);
            }
            data.extend_from_slice(b"]}");
            drop(snap);
            let meta = SnapshotMetaOf::<TypeConfig> { last_log_id, last_membership };
            let stored = StoredSnapshot { meta, data };
            let _guard = lock.lock().map_err(|_| io::Error::other("snapshot lock poisoned"))?;
            let current = StoredSnapshot::read_meta(&db)?;
            if current.is_none_or(|c| c.last_log_id < stored.meta.last_log_id) {
                let mut batch = WriteBatch::default();
                stored.put(&db, &mut batch)?;
                db.write(batch).map_err(io::Error::other)?;
            }
            Ok(stored)
        })
        .await
        .map_err(io::Error::other)??;
        tracing::info!(last_log_id = ?stored.meta.last_log_id, bytes = stored.data.len(), "built snapshot");
        Ok(SnapshotOf::<TypeConfig, _> { meta: stored.meta, snapshot: Cursor::new(stored.data) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
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
        let db = self.db.clone();
        let (batch, responses) = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let responses = apply_entries(&db, batch.iter().map(|(entry, _)| entry))?;
            Ok((batch, responses))
        })
        .await
        .map_err(io::Error::other)??;
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

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Cursor<Vec<u8>>,
    ) -> io::Result<()> {
        let data = snapshot.into_inner();
        let parsed: SnapshotData = decode(&data)?;
        let stored = StoredSnapshot { meta: meta.clone(), data };
        let db = self.db.clone();
        let count = parsed.records.len();
        let lock = self.snapshot_lock.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let _guard = lock.lock().map_err(|_| io::Error::other("snapshot lock poisoned"))?;
            let mut batch = WriteBatch::default();
            for name in [cf::SM_RECORDS, cf::SM_KEYS, cf::SM_COMPLETED] {
                let cf = db.cf_handle(name).expect("state machine column family");
                for item in db.iterator_cf(&cf, IteratorMode::Start) {
                    let (key, _) = item.map_err(io::Error::other)?;
                    batch.delete_cf(&cf, key);
                }
            }
            let records_cf = db.cf_handle(cf::SM_RECORDS).expect("sm_records column family");
            let keys_cf = db.cf_handle(cf::SM_KEYS).expect("sm_keys column family");
            let completed_cf = db.cf_handle(cf::SM_COMPLETED).expect("sm_completed column family");
            for record in &parsed.records {
                batch.put_cf(&records_cf, record.txid.as_str(), encode(record)?);
                if let Decision::Commit { idempotency_key: Some(k), .. } = &record.decision {
                    batch.put_cf(&keys_cf, k.as_bytes(), record.txid.as_str().as_bytes());
                }
                if let Some(at) = record.completed_unix_ms {
                    batch.put_cf(&completed_cf, completed_key(at, &record.txid), []);
                }
            }
            let meta_cf = db.cf_handle(cf::SM_META).expect("sm_meta column family");
            batch.put_cf(&meta_cf, KEY_LAST_APPLIED, encode(&stored.meta.last_log_id)?);
            batch.put_cf(&meta_cf, KEY_MEMBERSHIP, encode(&stored.meta.last_membership)?);
            stored.put(&db, &mut batch)?;
            db.write(batch).map_err(io::Error::other)?;
            db.flush_wal(true).map_err(io::Error::other)
        })
        .await
        .map_err(io::Error::other)??;
        tracing::info!(last_log_id = ?meta.last_log_id, records = count, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<SnapshotOf<TypeConfig, Cursor<Vec<u8>>>>> {
        let db = self.db.clone();
        let stored =
            tokio::task::spawn_blocking(move || -> io::Result<Option<StoredSnapshot>> { StoredSnapshot::read(&db) })
                .await
                .map_err(io::Error::other)??;
        Ok(stored.map(|s| SnapshotOf::<TypeConfig, _> { meta: s.meta, snapshot: Cursor::new(s.data) }))
    }
}

#[cfg(test)]
mod tests {
    use futures::stream;

    use super::*;
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
        let snap = f.sm.build_snapshot().await.unwrap();

        let mut g = Fixture::new();
        g.sm.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
        assert_eq!(g.sm.get(txid("t1")).await.unwrap(), f.sm.get(txid("t1")).await.unwrap());
        g.index = 2;
        let r = g.one(3, Op::Decide { txid: txid("t2"), decision: commit(Some("k")), info: TxnInfo::default() }).await;
        assert!(matches!(r, CommandResponse::IdempotencyConflict { .. }));
        assert_eq!(g.one(4, Op::Forget { before_unix_ms: 3 }).await, CommandResponse::Forgotten { count: 1 });
        let current = g.sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snap.meta);
    }

    #[tokio::test]
    async fn snapshots_of_earlier_builds_are_read_and_replaced() {
        let mut f = Fixture::new();
        f.one(1, Op::Decide { txid: txid("t1"), decision: abort(), info: TxnInfo::default() }).await;
        let built = f.sm.build_snapshot().await.unwrap();
        let data = built.snapshot.into_inner();
        // The earlier form: meta and data in one JSON value.
        let legacy = serde_json::json!({ "meta": built.meta, "data": data });
        let cf = f.sm.db.cf_handle(cf::SM_META).unwrap();
        f.sm.db.put_cf(&cf, KEY_SNAPSHOT_LEGACY, serde_json::to_vec(&legacy).unwrap()).unwrap();
        f.sm.db.delete_cf(&cf, KEY_SNAPSHOT_META).unwrap();
        f.sm.db.delete_cf(&cf, KEY_SNAPSHOT_DATA).unwrap();
        let read = f.sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!((read.meta, read.snapshot.into_inner()), (built.meta.clone(), data.clone()));

        f.one(2, Op::Decide { txid: txid("t2"), decision: abort(), info: TxnInfo::default() }).await;
        let newer = f.sm.build_snapshot().await.unwrap();
        let cf = f.sm.db.cf_handle(cf::SM_META).unwrap();
        assert!(f.sm.db.get_cf(&cf, KEY_SNAPSHOT_LEGACY).unwrap().is_none());
        let read = f.sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(read.meta, newer.meta);
        let parsed: SnapshotData = decode(&read.snapshot.into_inner()).unwrap();
        assert_eq!(parsed.records.len(), 2);
    }
}
