//! Snapshots: RocksDB checkpoints, and the files they travel as.
//!
//! The current snapshot is a checkpoint of the node's RocksDB in its
//! `snapshots` directory (inside the data directory): RocksDB's consistent
//! copy of the database whose files are hard links to the live ones. Making
//! one costs a memtable flush, not a copy of the state, however many records
//! the state holds; the records are read out of it only when a follower
//! needs the snapshot.
//!
//! A snapshot travels, and is kept while it is installed, as a snapshot
//! file: a header line, one transaction record per line (its JSON, as
//! `sm_records` stores it) and a trailer line with the number of records.
//! Sending, receiving and installing read and write it a buffer at a time,
//! so none holds the whole snapshot in memory. The trailer tells a complete
//! file from one cut short by a crash or a broken transfer.
//!
//! `sm_meta` names the current checkpoint (`snapshot_file`) beside its meta
//! (`snapshot_meta`), in one write. A checkpoint or file is durable before
//! it is named there, and a replaced one is removed only after the new name
//! is durable; anything else in the directory is a leftover of a crash and
//! is removed when the node opens its store.

use std::fs::File;
use std::io;
use std::io::BufRead;
use std::io::BufReader;
use std::io::BufWriter;
use std::io::Read;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use rocksdb::DB;

use super::cf;

/// The first line of a snapshot file.
const HEADER: &[u8] = b"tandem-snapshot 1\n";
/// The last line starts with this, then the record count.
const TRAILER: &[u8] = b"end ";
/// The directory, inside the node's data directory.
const DIR: &str = "snapshots";
/// Names of complete snapshot files start with this.
const PREFIX: &str = "snapshot-";
/// Names of checkpoints start with this.
const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// A record line longer than this is not a record: the file is damaged.
const LINE_BYTES_MAX: usize = 64 << 20;

/// A snapshot's data: a snapshot file, open for reading from its start, or
/// a checkpoint that becomes one when read. A received file (not yet
/// installed) is removed when dropped; an open file stays readable after it
/// is removed, so a snapshot being sent survives its replacement.
#[derive(Debug)]
pub struct SnapshotFile {
    data: Data,
}

#[derive(Debug)]
enum Data {
    File { file: File, path: PathBuf, remove_on_drop: bool },
    Checkpoint(PathBuf),
}

impl SnapshotFile {
    /// Opens a complete snapshot file for reading.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        Ok(Self { data: Data::File { file: File::open(path)?, path: path.to_path_buf(), remove_on_drop: false } })
    }

    /// The checkpoint at `path`, written out as a snapshot file when read.
    pub(crate) fn checkpoint(path: PathBuf) -> Self {
        Self { data: Data::Checkpoint(path) }
    }

    /// A new, empty file for a snapshot arriving from the leader. Write the
    /// data to the returned file, then [`SnapshotFile::received`].
    pub fn create_received(dir: &Path) -> io::Result<(File, PathBuf)> {
        let path = dir.join(format!(".received-{}", unique()));
        Ok((File::create(&path)?, path))
    }

    /// The data written to `path` (by [`SnapshotFile::create_received`]),
    /// to be installed; the file is removed when this is dropped.
    pub fn received(path: PathBuf) -> io::Result<Self> {
        let file = File::open(&path);
        if file.is_err() {
            std::fs::remove_file(&path).ok();
        }
        Ok(Self { data: Data::File { file: file?, path, remove_on_drop: true } })
    }

    /// The file, for reading from its start.
    pub fn into_file(self) -> io::Result<File> {
        match &self.data {
            Data::File { file, .. } => file.try_clone(),
            Data::Checkpoint(path) => write_out(path),
        }
    }

    /// The records' JSON, one by one, checked against the trailer.
    pub(crate) fn records(self) -> io::Result<Records> {
        Records::new(self.into_file()?)
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if let Data::File { path, remove_on_drop: true, .. } = &self.data {
            std::fs::remove_file(path).ok();
        }
    }
}

/// Makes a checkpoint of `db` in `dir` and returns its name: RocksDB's
/// consistent copy of the whole database, its files hard links to the live
/// ones, so it costs a memtable flush rather than a copy of the state.
pub(crate) fn create_checkpoint(db: &DB, dir: &Path) -> io::Result<String> {
    let name = format!("{CHECKPOINT_PREFIX}{}", unique());
    let checkpoint = rocksdb::checkpoint::Checkpoint::new(db).map_err(io::Error::other)?;
    checkpoint.create_checkpoint(dir.join(&name)).map_err(io::Error::other)?;
    File::open(dir)?.sync_all()?;
    Ok(name)
}

