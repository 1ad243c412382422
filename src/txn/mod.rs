//! The transaction model: txids, decisions and the records the decision log
//! keeps.
//!
//! Plain data, no I/O. The replicated state machine (`crate::raft`) stores
//! these records; the 2PC driver (`crate::coordinator`) moves transactions
//! through their states.
//!
//! A record exists once a decision is recorded. Its life:
//!
//! ```text
//!   (no record) --Decide(commit)--> Committed --Complete--> Completed --Forget--> (gone)
//!   (no record) --Decide(abort)---> Aborted   --Complete--> Completed --Forget--> (gone)
//! ```
//!
//! With no record a transaction is presumed aborted: whoever wants to act on
//! "no decision" first records an ABORT, and the compare-and-set tells it
//! what really holds.

pub mod gid;
pub mod machine;

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::Serialize;

use crate::error::Error;
use crate::error::Result;

/// Longest txid accepted, in bytes.
pub const TXID_LEN_MAX: usize = 48;
/// Longest idempotency key accepted, in bytes.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 128;
/// Longest abort reason kept, in bytes.
pub const ABORT_REASON_LEN_MAX: usize = 1024;
/// Longest participant name accepted, in bytes.
pub const PARTICIPANT_NAME_LEN_MAX: usize = 64;
/// Most branches one decision may name.
pub const BRANCHES_MAX: usize = 64;

/// A global transaction id: 1 to 48 characters of `[a-z0-9]`.
///
/// The alphabet is narrow on purpose: gids (the names of prepared branches
/// inside participants) are derived from it, and must stay within
/// `[a-z0-9_]` and far below PostgreSQL's 200-byte limit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TxId(String);

impl TxId {
    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::InvalidInput("txid is empty".into()));
        }
        if s.len() > TXID_LEN_MAX {
            return Err(Error::InvalidInput(format!("txid is {} bytes, longer than {TXID_LEN_MAX}", s.len())));
        }
        if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
            return Err(Error::InvalidInput(format!("txid {s:?} has characters outside [a-z0-9]")));
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TxId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<TxId> for String {
    fn from(t: TxId) -> String {
        t.0
    }
}

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Most labels one transaction may carry, and their longest key and value.
pub const LABELS_MAX: usize = 16;
pub const LABEL_KEY_LEN_MAX: usize = 64;
pub const LABEL_VALUE_LEN_MAX: usize = 256;

/// One participant's share of a global transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    /// The participant's configured name.
    pub participant: String,
    /// The participant's own id of the branch's prepared transaction (a
    /// PostgreSQL xid), when it has one. If the branch's gid vanishes before
    /// phase 2 reaches it, this tells how the branch really ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xid: Option<u64>,
    /// A remote participant's branch (`participant.proto`): where it is
    /// reached and the name it was enlisted under. A new leader drives phase
    /// 2 from this alone, whatever its configuration says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteBranch>,
}

impl Branch {
    pub fn new(participant: impl Into<String>) -> Self {
        Self { participant: participant.into(), xid: None, remote: None }
    }
}

/// Longest remote participant endpoint accepted, in bytes.
pub const ENDPOINT_LEN_MAX: usize = 256;

/// Where a remote branch lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteBranch {
    /// `http://host:port` (or `https://`) of the service's
    /// `tandem.v1.Participant`.
    pub endpoint: String,
    /// The branch's name within the transaction (`BranchRef.branch`).
    pub branch: String,
}

impl RemoteBranch {
    pub fn validate(&self) -> Result<()> {
        validate_endpoint(&self.endpoint)?;
        validate_branch_name(&self.branch)
    }
}

/// A remote participant's endpoint: `http://` or `https://`, a host, and
/// at most [`ENDPOINT_LEN_MAX`] bytes.
pub fn validate_endpoint(endpoint: &str) -> Result<()> {
    if endpoint.len() > ENDPOINT_LEN_MAX {
        return Err(Error::InvalidInput(format!(
            "endpoint is {} bytes, longer than {ENDPOINT_LEN_MAX}",
            endpoint.len()
        )));
    }
    let uri: tonic::transport::Uri =
        endpoint.parse().map_err(|e| Error::InvalidInput(format!("endpoint {endpoint:?} is not a URI: {e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none_or(str::is_empty) {
        return Err(Error::InvalidInput(format!(
            "endpoint {endpoint:?} must look like http://host:port or https://host:port"
        )));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(Error::InvalidInput(format!("endpoint {endpoint:?} must have no path")));
    }
    Ok(())
}

/// A remote branch's name: 1 to 64 characters of `[a-z0-9_-]`.
pub fn validate_branch_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > PARTICIPANT_NAME_LEN_MAX {
        return Err(Error::InvalidInput(format!("branch name {name:?} must be 1 to {PARTICIPANT_NAME_LEN_MAX} bytes")));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-') {
        return Err(Error::InvalidInput(format!("branch name {name:?} has characters outside [a-z0-9_-]")));
    }
    Ok(())
}

/// What a decision record keeps about its transaction besides the decision:
/// shown by `GetTransaction`, never part of the compare-and-set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnInfo {
    /// When the coordinator began the transaction (Unix milliseconds).
    #[serde(default)]
    pub started_unix_ms: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl TxnInfo {
    pub fn validate(&self) -> Result<()> {
        validate_labels(&self.labels)
    }
}

/// Labels: at most [`LABELS_MAX`], keys 1 to 64 bytes, values up to 256.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > LABELS_MAX {
        return Err(Error::InvalidInput(format!("{} labels, over the limit of {LABELS_MAX}", labels.len())));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > LABEL_KEY_LEN_MAX {
            return Err(Error::InvalidInput(format!("label key {k:?} must be 1 to {LABEL_KEY_LEN_MAX} bytes")));
        }
        if v.len() > LABEL_VALUE_LEN_MAX {
            return Err(Error::InvalidInput(format!("label {k:?} is longer than {LABEL_VALUE_LEN_MAX} bytes")));
        }
    }
    Ok(())
}

