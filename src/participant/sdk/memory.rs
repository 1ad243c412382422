//! [`MemoryResource`]: a [`Resource`] kept in memory, for tests and examples.
//!
//! "Durable" here means "for the life of the value": it shows the contract
//! and lets the protocol be tested without a database, and must not hold
//! anything that matters.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::BranchId;
use super::BranchState;
use super::Resource;
use super::Vote;
use crate::error::Error;
use crate::error::Result;

/// A resource method, to make fail on purpose ([`MemoryResource::fail_next`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// [`Resource::state`].
    State,
    /// [`Resource::prepare`].
    Prepare,
    /// [`Resource::commit`].
    Commit,
    /// [`Resource::abort`].
    Abort,
    /// [`Resource::prepared`].
    Prepared,
}

#[derive(Clone, Debug)]
struct Branch {
    state: BranchState,
    /// Whether the branch changed anything (a read-only branch votes
    /// READ_ONLY).
    writes: bool,
    /// Set when the branch's work failed: it votes ABORT with this reason.
    doomed: Option<String>,
}

/// A [`Resource`] in memory. Deliberately naive: it checks nothing about the
/// order of calls (the service does) and, given a delay, lets other calls in
/// between reading and writing a branch, so tests can show what the service's
/// per-branch lock prevents.
#[derive(Default)]
pub struct MemoryResource {
    branches: Mutex<HashMap<BranchId, Branch>>,
    failures: Mutex<HashMap<Operation, Error>>,
    /// Slept between reading a branch and writing it in `prepare` and
    /// `abort`.
    delay: Duration,
}

impl MemoryResource {
    /// An empty resource.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty resource that sleeps `delay` between reading and writing a
    /// branch in `prepare` and `abort`.
    pub fn with_delay(delay: Duration) -> Self {
        Self { delay, ..Self::default() }
    }

    /// Begins a branch that writes: it will vote PREPARED. Fails if the
    /// branch exists in any state (an aborted one is FAILED_PRECONDITION: an
    /// Abort overtook the work).
    pub fn begin(&self, id: &BranchId) -> Result<()> {
        self.insert(id, Branch { state: BranchState::Active, writes: true, doomed: None })
    }

    /// Begins a branch that changes nothing: it will vote READ_ONLY.
    pub fn begin_read_only(&self, id: &BranchId) -> Result<()> {
        self.insert(id, Branch { state: BranchState::Active, writes: false, doomed: None })
    }

    /// Marks an active branch's work as failed: it will vote ABORT with
    /// `reason`.
    pub fn doom(&self, id: &BranchId, reason: &str) -> Result<()> {
        let mut branches = self.branches.lock().expect("memory resource poisoned");
        match branches.get_mut(id) {
            Some(b) if b.state == BranchState::Active => {
                b.doomed = Some(reason.to_string());
                Ok(())
            }
            _ => Err(Error::FailedPrecondition(format!("branch {id} is not active"))),
        }
    }

    /// The branch's state now.
    pub fn state_of(&self, id: &BranchId) -> BranchState {
        self.branches.lock().expect("memory resource poisoned").get(id).map_or(BranchState::Unknown, |b| b.state)
    }

    /// How many branches the resource remembers (tombstones included).
    pub fn len(&self) -> usize {
        self.branches.lock().expect("memory resource poisoned").len()
    }

    /// Whether the resource remembers no branch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the next call of `op` fail with `error`, changing nothing.
    pub fn fail_next(&self, op: Operation, error: Error) {
        self.failures.lock().expect("memory resource poisoned").insert(op, error);
    }

    fn injected(&self, op: Operation) -> Result<()> {
        match self.failures.lock().expect("memory resource poisoned").remove(&op) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn insert(&self, id: &BranchId, branch: Branch) -> Result<()> {
        let mut branches = self.branches.lock().expect("memory resource poisoned");
        match branches.get(id).map(|b| b.state) {
            None => {
                branches.insert(id.clone(), branch);
                Ok(())
            }
            Some(BranchState::Aborted) => {
                Err(Error::FailedPrecondition(format!("branch {id} is aborted already (an Abort overtook the work)")))
            }
            Some(state) => Err(Error::AlreadyExists(format!("branch {id} exists ({state})"))),
        }
    }

    fn get(&self, id: &BranchId) -> Option<Branch> {
        self.branches.lock().expect("memory resource poisoned").get(id).cloned()
    }

    fn set(&self, id: &BranchId, state: BranchState) {
        let mut branches = self.branches.lock().expect("memory resource poisoned");
        branches.entry(id.clone()).or_insert(Branch { state, writes: true, doomed: None }).state = state;
    }

    async fn pause(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

#[async_trait]
impl Resource for MemoryResource {
    async fn state(&self, id: &BranchId) -> Result<BranchState> {
        self.injected(Operation::State)?;
        Ok(self.state_of(id))
    }

    async fn prepare(&self, id: &BranchId) -> Result<Vote> {
        self.injected(Operation::Prepare)?;
        let Some(branch) = self.get(id) else { return Ok(Vote::Abort(format!("branch {id} is not open"))) };
        self.pause().await;
        if let Some(reason) = branch.doomed {
            self.branches.lock().expect("memory resource poisoned").remove(id);
            return Ok(Vote::Abort(reason));
        }
        if !branch.writes {
            self.branches.lock().expect("memory resource poisoned").remove(id);
            return Ok(Vote::ReadOnly);
        }
        self.set(id, BranchState::Prepared);
        Ok(Vote::Prepared)
    }

    async fn commit(&self, id: &BranchId) -> Result<()> {
        self.injected(Operation::Commit)?;
        match self.state_of(id) {
            BranchState::Prepared | BranchState::Committed => {
                self.set(id, BranchState::Committed);
                Ok(())
            }
            state => Err(Error::FailedPrecondition(format!("branch {id} is {state}, not prepared"))),
        }
    }

    async fn abort(&self, id: &BranchId) -> Result<()> {
        self.injected(Operation::Abort)?;
        let state = self.state_of(id);
        self.pause().await;
        if state == BranchState::Committed {
            return Err(Error::FailedPrecondition(format!("branch {id} is committed")));
        }
        self.set(id, BranchState::Aborted);
        Ok(())
    }

    async fn prepared(&self, cluster_id: &str) -> Result<Vec<BranchId>> {
        self.injected(Operation::Prepared)?;
        let branches = self.branches.lock().expect("memory resource poisoned");
        let mut out: Vec<BranchId> = branches
            .iter()
            .filter(|(id, b)| id.cluster_id == cluster_id && b.state == BranchState::Prepared)
            .map(|(id, _)| id.clone())
            .collect();
        out.sort();
        Ok(out)
    }
}
