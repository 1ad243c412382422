//! gids: the names of prepared branches inside participants.
//!
//! A gid is derived from the cluster id, the txid and the branch's position,
//! never from client text:
//!
//! ```text
//! tdm_<cluster_id>_<txid>_<branch>      e.g. tdm_prod_01hx3k9q_1
//! ```
//!
//! Neither the cluster id (`[a-z0-9]`, at most 16) nor the txid (`[a-z0-9]`,
//! at most 48) contains `_`, so a gid parses back unambiguously, and the
//! longest gid (72 bytes) is far below PostgreSQL's 200-byte limit. Recovery
//! finds this cluster's prepared branches by the prefix `tdm_<cluster_id>_`.

use std::fmt;

use super::TxId;
use crate::error::Error;
use crate::error::Result;

/// Every gid starts with this, then the cluster id.
const GID_MAGIC: &str = "tdm";

/// The name of one prepared branch.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gid {
    pub cluster_id: String,
    pub txid: TxId,
    /// The branch's position in the transaction, from 0.
    pub branch: u32,
}

impl Gid {
    pub fn new(cluster_id: &str, txid: &TxId, branch: u32) -> Self {
        Self { cluster_id: cluster_id.to_string(), txid: txid.clone(), branch }
    }

    /// The prefix every gid of `cluster_id` starts with.
    pub fn cluster_prefix(cluster_id: &str) -> String {
        format!("{GID_MAGIC}_{cluster_id}_")
    }

    /// Parses a gid of cluster `cluster_id`; `None` for anything else (another
    /// cluster's branch, or one nobody here made).
    pub fn parse(cluster_id: &str, s: &str) -> Option<Self> {
        let rest = s.strip_prefix(&Self::cluster_prefix(cluster_id))?;
        let (txid, branch) = rest.split_once('_')?;
        if branch.is_empty() || !branch.bytes().all(|b| b.is_ascii_digit()) || branch.len() > 9 {
            return None;
        }
        let gid =
            Self { cluster_id: cluster_id.to_string(), txid: TxId::parse(txid).ok()?, branch: branch.parse().ok()? };
        // Only the canonical spelling ("1", not "01") is ours.
        (gid.to_string() == s).then_some(gid)
    }

    /// Checks the text that will be spliced into `PREPARE TRANSACTION '…'`
    /// and `COMMIT PREPARED '…'`: only `[a-z0-9_]`, so no quoting is needed.
    pub fn validated(&self) -> Result<String> {
        let s = self.to_string();
        if s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') && s.len() < 200 {
            Ok(s)
        } else {
            Err(Error::Internal(format!("gid {s:?} is not of [a-z0-9_]")))
        }
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{GID_MAGIC}_{}_{}_{}", self.cluster_id, self.txid, self.branch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let gid = Gid::new("prod", &TxId::parse("abc123").unwrap(), 7);
        assert_eq!(gid.to_string(), "tdm_prod_abc123_7");
        assert_eq!(Gid::parse("prod", "tdm_prod_abc123_7"), Some(gid.clone()));
        assert_eq!(gid.validated().unwrap(), "tdm_prod_abc123_7");
        assert!(gid.to_string().starts_with(&Gid::cluster_prefix("prod")));
    }

    #[test]
    fn foreign_and_malformed_gids_are_not_ours() {
        for s in [
            "tdm_other_abc_1",
            "tdm_prod_abc",
            "tdm_prod_abc_",
            "tdm_prod_abc_x",
            "tdm_prod_abc_01",
            "tdm_prod_ABC_1",
            "tdm_prod__1",
            "tdm_prod_abc_1_2",
            "tdm_prod_abc_9999999999",
            "someone_elses_gid",
        ] {
            assert_eq!(Gid::parse("prod", s), None, "{s}");
        }
    }

    #[test]
    fn longest_gid_fits_postgres() {
        let gid = Gid::new(&"c".repeat(16), &TxId::parse(&"t".repeat(48)).unwrap(), u32::MAX);
        assert!(gid.validated().unwrap().len() < 200);
    }
}
