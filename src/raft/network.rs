//! Node-to-node Raft RPC, client side: openraft's messages over tonic.
//!
//! Each message is openraft's own serde type, encoded as JSON inside a
//! `RaftPayload` (see `proto/tandem/v1/raft.proto`); the answer is the
//! receiving node's `Result`, encoded the same way. Replication travels over
//! a long-lived stream of such requests per follower, answered in order
//! (each heartbeat is a stream of one); a snapshot as a stream of chunks.
//! One tonic channel per peer is kept in [`PeerChannels`] and shared by
//! every openraft client of that peer (HTTP/2 multiplexes them), and by
//! request forwarding in the server.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use futures::Stream;
use openraft::AnyError;
use openraft::OptionalSend;
use openraft::base::BoxFuture;
use openraft::base::BoxStream;
use openraft::errors::Fatal;
use openraft::errors::NetworkError;
use openraft::errors::RPCError;
use openraft::errors::RaftError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkFactory;
use openraft::network::v2::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::type_config::alias::SnapshotOf;
use openraft::type_config::alias::VoteOf;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_stream::StreamExt;
use tonic::metadata::Ascii;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use super::Node;
use super::NodeId;
use super::TypeConfig;
use super::snapshot::SnapshotFile;
use crate::error::Error;
use crate::error::Result;
use crate::proto::RaftPayload;
use crate::proto::SnapshotChunk;
use crate::proto::raft_client::RaftClient;

