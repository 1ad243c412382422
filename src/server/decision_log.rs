//! The `tandem.v1.DecisionLog` service: the replicated decision log, for
//! operators and tests.

use std::sync::Arc;

use prost::Message;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::Node;
use super::convert;
use crate::error::Error;
use crate::error::Result;
use crate::proto as pb;
use crate::proto::decision_log_client::DecisionLogClient;
use crate::raft::CommandResponse;
use crate::raft::Op;
use crate::txn::TxId;

pub struct DecisionLogService {
    node: Arc<Node>,
}

impl DecisionLogService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// What a command's response must be; anything else is a bug.
fn unexpected(resp: CommandResponse) -> Error {
    Error::Internal(format!("unexpected state machine response {resp:?}"))
}

impl DecisionLogService {
    async fn decide_local(&self, req: &pb::DecideRequest) -> Result<pb::DecideResponse> {
        self.node.check_request_size(req.encoded_len())?;
        convert::command_version(req.version)?;
        let txid = TxId::parse(&req.txid)?;
        let decision = convert::decision_from_pb(req.decision.clone())?;
        match self.node.propose(Op::Decide { txid, decision, info: Default::default() }).await? {
            CommandResponse::Decided { won, record } => {
                Ok(pb::DecideResponse { won, record: Some(convert::record_to_pb(&record)) })
            }
            CommandResponse::IdempotencyConflict { key, txid } => {
                Err(Error::AlreadyExists(format!("idempotency key {key:?} is already bound to committed txid {txid}")))
            }
            CommandResponse::Invalid { reason } => Err(Error::InvalidInput(reason)),
            other => Err(unexpected(other)),
        }
    }

    async fn complete_local(&self, req: &pb::CompleteRequest) -> Result<pb::CompleteResponse> {
        self.node.check_request_size(req.encoded_len())?;
        convert::command_version(req.version)?;
        let txid = TxId::parse(&req.txid)?;
        match self.node.propose(Op::Complete { txid }).await? {
            CommandResponse::Completed { record } => {
                Ok(pb::CompleteResponse { record: Some(convert::record_to_pb(&record)) })
            }
            CommandResponse::NotFound { txid } => Err(Error::NotFound(format!("no decision recorded for txid {txid}"))),
            CommandResponse::Invalid { reason } => Err(Error::InvalidInput(reason)),
            other => Err(unexpected(other)),
        }
    }

    async fn forget_local(&self, req: &pb::ForgetRequest) -> Result<pb::ForgetResponse> {
        convert::command_version(req.version)?;
        let done = self.node.forget_before(req.before_unix_ms).await?;
        Ok(pb::ForgetResponse { forgotten: done.count })
    }

    async fn get_local(&self, req: &pb::GetRecordRequest) -> Result<pb::TxnRecord> {
        let txid = TxId::parse(&req.txid)?;
        if !req.local {
            self.node.linearize().await?;
        }
        match self.node.state_machine.get(txid.clone()).await? {
            Some(r) => Ok(convert::record_to_pb(&r)),
            None => Err(Error::NotFound(format!("no decision recorded for txid {txid}"))),
        }
    }

    async fn list_local(&self, req: &pb::ListRecordsRequest) -> Result<pb::ListRecordsResponse> {
        let state = convert::state_from_pb(req.state)?;
        let after = if req.after.is_empty() { None } else { Some(TxId::parse(&req.after)?) };
        let limit = self.node.page_limit(req.limit)?;
        if !req.local {
            self.node.linearize().await?;
        }
        let records = self.node.state_machine.list(state, after, limit as usize).await?;
        let next_after = if records.len() == limit as usize {
            records.last().map(|r| r.txid.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListRecordsResponse { records: records.iter().map(convert::record_to_pb).collect(), next_after })
    }
}

#[tonic::async_trait]
impl pb::decision_log_server::DecisionLog for DecisionLogService {
    async fn decide(&self, request: Request<pb::DecideRequest>) -> Result<Response<pb::DecideResponse>, Status> {
        local_or_forward!(self, request, self.decide_local(request.get_ref()).await, DecisionLogClient, decide)
    }

    async fn complete(&self, request: Request<pb::CompleteRequest>) -> Result<Response<pb::CompleteResponse>, Status> {
        local_or_forward!(self, request, self.complete_local(request.get_ref()).await, DecisionLogClient, complete)
    }

    async fn forget(&self, request: Request<pb::ForgetRequest>) -> Result<Response<pb::ForgetResponse>, Status> {
        local_or_forward!(self, request, self.forget_local(request.get_ref()).await, DecisionLogClient, forget)
    }

    async fn get_record(&self, request: Request<pb::GetRecordRequest>) -> Result<Response<pb::TxnRecord>, Status> {
        local_or_forward!(self, request, self.get_local(request.get_ref()).await, DecisionLogClient, get_record)
    }

    async fn list_records(
        &self,
        request: Request<pb::ListRecordsRequest>,
    ) -> Result<Response<pb::ListRecordsResponse>, Status> {
        local_or_forward!(self, request, self.list_local(request.get_ref()).await, DecisionLogClient, list_records)
    }
}
