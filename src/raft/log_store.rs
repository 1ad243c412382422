//! The Raft log and vote, in RocksDB.
//!
//! Durability is the whole point of this file. openraft may count a node's
//! log entries towards a commit only once they are on disk, and may count its
//! vote only once the vote is on disk; otherwise a crash could make a node
//! forget a promise and elect two leaders, or lose an acknowledged decision.
//!
//! - `append` writes the entries to RocksDB (unsynced) before it returns, so
//!   they can be read back at once, and hands the completion callback to the
//!   flusher thread. The flusher fsyncs the write-ahead log
//!   (`flush_wal(true)`) and only then reports the entries flushed. Callbacks
//!   that queue up while one fsync runs share the next one: under load many
//!   appends cost one fsync.
//! - `save_vote` fsyncs before it returns. On opening, the stored vote is
//!   made uncommitted ([`LogStore::uncommit_vote`]): a restarted node never
//!   resumes leading the term it led before.
//! - An fsync failure poisons the store: every later append and vote fails,
//!   openraft stops the node, and nothing is acknowledged after the failure.
//!
//! - The committed log id is not stored (openraft's default): storing it
//!   cost every node a write before every apply, on the commit path, and
//!   only let a restarted node apply its committed entries before the
//!   leader's first message. A restarted node applies from the state
//!   machine's own last-applied id (written in the same batch as what it
//!   applied) once the leader tells it what is committed; a new leader's
//!   recovery waits for its read barrier either way.
//!
//! - The newest entries are also kept in memory, decoded, as appended
//!   (`RecentEntries`). Each entry is read back moments after it is
//!   written: on the leader once per follower for replication and once for
//!   apply, on a follower once for apply. From memory such a read is a
//!   clone; from RocksDB it is an iterator and a JSON decode per entry.
//!
//! Where RocksDB calls run: fsyncs on the flusher thread; the calls on the
//! commit path of every decision (the unsynced append, a short read the
//! memory copy cannot serve) in place, on the calling task, as each is a
//! memtable access of microseconds and a hand-off to another thread and
//! back costs more; everything else (vote, purge, long reads) on tokio's
//! blocking pool. An in-place write can still wait on a RocksDB write
//! stall; that holds one async worker while it lasts.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use openraft::type_config::alias::EntryOf;
use openraft::type_config::alias::LogIdOf;
use openraft::type_config::alias::VoteOf;
use openraft::vote::RaftVote;
use rocksdb::DB;
use rocksdb::Direction;
use rocksdb::IteratorMode;
use rocksdb::WriteBatch;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::TypeConfig;
use super::cf;

type Entry = EntryOf<TypeConfig>;

const KEY_VOTE: &[u8] = b"vote";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
/// Most entries read in place, on the caller's task; longer reads go to the
/// blocking pool.
const INLINE_READ_MAX: u64 = 64;
/// The most the entries kept in memory may take, counted in their stored
/// (JSON) size. An entry is read back milliseconds after its append; at
/// this size every read in the benchmark, up to 256 clients, came from
/// memory. A follower that lags further is served from RocksDB. 4 MiB left
/// `decisions_only` no faster and the nodes' memory about 10 MB larger
/// (README, Benchmark).
const RECENT_MAX_BYTES: usize = 256 << 10;

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: Arc<Flusher>,
    poisoned: Arc<AtomicBool>,
    recent: Arc<Mutex<RecentEntries>>,
    stats: Arc<LogStats>,
}

/// How well appends share fsyncs: entries and appends written, and the
/// fsyncs that made them durable, with the time they took; and how many
/// reads the entries kept in memory served, against those RocksDB did.
#[derive(Default)]
pub struct LogStats {
    pub entries: AtomicU64,
    pub appends: AtomicU64,
    pub fsyncs: AtomicU64,
    pub fsync_us: AtomicU64,
    pub reads_from_memory: AtomicU64,
    pub reads_from_rocksdb: AtomicU64,
}

impl LogStats {
    /// Every counter by name, as `tandem cluster status` shows them.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("log_entries_appended", get(&self.entries)),
            ("log_appends", get(&self.appends)),
            ("log_fsyncs", get(&self.fsyncs)),
            ("log_fsync_us_total", get(&self.fsync_us)),
            ("log_reads_from_memory", get(&self.reads_from_memory)),
            ("log_reads_from_rocksdb", get(&self.reads_from_rocksdb)),
        ]
    }
}

