//! Node-to-node Raft RPC, server side: decodes openraft's messages and hands
//! them to the local Raft instance. See [`super::network`] for the encoding.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;

use openraft::type_config::alias::SnapshotMetaOf;
use openraft::type_config::alias::SnapshotOf;
use openraft::type_config::alias::VoteOf;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;

use super::Raft;
use super::TypeConfig;
use super::network::CLUSTER_ID_KEY;
use super::snapshot::SnapshotFile;
use crate::proto::RaftPayload;
use crate::proto::SnapshotChunk;
use crate::proto::raft_server;

/// Largest snapshot a node accepts (the records of a state machine, one
/// line each).
const SNAPSHOT_BYTES_MAX: usize = 64 << 30;

pub struct RaftService {
    raft: Raft,
    cluster_id: String,
    /// Where a received snapshot is written before it is installed.
    snapshot_dir: PathBuf,
}

impl RaftService {
    pub fn new(raft: Raft, cluster_id: &str, snapshot_dir: &std::path::Path) -> Self {
        Self { raft, cluster_id: cluster_id.to_string(), snapshot_dir: snapshot_dir.to_path_buf() }
    }

    /// Refuses a message from a node of another cluster.
    fn check_cluster<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let sender = request.metadata().get(CLUSTER_ID_KEY).and_then(|v| v.to_str().ok());
        if sender == Some(self.cluster_id.as_str()) {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "Raft message from cluster {:?}; this node belongs to cluster {:?}",
            sender.unwrap_or(""),
            self.cluster_id
        )))
    }
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(payload).map_err(|e| Status::invalid_argument(format!("undecodable Raft message: {e}")))
}

fn internal(e: std::io::Error) -> Status {
    Status::internal(format!("receiving the snapshot: {e}"))
}

fn encode<T: Serialize>(value: &T) -> Result<RaftPayload, Status> {
    let data = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(RaftPayload { data })
}

fn reply<T: Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    encode(value).map(Response::new)
}

/// Answers to a stream of AppendEntries requests, in order.
type AppendAnswers = std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftPayload, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    type AppendStreamStream = AppendAnswers;

    /// Hands the requests to openraft as they arrive; it answers each once
    /// its entries are on disk, in order, while later requests are already
    /// being written. A message that cannot be read ends the stream, after
    /// the answers to those before it, with INVALID_ARGUMENT.
    async fn append_stream(&self, request: Request<Streaming<RaftPayload>>) -> Result<Response<AppendAnswers>, Status> {
        self.check_cluster(&request)?;
        let undecodable = Arc::new(Mutex::new(None));
        let seen = undecodable.clone();
        let requests = request.into_inner().map_while(move |message| match message {
            Ok(payload) => match decode(&payload.data) {
                Ok(rpc) => Some(rpc),
                Err(status) => {
                    *seen.lock().expect("undecodable lock") = Some(status);
                    None
                }
            },
            // The leader went away or dropped the stream.
            Err(status) => {
                tracing::debug!(%status, "replication stream ended by the sender");
                None
            }
        });
        let answers = self.raft.stream_append(requests).map(|answer| encode(&answer));
        let last = futures::stream::once(async move { undecodable.lock().expect("undecodable lock").take() })
            .filter_map(|status| status.map(Err));
        Ok(Response::new(Box::pin(answers.chain(last))))
    }

    async fn append_entries(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.check_cluster(&request)?;
        let rpc = decode(&request.get_ref().data)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.check_cluster(&request)?;
        let rpc = decode(&request.get_ref().data)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn pre_vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.check_cluster(&request)?;
        let rpc = decode(&request.get_ref().data)?;
        reply(&self.raft.pre_vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.check_cluster(&request)?;
        let mut stream = request.into_inner();
        let Some(first) = stream.next().await.transpose()? else {
            return Err(Status::invalid_argument("empty snapshot stream"));
        };
        let (vote, meta): (VoteOf<TypeConfig>, SnapshotMetaOf<TypeConfig>) = decode(&first.header)?;
        // Written to a file as it arrives, never held whole in memory.
        let (file, path) = SnapshotFile::create_received(&self.snapshot_dir).map_err(internal)?;
        let received = SnapshotFile::received(path.clone()).map_err(internal)?;
        let mut out = tokio::io::BufWriter::new(tokio::fs::File::from_std(file));
        let mut bytes = first.data.len();
        out.write_all(&first.data).await.map_err(internal)?;
        while let Some(chunk) = stream.next().await.transpose()? {
            bytes += chunk.data.len();
            if bytes > SNAPSHOT_BYTES_MAX {
                return Err(Status::resource_exhausted("snapshot over 64 GiB"));
            }
            out.write_all(&chunk.data).await.map_err(internal)?;
        }
        out.flush().await.map_err(internal)?;
        drop(out);
        // A transfer cut short, or damaged, is refused here; the leader
        // sends it again.
        let checked = path.clone();
        tokio::task::spawn_blocking(move || crate::raft::state_machine::check_received(&checked))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::invalid_argument(format!("the snapshot arrived damaged: {e}")))?;
        let snapshot = SnapshotOf::<TypeConfig, SnapshotFile> { meta, snapshot: received };
        let result = self.raft.install_full_snapshot(vote, snapshot).await;
        let result: Result<_, openraft::errors::RaftError<TypeConfig>> = result.map_err(Into::into);
        reply(&result)
    }
}