/// Opens a checkpoint, read-only, with the column families it has: one an
/// earlier build made lacks those added since (only `sm_records` and
/// `sm_meta` are read from it).
pub(crate) fn open_checkpoint(path: &Path) -> io::Result<DB> {
    let mut opts = rocksdb::Options::default();
    opts.set_max_open_files(64);
    let families = DB::list_cf(&opts, path).map_err(io::Error::other)?;
    for needed in [cf::SM_RECORDS, cf::SM_META] {
        if !families.iter().any(|f| f == needed) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("checkpoint {} has no {needed} column family", path.display()),
            ));
        }
    }
    DB::open_cf_for_read_only(&opts, path, families, false).map_err(io::Error::other)
}

/// The records of the checkpoint at `path` written to a snapshot file, open
/// and already removed.
fn write_out(path: &Path) -> io::Result<File> {
    // Opening a missing checkpoint would make a directory for RocksDB's
    // info log; a replaced one is simply gone. (Should one be replaced
    // between the two, the next replacement removes what the open left.)
    if !path.is_dir() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("snapshot {} was replaced", path.display())));
    }
    let db = open_checkpoint(path)?;
    let dir = path.parent().ok_or_else(|| io::Error::other("a checkpoint has a parent directory"))?;
    let records = db.cf_handle(cf::SM_RECORDS).expect("sm_records column family");
    let mut writer = Writer::create(dir)?;
    for item in db.iterator_cf(&records, rocksdb::IteratorMode::Start) {
        let (_, value) = item.map_err(io::Error::other)?;
        writer.record(&value)?;
    }
    let (name, _) = writer.finish()?;
    let file = File::open(dir.join(&name))?;
    std::fs::remove_file(dir.join(&name))?;
    Ok(file)
}

/// The node's snapshot directory, created if missing.
pub(crate) fn dir(data_dir: &Path) -> io::Result<PathBuf> {
    let dir = data_dir.join(DIR);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Removes everything in `dir` but `keep`. At open, nothing else is in
/// use; later, only complete snapshot files and checkpoints are removed,
/// since a build or a transfer may be writing a file of its own meanwhile.
pub(crate) fn remove_others(dir: &Path, keep: Option<&str>, at_open: bool) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let complete = name.starts_with(PREFIX) || name.starts_with(CHECKPOINT_PREFIX);
        if Some(name) == keep || !(at_open || complete) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Whether `name` is a checkpoint (rather than a snapshot file).
pub(crate) fn is_checkpoint(name: &str) -> bool {
    name.starts_with(CHECKPOINT_PREFIX)
}

/// Unique within the process, and across restarts (the time).
fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Writes a new snapshot file, one record at a time.
pub(crate) struct Writer {
    out: BufWriter<File>,
    dir: PathBuf,
    tmp: PathBuf,
    count: u64,
    bytes: u64,
}

impl Writer {
    pub(crate) fn create(dir: &Path) -> io::Result<Self> {
        let tmp = dir.join(format!(".building-{}", unique()));
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        out.write_all(HEADER)?;
        Ok(Self { out, dir: dir.to_path_buf(), tmp, count: 0, bytes: HEADER.len() as u64 })
    }

    /// Adds one record's JSON (compact JSON has no raw newline).
    pub(crate) fn record(&mut self, json: &[u8]) -> io::Result<()> {
        if json.contains(&b'\n') || json.starts_with(TRAILER) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "a snapshot record is not one line of JSON"));
        }
        self.out.write_all(json)?;
        self.out.write_all(b"\n")?;
        self.count += 1;
        self.bytes += json.len() as u64 + 1;
        Ok(())
    }

    /// Ends the file, makes it durable under its final name and returns the
    /// name and the file's size.
    pub(crate) fn finish(mut self) -> io::Result<(String, u64)> {
        let trailer = format!("end {}\n", self.count);
        self.out.write_all(trailer.as_bytes())?;
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        let name = format!("{PREFIX}{}", unique());
        std::fs::rename(&self.tmp, self.dir.join(&name))?;
        File::open(&self.dir)?.sync_all()?;
        Ok((name, self.bytes + trailer.len() as u64))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Unfinished (an error on the way), nothing names the file; finished,
        // it has its final name already.
        std::fs::remove_file(&self.tmp).ok();
    }
}

/// The records of a snapshot file.
pub(crate) struct Records {
    input: BufReader<File>,
    count: u64,
    done: bool,
}

impl Records {
    pub(crate) fn new(file: File) -> io::Result<Self> {
        let mut input = BufReader::with_capacity(1 << 20, file);
        let mut header = vec![0; HEADER.len()];
        input.read_exact(&mut header).map_err(|_| damaged("no header"))?;
        if header != HEADER {
            return Err(damaged("not a snapshot file of this version"));
        }
        Ok(Self { input, count: 0, done: false })
    }

