//! [`ParticipantService`]: `tandem.v1.Participant` served on top of a
//! [`Resource`], one branch's calls at a time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;

use tokio::sync::OwnedMutexGuard;
use tokio::sync::Semaphore;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::BranchId;
use super::BranchState;
use super::Resource;
use super::Vote;
use super::validate_cluster_id;
use crate::error::Error;
use crate::error::Result;
use crate::proto as pb;
use crate::proto::participant_server::Participant;
use crate::proto::participant_server::ParticipantServer;

/// Default for [`ParticipantService::with_in_flight_max`].
pub const IN_FLIGHT_MAX_DEFAULT: usize = 1024;

/// Serves `tandem.v1.Participant` for a [`Resource`]: validates requests,
/// serializes the calls of each branch, answers duplicates and out-of-order
/// calls from the branch's state, and logs every decision (see the
/// [module docs](super) for the table of answers).
pub struct ParticipantService<R: Resource> {
    resource: Arc<R>,
    locks: BranchLocks,
    /// Limits the calls being answered at once.
    ///
    /// A call that finds no permit is answered RESOURCE_EXHAUSTED at once
    /// rather than queued: the coordinator retries with backoff, and a queue
    /// here would only hide the overload.
    in_flight: Arc<Semaphore>,
    in_flight_max: usize,
}