/// Largest message a node sends or accepts on the Raft service.
pub const RAFT_MESSAGE_BYTES_MAX: usize = 64 << 20;
/// Snapshot data per streamed chunk.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// One lazily connected tonic channel per peer address.
#[derive(Clone, Default)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl PeerChannels {
    /// The channel for `addr` (`host:port`), made on first use.
    pub fn get(&self, addr: &str) -> Result<Channel> {
        let mut channels = self.channels.lock().expect("peer channel map poisoned");
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = endpoint(addr)?.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// A tonic endpoint for `host:port` (or a full `http://` URI).
pub fn endpoint(addr: &str) -> Result<Endpoint> {
    let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| Error::InvalidInput(format!("bad address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// Metadata key carrying the sender's cluster id on every Raft message: a
/// node refuses messages from another cluster (a misconfigured address).
pub const CLUSTER_ID_KEY: &str = "x-tandem-cluster-id";

/// Makes openraft's clients for peers.
pub struct NetworkFactory {
    channels: PeerChannels,
    cluster_id: MetadataValue<Ascii>,
}

impl NetworkFactory {
    pub fn new(channels: PeerChannels, cluster_id: &str) -> Result<Self> {
        let cluster_id = MetadataValue::try_from(cluster_id)
            .map_err(|_| Error::InvalidInput(format!("cluster id {cluster_id:?} is not ASCII")))?;
        Ok(Self { channels, cluster_id })
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        let client = self.channels.get(&node.addr).map(|channel| {
            RaftClient::new(channel)
                .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        });
        PeerClient { target, addr: node.addr.clone(), client, cluster_id: self.cluster_id.clone() }
    }
}

/// openraft's client for one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    /// An unusable address is reported on every call, not at construction.
    client: Result<RaftClient<Channel>>,
    cluster_id: MetadataValue<Ascii>,
}

fn network_error<E: std::fmt::Display>(e: E) -> NetworkError<TypeConfig> {
    NetworkError::new(&AnyError::error(e.to_string()))
}

/// Sorts a failed call into what openraft should do: back off from a peer
/// that cannot be reached, retry soon after any other failure.
fn status_error(addr: &str, status: tonic::Status) -> RPCError<TypeConfig> {
    let message = format!("{addr}: {status}");
    match status.code() {
        tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&AnyError::error(message))),
        _ => RPCError::Network(network_error(message)),
    }
}

fn encode<T: Serialize>(value: &T) -> Result<RaftPayload, NetworkError<TypeConfig>> {
    Ok(RaftPayload { data: serde_json::to_vec(value).map_err(network_error)? })
}

fn decode<T: DeserializeOwned>(payload: &RaftPayload) -> Result<T, NetworkError<TypeConfig>> {
    serde_json::from_slice(&payload.data).map_err(network_error)
}

impl PeerClient {
    fn client(&self) -> Result<RaftClient<Channel>, RPCError<TypeConfig>> {
        self.client.clone().map_err(|e| RPCError::Unreachable(Unreachable::new(&AnyError::error(e.to_string()))))
    }

    /// Sends one request and decodes the peer's `Result`.
    async fn call<Req, Resp, F, Fut>(&self, req: &Req, option: &RPCOption, f: F) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, tonic::Request<RaftPayload>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftPayload>, tonic::Status>>,
    {
        let mut request = tonic::Request::new(encode(req)?);
        request.set_timeout(option.hard_ttl());
        request.metadata_mut().insert(CLUSTER_ID_KEY, self.cluster_id.clone());
        let reply = f(self.client()?, request).await.map_err(|s| status_error(&self.addr, s))?;
        let result: Result<Resp, RaftError<TypeConfig>> = decode(reply.get_ref())?;
        result.map_err(|e| RPCError::Network(network_error(format!("node {}: {e}", self.target))))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&rpc, &option, |mut c, r| async move { c.append_entries(r).await }).await
    }

    /// Replication over one gRPC stream: each request goes out as openraft
    /// produces it, without waiting for the answers to earlier ones (the
    /// default sends one and waits). The stream opens when openraft first
    /// reads the answers and its first request is ready, as the default's
    /// first call does. A request unanswered `hard_ttl` after it went out
    /// ends the stream with an error, and openraft opens a new one. That is
    /// the deadline a single call had (the heartbeat interval); openraft
    /// suggests the shorter `soft_ttl`, but an error here drops every
    /// request in flight, to be sent again to a follower that is slow
    /// already, so a shorter deadline would cost more on a brief fsync
    /// stall. The stream's own lifetime is not limited. Heartbeats come
    /// here too, each a stream of one request.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>, RPCError<TypeConfig>>,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        let ttl = option.hard_ttl();
        let client = self.client();
        let (cluster_id, addr, target) = (self.cluster_id.clone(), self.addr.clone(), self.target);
        // Opened on the first read of the answers, as openraft's default
        // does: openraft reads them while watching for its cancellation.
        let opening = Box::pin(async move {
            // The first request before the stream: producing it is where
            // openraft waits out its backoff after a failure, so a peer
            // that refuses connections is not called again at once.
            let mut input = input;
            let Some(first) = input.next().await else { return Ok(None) };
            let input = futures::stream::iter([first]).chain(input);
            // When each request still unanswered went out, oldest first.
            let unanswered = Arc::new(Mutex::new(VecDeque::new()));
            let sent = unanswered.clone();
            // The request side ends when the answers are dropped: HTTP/2
            // would otherwise go on sending (and polling openraft's request
            // stream, which the next stream to this peer needs) after
            // openraft has given up on this one.
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let requests = futures::StreamExt::take_until(input, stopped).map_while(move |rpc| match encode(&rpc) {
                Ok(payload) => {
                    sent.lock().expect("unanswered lock").push_back(Instant::now());
                    Some(payload)
                }
                Err(e) => {
                    tracing::error!(error = %e, "an AppendEntries request could not be encoded; ending the stream");
                    None
                }
            });
            let mut request = tonic::Request::new(requests);
            request.metadata_mut().insert(CLUSTER_ID_KEY, cluster_id);
            let mut client = client?;
            let opened = tokio::time::timeout(ttl, client.append_stream(request))
                .await
                .map_err(|_| {
                    RPCError::Network(network_error(format!("{addr}: no answer to opening a stream in {ttl:?}")))
                })?
                .map_err(|s| status_error(&addr, s))?;
            Ok(Some(Box::new(Answers { answers: opened.into_inner(), unanswered, ttl, addr, target, _stop: stop })))
        });
        let answers = futures::stream::unfold(Stage::Opening(opening), |stage| async move {
            let mut answers = match stage {
                Stage::Opening(opening) => match opening.await {
                    Ok(Some(answers)) => answers,
                    Ok(None) => return None,
                    Err(e) => return Some((Err(e), Stage::Done)),
                },
                Stage::Open(answers) => answers,
                Stage::Done => return None,
            };
            let next = answers.next().await?;
            let stage = if next.is_ok() { Stage::Open(answers) } else { Stage::Done };
            Some((next, stage))
        });
        Box::pin(std::future::ready(Ok(Box::pin(answers) as BoxStream<'s, _>)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&rpc, &option, |mut c, r| async move { c.vote(r).await }).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&rpc, &option, |mut c, r| async move { c.pre_vote(r).await }).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header = serde_json::to_vec(&(&vote, &snapshot.meta)).map_err(network_error)?;
        // Written out from the checkpoint now, off the async workers.
        let data = snapshot.snapshot;
        let file = tokio::task::spawn_blocking(move || data.into_file())
            .await
            .map_err(|e| StreamingError::Network(network_error(e)))?
            .map_err(|e| StreamingError::Network(network_error(e)))?;
        let mut request = tonic::Request::new(chunks(tokio::fs::File::from_std(file), header));
        request.set_timeout(option.hard_ttl());
        request.metadata_mut().insert(CLUSTER_ID_KEY, self.cluster_id.clone());
        let mut client = self.client().map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => StreamingError::Network(network_error(other)),
        })?;
        let addr = self.addr.clone();
        let send = async move {
            let reply = client.install_snapshot(request).await.map_err(|s| match status_error(&addr, s) {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                other => StreamingError::Network(network_error(other)),
            })?;
            let result: Result<SnapshotResponse<TypeConfig>, RaftError<TypeConfig>> = decode(reply.get_ref())?;
            result.map_err(|e| StreamingError::Network(network_error(e)))
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = send => result,
        }
    }
}

