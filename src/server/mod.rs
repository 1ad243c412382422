//! The node process: Raft, the gRPC services and background upkeep.
//!
//! One port per node serves everything: the client-facing services
//! ([`cluster`], [`decision_log`]), the node-to-node Raft service, gRPC health
//! and server reflection (so `grpcurl` can list and call the services).
//!
//! Any node takes any request. A write (or a linearizable read) that reaches
//! a follower is forwarded once to the leader over the cached peer channel;
//! if that fails, or there is no leader yet, the answer is UNAVAILABLE with
//! the leader's address (when known) in the `x-tandem-leader-addr` metadata
//! entry, which [`crate::client`] follows.

/// Runs a handler's local part; on an error naming another node as leader,
/// forwards the request there once with `$client::$method`.
macro_rules! local_or_forward {
    ($self:ident, $request:ident, $local:expr, $client:ident, $method:ident) => {{
        match $local {
            Ok(resp) => Ok(tonic::Response::new(resp)),
            Err(e) => match $self.node.forward_target(&$request, &e) {
                Some(ch) => {
                    $crate::server::forward(ch, $request.into_inner(), e, |ch, r| async move {
                        $client::new(ch).max_decoding_message_size($crate::server::RESPONSE_BYTES_MAX).$method(r).await
                    })
                    .await
                }
                None => Err(e.into()),
            },
        }
    }};
}

pub mod cluster;
pub mod convert;
pub mod decision_log;
pub mod transactions;

use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::ClientWriteError;
use openraft::errors::ForwardToLeader;
use openraft::errors::RaftError;
use tokio::net::TcpListener;
use tonic::Request;
use tonic::transport::Channel;

use crate::config::NodeConfig;
use crate::error::Error;
use crate::error::LeaderHint;
use crate::error::Result;
use crate::participant::Registry;
use crate::proto;
use crate::raft::Command;
use crate::raft::CommandResponse;
use crate::raft::Completion;
use crate::raft::DecideItem;
use crate::raft::Op;
use crate::raft::Raft;
use crate::raft::StateMachine;
use crate::raft::TypeConfig;
use crate::raft::batcher::Batcher;
use crate::raft::network::NetworkFactory;
use crate::raft::network::PeerChannels;
use crate::raft::network::RAFT_MESSAGE_BYTES_MAX;
use crate::raft::service::RaftService;

/// Largest answer a client of ours (and a follower forwarding a request)
/// accepts: twice the largest `limits.result_bytes_max`.
pub const RESPONSE_BYTES_MAX: usize = 64 << 20;

/// Metadata key marking a request a follower forwarded to the leader, so it
/// is forwarded at most once.
const FORWARDED_KEY: &str = "x-tandem-forwarded";

/// What every service of a node shares.
pub struct Node {
    pub config: NodeConfig,
    pub raft: Raft,
    pub state_machine: StateMachine,
    /// The Raft log's append and fsync counters.
    pub log_stats: Arc<crate::raft::log_store::LogStats>,
    pub peers: PeerChannels,
    pub participants: Registry,
    /// Where this node's decisions queue to share Raft entries.
    pub decisions: Batcher<DecideItem>,
    /// Where the decision log API's completions queue to share Raft
    /// entries.
    pub completions: Batcher<Completion>,
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The CPU time this process has used so far (user and system, every
/// thread), in microseconds; 0 if the system does not say.
pub fn process_cpu_us() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is given and nothing else.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return 0;
    }
    // SAFETY: getrusage returned 0, so it filled the struct in.
    let usage = unsafe { usage.assume_init() };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

impl Node {
    /// Proposes a command through Raft and waits until it is applied here.
    /// The time in the command is stamped now, on the node that proposes it,
    /// which is the leader: a follower's proposal fails with a leader hint.
    /// Decisions and single completions go through their batchers and may
    /// share an entry.
    pub async fn propose(&self, op: Op) -> Result<CommandResponse> {
        let result = match op {
            Op::Decide { txid, decision, info } => self.decisions.propose(DecideItem { txid, decision, info }).await,
            Op::Complete { txid } => self.completions.propose(Completion { txid, heuristic: Vec::new() }).await,
            op => self.raft.client_write(Command::new(now_unix_ms(), op)).await.map(|r| r.data),
        };
        result.map_err(|e| self.write_error(e))
    }

