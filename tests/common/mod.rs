//! A test harness: real `tandem` processes on loopback ports chosen at run
//! time, each with its own data directory, killed when the harness drops.

#![allow(dead_code)]

pub mod bank;
pub mod postgres;

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::hash::Hasher;
use std::hash::RandomState;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use tandem::client::Client;
use tandem::proto as pb;
use tandem::txn::TxnRecord;

/// Generous: the machine has two cores and runs three nodes plus the test.
pub const WAIT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Options {
    pub snapshot_logs_since_last: u64,
    pub logs_kept_after_snapshot: u64,
    /// Appended to every node's config (e.g. `[[participants]]`).
    pub extra_config: String,
    /// Recovery rounds rewrite the decision log (they complete ABORTs that
    /// hold no prepared branch); tests of the bare log keep them out.
    pub recovery_interval_ms: u64,
    /// Whether a new leader runs recovery at once (tests of the bare log
    /// keep it out, like the periodic rounds).
    pub recover_on_leadership: bool,
    /// More lines of the `[coordinator]` table.
    pub coordinator_config: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            snapshot_logs_since_last: 10_000,
            logs_kept_after_snapshot: 1_000,
            extra_config: String::new(),
            recovery_interval_ms: 3_600_000,
            recover_on_leadership: false,
            coordinator_config: String::new(),
        }
    }
}

pub struct TestNode {
    pub id: u64,
    pub addr: String,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<TestNode>,
    opts: Options,
}

/// A port to listen on: free when checked, never handed out before in this
/// process, and below the kernel's ephemeral range (32768 and up), from
/// which outgoing connections take their source ports. (Ports from
/// `bind(0)` are ephemeral ones and, once released, may come again: two
/// nodes of one cluster were once given the same port.)
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let random = RandomState::new().build_hasher().finish();
        let port = 10_000 + (random % 22_000) as u16;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
}

impl TestCluster {
    /// Starts `n` nodes and initialises them as one cluster; returns once a
    /// leader is agreed.
    pub async fn start(n: u64, opts: Options) -> Self {
        let cluster = Self::spawn(n, opts);
        let members: Vec<pb::Member> =
            cluster.nodes.iter().map(|n| pb::Member { id: n.id, addr: n.addr.clone() }).collect();
        for node in &cluster.nodes {
            cluster.wait_answering(node.id).await;
        }
        Client::pinned(&cluster.nodes[0].addr).unwrap().init(members).await.expect("cluster init");
        cluster.leader().await;
        cluster
    }