/// A branch that ended against its transaction's decision, by a hand other
/// than the coordinator's (an operator's ROLLBACK PREPARED, say).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeuristicBranch {
    pub branch: u32,
    /// How it really ended.
    pub committed: bool,
}

/// The outcome of a transaction, written once to the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Commit {
        branches: Vec<Branch>,
        /// While the record lives, no other txid may commit with this key.
        idempotency_key: Option<String>,
    },
    Abort {
        reason: String,
    },
}

impl Decision {
    pub fn is_commit(&self) -> bool {
        matches!(self, Decision::Commit { .. })
    }

    /// Whether two decisions decide the same thing: any two ABORTs (whatever
    /// their reasons), or COMMITs of the same participants with the same
    /// idempotency key (whatever xids they carry, which only help recovery).
    pub fn same_as(&self, other: &Decision) -> bool {
        match (self, other) {
            (Decision::Abort { .. }, Decision::Abort { .. }) => true,
            (
                Decision::Commit { branches: a, idempotency_key: ka },
                Decision::Commit { branches: b, idempotency_key: kb },
            ) => ka == kb && a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.participant == y.participant),
            _ => false,
        }
    }

    /// Checks the limits and formats a decision must respect before it is
    /// proposed. Apply relies on it: it never sees an invalid decision from a
    /// well-behaved leader, and refuses one from any other.
    pub fn validate(&self) -> Result<()> {
        match self {
            Decision::Commit { branches, idempotency_key } => {
                if branches.is_empty() {
                    return Err(Error::InvalidInput("a COMMIT decision names no branch".into()));
                }
                if branches.len() > BRANCHES_MAX {
                    return Err(Error::InvalidInput(format!(
                        "a COMMIT decision names {} branches, over the limit of {BRANCHES_MAX}",
                        branches.len()
                    )));
                }
                for branch in branches {
                    validate_participant_name(&branch.participant)?;
                    if let Some(remote) = &branch.remote {
                        remote.validate()?;
                    }
                }
                if let Some(key) = idempotency_key {
                    validate_idempotency_key(key)?;
                }
                Ok(())
            }
            Decision::Abort { reason } => {
                if reason.len() > ABORT_REASON_LEN_MAX {
                    return Err(Error::InvalidInput(format!(
                        "abort reason is {} bytes, longer than {ABORT_REASON_LEN_MAX}",
                        reason.len()
                    )));
                }
                Ok(())
            }
        }
    }
}

/// `reason` cut to [`ABORT_REASON_LEN_MAX`] bytes (at a character
/// boundary), fit for an ABORT decision.
pub fn abort_reason(reason: impl Into<String>) -> String {
    let mut reason = reason.into();
    if reason.len() > ABORT_REASON_LEN_MAX {
        let mut end = ABORT_REASON_LEN_MAX - 3;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push_str("...");
    }
    reason
}

/// An idempotency key: 1 to 128 bytes.
pub fn validate_idempotency_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidInput("idempotency key is empty".into()));
    }
    if key.len() > IDEMPOTENCY_KEY_LEN_MAX {
        return Err(Error::InvalidInput(format!(
            "idempotency key is {} bytes, longer than {IDEMPOTENCY_KEY_LEN_MAX}",
            key.len()
        )));
    }
    Ok(())
}

/// A participant name: 1 to 64 characters of `[A-Za-z0-9_-]`.
pub fn validate_participant_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > PARTICIPANT_NAME_LEN_MAX {
        return Err(Error::InvalidInput(format!(
            "participant name {name:?} must be 1 to {PARTICIPANT_NAME_LEN_MAX} bytes"
        )));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(Error::InvalidInput(format!("participant name {name:?} has characters outside [A-Za-z0-9_-]")));
    }
    Ok(())
}

