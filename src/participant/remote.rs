//! A remote participant: a branch that lives in someone else's service,
//! driven through `tandem.v1.Participant` (`proto/tandem/v1/participant.proto`).
//!
//! The service does its branch's work itself, under the txid, and enlists
//! the branch; so a remote branch runs no statements here. One
//! [`RemoteBranchParticipant`] stands for one enlisted branch: it knows the
//! endpoint and the branch's name, and turns the coordinator's gid-based
//! calls into the protocol's `BranchRef` calls. Every call is idempotent,
//! so every call may be retried; `Prepare` is retried with backoff until
//! its deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use super::BranchSession;
use super::Participant;
use super::Phase2;
use super::Prepared;
use super::Statement;
use super::StatementResult;
use crate::error::Error;
use crate::error::Result;
use crate::proto as pb;
use crate::proto::participant_client::ParticipantClient;
use crate::txn::RemoteBranch;
use crate::txn::gid::Gid;

/// Most endpoints whose channels are kept; past it, the pool starts over
/// (channels reconnect lazily, so forgetting one costs a handshake).
const CHANNELS_MAX: usize = 1024;
/// How long connecting to an endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Retries of a failed `Prepare` back off from this…
const RETRY_FIRST: Duration = Duration::from_millis(50);
/// …up to this.
const RETRY_MAX: Duration = Duration::from_secs(1);
/// The longest one `Prepare` attempt may take.
const PREPARE_ATTEMPT_MAX: Duration = Duration::from_secs(5);
/// How long the `Abort` of a branch rolled back before PREPARE is retried.
const ABORT_RETRY_FOR: Duration = Duration::from_secs(120);

/// Channels to remote participants, one per endpoint, shared by every
/// branch that lives there.
#[derive(Default)]
pub struct RemoteChannels {
    by_endpoint: Mutex<HashMap<String, Channel>>,
}

impl RemoteChannels {
    /// A channel to `endpoint`, made on first use; it connects lazily.
    pub fn get(&self, endpoint: &str) -> Result<Channel> {
        let mut map = self.by_endpoint.lock().expect("channels lock");
        if let Some(c) = map.get(endpoint) {
            return Ok(c.clone());
        }
        crate::txn::validate_endpoint(endpoint)?;
        // Keep-alives find a connection that died silently (a NAT, a load
        // balancer), so that retries do not all wait on it.
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| Error::InvalidInput(format!("endpoint {endpoint:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Some(Duration::from_secs(10)))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy();
        if map.len() >= CHANNELS_MAX {
            map.clear();
        }
        map.insert(endpoint.to_string(), channel.clone());
        Ok(channel)
    }

    /// Connects to `endpoint` now, with HTTP/2, to tell a caller at
    /// `Enlist` time that it cannot be reached (or is not speaking gRPC).
    pub async fn probe(endpoint: &str, within: Duration) -> Result<()> {
        crate::txn::validate_endpoint(endpoint)?;
        // Not UNAVAILABLE: that tells clients to try another node, and no
        // node would do better.
        let unreachable =
            |why: String| Error::FailedPrecondition(format!("cannot reach participant endpoint {endpoint}: {why}"));
        let target = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| Error::InvalidInput(format!("endpoint {endpoint:?}: {e}")))?
            .connect_timeout(within);
        let channel = match tokio::time::timeout(within, target.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(unreachable(error_chain(&e))),
            Err(_) => return Err(unreachable(format!("no connection in {within:?}"))),
        };
        // A server that is not a Participant answers UNIMPLEMENTED; garbage
        // fails the HTTP/2 exchange.
        let mut client = ParticipantClient::new(channel);
        let list = client.list_prepared(pb::ListPreparedRequest { cluster_id: String::new() });
        match tokio::time::timeout(within, list).await {
            Ok(Ok(_)) => Ok(()),
            // Refusing an empty cluster id is a Participant speaking.
            Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => Ok(()),
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                Err(unreachable("it does not serve tandem.v1.Participant".into()))
            }
            Ok(Err(s)) => Err(unreachable(format!("{:?}: {}", s.code(), s.message()))),
            Err(_) => Err(unreachable(format!("no answer in {within:?}"))),
        }
    }
}

/// The causes of a transport error, joined: tonic's top-level message alone
/// ("transport error") says nothing.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// One remote branch, as a participant of its transaction.
#[derive(Clone)]
pub struct RemoteBranchParticipant {
    /// Shown in statuses and records: the configured participant's name, or
    /// the branch name for an endpoint enlisted directly.
    name: String,
    remote: RemoteBranch,
    channel: Channel,
    /// How long `Prepare` may take, retries included.
    prepare_timeout: Duration,
}