impl<R: Resource> ParticipantService<R> {
    /// A service for `resource`, answering at most
    /// [`IN_FLIGHT_MAX_DEFAULT`] calls at once.
    pub fn new(resource: Arc<R>) -> Self {
        Self {
            resource,
            locks: BranchLocks::default(),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT_MAX_DEFAULT)),
            in_flight_max: IN_FLIGHT_MAX_DEFAULT,
        }
    }

    /// Answers at most `max` calls at once (at least 1); more get
    /// RESOURCE_EXHAUSTED.
    pub fn with_in_flight_max(mut self, max: usize) -> Self {
        let max = max.max(1);
        self.in_flight = Arc::new(Semaphore::new(max));
        self.in_flight_max = max;
        self
    }

    /// The resource the service drives.
    pub fn resource(&self) -> &Arc<R> {
        &self.resource
    }

    /// The tonic service, to add to a `tonic::transport::Server`.
    pub fn into_server(self) -> ParticipantServer<Self> {
        ParticipantServer::new(self)
    }

    /// How many branches have a lock entry now: calls being answered or
    /// waiting. Zero when idle (the map never outgrows the calls in flight).
    pub fn locked_branches(&self) -> usize {
        self.locks.len()
    }

    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "the participant service is answering {} calls already; retry later",
                self.in_flight_max
            ))
        })
    }

    /// The branch's state, with the resource's error put in context.
    async fn state(&self, id: &BranchId) -> Result<BranchState> {
        self.resource.state(id).await.map_err(|e| e.context(&format!("branch {id}: reading its state")))
    }

    /// Records a tombstone for `id` (an abort of whatever exists of it).
    async fn abort_in_resource(&self, id: &BranchId) -> Result<()> {
        self.resource.abort(id).await.map_err(|e| e.context(&format!("branch {id}: aborting")))
    }

    async fn prepare_branch(&self, id: &BranchId) -> Result<pb::PrepareBranchResponse> {
        let abort = |reason: String| {
            tracing::info!(branch = %id, %reason, "prepare: vote ABORT");
            pb::PrepareBranchResponse { vote: pb::Vote::Abort as i32, reason }
        };
        let prepared = || pb::PrepareBranchResponse { vote: pb::Vote::Prepared as i32, reason: String::new() };
        match self.state(id).await? {
            BranchState::Active => {}
            BranchState::Prepared => {
                tracing::info!(branch = %id, "prepare: already prepared (a duplicate); vote PREPARED");
                return Ok(prepared());
            }
            BranchState::Committed => {
                // Only a very late duplicate: the decision was COMMIT, so
                // the first Prepare was answered PREPARED.
                tracing::info!(branch = %id, "prepare: already committed (a late duplicate); vote PREPARED");
                return Ok(prepared());
            }
            BranchState::Aborted => {
                return Ok(abort(
                    "the branch is aborted already (an Abort overtook this Prepare, or an earlier Prepare voted \
                     ABORT)"
                        .into(),
                ));
            }
            BranchState::Unknown => {
                // The vote promises the branch stays rolled back, and its
                // work may still be in flight: record that first.
                self.abort_in_resource(id).await?;
                return Ok(abort(
                    "the participant holds no work for this branch (never begun here, ended read-only, or lost \
                     before it was prepared); it is recorded as aborted"
                        .into(),
                ));
            }
        }
        let vote = self.resource.prepare(id).await.map_err(|e| e.context(&format!("branch {id}: preparing")))?;
        Ok(match vote {
            Vote::Prepared => {
                tracing::info!(branch = %id, "prepare: prepared; vote PREPARED");
                prepared()
            }
            Vote::ReadOnly => {
                tracing::info!(branch = %id, "prepare: changed nothing; vote READ_ONLY");
                pb::PrepareBranchResponse { vote: pb::Vote::ReadOnly as i32, reason: String::new() }
            }
            Vote::Abort(reason) => {
                // The resource rolled the branch back; the tombstone keeps
                // it so.
                self.abort_in_resource(id).await?;
                abort(reason)
            }
        })
    }

    async fn commit_branch(&self, id: &BranchId) -> Result<pb::Phase2Result> {
        match self.state(id).await? {
            BranchState::Prepared => {
                self.resource.commit(id).await.map_err(|e| e.context(&format!("branch {id}: committing")))?;
                tracing::info!(branch = %id, "commit: committed");
                Ok(pb::Phase2Result::Done)
            }
            BranchState::Committed => {
                tracing::info!(branch = %id, "commit: already committed (a duplicate); DONE");
                Ok(pb::Phase2Result::Done)
            }
            BranchState::Unknown => {
                // Committed and forgotten, or read-only: nothing to create.
                tracing::info!(branch = %id, "commit: unknown branch; UNKNOWN_BRANCH");
                Ok(pb::Phase2Result::UnknownBranch)
            }
            BranchState::Active => {
                tracing::warn!(branch = %id, "commit: refused, the branch was never prepared");
                Err(Error::FailedPrecondition(format!(
                    "branch {id} is active, not prepared: only a prepared branch can be committed"
                )))
            }
            BranchState::Aborted => {
                tracing::error!(
                    branch = %id,
                    "commit: refused, the branch is aborted; the decision COMMIT contradicts it (heuristic outcome)"
                );
                Err(Error::FailedPrecondition(format!(
                    "branch {id} is aborted and cannot be committed (it was rolled back by other means than this \
                     transaction's decision)"
                )))
            }
        }
    }

    async fn abort_branch(&self, id: &BranchId, reason: &str) -> Result<pb::Phase2Result> {
        let state = self.state(id).await?;
        match state {
            BranchState::Active | BranchState::Prepared | BranchState::Unknown => {
                self.abort_in_resource(id).await?;
                tracing::info!(branch = %id, was = %state, %reason, "abort: rolled back and recorded; DONE");
                Ok(pb::Phase2Result::Done)
            }
            BranchState::Aborted => {
                tracing::info!(branch = %id, %reason, "abort: already aborted (a duplicate); DONE");
                Ok(pb::Phase2Result::Done)
            }
            BranchState::Committed => {
                tracing::error!(branch = %id, %reason, "abort: refused, the branch is committed");
                Err(Error::FailedPrecondition(format!("branch {id} is committed and cannot be aborted")))
            }
        }
    }

    async fn prepared_branches(&self, cluster_id: &str) -> Result<Vec<pb::BranchRef>> {
        validate_cluster_id(cluster_id)?;
        let branches = self.resource.prepared(cluster_id).await.map_err(|e| e.context("listing prepared branches"))?;
        Ok(branches.into_iter().filter(|b| b.cluster_id == cluster_id).map(Into::into).collect())
    }
}

