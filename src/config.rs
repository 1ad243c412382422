//! Node configuration: a TOML file, overridden by command-line flags and
//! environment variables (flags > env > file > defaults).
//!
//! ```toml
//! id = 1
//! cluster_id = "local"
//! listen = "127.0.0.1:7001"
//! data_dir = "/var/lib/tandem/node1"
//!
//! [raft]
//! election_timeout_ms_min = 1000
//! election_timeout_ms_max = 2000
//!
//! [limits]
//! request_bytes_max = 1048576
//! transactions_in_flight_max = 1024
//! branches_per_transaction_max = 16
//! statements_per_branch_max = 1000
//! result_bytes_max = 4194304
//!
//! [coordinator]
//! timeout_default_ms = 30000
//! timeout_max_ms = 600000
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::Serialize;

use crate::error::Error;
use crate::error::Result;

/// Longest cluster id accepted: it becomes part of every gid.
pub const CLUSTER_ID_LEN_MAX: usize = 16;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's Raft id; unique in the cluster, never reused.
    pub id: u64,
    /// Names the cluster in gids; nodes refuse Raft messages from another
    /// cluster. 1 to 16 of `[a-z0-9]`.
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// Where this node serves gRPC, for clients and peers alike.
    pub listen: SocketAddr,
    /// The address peers and clients use to reach this node; `listen` if unset.
    #[serde(default)]
    pub advertise: Option<String>,
    /// RocksDB lives here.
    pub data_dir: PathBuf,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub retention: Retention,
    #[serde(default)]
    pub coordinator: CoordinatorConfig,
    /// The participants, by name; every node loads the same list.
    #[serde(default)]
    pub participants: Vec<ParticipantConfig>,
    /// A TOML file with more `[[participants]]`, read at start-up; relative
    /// to the config file's directory.
    #[serde(default)]
    pub participants_file: Option<PathBuf>,
}

/// One participant:
///
/// ```toml
/// [[participants]]
/// name = "accounts_a"
/// kind = "postgres"
/// url = "postgres://postgres@127.0.0.1:55432/accounts"
/// pool_size = 16
///
/// [[participants]]
/// name = "inventory"
/// kind = "remote"   # a service speaking tandem.v1.Participant
/// url = "http://10.0.0.7:7400"
/// ```
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ParticipantConfig {
    pub name: String,
    pub kind: ParticipantKind,
    pub url: String,
    /// Connections the leader keeps to this participant for branches (and
    /// for phase 2 when one is free), at most; a PostgreSQL participant
    /// keeps up to half as many more (at least 2, at most 128) for phase 2
    /// when none is free, recovery and checks.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ParticipantKind {
    Postgres,
    /// A service that implements `tandem.v1.Participant` (participant.proto)
    /// and enlists its own branches; `url` is its endpoint.
    Remote,
}

fn default_pool_size() -> usize {
    16
}

/// The shortest retention of completed records, whatever the longest
/// transaction timeout.
pub const COMPLETED_RETENTION_S_MIN: u64 = 60;
/// How much longer than the longest transaction timeout completed records
/// must be kept: a driver may still propose its decision that long after
/// the deadline (`PROPOSE_ATTEMPTS` × `PROPOSE_TIMEOUT` and back-off, about
/// 45 s, in `coordinator::driver`), plus room for clock skew.
pub const RETENTION_PAST_TIMEOUT_S: u64 = 120;

/// Most connections one participant's pool may hold.
pub const POOL_SIZE_MAX: usize = 1024;