impl RemoteBranchParticipant {
    pub fn new(name: &str, remote: RemoteBranch, channels: &RemoteChannels, prepare_timeout: Duration) -> Result<Self> {
        remote.validate()?;
        let channel = channels.get(&remote.endpoint)?;
        Ok(Self { name: name.to_string(), remote, channel, prepare_timeout })
    }

    fn branch_ref(&self, gid: &Gid) -> pb::BranchRef {
        pb::BranchRef {
            cluster_id: gid.cluster_id.clone(),
            txid: gid.txid.to_string(),
            branch: self.remote.branch.clone(),
        }
    }

    fn client(&self) -> ParticipantClient<Channel> {
        ParticipantClient::new(self.channel.clone())
    }

    fn what(&self) -> String {
        format!("participant {} ({}, branch {})", self.name, self.remote.endpoint, self.remote.branch)
    }

    async fn prepare(&self, gid: &Gid) -> Result<Prepared> {
        let deadline = tokio::time::Instant::now() + self.prepare_timeout;
        let request = pb::PrepareBranchRequest { branch: Some(self.branch_ref(gid)) };
        let mut backoff = RETRY_FIRST;
        let mut last_error = String::from("no answer");
        loop {
            let mut client = self.client();
            let call = client.prepare(request.clone());
            // One attempt may not use up the whole budget: a call stuck on a
            // dead connection is given up and tried again.
            let attempt_deadline = deadline.min(tokio::time::Instant::now() + PREPARE_ATTEMPT_MAX);
            match tokio::time::timeout_at(attempt_deadline, call).await {
                Err(_) if attempt_deadline >= deadline => break,
                Err(_) => {
                    last_error = format!("no answer in {PREPARE_ATTEMPT_MAX:?}");
                    continue;
                }
                Ok(Ok(answer)) => {
                    let answer = answer.into_inner();
                    return match pb::Vote::try_from(answer.vote) {
                        Ok(pb::Vote::Prepared | pb::Vote::ReadOnly) => Ok(Prepared { xid: None }),
                        Ok(pb::Vote::Abort) => {
                            Err(Error::FailedPrecondition(format!("{} voted ABORT: {}", self.what(), answer.reason)))
                        }
                        _ => Err(Error::FailedPrecondition(format!(
                            "{} answered PREPARE with no vote ({})",
                            self.what(),
                            answer.vote
                        ))),
                    };
                }
                // The participant refused the request itself: asking again
                // cannot help.
                Ok(Err(s)) if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition) => {
                    return Err(Error::FailedPrecondition(format!(
                        "{} refused PREPARE: {:?}: {}",
                        self.what(),
                        s.code(),
                        s.message()
                    )));
                }
                Ok(Err(s)) => last_error = format!("{:?}: {}", s.code(), s.message()),
            }
            if tokio::time::Instant::now() + backoff >= deadline {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_MAX);
        }
        Err(Error::FailedPrecondition(format!(
            "{} did not answer PREPARE within {} ms (coordinator.remote_prepare_timeout_ms); last: {last_error}",
            self.what(),
            self.prepare_timeout.as_millis()
        )))
    }

    async fn phase2(&self, gid: &Gid, commit: bool, reason: &str) -> Result<Phase2> {
        send_phase2(self.channel.clone(), self.branch_ref(gid), commit, reason, &self.what()).await
    }
}

#[async_trait]
impl Participant for RemoteBranchParticipant {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> Result<()> {
        RemoteChannels::probe(&self.remote.endpoint, CONNECT_TIMEOUT).await
    }

    /// A remote branch is enlisted, never begun here: see
    /// [`RemoteBranchParticipant::enlisted`].
    async fn begin(&self) -> Result<Box<dyn BranchSession>> {
        Err(Error::InvalidInput(format!(
            "{} is a remote branch: its service runs its own work and enlists it",
            self.what()
        )))
    }

    async fn commit_prepared(&self, gid: &Gid) -> Result<Phase2> {
        self.phase2(gid, true, "").await
    }

    async fn rollback_prepared(&self, gid: &Gid) -> Result<Phase2> {
        self.phase2(gid, false, "the transaction aborted").await
    }

    /// A single branch lists nothing: recovery asks configured remote
    /// participants with [`list_prepared`].
    async fn prepared_branches(&self, _cluster_id: &str) -> Result<Vec<Gid>> {
        Ok(Vec::new())
    }