    /// Forgets the records completed before `before_unix_ms`, in rounds: a
    /// `Forget` entry each, of at most about `retention.forget_round_max`
    /// records. Applying a `Forget` holds up every entry after it, on every
    /// node, for as long as it takes to find and delete its records; in
    /// rounds, the entries proposed meanwhile are applied between them.
    /// One `Forget` of about a minute's completions (113,029 records) held
    /// the log up for 353 ms on the leader, and the benchmark lost about
    /// 0.8 s of transfers; in rounds of 2,000 the longest round took 40 ms
    /// (README, Benchmark). A time in the future counts as now, as it would
    /// in one `Forget`, so that the rounds do not chase new completions. A
    /// round that drops nothing ends the rounds early (another forget took
    /// its records, or the clock stepped back below its time): the next
    /// call goes on, where repeating the round could fill the log with
    /// empty `Forget`s.
    pub async fn forget_before(&self, before_unix_ms: u64) -> Result<Forgotten> {
        let before_unix_ms = before_unix_ms.min(now_unix_ms());
        let limit = usize::try_from(self.config.retention.forget_round_max).unwrap_or(usize::MAX);
        let mut done = Forgotten::default();
        loop {
            let cutoff = self.state_machine.forget_cutoff(before_unix_ms, limit).await?;
            let started = std::time::Instant::now();
            let count = match self.propose(Op::Forget { before_unix_ms: cutoff }).await? {
                CommandResponse::Forgotten { count } => count,
                other => return Err(Error::Internal(format!("a forget was answered with {other:?}"))),
            };
            done.count += count;
            done.rounds += 1;
            done.longest_round = done.longest_round.max(started.elapsed());
            if cutoff >= before_unix_ms || count == 0 {
                return Ok(done);
            }
        }
    }

    /// Waits until this node, as leader, has applied everything committed
    /// before now, so that a read of its state machine is linearizable.
    pub async fn linearize(&self) -> Result<()> {
        match self.raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(openraft::errors::LinearizableReadError::ForwardToLeader(f))) => {
                Err(self.not_leader(&f))
            }
            Err(RaftError::APIError(e)) => Err(Error::Unavailable { message: e.to_string(), leader: None }),
            Err(RaftError::Fatal(e)) => Err(Error::Internal(format!("raft stopped: {e}"))),
        }
    }

    pub(crate) fn write_error(&self, e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Error {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => self.not_leader(&f),
            RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => Error::OutcomeUnknown(format!(
                "the leader changed before the entry was known to commit (new leader: {:?})",
                f.leader_id
            )),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => Error::FailedPrecondition(e.to_string()),
            RaftError::APIError(e) => Error::FailedPrecondition(e.to_string()),
            RaftError::Fatal(e) => Error::Internal(format!("raft stopped: {e}")),
        }
    }

    /// The error for a request that needs the leader, on a node that is not.
    pub(crate) fn not_leader(&self, f: &ForwardToLeader<TypeConfig>) -> Error {
        self.not_leader_hint(f.leader_id, f.leader_node.as_ref())
    }

    /// [`Self::not_leader`], from what this node knows of the leader now.
    pub(crate) fn not_leader_now(&self) -> Error {
        let m = self.raft.metrics().borrow_watched().clone();
        let leader_node = m.current_leader.and_then(|id| m.membership_config.membership().get_node(&id).cloned());
        self.not_leader_hint(m.current_leader, leader_node.as_ref())
    }

    fn not_leader_hint(&self, leader_id: Option<u64>, leader_node: Option<&crate::raft::Node>) -> Error {
        let m = self.raft.metrics().borrow_watched().clone();
        let initialized = m.membership_config.voter_ids().next().is_some();
        // A restarted member has a log or a term before its membership is
        // loaded: it is starting up, and another node may answer.
        if !initialized && (m.last_log_index.is_some() || m.current_term > 0) {
            return Error::Unavailable { message: format!("node {} is starting up", self.config.id), leader: None };
        }
        if !initialized {
            return Error::FailedPrecondition(format!(
                "node {} is not a member of any cluster yet: run `tandem cluster init` or add it with `tandem cluster add-learner`",
                self.config.id
            ));
        }
        let leader = match (leader_id, leader_node) {
            (Some(id), Some(node)) => Some(LeaderHint { id, addr: node.addr.clone() }),
            _ => None,
        };
        let message = match &leader {
            Some(_) => format!("node {} is not the leader", self.config.id),
            None => format!("node {} knows no leader yet (election in progress?)", self.config.id),
        };
        Error::Unavailable { message, leader }
    }

    /// The channel to the leader named by `e`, if `request` may be forwarded.
    pub(crate) fn forward_target<T>(&self, request: &Request<T>, e: &Error) -> Option<Channel> {
        if request.metadata().contains_key(FORWARDED_KEY) {
            return None;
        }
        let hint = e.leader_hint()?;
        if hint.id == self.config.id {
            return None;
        }
        self.peers.get(&hint.addr).ok()
    }

    /// Checks a request's encoded size against `limits.request_bytes_max`.
    /// The page size a list request asks for: 0 means the default (100, at
    /// most `limits.list_page_max`); above the maximum is refused.
    pub(crate) fn page_limit(&self, asked: u32) -> Result<u32> {
        const LIST_PAGE_DEFAULT: u32 = 100;
        let max = self.config.limits.list_page_max;
        match asked {
            0 => Ok(LIST_PAGE_DEFAULT.min(max)),
            n if n > max => {
                Err(Error::InvalidInput(format!("limit {n} is over the limit limits.list_page_max = {max}")))
            }
            n => Ok(n),
        }
    }

    pub(crate) fn check_request_size(&self, size: usize) -> Result<()> {
        let max = self.config.limits.request_bytes_max;
        if size > max {
            return Err(Error::InvalidInput(format!(
                "request is {size} bytes, over the limit limits.request_bytes_max = {max}"
            )));
        }
        Ok(())
    }
}