/// The shape of a separate participants file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParticipantsFile {
    #[serde(default)]
    participants: Vec<ParticipantConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// A follower that hears no leader for a random time in this range starts
    /// an election. On small machines keep it at a second or more: a busy CPU
    /// must not look like a dead leader.
    pub election_timeout_ms_min: u64,
    pub election_timeout_ms_max: u64,
    pub heartbeat_interval_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Log entries kept behind a snapshot (so a briefly absent follower can
    /// catch up from the log rather than from a snapshot).
    pub logs_kept_after_snapshot: u64,
    /// Most entries sent in one append request.
    pub append_entries_max: u64,
    /// Deadline of one node-to-node RPC.
    pub rpc_timeout_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            election_timeout_ms_min: 1000,
            election_timeout_ms_max: 2000,
            heartbeat_interval_ms: 250,
            snapshot_logs_since_last: 10_000,
            logs_kept_after_snapshot: 1_000,
            append_entries_max: 1_000,
            rpc_timeout_ms: 2_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest client request accepted, in bytes (encoded protobuf).
    pub request_bytes_max: usize,
    /// Largest page of a list request.
    pub list_page_max: u32,
    /// Most transactions the leader runs at once (open interactive ones
    /// included); past it, new ones get RESOURCE_EXHAUSTED.
    pub transactions_in_flight_max: usize,
    /// Most branches (participants) in one transaction, at most 64.
    pub branches_per_transaction_max: usize,
    /// Most statements one branch may run.
    pub statements_per_branch_max: usize,
    /// Largest answer of returned rows: a one-shot transaction's results in
    /// all, or one interactive statement's. Past it the transaction is
    /// rolled back (at most 32 MiB).
    pub result_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_bytes_max: 1 << 20,
            list_page_max: 1000,
            transactions_in_flight_max: 1024,
            branches_per_transaction_max: 16,
            statements_per_branch_max: 1000,
            result_bytes_max: 4 << 20,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Completed records (and their idempotency keys) are kept this long.
    pub completed_retention_s: u64,
    /// How often the leader proposes `Forget` for records past retention.
    pub forget_interval_s: u64,
    /// Most records one `Forget` entry drops (about: records completed in
    /// the same millisecond go together). The leader forgets in rounds of
    /// this many: applying a `Forget` holds up the entries after it.
    pub forget_round_max: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self { completed_retention_s: 24 * 3600, forget_interval_s: 60, forget_round_max: 2_000 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// How often the leader reconciles prepared branches and re-drives
    /// decided, incomplete transactions.
    pub recovery_interval_ms: u64,
    /// Also run a round at once on becoming leader.
    pub recover_on_leadership: bool,
    /// A transaction's deadline when the request names none, and the
    /// longest one a request may name. An interactive transaction still
    /// open at its deadline is rolled back.
    pub timeout_default_ms: u64,
    pub timeout_max_ms: u64,
    /// Phase-2 retries back off exponentially from the first delay up to the
    /// cap, and never give up.
    pub retry_first_ms: u64,
    pub retry_max_ms: u64,
    /// How long a remote participant may take to answer PREPARE, retries
    /// included; past it the transaction aborts, naming the participant.
    pub remote_prepare_timeout_ms: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            recovery_interval_ms: 5_000,
            recover_on_leadership: true,
            timeout_default_ms: 30_000,
            timeout_max_ms: 600_000,
            retry_first_ms: 100,
            retry_max_ms: 10_000,
            remote_prepare_timeout_ms: 10_000,
        }
    }
}

/// The `[[participants]]` of a TOML file.
pub fn load_participants_file(path: &Path) -> Result<Vec<ParticipantConfig>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::InvalidInput(format!("cannot read participants file {}: {e}", path.display())))?;
    let file: ParticipantsFile =
        toml::from_str(&text).map_err(|e| Error::InvalidInput(format!("participants file {}: {e}", path.display())))?;
    Ok(file.participants)
}

