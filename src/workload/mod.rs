//! Workloads that exercise a cluster, and the checker of what they leave
//! behind: the bank ([`bank`]) and its invariants ([`check`]).
//!
//! `tandem workload bank` moves money between accounts spread over two or
//! more PostgreSQL participants, one Tandem transaction per transfer, and
//! records every request's outcome; each branch also inserts a marker row
//! named after the transfer. `tandem workload check`, run once faults have
//! healed, proves from the databases, the outcomes and the decision logs
//! that every transfer landed everywhere or nowhere and that no
//! acknowledgement was lost (see [`check`] for the invariants).
//! `scripts/chaos.sh` runs both around a schedule of faults.

pub mod bank;
pub mod bench;
pub mod check;
pub mod proxy;

use serde::Deserialize;
use serde::Serialize;

/// What happened to one transfer, as its client saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The transfer's own id: its idempotency key and its marker.
    pub op: String,
    pub from: String,
    pub to: String,
    pub amount: i64,
    /// `committed`, `aborted` or `unknown` (no answer, or an error).
    pub outcome: String,
    #[serde(default)]
    pub txid: String,
    pub start_unix_ms: u64,
    pub end_unix_ms: u64,
    #[serde(default)]
    pub reason: String,
}

/// A small, seeded pseudo-random generator (splitmix64): the same seed
/// gives the same workload.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The file of outcomes in a workload's output directory.
pub const OUTCOMES_FILE: &str = "outcomes.jsonl";