/// Where a replication stream stands, as openraft reads its answers.
enum Stage {
    Opening(BoxFuture<'static, Result<Option<Box<Answers>>, RPCError<TypeConfig>>>),
    Open(Box<Answers>),
    Done,
}

/// The follower's side of a replication stream, as openraft reads it.
struct Answers {
    answers: tonic::Streaming<RaftPayload>,
    unanswered: Arc<Mutex<VecDeque<Instant>>>,
    ttl: Duration,
    addr: String,
    target: NodeId,
    /// Dropped with the answers, it ends the requests.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Answers {
    /// The next answer; `None` when the follower ends the stream. While
    /// requests are unanswered, the oldest may wait `ttl` from when it went
    /// out; an idle stream waits for as long as it is idle.
    async fn next(&mut self) -> Option<Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>> {
        loop {
            let oldest = self.unanswered.lock().expect("unanswered lock").front().copied();
            let wait = oldest.map_or(self.ttl, |sent| (sent + self.ttl).saturating_duration_since(Instant::now()));
            let message = match tokio::time::timeout(wait, self.answers.message()).await {
                Ok(message) => message,
                Err(_) => {
                    // A request sent during the wait may be the oldest now.
                    let oldest = self.unanswered.lock().expect("unanswered lock").front().copied();
                    match oldest {
                        Some(sent) if sent.elapsed() >= self.ttl => {
                            let e = format!(
                                "{}: an AppendEntries request unanswered after {:?}",
                                self.addr,
                                sent.elapsed()
                            );
                            return Some(Err(RPCError::Network(network_error(e))));
                        }
                        _ => continue,
                    }
                }
            };
            let payload = match message {
                Ok(Some(payload)) => payload,
                Ok(None) => return None,
                Err(status) => return Some(Err(status_error(&self.addr, status))),
            };
            self.unanswered.lock().expect("unanswered lock").pop_front();
            let answer: Result<StreamAppendResult<TypeConfig>, Fatal<TypeConfig>> = match decode(&payload) {
                Ok(answer) => answer,
                Err(e) => return Some(Err(RPCError::Network(e))),
            };
            return Some(answer.map_err(|e| RPCError::Network(network_error(format!("node {}: {e}", self.target)))));
        }
    }
}

/// A snapshot file as a stream of chunks, read a chunk at a time; the first
/// carries `header`. A read error ends the stream early, and the receiver
/// refuses the file it got (it lacks its trailer).
fn chunks(file: tokio::fs::File, header: Vec<u8>) -> impl futures::Stream<Item = SnapshotChunk> + Send + 'static {
    futures::stream::unfold(Some((file, header)), |state| async move {
        let (mut file, header) = state?;
        let mut data = vec![0; SNAPSHOT_CHUNK_BYTES];
        let mut filled = 0;
        while filled < data.len() {
            match tokio::io::AsyncReadExt::read(&mut file, &mut data[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the snapshot to send failed");
                    return None;
                }
            }
        }
        data.truncate(filled);
        let last = filled < SNAPSHOT_CHUNK_BYTES;
        let chunk = SnapshotChunk { header, data };
        Some((chunk, if last { None } else { Some((file, Vec::new())) }))
    })
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use openraft::Vote;
    use tokio::net::TcpListener;
    use tonic::Request;
    use tonic::Response;
    use tonic::Status;
    use tonic::Streaming;

