//! COMPLETE records, batched off the transactions' critical path.
//!
//! A driver whose branches are all settled hands its txid here and is done.
//! One task gathers completions for [`GATHER`] from the first, then
//! proposes them as one [`Op::CompleteBatch`] entry, so that many
//! transactions share one entry (and one fsync on every node), at low load
//! too: a Raft entry costs each node far more than the wait costs anyone,
//! as no caller waits for its COMPLETE. A completion that cannot be
//! recorded (no longer leader, say) is not lost: the record stays
//! incomplete and recovery completes it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Metrics;
use crate::raft::COMPLETE_BATCH_MAX;
use crate::raft::CommandResponse;
use crate::raft::Completion;
use crate::raft::Op;
use crate::server::Node;

/// Where drivers send their completions.
#[derive(Clone)]
pub struct Completer {
    tx: mpsc::UnboundedSender<Completion>,
}

impl Completer {
    /// Starts the batching task; it ends when every sender is dropped.
    pub fn start(node: Arc<Node>, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(node, metrics, rx));
        Self { tx }
    }

    pub fn complete(&self, completion: Completion) {
        // Only fails when the node is shutting down; recovery completes the
        // record on the next leader.
        self.tx.send(completion).ok();
    }
}

/// How long completions gather for one entry, from the first.
pub const GATHER: Duration = Duration::from_millis(10);

async fn run(node: Arc<Node>, metrics: Arc<Metrics>, mut rx: mpsc::UnboundedReceiver<Completion>) {
    // Bounded by the transactions in flight: each sends one completion.
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        let until = tokio::time::Instant::now() + GATHER;
        while items.len() < COMPLETE_BATCH_MAX {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(c)) => items.push(c),
                Ok(None) | Err(_) => break,
            }
        }
        let n = items.len() as u64;
        match node.propose(Op::CompleteBatch { items }).await {
            Ok(CommandResponse::CompletedBatch { .. }) => {
                Metrics::add(&metrics.completions, n);
                Metrics::add(&metrics.completion_entries, 1);
            }
            Ok(other) => tracing::warn!(?other, "unexpected answer to COMPLETE"),
            Err(e) => tracing::warn!(count = n, error = %e, "recording COMPLETE failed; recovery will complete them"),
        }
    }
}