/// Sends `req` on to the leader, marked as forwarded. If the leader cannot be
/// reached, the request may or may not have arrived, so the answer is
/// "outcome unknown" (gRPC UNKNOWN), naming the leader; a client retries
/// only what is safe to repeat.
pub(crate) async fn forward<Req, Resp, F, Fut>(
    channel: Channel,
    req: Req,
    original: Error,
    call: F,
) -> std::result::Result<tonic::Response<Resp>, tonic::Status>
where
    F: FnOnce(Channel, Request<Req>) -> Fut,
    Fut: Future<Output = std::result::Result<tonic::Response<Resp>, tonic::Status>>,
{
    let mut request = Request::new(req);
    request.metadata_mut().insert(FORWARDED_KEY, tonic::metadata::MetadataValue::from_static("1"));
    match call(channel, request).await {
        Err(s) if s.code() == tonic::Code::Unavailable && !s.metadata().contains_key(crate::error::LEADER_ADDR_KEY) => {
            Err(Error::OutcomeUnknown(format!("forwarding to the leader failed ({original}): {}", s.message())).into())
        }
        other => other,
    }
}

/// Runs a node until SIGINT or SIGTERM.
pub async fn serve(config: NodeConfig) -> Result<()> {
    config.validate()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::InvalidInput(format!("cannot listen on {}: {e}", config.listen)))?;
    let node = start(config).await?;
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    };
    let coordinator = crate::coordinator::Coordinator::new(node.clone());
    let upkeep = [
        tokio::spawn(forget_expired(node.clone())),
        tokio::spawn(crate::coordinator::recovery::run(
            coordinator.clone(),
            Duration::from_millis(node.config.coordinator.recovery_interval_ms),
        )),
    ];
    let served = run_grpc(node.clone(), coordinator, listener, shutdown).await;
    tracing::info!("shutting down");
    for task in upkeep {
        task.abort();
        task.await.ok();
    }
    node.raft.shutdown().await.map_err(Error::internal)?;
    // The last reference closes RocksDB, which must happen before exit.
    drop(node);
    tracing::info!("stopped");
    served
}