/// Where a recorded transaction stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordState {
    /// COMMIT decided; phase 2 not yet complete.
    Committed,
    /// ABORT decided; phase 2 not yet complete.
    Aborted,
    /// Phase 2 complete on every branch.
    Completed,
}

impl RecordState {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "committed" => Ok(Self::Committed),
            "aborted" => Ok(Self::Aborted),
            "completed" => Ok(Self::Completed),
            _ => Err(Error::InvalidInput(format!("unknown record state {s:?} (committed, aborted or completed)"))),
        }
    }
}

impl fmt::Display for RecordState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Committed => "committed",
            Self::Aborted => "aborted",
            Self::Completed => "completed",
        })
    }
}

/// What the decision log holds for one transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRecord {
    pub txid: TxId,
    pub decision: Decision,
    /// Unix milliseconds, stamped by the leader that proposed the decision.
    pub decided_unix_ms: u64,
    /// Unix milliseconds, stamped by the leader that proposed `Complete`.
    pub completed_unix_ms: Option<u64>,
    /// Raft log index of the entry that recorded the decision.
    pub decided_log_index: u64,
    #[serde(default)]
    pub info: TxnInfo,
    /// Branches found, when phase 2 reached them, to have ended against the
    /// decision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heuristic: Vec<HeuristicBranch>,
}

impl TxnRecord {
    pub fn state(&self) -> RecordState {
        match (&self.decision, self.completed_unix_ms) {
            (_, Some(_)) => RecordState::Completed,
            (Decision::Commit { .. }, None) => RecordState::Committed,
            (Decision::Abort { .. }, None) => RecordState::Aborted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txid_alphabet_and_length() {
        assert!(TxId::parse("t1").is_ok());
        assert!(TxId::parse(&"a".repeat(TXID_LEN_MAX)).is_ok());
        assert!(TxId::parse("").is_err());
        assert!(TxId::parse(&"a".repeat(TXID_LEN_MAX + 1)).is_err());
        assert!(TxId::parse("T1").is_err());
        assert!(TxId::parse("t_1").is_err());
        assert!(TxId::parse("t'1").is_err());
    }

    #[test]
    fn remote_branch_endpoint_and_name() {
        let remote = |endpoint: &str, branch: &str| RemoteBranch { endpoint: endpoint.into(), branch: branch.into() };
        assert!(remote("http://127.0.0.1:7400", "stock").validate().is_ok());
        assert!(remote("https://inventory.internal:443", "stock_1-a").validate().is_ok());
        for bad in ["", "127.0.0.1:7400", "ftp://h:1", "http://", "http://h:1/path", "not a uri"] {
            assert!(remote(bad, "stock").validate().is_err(), "{bad:?}");
        }
        assert!(remote(&format!("http://{}:1", "h".repeat(ENDPOINT_LEN_MAX)), "s").validate().is_err());
        for bad in ["", "Stock", "a b", "a/b", &"b".repeat(PARTICIPANT_NAME_LEN_MAX + 1)] {
            assert!(remote("http://h:1", bad).validate().is_err(), "{bad:?}");
        }
        // A record written before remote branches existed still reads.
        let old: Branch = serde_json::from_str(r#"{"participant":"a","xid":7}"#).unwrap();
        assert_eq!(old, Branch { participant: "a".into(), xid: Some(7), remote: None });
        let commit = Decision::Commit {
            branches: vec![Branch { remote: Some(remote("nope", "s")), ..Branch::new("s") }],
            idempotency_key: None,
        };
        assert!(commit.validate().is_err(), "a decision with a bad endpoint is refused");
    }

    #[test]
    fn txid_deserialization_validates() {
        assert!(serde_json::from_str::<TxId>("\"ok1\"").is_ok());
        assert!(serde_json::from_str::<TxId>("\"Bad!\"").is_err());
    }

    #[test]
    fn decision_limits() {
        let commit = |n: usize, key: Option<&str>| Decision::Commit {
            branches: (0..n).map(|i| Branch::new(format!("p{i}"))).collect(),
            idempotency_key: key.map(str::to_string),
        };
        assert!(commit(2, Some("k")).validate().is_ok());
        assert!(commit(0, None).validate().is_err());
        assert!(commit(BRANCHES_MAX + 1, None).validate().is_err());
        assert!(commit(1, Some("")).validate().is_err());
        assert!(commit(1, Some(&"k".repeat(IDEMPOTENCY_KEY_LEN_MAX + 1))).validate().is_err());
        let bad_name = Decision::Commit { branches: vec![Branch::new("a b")], idempotency_key: None };
        assert!(bad_name.validate().is_err());
        let long_reason = Decision::Abort { reason: "r".repeat(ABORT_REASON_LEN_MAX + 1) };
        assert!(long_reason.validate().is_err());
        let cut = abort_reason("é".repeat(ABORT_REASON_LEN_MAX));
        assert!(cut.len() <= ABORT_REASON_LEN_MAX && cut.ends_with("..."));
        assert!(Decision::Abort { reason: cut }.validate().is_ok());
    }
}
