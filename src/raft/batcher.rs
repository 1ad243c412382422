//! The decision batcher: concurrent decisions share one Raft entry.
//!
//! Every decision a node proposes goes through one queue. A batch takes
//! what is waiting there (up to [`DECIDE_BATCH_MAX`]) and goes to Raft as one
//! [`Op::DecideBatch`] entry; at most [`BATCHES_IN_FLIGHT`] batches are in
//! Raft at once, so under load the next batch gathers the decisions that
//! arrive while the earlier ones replicate. With no load (nothing queued, a
//! batch slot free) a decision goes out alone and at once, as a plain
//! [`Op::Decide`], without passing through the batching task: batching adds
//! no wait.
//!
//! A batch applies its decisions in order, each exactly as its own entry
//! would (a compare-and-set; a later decision for the same txid sees the
//! earlier), so the batch boundaries change nothing but the entry count.
//! A decision whose caller has given up before its batch leaves is dropped:
//! the caller learns nothing of it either way and may propose it again.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use openraft::errors::ClientWriteError;
use openraft::errors::RaftError;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use super::Command;
use super::CommandResponse;
use super::DecideItem;
use super::Op;
use super::Raft;
use super::TypeConfig;

/// Most decisions in one entry.
pub const DECIDE_BATCH_MAX: usize = 256;
/// Most bytes of decisions (as JSON) in one entry, past the first: a
/// follower catching up takes up to `raft.append_entries_max` entries in one
/// message, which must stay under the message limit.
pub const DECIDE_BATCH_BYTES: usize = 32 << 10;
/// Batches proposed and not yet applied, at most.
pub const BATCHES_IN_FLIGHT: usize = 2;
/// Decisions waiting for a batch, at most; a caller beyond waits to queue.
const QUEUE_MAX: usize = 8192;

pub type WriteError = RaftError<TypeConfig, ClientWriteError<TypeConfig>>;

struct Pending {
    item: DecideItem,
    /// The item's size as JSON.
    bytes: usize,
    answer: oneshot::Sender<Result<CommandResponse, WriteError>>,
}

/// Where a node's decisions queue for Raft.
pub struct Batcher {
    queue: mpsc::Sender<Pending>,
    /// Room for batches in Raft: [`BATCHES_IN_FLIGHT`] permits.
    slots: Arc<Semaphore>,
    raft: Raft,
    now_unix_ms: fn() -> u64,
    stats: Arc<BatchStats>,
}

/// How well decisions share entries: decisions and entries applied.
#[derive(Default)]
pub struct BatchStats {
    decisions: AtomicU64,
    entries: AtomicU64,
}

impl BatchStats {
    /// Every counter by name, as `tandem cluster status` shows them.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("decisions_proposed", self.decisions.load(Ordering::Relaxed)),
            ("decision_entries", self.entries.load(Ordering::Relaxed)),
        ]
    }
}

impl Batcher {
    /// Starts the batching task; it ends with the batcher.
    pub fn start(raft: Raft, now_unix_ms: fn() -> u64) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE_MAX);
        let stats = Arc::new(BatchStats::default());
        let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        tokio::spawn(run(raft.clone(), now_unix_ms, rx, slots.clone(), stats.clone()));
        Self { queue, slots, raft, now_unix_ms, stats }
    }

    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Proposes the decision and returns what applying it answered.
    pub async fn decide(&self, item: DecideItem) -> Result<CommandResponse, WriteError> {
        let (answer, rx) = oneshot::channel();
        let gone = || RaftError::Fatal(openraft::errors::Fatal::Stopped);
        // Nothing waiting and room in Raft: the decision goes alone, from
        // here, without the hand-offs to the batching task and back.
        // Its own task holds the slot until Raft answers, even if this
        // caller gives up first, as a batch's does.
        if self.queue.capacity() == QUEUE_MAX
            && let Ok(slot) = self.slots.clone().try_acquire_owned()
        {
            spawn_propose(
                &self.raft,
                (self.now_unix_ms)(),
                vec![Pending { item, bytes: 0, answer }],
                &self.stats,
                slot,
            );
            return rx.await.map_err(|_| gone())?;
        }
        let bytes = serde_json::to_vec(&item).map_or(DECIDE_BATCH_BYTES, |v| v.len());
        self.queue.send(Pending { item, bytes, answer }).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

async fn run(
    raft: Raft,
    now_unix_ms: fn() -> u64,
    mut rx: mpsc::Receiver<Pending>,
    slots: Arc<Semaphore>,
    stats: Arc<BatchStats>,
) {
    while let Some(first) = rx.recv().await {
        // A slot first: while every slot is busy, decisions gather in the
        // queue for the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        // What waits, up to the limits (the last one taken may pass the
        // byte limit by its own size).
        while batch.len() < DECIDE_BATCH_MAX && bytes < DECIDE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.bytes;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        spawn_propose(&raft, now_unix_ms(), batch, &stats, slot);
    }
}

/// Proposes `batch` on a task of its own, which holds `slot` until Raft
/// answers, whether or not the callers are still waiting.
fn spawn_propose(raft: &Raft, now: u64, batch: Vec<Pending>, stats: &Arc<BatchStats>, slot: OwnedSemaphorePermit) {
    let (raft, stats) = (raft.clone(), stats.clone());
    tokio::spawn(async move {
        propose(&raft, now, batch, &stats).await;
        drop(slot);
    });
}

async fn propose(raft: &Raft, now: u64, mut batch: Vec<Pending>, stats: &BatchStats) {
    batch.retain(|p| !p.answer.is_closed());
    let op = match batch.len() {
        0 => return,
        1 => {
            let DecideItem { txid, decision, info } = batch[0].item.clone();
            Op::Decide { txid, decision, info }
        }
        _ => Op::DecideBatch { items: batch.iter().map(|p| p.item.clone()).collect() },
    };
    let result = raft.client_write(Command::new(now, op)).await.map(|r| r.data);
    if result.is_ok() {
        stats.decisions.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.entries.fetch_add(1, Ordering::Relaxed);
    }
    match result {
        Ok(CommandResponse::DecidedBatch { responses }) if responses.len() == batch.len() => {
            for (p, response) in batch.into_iter().zip(responses) {
                p.answer.send(Ok(response)).ok();
            }
        }
        // One decision's answer, or a refusal of the whole entry.
        other => {
            for p in batch {
                p.answer.send(other.clone()).ok();
            }
        }
    }
}