/// Opens the store, starts Raft and checks the participants (in the
/// background: a participant that is down must not stop the node).
pub async fn start(config: NodeConfig) -> Result<Arc<Node>> {
    let (log_store, state_machine) = crate::raft::open_store(&config.data_dir)?;
    let log_stats = log_store.stats();
    let raft_config = Arc::new(crate::raft::raft_config(&config)?);
    let peers = PeerChannels::default();
    let raft = Raft::new(
        config.id,
        raft_config,
        NetworkFactory::new(peers.clone(), &config.cluster_id)?,
        log_store,
        state_machine.clone(),
    )
    .await
    .map_err(|e| Error::Internal(format!("starting raft: {e}")))?;
    tracing::info!(id = config.id, addr = %config.advertise_addr(), data_dir = %config.data_dir.display(), "node started");
    let participants = Registry::from_config(&config.participants)?;
    let checked = participants.clone();
    tokio::spawn(async move { checked.check_all().await });
    let decisions = Batcher::start(raft.clone(), now_unix_ms);
    let completions = Batcher::start(raft.clone(), now_unix_ms);
    Ok(Arc::new(Node { config, raft, state_machine, log_stats, peers, participants, decisions, completions }))
}

/// Serves every gRPC service of `node` on `listener` until `shutdown`.
pub async fn run_grpc(
    node: Arc<Node>,
    coordinator: Arc<crate::coordinator::Coordinator>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let request_max = node.config.limits.request_bytes_max.saturating_mul(2).max(4 << 20);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<proto::cluster_server::ClusterServer<cluster::ClusterService>>().await;
    health_reporter
        .set_serving::<proto::decision_log_server::DecisionLogServer<decision_log::DecisionLogService>>()
        .await;
    health_reporter
        .set_serving::<proto::transactions_server::TransactionsServer<transactions::TransactionsService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(Error::internal)?;
    // Small answers go out at once: without TCP_NODELAY, Nagle's algorithm
    // holds them until the peer's delayed ACK, tens of milliseconds.
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |conn| {
        if let Ok(stream) = &conn {
            stream.set_nodelay(true).ok();
        }
        conn
    });
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            proto::raft_server::RaftServer::new(RaftService::new(
                node.raft.clone(),
                &node.config.cluster_id,
                node.state_machine.snapshot_dir(),
            ))
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX),
        )
        .add_service(
            proto::cluster_server::ClusterServer::new(cluster::ClusterService::new(node.clone(), coordinator.clone()))
                .max_decoding_message_size(request_max),
        )
        .add_service(
            proto::decision_log_server::DecisionLogServer::new(decision_log::DecisionLogService::new(node.clone()))
                .max_decoding_message_size(request_max),
        )
        .add_service(
            proto::transactions_server::TransactionsServer::new(transactions::TransactionsService::new(
                node.clone(),
                coordinator,
            ))
            .max_decoding_message_size(request_max),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::Internal(format!("gRPC server: {e}")))
}

/// What [`Node::forget_before`] did.
#[derive(Debug, Default)]
pub struct Forgotten {
    pub count: u64,
    /// `Forget` entries proposed.
    pub rounds: u64,
    /// The longest from proposing a round to its being applied here.
    pub longest_round: Duration,
}

/// On the leader, every `retention.forget_interval_s`: forget completed
/// records older than `retention.completed_retention_s`. The cut-off time is
/// computed here, by the proposer, never at apply.
async fn forget_expired(node: Arc<Node>) {
    let interval = Duration::from_secs(node.config.retention.forget_interval_s);
    let retention_ms = node.config.retention.completed_retention_s.saturating_mul(1000);
    loop {
        tokio::time::sleep(interval).await;
        if !node.raft.is_leader() {
            continue;
        }
        let before_unix_ms = now_unix_ms().saturating_sub(retention_ms);
        match node.forget_before(before_unix_ms).await {
            Ok(Forgotten { count, rounds, longest_round }) if count > 0 => tracing::info!(
                count,
                rounds,
                longest_round_ms = longest_round.as_millis() as u64,
                "forgot completed records past retention"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "forgetting expired records failed; will retry"),
        }
    }
}
