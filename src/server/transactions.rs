//! The `tandem.v1.Transactions` service: the client API.

use std::sync::Arc;

use prost::Message;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::Node;
use super::convert;
use crate::coordinator::Coordinator;
use crate::error::Result;
use crate::proto as pb;
use crate::proto::transactions_client::TransactionsClient;

pub struct TransactionsService {
    node: Arc<Node>,
    coordinator: Arc<Coordinator>,
}

impl TransactionsService {
    pub fn new(node: Arc<Node>, coordinator: Arc<Coordinator>) -> Self {
        Self { node, coordinator }
    }

    async fn transact_local(&self, req: &pb::TransactRequest) -> Result<pb::TransactResponse> {
        self.node.check_request_size(req.encoded_len())?;
        let spec = convert::transact_from_pb(req)?;
        let names: Vec<String> = spec.branches.iter().map(|b| b.participant.clone()).collect();
        let outcome = self.coordinator.transact(spec).await?;
        Ok(convert::transact_to_pb(&outcome, &names))
    }
}

#[tonic::async_trait]
impl pb::transactions_server::Transactions for TransactionsService {
    async fn transact(&self, request: Request<pb::TransactRequest>) -> Result<Response<pb::TransactResponse>, Status> {
        local_or_forward!(self, request, self.transact_local(request.get_ref()).await, TransactionsClient, transact)
    }
}
