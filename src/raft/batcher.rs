//! The batchers: concurrent decisions share one Raft entry, and so do
//! concurrent completions from the decision log's API.
//!
//! Every decision a node proposes goes through one queue, and every
//! `Complete` asked of its decision log through another. A batch takes what
//! is waiting there (up to the kind's most, [`Batched::MAX`]) and goes to
//! Raft as one entry ([`Op::DecideBatch`], [`Op::CompleteBatch`]); at most
//! [`BATCHES_IN_FLIGHT`] batches of a kind are in Raft at once, so under
//! load the next batch gathers the items that arrive while the earlier ones
//! replicate. With no load (nothing queued, a batch slot free) an item goes
//! out alone and at once ([`Op::Decide`], [`Op::Complete`]), without passing
//! through the batching task: batching adds no wait.
//!
//! A batch applies its items in order, each exactly as its own entry would
//! (a decision is a compare-and-set, a later decision for the same txid sees
//! the earlier; completing twice completes once), so the batch boundaries
//! change nothing but the entry count. An item whose caller has given up
//! before its batch leaves is dropped: the caller learns nothing of it
//! either way and may propose it again.
//!
//! Tandem's own drivers do not complete through here: they hand their
//! completions to the coordinator's completer, which gathers them for a
//! while first, as no caller waits for them.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use openraft::errors::ClientWriteError;
use openraft::errors::RaftError;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use serde::Serialize;

use super::COMPLETE_BATCH_MAX;
use super::Command;
use super::CommandResponse;
use super::Completion;
use super::DecideItem;
use super::Op;
use super::Raft;
use super::TypeConfig;

/// Most decisions in one entry.
pub const DECIDE_BATCH_MAX: usize = 256;
/// Most bytes of items (as JSON) in one entry, past the first: a follower
/// catching up takes up to `raft.append_entries_max` entries in one
/// message, which must stay under the message limit.
pub const BATCH_BYTES: usize = 32 << 10;
/// Batches of one kind proposed and not yet applied, at most.
pub const BATCHES_IN_FLIGHT: usize = 2;
/// Items waiting for a batch, at most; a caller beyond waits to queue.
const QUEUE_MAX: usize = 8192;

pub type WriteError = RaftError<TypeConfig, ClientWriteError<TypeConfig>>;

/// What a batcher gathers into entries: a decision or a completion.
pub trait Batched: Clone + Serialize + Send + Sync + 'static {
    /// Most items in one entry.
    const MAX: usize;
    /// The batcher's counters' names: items proposed, entries they took.
    const COUNTERS: [&'static str; 2];
    /// The command for one item alone.
    fn alone(self) -> Op;
    /// The command for several, applied in order.
    fn together(items: Vec<Self>) -> Op;
    /// A batch's answers, one per item, in order; `None` if `response` is
    /// not a batch's (a refusal of the whole entry, say).
    fn answers(response: &mut CommandResponse) -> Option<&mut Vec<CommandResponse>>;
}