    /// Starts `n` nodes without initialising anything.
    pub fn spawn(n: u64, opts: Options) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cluster = Self { dir, nodes: Vec::new(), opts };
        for _ in 0..n {
            cluster.add_node();
        }
        cluster
    }

    /// Writes a config for one more node and starts it.
    pub fn add_node(&mut self) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let addr = format!("127.0.0.1:{}", free_port());
        let root = self.dir.path();
        let config = root.join(format!("node{id}.toml"));
        let data = self.data_dir(id);
        std::fs::write(
            &config,
            format!(
                "id = {id}\ncluster_id = \"test\"\nlisten = \"{addr}\"\ndata_dir = \"{}\"\n\n[raft]\n\
                 election_timeout_ms_min = 1000\nelection_timeout_ms_max = 2000\nheartbeat_interval_ms = 200\n\
                 snapshot_logs_since_last = {}\nlogs_kept_after_snapshot = {}\n\n\
                 [coordinator]\nrecovery_interval_ms = {}\nrecover_on_leadership = {}\n{}\n\n{}",
                data.display(),
                self.opts.snapshot_logs_since_last,
                self.opts.logs_kept_after_snapshot,
                self.opts.recovery_interval_ms,
                self.opts.recover_on_leadership,
                self.opts.coordinator_config,
                self.opts.extra_config,
            ),
        )
        .unwrap();
        let log = root.join(format!("node{id}.log"));
        self.nodes.push(TestNode { id, addr, config, log, child: None });
        self.start_node(id);
        id
    }

    fn node(&self, id: u64) -> &TestNode {
        &self.nodes[(id - 1) as usize]
    }

    pub fn addr(&self, id: u64) -> String {
        self.node(id).addr.clone()
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    pub fn running(&self) -> Vec<u64> {
        self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.id).collect()
    }

    pub fn start_node(&mut self, id: u64) {
        let node = &mut self.nodes[(id - 1) as usize];
        assert!(node.child.is_none(), "node {id} is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["serve", "--config"])
            .arg(&node.config)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn tandem serve");
        node.child = Some(child);
    }

    /// Node `id`'s process id, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes[(id - 1) as usize].child.as_ref().map(Child::id)
    }

    /// Whether node `id`'s process has exited (it is still counted as
    /// running until [`Self::wait_exit`]).
    pub fn has_exited(&mut self, id: u64) -> bool {
        let node = &mut self.nodes[(id - 1) as usize];
        node.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Waits until node `id` exits by itself (a fail point that aborts it).
    pub async fn wait_exit(&mut self, id: u64) {
        let deadline = Instant::now() + WAIT;
        let node = &mut self.nodes[(id - 1) as usize];
        let child = node.child.as_mut().expect("node is running");
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "node {id} did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        node.child = None;
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) {
        let node = &mut self.nodes[(id - 1) as usize];
        if let Some(mut child) = node.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    pub fn client(&self) -> Client {
        Client::new(self.addrs()).unwrap()
    }

    pub fn pinned(&self, id: u64) -> Client {
        Client::pinned(&self.addr(id)).unwrap()
    }

    pub async fn status(&self, id: u64) -> Option<pb::NodeStatus> {
        let mut c = self.pinned(id);
        tokio::time::timeout(Duration::from_secs(3), c.status()).await.ok()?.ok()
    }

    pub async fn wait_answering(&self, id: u64) {
        let deadline = Instant::now() + WAIT;
        while self.status(id).await.is_none() {
            assert!(Instant::now() < deadline, "node {id} does not answer; log:\n{}", self.log_tail(id));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every running cluster member names the same leader,
    /// which says it leads; returns its id.
    pub async fn leader(&self) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut statuses = Vec::new();
            for id in self.running() {
                let status = self.status(id).await;
                // A node that belongs to no cluster yet has no say.
                if status.as_ref().is_none_or(|s| s.initialized) {
                    statuses.push(status);
                }
            }
            if let Some(Some(first)) = statuses.first()
                && let Some(leader) = first.leader_id
            {
                let agree = statuses.iter().all(|s| s.as_ref().is_some_and(|s| s.leader_id == Some(leader)));
                let leads = statuses.iter().flatten().any(|s| s.id == leader && s.role == pb::Role::Leader as i32);
                if agree && leads {
                    return leader;
                }
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> =
                    self.running().iter().map(|id| format!("node {id}:\n{}", self.log_tail(*id))).collect();
                panic!("no agreed leader among {:?}; logs:\n{}", self.running(), logs.join("\n---\n"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every node in `ids` has applied the leader's whole log.
    pub async fn wait_converged(&self, ids: &[u64]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let leader = self.leader().await;
            let target = self.status(leader).await.and_then(|s| s.last_log_index);
            let mut done = true;
            for id in ids {
                let applied = self.status(*id).await.and_then(|s| s.applied_index);
                done &= applied.is_some() && applied >= target;
            }
            if done {
                return;
            }
            assert!(Instant::now() < deadline, "nodes {ids:?} did not apply up to {target:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every record in node `id`'s own state machine, ordered by txid.
    pub async fn local_records(&self, id: u64) -> Vec<TxnRecord> {
        self.pinned(id).list_all_records(None, true).await.expect("local list")
    }

    /// The last log index in a stopped node's RocksDB, read directly.
    pub async fn last_log_index_on_disk(&self, id: u64) -> u64 {
        use openraft::storage::RaftLogStorage;
        assert!(self.node(id).child.is_none(), "node {id} is running");
        let (mut log, _sm) = tandem::raft::open_store(&self.data_dir(id)).expect("open the stopped node's store");
        let state = log.get_log_state().await.expect("log state");
        state.last_log_id.map_or(0, |l| l.index)
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("data{id}"))
    }

    /// Waits until node `id`'s log has a line containing `needle`.
    pub async fn wait_log(&self, id: u64, needle: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            if std::fs::read_to_string(&self.node(id).log).unwrap_or_default().contains(needle) {
                return;
            }
            assert!(Instant::now() < deadline, "node {id} never logged {needle:?}; log:\n{}", self.log_tail(id));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_tail(&self, id: u64) -> String {
        let text = std::fs::read_to_string(&self.node(id).log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                child.kill().ok();
                child.wait().ok();
            }
        }
        // A failing test keeps its nodes' logs and data for a look.
        if std::thread::panicking() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir")).keep();
            eprintln!("the cluster's logs and data are kept in {}", kept.display());
        }
    }
}