    /// The protocol does not say how a forgotten branch ended.
    async fn branch_outcome(&self, _xid: u64) -> Result<Option<bool>> {
        Ok(None)
    }

    fn remote(&self) -> Option<RemoteBranch> {
        Some(self.remote.clone())
    }
}

impl RemoteBranchParticipant {
    /// The session of the branch enlisted in `txid` of `cluster_id`.
    pub fn enlisted(&self, cluster_id: &str, txid: &crate::txn::TxId) -> Box<dyn BranchSession> {
        Box::new(RemoteSession { participant: Arc::new(self.clone()), gid: Gid::new(cluster_id, txid, 0) })
    }
}

/// An enlisted remote branch until it is prepared.
struct RemoteSession {
    participant: Arc<RemoteBranchParticipant>,
    /// Only its cluster id and txid are used: the branch is named by the
    /// participant's `remote.branch`.
    gid: Gid,
}

#[async_trait]
impl BranchSession for RemoteSession {
    async fn execute(&mut self, _statement: &Statement) -> Result<StatementResult> {
        Err(Error::InvalidInput(format!(
            "{} is a remote branch: its service runs its own work, Tandem runs no statements on it",
            self.participant.what()
        )))
    }

    async fn prepare(self: Box<Self>, gid: &Gid) -> Result<Prepared> {
        self.participant.prepare(gid).await
    }

    /// Tells the service the branch will never commit, in the background:
    /// until the service answers, its branch may hold locks. Retried with
    /// backoff for [`ABORT_RETRY_FOR`]; a service that hears nothing still
    /// votes ABORT at a later `Prepare`, or can ask `GetOutcome`.
    async fn rollback(self: Box<Self>) -> Result<()> {
        tokio::spawn(async move {
            let give_up = tokio::time::Instant::now() + ABORT_RETRY_FOR;
            let mut backoff = RETRY_FIRST;
            loop {
                let call = self.participant.phase2(&self.gid, false, "the transaction was rolled back before PREPARE");
                let error = match tokio::time::timeout(CONNECT_TIMEOUT * 2, call).await {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer".to_string(),
                };
                if tokio::time::Instant::now() + backoff >= give_up {
                    tracing::warn!(gid = %self.gid, participant = %self.participant.what(), %error, "gave up telling a remote branch it is rolled back");
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX * 4);
            }
        });
        Ok(())
    }
}

/// The prepared branches a configured remote participant holds for
/// `cluster_id`, for recovery.
pub async fn list_prepared(channel: Channel, cluster_id: &str) -> Result<Vec<pb::BranchRef>> {
    let request = pb::ListPreparedRequest { cluster_id: cluster_id.to_string() };
    ParticipantClient::new(channel).list_prepared(request).await.map(|r| r.into_inner().branches).map_err(|s| {
        Error::Unavailable { message: format!("ListPrepared: {:?}: {}", s.code(), s.message()), leader: None }
    })
}

/// Commits or aborts a configured remote participant's branch found by
/// [`list_prepared`].
pub async fn end_branch(channel: Channel, branch: pb::BranchRef, commit: bool, reason: &str) -> Result<Phase2> {
    let what = format!("branch {}/{}/{}", branch.cluster_id, branch.txid, branch.branch);
    send_phase2(channel, branch, commit, reason, &what).await
}

/// Sends `Commit` (or `Abort`) for `branch`; `what` names it in errors.
async fn send_phase2(
    channel: Channel,
    branch: pb::BranchRef,
    commit: bool,
    reason: &str,
    what: &str,
) -> Result<Phase2> {
    let mut client = ParticipantClient::new(channel);
    let branch = Some(branch);
    let result = if commit {
        client.commit(pb::CommitBranchRequest { branch }).await.map(|r| r.into_inner().result)
    } else {
        client.abort(pb::AbortBranchRequest { branch, reason: reason.to_string() }).await.map(|r| r.into_inner().result)
    };
    let verb = if commit { "COMMIT" } else { "ABORT" };
    match result {
        Ok(r) => match pb::Phase2Result::try_from(r) {
            Ok(pb::Phase2Result::Done) => Ok(Phase2::Done),
            Ok(pb::Phase2Result::UnknownBranch) => Ok(Phase2::GidMissing),
            _ => Err(Error::Internal(format!("{what} answered {verb} with no result ({r})"))),
        },
        Err(s) => Err(Error::Unavailable {
            message: format!("{what}: {verb}: {:?}: {}", s.code(), s.message()),
            leader: None,
        }),
    }
}