#[tonic::async_trait]
impl<R: Resource> Participant for ParticipantService<R> {
    async fn prepare(
        &self,
        request: Request<pb::PrepareBranchRequest>,
    ) -> std::result::Result<Response<pb::PrepareBranchResponse>, Status> {
        let _permit = self.admit()?;
        let id = BranchId::from_request(request.get_ref().branch.as_ref())?;
        let _lock = self.locks.lock(&id).await;
        Ok(Response::new(self.prepare_branch(&id).await?))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitBranchRequest>,
    ) -> std::result::Result<Response<pb::CommitBranchResponse>, Status> {
        let _permit = self.admit()?;
        let id = BranchId::from_request(request.get_ref().branch.as_ref())?;
        let _lock = self.locks.lock(&id).await;
        let result = self.commit_branch(&id).await?;
        Ok(Response::new(pb::CommitBranchResponse { result: result as i32 }))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortBranchRequest>,
    ) -> std::result::Result<Response<pb::AbortBranchResponse>, Status> {
        let _permit = self.admit()?;
        let req = request.get_ref();
        let id = BranchId::from_request(req.branch.as_ref())?;
        let _lock = self.locks.lock(&id).await;
        let result = self.abort_branch(&id, &req.reason).await?;
        Ok(Response::new(pb::AbortBranchResponse { result: result as i32 }))
    }

    async fn list_prepared(
        &self,
        request: Request<pb::ListPreparedRequest>,
    ) -> std::result::Result<Response<pb::ListPreparedResponse>, Status> {
        let _permit = self.admit()?;
        let branches = self.prepared_branches(&request.get_ref().cluster_id).await?;
        Ok(Response::new(pb::ListPreparedResponse { branches }))
    }
}

/// One async lock per branch, so that the calls of one branch take turns.
///
/// An entry lives only while some call holds or awaits its lock: each one
/// counts itself in `users`, and the last one out removes the entry, so the
/// map never holds more entries than calls in flight (which the service
/// bounds).
#[derive(Default)]
pub(crate) struct BranchLocks {
    map: Arc<Mutex<HashMap<BranchId, LockSlot>>>,
}

struct LockSlot {
    mutex: Arc<tokio::sync::Mutex<()>>,
    /// Calls holding or awaiting `mutex`.
    users: usize,
}

impl BranchLocks {
    /// Waits for `id`'s lock. Dropping the future while it waits (the
    /// caller's deadline) leaves no entry behind.
    pub(crate) async fn lock(&self, id: &BranchId) -> BranchGuard {
        let mutex = {
            let mut map = self.map.lock().expect("branch lock map poisoned");
            let slot = map
                .entry(id.clone())
                .or_insert_with(|| LockSlot { mutex: Arc::new(tokio::sync::Mutex::new(())), users: 0 });
            slot.users += 1;
            slot.mutex.clone()
        };
        // Counted before waiting, so that a dropped wait still counts out.
        let user = LockUser { map: self.map.clone(), id: id.clone() };
        let guard = mutex.lock_owned().await;
        BranchGuard { _guard: guard, _user: user }
    }

    fn len(&self) -> usize {
        self.map.lock().expect("branch lock map poisoned").len()
    }
}

/// Holds one branch's lock; on drop releases it, then counts out.
pub(crate) struct BranchGuard {
    // Fields drop in declaration order: the lock before the count, so an
    // entry is never removed while its lock is held.
    _guard: OwnedMutexGuard<()>,
    _user: LockUser,
}

/// One call's count in a branch's lock entry.
struct LockUser {
    map: Arc<Mutex<HashMap<BranchId, LockSlot>>>,
    id: BranchId,
}