    use super::*;
    use crate::proto::raft_server;

    /// A peer that takes replication streams and either answers every
    /// request at once, as a follower with nothing to write would, or none,
    /// as a stopped process would.
    #[derive(Default)]
    struct TestPeer {
        answers: bool,
        /// Told when a silent stream starts and when its requests end.
        started: Arc<tokio::sync::Notify>,
        ended: Arc<tokio::sync::Notify>,
    }

    type Answers = Pin<Box<dyn Stream<Item = std::result::Result<RaftPayload, Status>> + Send + 'static>>;

    #[tonic::async_trait]
    impl raft_server::Raft for TestPeer {
        type AppendStreamStream = Answers;

        async fn append_stream(
            &self,
            request: Request<Streaming<RaftPayload>>,
        ) -> std::result::Result<Response<Answers>, Status> {
            let mut requests = request.into_inner();
            if self.answers {
                let answers = requests.map(|request| {
                    request?;
                    let answer: std::result::Result<StreamAppendResult<TypeConfig>, Fatal<TypeConfig>> = Ok(Ok(None));
                    Ok(RaftPayload { data: serde_json::to_vec(&answer).unwrap() })
                });
                return Ok(Response::new(Box::pin(answers)));
            }
            // Reads the requests (keeping the stream open) and answers none.
            self.started.notify_one();
            let ended = self.ended.clone();
            tokio::spawn(async move {
                while let Some(Ok(_)) = requests.next().await {}
                ended.notify_one();
            });
            Ok(Response::new(Box::pin(futures::stream::pending())))
        }

