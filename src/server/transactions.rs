//! The `tandem.v1.Transactions` service: the client API.
//!
//! Every call runs on the leader; a follower forwards it there once.

use std::sync::Arc;

use prost::Message;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::Node;
use super::convert;
use crate::coordinator::Coordinator;
use crate::coordinator::EnlistSpec;
use crate::error::Error;
use crate::error::Result;
use crate::proto as pb;
use crate::proto::transactions_client::TransactionsClient;
use crate::txn::Decision;
use crate::txn::TxId;

pub struct TransactionsService {
    node: Arc<Node>,
    coordinator: Arc<Coordinator>,
}

impl TransactionsService {
    pub fn new(node: Arc<Node>, coordinator: Arc<Coordinator>) -> Self {
        Self { node, coordinator }
    }

    /// Refuses a request over `limits.request_bytes_max`, counting it.
    fn check_size(&self, len: usize) -> Result<()> {
        self.node.check_request_size(len).or_else(|e| self.coordinator.refuse(e))
    }

    /// Only the leader runs transactions.
    fn leader(&self) -> Result<()> {
        if self.node.raft.is_leader() { Ok(()) } else { Err(self.node.not_leader_now()) }
    }

    async fn transact_local(&self, req: &pb::TransactRequest) -> Result<pb::TransactResponse> {
        self.check_size(req.encoded_len())?;
        self.leader()?;
        let spec = convert::transact_from_pb(req).or_else(|e| self.coordinator.refuse(e))?;
        let names: Vec<String> = spec.branches.iter().map(|b| b.participant.clone()).collect();
        let outcome = self.coordinator.transact(spec).await?;
        if !outcome.duplicate {
            crate::failpoint::hit("server::before_transact_answer").await;
        }
        Ok(convert::transact_to_pb(&outcome, &names))
    }

    async fn begin_local(&self, req: &pb::BeginRequest) -> Result<pb::BeginResponse> {
        self.check_size(req.encoded_len())?;
        self.leader()?;
        let txid = self.coordinator.begin(convert::begin_from_pb(req)).await?;
        Ok(pb::BeginResponse { txid: txid.to_string() })
    }

    async fn execute_local(&self, req: &pb::ExecuteRequest) -> Result<pb::StatementResult> {
        self.check_size(req.encoded_len())?;
        self.leader()?;
        let txid = TxId::parse(&req.txid)?;
        let statement = req.statement.as_ref().ok_or_else(|| Error::InvalidInput("statement is missing".into()))?;
        let statement = convert::statement_from_pb(statement).or_else(|e| self.coordinator.refuse(e))?;
        let result = self.coordinator.execute(&txid, &req.participant, statement).await?;
        Ok(convert::result_to_pb(&result))
    }

    async fn commit_local(&self, req: &pb::CommitRequest) -> Result<pb::TransactResponse> {
        self.leader()?;
        let txid = TxId::parse(&req.txid)?;
        let outcome = self.coordinator.commit(&txid).await?;
        Ok(convert::transact_to_pb(&outcome, &[]))
    }

    async fn rollback_local(&self, req: &pb::RollbackRequest) -> Result<pb::RollbackResponse> {
        self.leader()?;
        self.coordinator.rollback(&TxId::parse(&req.txid)?).await?;
        Ok(pb::RollbackResponse {})
    }

    async fn enlist_local(&self, req: &pb::EnlistRequest) -> Result<pb::EnlistResponse> {
        self.check_size(req.encoded_len())?;
        self.leader()?;
        let txid = TxId::parse(&req.txid)?;
        let spec = EnlistSpec {
            participant: (!req.participant.is_empty()).then(|| req.participant.clone()),
            endpoint: (!req.endpoint.is_empty()).then(|| req.endpoint.clone()),
            branch: req.branch.clone(),
        };
        let branch = self.coordinator.enlist(&txid, spec).await?;
        Ok(pb::EnlistResponse { branch: Some(branch) })
    }

    async fn get_outcome_local(&self, req: &pb::GetOutcomeRequest) -> Result<pb::GetOutcomeResponse> {
        self.leader()?;
        let outcome = self.coordinator.get_outcome(&TxId::parse(&req.txid)?).await?;
        let (outcome, reason) = match outcome {
            None => (pb::Outcome::Unspecified, String::new()),
            Some(Decision::Commit { .. }) => (pb::Outcome::Committed, String::new()),
            Some(Decision::Abort { reason }) => (pb::Outcome::Aborted, reason),
        };
        Ok(pb::GetOutcomeResponse { outcome: outcome as i32, reason })
    }

    async fn get_local(&self, req: &pb::GetTransactionRequest) -> Result<pb::Transaction> {
        self.leader()?;
        let status = self.coordinator.get_transaction(&TxId::parse(&req.txid)?).await?;
        Ok(convert::transaction_to_pb(&status))
    }

    async fn list_local(&self, req: &pb::ListTransactionsRequest) -> Result<pb::ListTransactionsResponse> {
        self.leader()?;
        let state = convert::txn_state_from_pb(req.state)?;
        let after = if req.after.is_empty() { None } else { Some(TxId::parse(&req.after)?) };
        let limit = self.node.page_limit(req.limit)?;
        let list = self.coordinator.list_transactions(state, after, limit as usize).await?;
        Ok(pb::ListTransactionsResponse { transactions: list.iter().map(convert::transaction_to_pb).collect() })
    }
}

#[tonic::async_trait]
impl pb::transactions_server::Transactions for TransactionsService {
    async fn transact(&self, request: Request<pb::TransactRequest>) -> Result<Response<pb::TransactResponse>, Status> {
        local_or_forward!(self, request, self.transact_local(request.get_ref()).await, TransactionsClient, transact)
    }

    async fn begin(&self, request: Request<pb::BeginRequest>) -> Result<Response<pb::BeginResponse>, Status> {
        local_or_forward!(self, request, self.begin_local(request.get_ref()).await, TransactionsClient, begin)
    }

    async fn execute(&self, request: Request<pb::ExecuteRequest>) -> Result<Response<pb::StatementResult>, Status> {
        local_or_forward!(self, request, self.execute_local(request.get_ref()).await, TransactionsClient, execute)
    }

    async fn commit(&self, request: Request<pb::CommitRequest>) -> Result<Response<pb::TransactResponse>, Status> {
        local_or_forward!(self, request, self.commit_local(request.get_ref()).await, TransactionsClient, commit)
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::RollbackResponse>, Status> {
        local_or_forward!(self, request, self.rollback_local(request.get_ref()).await, TransactionsClient, rollback)
    }

    async fn enlist(&self, request: Request<pb::EnlistRequest>) -> Result<Response<pb::EnlistResponse>, Status> {
        local_or_forward!(self, request, self.enlist_local(request.get_ref()).await, TransactionsClient, enlist)
    }

    async fn get_outcome(
        &self,
        request: Request<pb::GetOutcomeRequest>,
    ) -> Result<Response<pb::GetOutcomeResponse>, Status> {
        local_or_forward!(
            self,
            request,
            self.get_outcome_local(request.get_ref()).await,
            TransactionsClient,
            get_outcome
        )
    }

    async fn get_transaction(
        &self,
        request: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::Transaction>, Status> {
        local_or_forward!(self, request, self.get_local(request.get_ref()).await, TransactionsClient, get_transaction)
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        local_or_forward!(
            self,
            request,
            self.list_local(request.get_ref()).await,
            TransactionsClient,
            list_transactions
        )
    }
}
