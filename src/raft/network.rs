//! Node-to-node Raft RPC, client side: openraft's messages over tonic.
//!
//! Each message is openraft's own serde type, encoded as JSON inside a
//! `RaftPayload` (see `proto/tandem/v1/raft.proto`); the answer is the
//! receiving node's `Result`, encoded the same way. A snapshot travels as a
//! stream of chunks. One tonic channel per peer is kept in [`PeerChannels`]
//! and shared by every openraft client of that peer (HTTP/2 multiplexes
//! them), and by request forwarding in the server.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use openraft::AnyError;
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
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::type_config::alias::SnapshotOf;
use openraft::type_config::alias::VoteOf;
use serde::Serialize;
use serde::de::DeserializeOwned;
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