    fn next_record(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        let n = (&mut self.input).take(LINE_BYTES_MAX as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Err(damaged("it ends without its trailer"));
        }
        line.pop();
        if let Some(count) = line.strip_prefix(TRAILER) {
            let count: u64 = std::str::from_utf8(count)
                .ok()
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| damaged("unreadable trailer"))?;
            if count != self.count {
                return Err(damaged("the record count differs from the trailer's"));
            }
            let mut rest = [0u8; 1];
            if self.input.read(&mut rest)? != 0 {
                return Err(damaged("data after the trailer"));
            }
            return Ok(None);
        }
        self.count += 1;
        Ok(Some(line))
    }
}

impl Iterator for Records {
    type Item = io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.next_record();
        if !matches!(next, Ok(Some(_))) {
            self.done = true;
        }
        next.transpose()
    }
}

fn damaged(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file damaged: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, records: &[&str]) -> PathBuf {
        let mut w = Writer::create(dir).unwrap();
        for r in records {
            w.record(r.as_bytes()).unwrap();
        }
        let (name, bytes) = w.finish().unwrap();
        let path = dir.join(name);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes);
        path
    }

    fn read(path: &Path) -> io::Result<Vec<String>> {
        SnapshotFile::open(path)?.records()?.map(|r| r.map(|l| String::from_utf8(l).unwrap())).collect()
    }

    #[test]
    fn a_checkpoint_without_the_newer_column_families_opens() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // The column families of a build before sm_open.
        let earlier = [cf::RAFT_LOG, cf::RAFT_META, cf::SM_RECORDS, cf::SM_KEYS, cf::SM_COMPLETED, cf::SM_META];
        let path = dir.path().join("earlier");
        {
            let db = DB::open_cf(&opts, &path, earlier).unwrap();
            db.put_cf(&db.cf_handle(cf::SM_RECORDS).unwrap(), "t1", "{}").unwrap();
        }
        let db = open_checkpoint(&path).unwrap();
        assert_eq!(db.get_cf(&db.cf_handle(cf::SM_RECORDS).unwrap(), "t1").unwrap().unwrap(), b"{}");
        drop(db);
        // One without the records is refused, saying why.
        let path = dir.path().join("no-records");
        drop(DB::open_cf(&opts, &path, [cf::SM_META]).unwrap());
        let e = open_checkpoint(&path).err().unwrap();
        assert!(e.to_string().contains("no sm_records"), "{e}");
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &["{\"a\":1}", "{\"b\":2}"]);
        assert_eq!(read(&path).unwrap(), vec!["{\"a\":1}", "{\"b\":2}"]);
        let empty = write(dir.path(), &[]);
        assert!(read(&empty).unwrap().is_empty());
    }

    #[test]
    fn a_file_cut_short_or_extended_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &["{\"a\":1}", "{\"b\":2}"]);
        let full = std::fs::read(&path).unwrap();
        // Cut anywhere, even at a line boundary, the file is refused.
        for len in 0..full.len() {
            std::fs::write(&path, &full[..len]).unwrap();
            assert!(read(&path).is_err(), "accepted a file cut to {len} bytes");
        }
        let mut longer = full.clone();
        longer.extend_from_slice(b"{\"c\":3}\n");
        std::fs::write(&path, &longer).unwrap();
        assert!(read(&path).is_err());
        // A line dropped from the middle: the count no longer matches.
        let text = String::from_utf8(full).unwrap().replace("{\"a\":1}\n", "");
        std::fs::write(&path, text).unwrap();
        assert!(read(&path).is_err());
    }

    #[test]
    fn a_record_must_be_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::create(dir.path()).unwrap();
        assert!(w.record(b"{\"a\":\n1}").is_err());
        assert!(w.record(b"end 0").is_err());
        drop(w);
        // The unfinished file is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn leftovers_are_removed_and_received_files_with_their_holder() {
        let dir = tempfile::tempdir().unwrap();
        let keep = write(dir.path(), &["{}"]);
        let old = write(dir.path(), &["{}"]);
        let (mut file, path) = SnapshotFile::create_received(dir.path()).unwrap();
        file.write_all(b"partial").unwrap();
        remove_others(dir.path(), keep.file_name().unwrap().to_str(), false).unwrap();
        assert!(keep.exists() && !old.exists() && path.exists(), "a transfer's file is left to its holder");
        let received = SnapshotFile::received(path.clone()).unwrap();
        drop(received);
        assert!(!path.exists());
        SnapshotFile::create_received(dir.path()).unwrap();
        remove_others(dir.path(), keep.file_name().unwrap().to_str(), true).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