fn default_cluster_id() -> String {
    "tandem".to_string()
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::InvalidInput(format!("cannot read config {}: {e}", path.display())))?;
        let mut config: NodeConfig =
            toml::from_str(&text).map_err(|e| Error::InvalidInput(format!("config {}: {e}", path.display())))?;
        if let Some(file) = config.participants_file.clone() {
            let file = path.parent().map_or(file.clone(), |dir| dir.join(&file));
            config.add_participants_file(&file)?;
        }
        Ok(config)
    }

    /// Adds the participants listed in `path` (a `[[participants]]` file).
    pub fn add_participants_file(&mut self, path: &Path) -> Result<()> {
        self.participants.extend(load_participants_file(path)?);
        Ok(())
    }

    /// The address other nodes and clients use for this node.
    pub fn advertise_addr(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    pub fn validate(&self) -> Result<()> {
        let invalid = |m: String| Err(Error::InvalidInput(m));
        if self.id == 0 {
            return invalid("id must be at least 1".into());
        }
        let c = &self.cluster_id;
        if c.is_empty()
            || c.len() > CLUSTER_ID_LEN_MAX
            || !c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return invalid(format!("cluster_id {c:?} must be 1 to {CLUSTER_ID_LEN_MAX} characters of [a-z0-9]"));
        }
        let r = &self.raft;
        if r.election_timeout_ms_min == 0 || r.election_timeout_ms_min >= r.election_timeout_ms_max {
            return invalid(format!(
                "raft.election_timeout_ms_min ({}) must be above 0 and below raft.election_timeout_ms_max ({})",
                r.election_timeout_ms_min, r.election_timeout_ms_max
            ));
        }
        if r.heartbeat_interval_ms == 0 || r.heartbeat_interval_ms * 2 > r.election_timeout_ms_min {
            return invalid(format!(
                "raft.heartbeat_interval_ms ({}) must be above 0 and at most half of raft.election_timeout_ms_min ({})",
                r.heartbeat_interval_ms, r.election_timeout_ms_min
            ));
        }
        if r.snapshot_logs_since_last == 0 || r.append_entries_max == 0 || r.rpc_timeout_ms == 0 {
            return invalid(
                "raft.snapshot_logs_since_last, raft.append_entries_max and raft.rpc_timeout_ms must be above 0".into(),
            );
        }
        if self.limits.request_bytes_max < 1024 {
            return invalid("limits.request_bytes_max must be at least 1024".into());
        }
        if self.limits.list_page_max == 0 {
            return invalid("limits.list_page_max must be above 0".into());
        }
        if self.limits.transactions_in_flight_max == 0 || self.limits.statements_per_branch_max == 0 {
            return invalid(
                "limits.transactions_in_flight_max and limits.statements_per_branch_max must be above 0".into(),
            );
        }
        if self.limits.result_bytes_max == 0 || self.limits.result_bytes_max > crate::server::RESPONSE_BYTES_MAX / 2 {
            return invalid(format!(
                "limits.result_bytes_max must be above 0 and at most {}",
                crate::server::RESPONSE_BYTES_MAX / 2
            ));
        }
        let b = self.limits.branches_per_transaction_max;
        if b == 0 || b > crate::txn::BRANCHES_MAX {
            return invalid(format!(
                "limits.branches_per_transaction_max must be 1 to {}, not {b}",
                crate::txn::BRANCHES_MAX
            ));
        }
        let c = &self.coordinator;
        if c.recovery_interval_ms == 0 {
            return invalid("coordinator.recovery_interval_ms must be above 0".into());
        }
        if c.timeout_default_ms == 0 || c.timeout_default_ms > c.timeout_max_ms {
            return invalid(format!(
                "coordinator.timeout_default_ms ({}) must be above 0 and at most coordinator.timeout_max_ms ({})",
                c.timeout_default_ms, c.timeout_max_ms
            ));
        }
        if c.retry_first_ms == 0 || c.retry_first_ms > c.retry_max_ms {
            return invalid("coordinator.retry_first_ms must be above 0 and at most coordinator.retry_max_ms".into());
        }
        if self.retention.forget_interval_s == 0 {
            return invalid("retention.forget_interval_s must be above 0".into());
        }
        if self.retention.forget_round_max == 0 {
            return invalid("retention.forget_round_max must be above 0".into());
        }
        // A record must outlive any driver still working on its transaction
        // (a deposed leader's, up to the longest transaction timeout), or a
        // late COMMIT could find no record and win.
        // The longest timeout, then the driver's retries of its proposal
        // (about 45 s) and room for clock skew.
        let retention_min = COMPLETED_RETENTION_S_MIN.max(c.timeout_max_ms.div_ceil(1000) + RETENTION_PAST_TIMEOUT_S);
        if self.retention.completed_retention_s < retention_min {
            return invalid(format!(
                "retention.completed_retention_s must be at least {retention_min}: coordinator.timeout_max_ms plus {RETENTION_PAST_TIMEOUT_S} s"
            ));
        }
        if self.coordinator.remote_prepare_timeout_ms == 0 {
            return invalid("coordinator.remote_prepare_timeout_ms must be above 0".to_string());
        }
        let mut names = std::collections::BTreeSet::new();
        for p in &self.participants {
            crate::txn::validate_participant_name(&p.name)?;
            if !names.insert(p.name.as_str()) {
                return invalid(format!("participant {:?} is configured twice", p.name));
            }
            if p.url.is_empty() {
                return invalid(format!("participant {:?} has no url", p.name));
            }
            if p.kind == ParticipantKind::Remote {
                crate::txn::validate_endpoint(&p.url)
                    .map_err(|e| Error::InvalidInput(format!("participant {:?}: {e}", p.name)))?;
            }
            if p.pool_size == 0 || p.pool_size > POOL_SIZE_MAX {
                return invalid(format!("participant {:?}: pool_size must be 1 to {POOL_SIZE_MAX}", p.name));
            }
        }
        Ok(())
    }

    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.raft.rpc_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig> {
        let c: NodeConfig = toml::from_str(text).map_err(|e| Error::InvalidInput(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let c = parse("id = 1\nlisten = \"127.0.0.1:7001\"\ndata_dir = \"/tmp/x\"\n").unwrap();
        assert_eq!(c.cluster_id, "tandem");
        assert_eq!(c.raft.election_timeout_ms_min, 1000);
        assert_eq!(c.advertise_addr(), "127.0.0.1:7001");
    }

    #[test]
    fn participants_parse_and_validate() {
        let base = "id = 1\nlisten = \"127.0.0.1:7001\"\ndata_dir = \"/tmp/x\"\n";
        let c = parse(&format!(
            "{base}[[participants]]\nname = \"accounts_a\"\nkind = \"postgres\"\nurl = \"postgres://h/a\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.participants,
            vec![ParticipantConfig {
                name: "accounts_a".into(),
                kind: ParticipantKind::Postgres,
                url: "postgres://h/a".into(),
                pool_size: 16
            }]
        );
        let p = |name: &str, kind: &str, pool: usize| {
            format!("[[participants]]\nname = \"{name}\"\nkind = \"{kind}\"\nurl = \"u\"\npool_size = {pool}\n")
        };
        assert!(parse(&format!("{base}{}{}", p("a", "postgres", 1), p("a", "postgres", 1))).is_err());
        assert!(parse(&format!("{base}{}", p("a b", "postgres", 1))).is_err());
        assert!(parse(&format!("{base}{}", p("a", "mongodb", 1))).is_err());
        assert!(parse(&format!("{base}{}", p("a", "postgres", 0))).is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        let base = "listen = \"127.0.0.1:7001\"\ndata_dir = \"/tmp/x\"\n";
        assert!(parse(&format!("id = 0\n{base}")).is_err());
        assert!(parse(&format!("id = 1\ncluster_id = \"Bad\"\n{base}")).is_err());
        assert!(parse(&format!("id = 1\nunknown = 3\n{base}")).is_err());
        assert!(
            parse(&format!("id = 1\n{base}[raft]\nelection_timeout_ms_min = 2000\nelection_timeout_ms_max = 1000\n"))
                .is_err()
        );
    }

    #[test]
    fn retention_outlasts_the_longest_timeout() {
        let base = "id = 1\nlisten = \"127.0.0.1:7001\"\ndata_dir = \"/tmp/x\"\n";
        let with = |retention: u64| {
            parse(&format!(
                "{base}[coordinator]\ntimeout_max_ms = 60000\ntimeout_default_ms = 30000\n\
                 [retention]\ncompleted_retention_s = {retention}\n"
            ))
        };
        assert!(with(180).is_ok());
        let e = with(179).unwrap_err();
        assert!(e.to_string().contains("at least 180"), "{e}");
        // The defaults: a 10-minute timeout, a day's retention.
        assert!(parse(base).is_ok());
    }
}