/// The newest entries of the log, decoded, each with its stored size: a
/// contiguous run, or none.
///
/// An entry joins the run only once RocksDB holds it (`append`) and leaves
/// before RocksDB drops it (`truncate_after`, `purge`), each change under
/// the lock; so every entry here is the one RocksDB holds at its index. A
/// read is served from here only if the run holds the whole range, and
/// then returns exactly what RocksDB would. The oldest entries go once the
/// run passes [`RECENT_MAX_BYTES`].
#[derive(Default)]
struct RecentEntries {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl RecentEntries {
    /// Adds an entry just appended. One at an index the run holds replaces
    /// it and what follows (openraft truncates first; this holds without).
    /// One beyond the run's end (a snapshot installed before its purge ran)
    /// starts the run afresh.
    fn push(&mut self, entry: Entry, size: usize) {
        self.truncate_from(entry.index());
        if self.entries.back().is_some_and(|(last, _)| last.index() + 1 != entry.index()) {
            self.entries.clear();
            self.bytes = 0;
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.bytes > RECENT_MAX_BYTES
            && let Some((_, size)) = self.entries.pop_front()
        {
            self.bytes -= size;
        }
    }

    /// Drops the entries at `index` and after.
    fn truncate_from(&mut self, index: u64) {
        while let Some((last, size)) = self.entries.back()
            && last.index() >= index
        {
            self.bytes -= size;
            self.entries.pop_back();
        }
    }

    /// Drops the entries up to `index`, inclusive.
    fn purge_through(&mut self, index: u64) {
        while let Some((first, size)) = self.entries.front()
            && first.index() <= index
        {
            self.bytes -= size;
            self.entries.pop_front();
        }
    }

    /// The entries from `start` up to `end` (exclusive), if the run holds
    /// them all.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.entries.front()?.0.index();
        let after_last = self.entries.back()?.0.index() + 1;
        if start < first || end > after_last || start > end {
            return None;
        }
        let range = (start - first) as usize..(end - first) as usize;
        Some(self.entries.range(range).map(|(entry, _)| entry.clone()).collect())
    }
}

/// The flusher thread and the queue to it. Dropping the last handle closes
/// the queue and joins the thread, so the thread's reference to the database
/// is gone before the process can exit: RocksDB must be closed before its
/// static destructors run.
struct Flusher {
    queue: Option<mpsc::Sender<IOFlushed<TypeConfig>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            thread.join().ok();
        }
    }
}

impl LogStore {
    /// Stores the vote as not committed, before Raft starts: a restarted
    /// node does not resume leading the term it led before the crash, it
    /// must win a new term first. The vote still binds it to its candidate
    /// for that term.
    ///
    /// A leader's entries reach its followers while its own copy may still
    /// be on the way to disk, and two followers are a quorum without it. Had
    /// it lost the tail of its log in the crash (RocksDB drops a torn
    /// write-ahead-log record and everything after it), resuming the old
    /// term would let it write *different* entries under log ids (term,
    /// index) the followers already hold, which they take for the same
    /// entries, and the nodes' decision logs would diverge. The crash matrix
    /// caught that.
    pub fn uncommit_vote(&self) -> crate::error::Result<()> {
        let cf = self.db.cf_handle(cf::RAFT_META).expect("raft_meta column family");
        let Some(bytes) = self.db.get_cf(&cf, KEY_VOTE)? else { return Ok(()) };
        let vote: VoteOf<TypeConfig> = decode(&bytes)?;
        if vote.is_committed() {
            let uncommitted = VoteOf::<TypeConfig>::from_leader_id(*vote.leader_id(), false);
            let mut opts = rocksdb::WriteOptions::default();
            opts.set_sync(true);
            self.db.put_cf_opt(&cf, KEY_VOTE, encode(&uncommitted)?, &opts)?;
        }
        Ok(())
    }

    pub(crate) fn new(db: Arc<DB>) -> Self {
        let (tx, rx) = mpsc::channel();
        let poisoned = Arc::new(AtomicBool::new(false));
        let flusher_db = db.clone();
        let flusher_poisoned = poisoned.clone();
        let stats = Arc::new(LogStats::default());
        let flusher_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-log-flusher".into())
            .spawn(move || run_flusher(flusher_db, rx, flusher_poisoned, flusher_stats))
            .expect("spawning the log flusher thread");
        let flusher = Arc::new(Flusher { queue: Some(tx), thread: Some(thread) });
        let recent = Arc::new(Mutex::new(RecentEntries::default()));
        Self { db, flusher, poisoned, recent, stats }
    }