        async fn append_entries(&self, _: Request<RaftPayload>) -> std::result::Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("test peer"))
        }

        async fn vote(&self, _: Request<RaftPayload>) -> std::result::Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("test peer"))
        }

        async fn pre_vote(&self, _: Request<RaftPayload>) -> std::result::Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("test peer"))
        }

        async fn install_snapshot(
            &self,
            _: Request<Streaming<SnapshotChunk>>,
        ) -> std::result::Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("test peer"))
        }
    }

    async fn silent_peer() -> PeerClient {
        peer(TestPeer::default()).await
    }

    async fn peer<R: raft_server::Raft>(service: R) -> PeerClient {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(raft_server::RaftServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        client_of(addr).await
    }

    async fn client_of(addr: String) -> PeerClient {
        let mut factory = NetworkFactory::new(PeerChannels::default(), "test").unwrap();
        factory.new_client(2, &Node::new(addr)).await
    }

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest { vote: Vote::new(1, 1), prev_log_id: None, leader_commit: None, entries: vec![] }
    }

    #[tokio::test]
    async fn an_unanswered_append_ends_the_stream_with_an_error() {
        let mut peer = silent_peer().await;
        let requests = futures::stream::iter([heartbeat()]).chain(futures::stream::pending());
        let option = RPCOption::new(Duration::from_secs(1));
        let mut answers = peer.stream_append(Box::pin(requests), option).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(30), answers.next()).await.expect("an answer or an error");
        assert!(matches!(first, Some(Err(RPCError::Network(_)))), "{first:?}");
    }

    #[tokio::test]
    async fn an_idle_stream_stays_open() {
        let mut peer = peer(TestPeer { answers: true, ..Default::default() }).await;
        let requests = futures::stream::iter([heartbeat()]).chain(futures::stream::pending());
        let option = RPCOption::new(Duration::from_secs(1));
        let mut answers = peer.stream_append(Box::pin(requests), option).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(30), answers.next()).await.expect("an answer");
        assert!(matches!(first, Some(Ok(Ok(None)))), "{first:?}");
        // Four deadlines pass with nothing sent: nothing to answer, no error.
        let waited = tokio::time::timeout(Duration::from_secs(4), answers.next()).await;
        assert!(waited.is_err(), "{waited:?}");
    }

    #[tokio::test]
    async fn nothing_connects_before_the_first_request() {
        // openraft waits out its backoff while it makes a request: a stream
        // opened before it has one would call a failing peer at once.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(socket);
            }
        });
        let mut peer = client_of(addr).await;
        let option = RPCOption::new(Duration::from_secs(1));
        let mut answers = peer.stream_append(Box::pin(futures::stream::pending()), option).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(2), answers.next()).await;
        assert!(waited.is_err(), "{waited:?}");
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn dropping_the_answers_ends_the_requests() {
        let silent = TestPeer::default();
        let (started, ended) = (silent.started.clone(), silent.ended.clone());
        let mut peer = peer(silent).await;
        let requests = futures::stream::iter([heartbeat()]).chain(futures::stream::pending());
        let option = RPCOption::new(Duration::from_secs(60));
        let mut answers = peer.stream_append(Box::pin(requests), option).await.unwrap();
        // Reading the answers opens the stream.
        tokio::select! {
            _ = started.notified() => {}
            answer = answers.next() => panic!("the silent peer answered: {answer:?}"),
        }
        drop(answers);
        // openraft's request stream would otherwise stay polled (and hold
        // its replication state) with nobody reading the answers.
        tokio::time::timeout(Duration::from_secs(30), ended.notified()).await.expect("the requests ended");
    }

    #[tokio::test]
    async fn answered_requests_keep_the_stream_open() {
        let mut peer = peer(TestPeer { answers: true, ..Default::default() }).await;
        // Six requests, half a deadline apart: three deadlines in all, each
        // request answered at once.
        let requests = futures::stream::unfold(0, |n| async move {
            if n > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            (n < 6).then(|| (heartbeat(), n + 1))
        });
        let option = RPCOption::new(Duration::from_secs(1));
        let answers = peer.stream_append(Box::pin(requests), option).await.unwrap();
        let answers: Vec<_> = tokio::time::timeout(Duration::from_secs(60), answers.collect()).await.unwrap();
        assert_eq!(answers.len(), 6, "{answers:?}");
        assert!(answers.iter().all(|a| matches!(a, Ok(Ok(None)))), "{answers:?}");
    }
}