impl Drop for LockUser {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("branch lock map poisoned");
        if let Some(slot) = map.get_mut(&self.id) {
            slot.users -= 1;
            if slot.users == 0 {
                map.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::*;
    use crate::participant::sdk::MemoryResource;
    use crate::participant::sdk::memory::Operation;

    type Service = ParticipantService<MemoryResource>;

    fn service() -> Service {
        ParticipantService::new(Arc::new(MemoryResource::new()))
    }

    fn id(txid: &str) -> BranchId {
        BranchId::new("c1", txid, "inv").unwrap()
    }

    async fn prepare(s: &Service, id: &BranchId) -> std::result::Result<(pb::Vote, String), Status> {
        let req = pb::PrepareBranchRequest { branch: Some(id.to_pb()) };
        let r = Participant::prepare(s, Request::new(req)).await?.into_inner();
        Ok((pb::Vote::try_from(r.vote).unwrap(), r.reason))
    }

    async fn commit(s: &Service, id: &BranchId) -> std::result::Result<pb::Phase2Result, Status> {
        let req = pb::CommitBranchRequest { branch: Some(id.to_pb()) };
        let r = Participant::commit(s, Request::new(req)).await?.into_inner();
        Ok(pb::Phase2Result::try_from(r.result).unwrap())
    }

    async fn abort(s: &Service, id: &BranchId) -> std::result::Result<pb::Phase2Result, Status> {
        let req = pb::AbortBranchRequest { branch: Some(id.to_pb()), reason: "test".into() };
        let r = Participant::abort(s, Request::new(req)).await?.into_inner();
        Ok(pb::Phase2Result::try_from(r.result).unwrap())
    }

    async fn list(s: &Service, cluster_id: &str) -> std::result::Result<Vec<BranchId>, Status> {
        let req = pb::ListPreparedRequest { cluster_id: cluster_id.into() };
        let r = Participant::list_prepared(s, Request::new(req)).await?.into_inner();
        Ok(r.branches.into_iter().map(|b| BranchId::try_from(b).unwrap()).collect())
    }

    fn state(s: &Service, id: &BranchId) -> BranchState {
        s.resource().state_of(id)
    }

    #[tokio::test]
    async fn prepare_and_commit_answer_duplicates_alike() {
        let s = service();
        let t = id("t1");
        s.resource().begin(&t).unwrap();
        assert_eq!(prepare(&s, &t).await.unwrap().0, pb::Vote::Prepared);
        assert_eq!(prepare(&s, &t).await.unwrap().0, pb::Vote::Prepared);
        assert_eq!(list(&s, "c1").await.unwrap(), vec![t.clone()]);
        assert_eq!(list(&s, "c2").await.unwrap(), vec![]);
        assert_eq!(commit(&s, &t).await.unwrap(), pb::Phase2Result::Done);
        assert_eq!(commit(&s, &t).await.unwrap(), pb::Phase2Result::Done);
        assert_eq!(state(&s, &t), BranchState::Committed);
        // A very late duplicate Prepare still agrees with the first answer.
        assert_eq!(prepare(&s, &t).await.unwrap().0, pb::Vote::Prepared);
        assert_eq!(list(&s, "c1").await.unwrap(), vec![]);
        assert_eq!(s.locked_branches(), 0);
    }

    #[tokio::test]
    async fn abort_of_a_prepared_branch_and_its_duplicate() {
        let s = service();
        let t = id("t1");
        s.resource().begin(&t).unwrap();
        assert_eq!(prepare(&s, &t).await.unwrap().0, pb::Vote::Prepared);
        assert_eq!(abort(&s, &t).await.unwrap(), pb::Phase2Result::Done);
        assert_eq!(abort(&s, &t).await.unwrap(), pb::Phase2Result::Done);
        assert_eq!(state(&s, &t), BranchState::Aborted);
        // A late duplicate Prepare does not revive it.
        assert_eq!(prepare(&s, &t).await.unwrap().0, pb::Vote::Abort);
        assert_eq!(state(&s, &t), BranchState::Aborted);
    }

    #[tokio::test]
    async fn abort_of_an_active_branch() {
        let s = service();
        let t = id("t1");
        s.resource().begin(&t).unwrap();
        assert_eq!(abort(&s, &t).await.unwrap(), pb::Phase2Result::Done);
        assert_eq!(state(&s, &t), BranchState::Aborted);
        let (vote, reason) = prepare(&s, &t).await.unwrap();
        assert_eq!(vote, pb::Vote::Abort);
        assert!(reason.contains("overtook"), "{reason}");
    }

    #[tokio::test]
    async fn abort_before_the_work_leaves_a_tombstone_and_the_late_prepare_votes_abort() {
        let s = service();
        let t = id("t1");
        // Null compensation: the Abort overtook the work.
        assert_eq!(abort(&s, &t).await.unwrap(), pb::Phase2Result::Done);
        assert_eq!(state(&s, &t), BranchState::Aborted);
        // The work arrives late: it cannot begin, and a Prepare votes ABORT.
        let e = s.resource().begin(&t).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        let (vote, reason) = prepare(&s, &t).await.unwrap();
        assert_eq!(vote, pb::Vote::Abort);
        assert!(reason.contains("aborted already"), "{reason}");
        assert_eq!(abort(&s, &t).await.unwrap(), pb::Phase2Result::Done);
    }

    #[tokio::test]
    async fn prepare_of_an_unknown_branch_votes_abort_and_keeps_it_so() {
        let s = service();
        let t = id("t1");
        let (vote, reason) = prepare(&s, &t).await.unwrap();
        assert_eq!(vote, pb::Vote::Abort);
        assert!(reason.contains("holds no work"), "{reason}");
        // Work still in flight for the branch cannot start after the vote.
        assert_eq!(state(&s, &t), BranchState::Aborted);
        assert!(s.resource().begin(&t).is_err());
        assert_eq!(prepare(&s, &t).await.unwrap().0, pb::Vote::Abort);
    }

    #[tokio::test]
    async fn commit_of_an_unknown_branch_creates_nothing() {
        let s = service();
        assert_eq!(commit(&s, &id("t1")).await.unwrap(), pb::Phase2Result::UnknownBranch);
        assert!(s.resource().is_empty());
    }

    #[tokio::test]
    async fn abort_of_a_committed_branch_is_refused() {
        let s = service();
        let t = id("t1");
        s.resource().begin(&t).unwrap();
        prepare(&s, &t).await.unwrap();
        commit(&s, &t).await.unwrap();
        assert_eq!(abort(&s, &t).await.unwrap_err().code(), Code::FailedPrecondition);
        assert_eq!(state(&s, &t), BranchState::Committed);
    }

    #[tokio::test]
    async fn commit_of_an_unprepared_or_aborted_branch_is_refused() {
        let s = service();
        let active = id("t1");
        s.resource().begin(&active).unwrap();
        assert_eq!(commit(&s, &active).await.unwrap_err().code(), Code::FailedPrecondition);
        assert_eq!(state(&s, &active), BranchState::Active);
        let aborted = id("t2");
        abort(&s, &aborted).await.unwrap();
        assert_eq!(commit(&s, &aborted).await.unwrap_err().code(), Code::FailedPrecondition);
        assert_eq!(state(&s, &aborted), BranchState::Aborted);
    }

    #[tokio::test]
    async fn read_only_branch_is_forgotten() {
        let s = service();
        let t = id("t1");
        s.resource().begin_read_only(&t).unwrap();
        assert_eq!(prepare(&s, &t).await.unwrap().0, pb::Vote::ReadOnly);
        assert_eq!(state(&s, &t), BranchState::Unknown);
        assert_eq!(commit(&s, &t).await.unwrap(), pb::Phase2Result::UnknownBranch);
        assert!(s.resource().is_empty());
    }

    #[tokio::test]
    async fn a_resource_vote_abort_is_passed_on_and_recorded() {
        let s = service();
        let t = id("t1");
        s.resource().begin(&t).unwrap();
        s.resource().doom(&t, "not enough stock").unwrap();
        assert_eq!(prepare(&s, &t).await.unwrap(), (pb::Vote::Abort, "not enough stock".to_string()));
        assert_eq!(state(&s, &t), BranchState::Aborted);
    }

    #[tokio::test]
    async fn resource_errors_are_grpc_errors_and_change_nothing() {
        let s = service();
        let t = id("t1");
        s.resource().begin(&t).unwrap();

        s.resource().fail_next(Operation::State, Error::Storage("disk gone".into()));
        let e = prepare(&s, &t).await.unwrap_err();
        assert_eq!(e.code(), Code::Internal);
        assert!(e.message().contains("disk gone") && e.message().contains("c1/t1/inv"), "{}", e.message());

        s.resource().fail_next(Operation::Prepare, Error::Unavailable { message: "db down".into(), leader: None });
        assert_eq!(prepare(&s, &t).await.unwrap_err().code(), Code::Unavailable);
        assert_eq!(state(&s, &t), BranchState::Active);

        s.resource().fail_next(Operation::Abort, Error::Storage("disk gone".into()));
        assert_eq!(abort(&s, &t).await.unwrap_err().code(), Code::Internal);
        assert_eq!(state(&s, &t), BranchState::Active);

        // The retries succeed.
        assert_eq!(prepare(&s, &t).await.unwrap().0, pb::Vote::Prepared);
        s.resource().fail_next(Operation::Commit, Error::Storage("disk gone".into()));
        assert_eq!(commit(&s, &t).await.unwrap_err().code(), Code::Internal);
        assert_eq!(state(&s, &t), BranchState::Prepared);
        assert_eq!(commit(&s, &t).await.unwrap(), pb::Phase2Result::Done);

        // A Prepare of an unknown branch whose tombstone cannot be written
        // answers an error, not a vote it could not keep.
        let u = id("t2");
        s.resource().fail_next(Operation::Abort, Error::Storage("disk gone".into()));
        assert_eq!(prepare(&s, &u).await.unwrap_err().code(), Code::Internal);
        assert_eq!(state(&s, &u), BranchState::Unknown);

        s.resource().fail_next(Operation::Prepared, Error::Storage("disk gone".into()));
        assert_eq!(list(&s, "c1").await.unwrap_err().code(), Code::Internal);
        assert_eq!(s.locked_branches(), 0);
    }

    #[tokio::test]
    async fn malformed_requests_are_invalid_argument() {
        let s = service();
        let none = Participant::prepare(&s, Request::new(pb::PrepareBranchRequest { branch: None })).await;
        assert_eq!(none.unwrap_err().code(), Code::InvalidArgument);
        let bad = BranchId { cluster_id: "c1".into(), txid: "T1".into(), branch: "inv".into() };
        assert_eq!(commit(&s, &bad).await.unwrap_err().code(), Code::InvalidArgument);
        let bad = BranchId { cluster_id: "c1".into(), txid: "t1".into(), branch: "in v".into() };
        assert_eq!(abort(&s, &bad).await.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(list(&s, "").await.unwrap_err().code(), Code::InvalidArgument);
        assert!(s.resource().is_empty());
    }

    #[tokio::test]
    async fn calls_beyond_the_in_flight_limit_are_refused() {
        let s = service().with_in_flight_max(1);
        let t = id("t1");
        let permit = s.admit().unwrap();
        assert_eq!(commit(&s, &t).await.unwrap_err().code(), Code::ResourceExhausted);
        drop(permit);
        assert_eq!(commit(&s, &t).await.unwrap(), pb::Phase2Result::UnknownBranch);
    }

    /// The property: an Abort that answered DONE is never followed by the
    /// branch being prepared. The resource sleeps between reading and
    /// writing a branch, so without the per-branch lock a Prepare and an
    /// Abort that start together both read "active" and the Prepare's write
    /// lands after the Abort's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_prepare_and_abort_end_consistently() {
        let s = Arc::new(ParticipantService::new(Arc::new(MemoryResource::with_delay(Duration::from_millis(5)))));
        let mut runs = Vec::new();
        for i in 0..40 {
            let t = id(&format!("t{i}"));
            s.resource().begin(&t).unwrap();
            let (s1, s2, t1, t2) = (s.clone(), s.clone(), t.clone(), t.clone());
            // Alternate which one is spawned first.
            let (p, a) = if i % 2 == 0 {
                let p = tokio::spawn(async move { prepare(&s1, &t1).await.unwrap().0 });
                let a = tokio::spawn(async move { abort(&s2, &t2).await.unwrap() });
                (p, a)
            } else {
                let a = tokio::spawn(async move { abort(&s2, &t2).await.unwrap() });
                let p = tokio::spawn(async move { prepare(&s1, &t1).await.unwrap().0 });
                (p, a)
            };
            runs.push((t, p, a));
        }
        let (mut prepared_first, mut aborted_first) = (0, 0);
        for (t, p, a) in runs {
            let (vote, result) = (p.await.unwrap(), a.await.unwrap());
            assert_eq!(result, pb::Phase2Result::Done, "{t}");
            // Either prepared, then aborted; or aborted, then refused.
            assert_eq!(state(&s, &t), BranchState::Aborted, "{t}: prepared after the Abort answered DONE");
            match vote {
                pb::Vote::Prepared => prepared_first += 1,
                pb::Vote::Abort => aborted_first += 1,
                v => panic!("{t}: unexpected vote {v:?}"),
            }
        }
        assert_eq!(prepared_first + aborted_first, 40);
        assert_eq!(s.locked_branches(), 0);
    }

    #[tokio::test]
    async fn lock_entries_go_away_when_waiters_give_up() {
        let locks = BranchLocks::default();
        let t = id("t1");
        let held = locks.lock(&t).await;
        // A waiter that gives up (its deadline) leaves nothing behind.
        assert!(tokio::time::timeout(Duration::from_millis(10), locks.lock(&t)).await.is_err());
        assert_eq!(locks.len(), 1);
        drop(held);
        assert_eq!(locks.len(), 0);
        // Other branches do not wait for each other.
        let _a = locks.lock(&id("t1")).await;
        let _b = locks.lock(&id("t2")).await;
        assert_eq!(locks.len(), 2);
    }
}