impl Batched for DecideItem {
    const MAX: usize = DECIDE_BATCH_MAX;
    const COUNTERS: [&'static str; 2] = ["decisions_proposed", "decision_entries"];

    fn alone(self) -> Op {
        Op::Decide { txid: self.txid, decision: self.decision, info: self.info }
    }

    fn together(items: Vec<Self>) -> Op {
        Op::DecideBatch { items }
    }

    fn answers(response: &mut CommandResponse) -> Option<&mut Vec<CommandResponse>> {
        match response {
            CommandResponse::DecidedBatch { responses } => Some(responses),
            _ => None,
        }
    }
}

impl Batched for Completion {
    const MAX: usize = COMPLETE_BATCH_MAX;
    const COUNTERS: [&'static str; 2] = ["api_completions_proposed", "api_completion_entries"];

    fn alone(self) -> Op {
        if self.heuristic.is_empty() {
            Op::Complete { txid: self.txid }
        } else {
            Op::CompleteBatch { items: vec![self] }
        }
    }

    fn together(items: Vec<Self>) -> Op {
        Op::CompleteBatch { items }
    }

    fn answers(response: &mut CommandResponse) -> Option<&mut Vec<CommandResponse>> {
        match response {
            CommandResponse::CompletedBatch { responses } => Some(responses),
            _ => None,
        }
    }
}

struct Pending<T> {
    item: T,
    /// The item's size as JSON.
    bytes: usize,
    answer: oneshot::Sender<Result<CommandResponse, WriteError>>,
}

/// Where a node's items of one kind queue for Raft.
pub struct Batcher<T: Batched> {
    queue: mpsc::Sender<Pending<T>>,
    /// Room for batches in Raft: [`BATCHES_IN_FLIGHT`] permits.
    slots: Arc<Semaphore>,
    raft: Raft,
    now_unix_ms: fn() -> u64,
    stats: Arc<BatchStats>,
}

/// How well items share entries: items and entries applied.
pub struct BatchStats {
    names: [&'static str; 2],
    items: AtomicU64,
    entries: AtomicU64,
}

impl BatchStats {
    /// Every counter by name, as `tandem cluster status` shows them.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![(self.names[0], self.items.load(Ordering::Relaxed)), (self.names[1], self.entries.load(Ordering::Relaxed))]
    }
}

impl<T: Batched> Batcher<T> {
    /// Starts the batching task; it ends with the batcher.
    pub fn start(raft: Raft, now_unix_ms: fn() -> u64) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE_MAX);
        let stats = Arc::new(BatchStats { names: T::COUNTERS, items: AtomicU64::new(0), entries: AtomicU64::new(0) });
        let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        tokio::spawn(run(raft.clone(), now_unix_ms, rx, slots.clone(), stats.clone()));
        Self { queue, slots, raft, now_unix_ms, stats }
    }

    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Proposes the item and returns what applying it answered.
    pub async fn propose(&self, item: T) -> Result<CommandResponse, WriteError> {
        let (answer, rx) = oneshot::channel();
        let gone = || RaftError::Fatal(openraft::errors::Fatal::Stopped);
        // Nothing waiting and room in Raft: the item goes alone, from here,
        // without the hand-offs to the batching task and back. Its own task
        // holds the slot until Raft answers, even if this caller gives up
        // first, as a batch's does.
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
        let bytes = serde_json::to_vec(&item).map_or(BATCH_BYTES, |v| v.len());
        self.queue.send(Pending { item, bytes, answer }).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

async fn run<T: Batched>(
    raft: Raft,
    now_unix_ms: fn() -> u64,
    mut rx: mpsc::Receiver<Pending<T>>,
    slots: Arc<Semaphore>,
    stats: Arc<BatchStats>,
) {
    while let Some(first) = rx.recv().await {
        // A slot first: while every slot is busy, items gather in the queue
        // for the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        // What waits, up to the limits (the last one taken may pass the
        // byte limit by its own size).
        while batch.len() < T::MAX && bytes < BATCH_BYTES {
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
fn spawn_propose<T: Batched>(
    raft: &Raft,
    now: u64,
    batch: Vec<Pending<T>>,
    stats: &Arc<BatchStats>,
    slot: OwnedSemaphorePermit,
) {
    let (raft, stats) = (raft.clone(), stats.clone());
    tokio::spawn(async move {
        propose(&raft, now, batch, &stats).await;
        drop(slot);
    });
}

async fn propose<T: Batched>(raft: &Raft, now: u64, mut batch: Vec<Pending<T>>, stats: &BatchStats) {
    batch.retain(|p| !p.answer.is_closed());
    let op = match batch.len() {
        0 => return,
        1 => batch[0].item.clone().alone(),
        _ => T::together(batch.iter().map(|p| p.item.clone()).collect()),
    };
    let mut result = raft.client_write(Command::new(now, op)).await.map(|r| r.data);
    if result.is_ok() {
        stats.items.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.entries.fetch_add(1, Ordering::Relaxed);
    }
    let answers = match &mut result {
        Ok(response) => T::answers(response).filter(|a| a.len() == batch.len()).map(std::mem::take),
        Err(_) => None,
    };
    match answers {
        Some(answers) => {
            for (p, response) in batch.into_iter().zip(answers) {
                p.answer.send(Ok(response)).ok();
            }
        }
        // One item's answer, or a refusal of the whole entry.
        None => {
            for p in batch {
                p.answer.send(result.clone()).ok();
            }
        }
    }
}