    fn recent(&self) -> MutexGuard<'_, RecentEntries> {
        self.recent.lock().expect("recent entries lock")
    }

    /// The store's counters; they live as long as any holder.
    pub fn stats(&self) -> Arc<LogStats> {
        self.stats.clone()
    }

    fn check_poisoned(&self) -> io::Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(io::Error::other("an earlier fsync of the Raft log failed; the node stops"));
        }
        Ok(())
    }

    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        F: FnOnce(&DB) -> io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(io::Error::other)?
    }

    async fn get_meta<T: DeserializeOwned + Send + 'static>(&self, key: &'static [u8]) -> io::Result<Option<T>> {
        self.blocking(move |db| {
            let cf = db.cf_handle(cf::RAFT_META).expect("raft_meta column family");
            match db.get_cf(&cf, key).map_err(io::Error::other)? {
                Some(bytes) => Ok(Some(decode(&bytes)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn put_meta<T: Serialize>(&self, key: &'static [u8], value: &T, sync: bool) -> io::Result<()> {
        let bytes = encode(value)?;
        self.blocking(move |db| {
            let cf = db.cf_handle(cf::RAFT_META).expect("raft_meta column family");
            db.put_cf(&cf, key, bytes).map_err(io::Error::other)?;
            if sync {
                db.flush_wal(true).map_err(io::Error::other)?;
            }
            Ok(())
        })
        .await
    }
}

/// Fsyncs the write-ahead log for every queued append, one fsync for all
/// callbacks waiting at that moment, in order.
fn run_flusher(
    db: Arc<DB>,
    rx: mpsc::Receiver<IOFlushed<TypeConfig>>,
    poisoned: Arc<AtomicBool>,
    stats: Arc<LogStats>,
) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let result = if poisoned.load(Ordering::Acquire) {
            Err("an earlier fsync of the Raft log failed".to_string())
        } else {
            db.flush_wal(true).map_err(|e| e.to_string())
        };
        stats.fsync_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if let Err(e) = &result {
            tracing::error!(error = %e, "fsync of the Raft log failed; the node stops taking writes");
            poisoned.store(true, Ordering::Release);
        }
        for callback in waiting {
            callback.io_completed(result.clone().map_err(io::Error::other));
        }
    }
}

pub(crate) fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> io::Result<u64> {
    let bytes: [u8; 8] =
        key.try_into().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "raft_log key is not 8 bytes"))?;
    Ok(u64::from_be_bytes(bytes))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        if let Some(entries) = self.recent().get(start, end) {
            self.stats.reads_from_memory.fetch_add(1, Ordering::Relaxed);
            return Ok(entries);
        }
        self.stats.reads_from_rocksdb.fetch_add(1, Ordering::Relaxed);
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        let read = move |db: &DB| {
            let cf = db.cf_handle(cf::RAFT_LOG).expect("raft_log column family");
            let mut entries = Vec::new();
            let from = index_key(start);
            for item in db.iterator_cf(&cf, IteratorMode::From(&from, Direction::Forward)) {
                let (key, value) = item.map_err(io::Error::other)?;
                let index = key_index(&key)?;
                if !range.contains(&index) {
                    break;
                }
                let entry: Entry = decode(&value)?;
                debug_assert_eq!(entry.index(), index);
                entries.push(entry);
            }
            Ok(entries)
        };
        // A short range is likely still in the memtable: in place. A long
        // one (a follower catching up) may read from disk.
        if end.saturating_sub(start) <= INLINE_READ_MAX { read(&self.db) } else { self.blocking(read).await }
    }

    async fn read_vote(&mut self) -> io::Result<Option<VoteOf<TypeConfig>>> {
        self.get_meta(KEY_VOTE).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogIdOf<TypeConfig>> = self.get_meta(KEY_LAST_PURGED).await?;
        let last = self
            .blocking(|db| {
                let cf = db.cf_handle(cf::RAFT_LOG).expect("raft_log column family");
                match db.iterator_cf(&cf, IteratorMode::End).next() {
                    Some(item) => {
                        let (_, value) = item.map_err(io::Error::other)?;
                        let entry: Entry = decode(&value)?;
                        Ok(Some(entry.log_id()))
                    }
                    None => Ok(None),
                }
            })
            .await?;
        Ok(LogState { last_log_id: last.or(last_purged_log_id), last_purged_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> io::Result<()> {
        self.check_poisoned()?;
        self.put_meta(KEY_VOTE, vote, true).await
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.check_poisoned()?;
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes = encode(&entry)?;
            encoded.push((entry, bytes));
        }
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        self.stats.entries.fetch_add(encoded.len() as u64, Ordering::Relaxed);
        // In place: an unsynced write of a few entries is a memtable insert
        // and a buffered write-ahead-log append, microseconds, and it sits
        // on the commit path of every decision (see the module notes).
        let cf = self.db.cf_handle(cf::RAFT_LOG).expect("raft_log column family");
        let mut batch = WriteBatch::default();
        for (entry, bytes) in &encoded {
            batch.put_cf(&cf, index_key(entry.index()), bytes);
        }
        self.db.write(batch).map_err(io::Error::other)?;
        // Into memory only once RocksDB holds them (see `RecentEntries`).
        let mut recent = self.recent();
        for (entry, bytes) in encoded {
            recent.push(entry, bytes.len());
        }
        drop(recent);
        let queue = self.flusher.queue.as_ref().expect("the flusher queue lives as long as the store");
        queue.send(callback).map_err(|_| io::Error::other("the log flusher thread is gone"))?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<TypeConfig>>) -> io::Result<()> {
        let from = last_log_id.map_or(0, |id| id.index() + 1);
        // Out of memory before RocksDB drops them (see `RecentEntries`).
        self.recent().truncate_from(from);
        self.blocking(move |db| {
            let cf = db.cf_handle(cf::RAFT_LOG).expect("raft_log column family");
            db.delete_range_cf(&cf, index_key(from), index_key(u64::MAX)).map_err(io::Error::other)?;
            // u64::MAX itself is excluded by the range end.
            db.delete_cf(&cf, index_key(u64::MAX)).map_err(io::Error::other)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> io::Result<()> {
        // Out of memory before RocksDB drops them (see `RecentEntries`).
        self.recent().purge_through(log_id.index());
        // Record the purge point first: entries at or before it are ignored
        // from then on, so the deletion need not be atomic with it.
        self.put_meta(KEY_LAST_PURGED, &log_id, false).await?;
        let to = log_id.index() + 1;
        self.blocking(move |db| {
            let cf = db.cf_handle(cf::RAFT_LOG).expect("raft_log column family");
            db.delete_range_cf(&cf, index_key(0), index_key(to)).map_err(io::Error::other)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Command;
    use crate::raft::Op;

    fn entry(term: u64, index: u64) -> Entry {
        let log_id = openraft::testing::log_id::<TypeConfig>(term, 1, index);
        Entry::new_normal(log_id, Command::new(index, Op::Forget { before_unix_ms: index }))
    }

    fn indexes(entries: &[Entry]) -> Vec<(u64, u64)> {
        entries.iter().map(|e| (e.log_id().leader_id.term, e.index())).collect()
    }

    fn run(recent: &RecentEntries) -> Vec<(u64, u64)> {
        let entries: Vec<Entry> = recent.entries.iter().map(|(e, _)| e.clone()).collect();
        indexes(&entries)
    }

    /// What the store reads from memory is what RocksDB holds: a second
    /// store on the same database, with nothing in memory, reads the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_from_memory_match_rocksdb() {
        use openraft::storage::RaftLogStorageExt;
        let dir = tempfile::TempDir::new().unwrap();
        let (mut store, _sm) = crate::raft::open_store(dir.path()).unwrap();
        let mut cold = LogStore::new(store.db.clone());
        let stats = store.stats();
        let reads = |stats: &LogStats| {
            (stats.reads_from_memory.load(Ordering::Relaxed), stats.reads_from_rocksdb.load(Ordering::Relaxed))
        };

        store.blocking_append((1..=5).map(|i| entry(1, i))).await.unwrap();
        let warm = store.try_get_log_entries(2..5).await.unwrap();
        assert_eq!(indexes(&warm), [(1, 2), (1, 3), (1, 4)]);
        assert_eq!(warm, cold.try_get_log_entries(2..5).await.unwrap());
        assert_eq!(reads(&stats), (1, 0));
        assert_eq!(cold.stats().reads_from_rocksdb.load(Ordering::Relaxed), 1);

        // A new leader overwrites entries 4 and 5: once truncated, they are
        // not served from memory either.
        store.truncate_after(Some(openraft::testing::log_id::<TypeConfig>(1, 1, 3))).await.unwrap();
        assert_eq!(indexes(&store.try_get_log_entries(2..6).await.unwrap()), [(1, 2), (1, 3)]);
        assert_eq!(reads(&stats), (1, 1));
        store.blocking_append([entry(2, 4)]).await.unwrap();
        let warm = store.try_get_log_entries(1..=4).await.unwrap();
        assert_eq!(indexes(&warm), [(1, 1), (1, 2), (1, 3), (2, 4)]);
        assert_eq!(warm, cold.try_get_log_entries(1..=4).await.unwrap());
        // Past the end, or to an open end, RocksDB answers.
        assert_eq!(indexes(&store.try_get_log_entries(3..9).await.unwrap()), [(1, 3), (2, 4)]);
        assert_eq!(store.try_get_log_entries(3..).await.unwrap(), cold.try_get_log_entries(3..).await.unwrap());
        assert_eq!(reads(&stats), (2, 3));

        store.purge(openraft::testing::log_id::<TypeConfig>(1, 1, 2)).await.unwrap();
        assert_eq!(store.try_get_log_entries(1..3).await.unwrap(), []);
        assert_eq!(indexes(&store.try_get_log_entries(3..5).await.unwrap()), [(1, 3), (2, 4)]);
        assert_eq!(reads(&stats), (3, 4));

        // A snapshot installed: appends resume past it, with its purge run
        // first (8) or not yet (12).
        store.purge(openraft::testing::log_id::<TypeConfig>(2, 1, 7)).await.unwrap();
        store.blocking_append([entry(2, 8)]).await.unwrap();
        store.blocking_append([entry(2, 12)]).await.unwrap();
        assert_eq!(indexes(&store.try_get_log_entries(12..13).await.unwrap()), [(2, 12)]);
        assert_eq!(reads(&stats), (4, 4));
        assert_eq!(indexes(&store.try_get_log_entries(8..13).await.unwrap()), [(2, 8), (2, 12)]);
        assert_eq!(reads(&stats), (4, 5));
    }

    #[test]
    fn serves_only_ranges_it_holds_whole() {
        let mut recent = RecentEntries::default();
        assert!(recent.get(0, 0).is_none(), "an empty run serves nothing");
        for index in 5..10 {
            recent.push(entry(1, index), 10);
        }
        assert_eq!(indexes(&recent.get(5, 10).unwrap()), [(1, 5), (1, 6), (1, 7), (1, 8), (1, 9)]);
        assert_eq!(indexes(&recent.get(7, 9).unwrap()), [(1, 7), (1, 8)]);
        assert_eq!(recent.get(10, 10).unwrap(), []);
        assert!(recent.get(4, 6).is_none(), "entry 4 may be in RocksDB");
        assert!(recent.get(8, 11).is_none(), "past the run's end");
        assert!(recent.get(6, u64::MAX).is_none());
        assert!(recent.get(7, 6).is_none());
    }

    #[test]
    fn overwrites_and_gaps_keep_the_run_contiguous() {
        let mut recent = RecentEntries::default();
        for index in 1..=5 {
            recent.push(entry(1, index), 10);
        }
        // A new leader's entry 4 replaces the old term's 4 and 5.
        recent.push(entry(2, 4), 10);
        assert_eq!(run(&recent), [(1, 1), (1, 2), (1, 3), (2, 4)]);
        assert_eq!(recent.bytes, 40);
        // An entry that does not follow (a snapshot skipped ahead) starts afresh.
        recent.push(entry(2, 9), 10);
        assert_eq!(run(&recent), [(2, 9)]);
        assert_eq!(recent.bytes, 10);
    }

    #[test]
    fn truncation_and_purge_follow_the_log() {
        let mut recent = RecentEntries::default();
        for index in 1..=6 {
            recent.push(entry(1, index), 10);
        }
        recent.truncate_from(5);
        assert_eq!(run(&recent), [(1, 1), (1, 2), (1, 3), (1, 4)]);
        recent.purge_through(2);
        assert_eq!(run(&recent), [(1, 3), (1, 4)]);
        assert_eq!(recent.bytes, 20);
        assert!(recent.get(2, 4).is_none());
        recent.purge_through(9);
        recent.truncate_from(0);
        assert!(recent.entries.is_empty());
        assert_eq!(recent.bytes, 0);
    }

    #[test]
    fn the_oldest_entries_go_past_the_bound() {
        let mut recent = RecentEntries::default();
        let size = RECENT_MAX_BYTES / 4;
        for index in 1..=6 {
            recent.push(entry(1, index), size);
        }
        assert_eq!(run(&recent), [(1, 3), (1, 4), (1, 5), (1, 6)]);
        assert_eq!(recent.bytes, RECENT_MAX_BYTES);
        // One entry larger than the bound is not kept at all.
        recent.push(entry(1, 7), RECENT_MAX_BYTES + 1);
        assert!(recent.entries.is_empty());
        assert_eq!(recent.bytes, 0);
        assert!(recent.get(7, 8).is_none());
    }
}
