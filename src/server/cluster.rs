//! The `tandem.v1.Cluster` service: membership and status.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::InitializeError;
use openraft::errors::RaftError;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::Node;
use super::convert;
use crate::coordinator::Coordinator;
use crate::error::Error;
use crate::proto as pb;
use crate::proto::cluster_client::ClusterClient;
use crate::raft::TypeConfig;

pub struct ClusterService {
    node: Arc<Node>,
    coordinator: Arc<Coordinator>,
}

impl ClusterService {
    pub fn new(node: Arc<Node>, coordinator: Arc<Coordinator>) -> Self {
        Self { node, coordinator }
    }

    /// The coordinator's counters, the Raft log's (entries and appends
    /// written, and the fsyncs that made them durable: group commit shows
    /// as many entries per fsync), the batchers' (decisions, and the
    /// decision log API's completions, per entry), RocksDB's memory and
    /// the CPU time the process has used.
    fn counters(&self) -> std::collections::HashMap<String, u64> {
        let log = self.node.log_stats.snapshot();
        let batchers =
            self.node.decisions.stats().snapshot().into_iter().chain(self.node.completions.stats().snapshot());
        let memory = self.node.state_machine.memory();
        let cpu = [("process_cpu_us", super::process_cpu_us())];
        let all = self.coordinator.metrics.snapshot().into_iter().chain(log).chain(batchers).chain(memory).chain(cpu);
        all.map(|(k, v)| (k.to_string(), v)).collect()
    }

    fn membership_response(&self, resp: openraft::raft::ClientWriteResponse<TypeConfig>) -> pb::MembershipResponse {
        let mut out = pb::MembershipResponse { log_index: resp.log_id.index, ..Default::default() };
        if let Some(m) = resp.membership {
            let voters: BTreeSet<u64> = m.voter_ids().collect();
            for (id, node) in m.nodes() {
                let member = convert::member_to_pb(*id, node);
                if voters.contains(id) { out.voters.push(member) } else { out.learners.push(member) }
            }
        }
        out
    }
}

fn role(state: ServerState) -> pb::Role {
    match state {
        ServerState::Learner => pb::Role::Learner,
        ServerState::Follower => pb::Role::Follower,
        ServerState::Candidate => pb::Role::Candidate,
        ServerState::Leader => pb::Role::Leader,
        ServerState::Shutdown => pb::Role::Shutdown,
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn init(&self, request: Request<pb::InitRequest>) -> Result<Response<pb::InitResponse>, Status> {
        let req = request.into_inner();
        if req.members.is_empty() {
            return Err(Error::InvalidInput("init needs at least one member".into()).into());
        }
        let mut members: BTreeMap<crate::raft::NodeId, crate::raft::Node> = BTreeMap::new();
        for m in &req.members {
            let (id, node) = convert::member_from_pb(m)?;
            if members.contains_key(&id) {
                return Err(Error::InvalidInput(format!("member id {id} appears twice")).into());
            }
            if let Some((other, _)) = members.iter().find(|(_, n)| n.addr == node.addr) {
                return Err(Error::InvalidInput(format!(
                    "members {other} and {id} share the address {}: a node would send Raft messages to itself",
                    node.addr
                ))
                .into());
            }
            members.insert(id, node);
        }
        if !members.contains_key(&self.node.config.id) {
            return Err(Error::InvalidInput(format!(
                "init must run on one of the members; this is node {}",
                self.node.config.id
            ))
            .into());
        }
        match self.node.raft.initialize(members).await {
            Ok(()) => Ok(Response::new(pb::InitResponse {})),
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                Err(Error::FailedPrecondition(format!("this node is already initialised: {e}")).into())
            }
            Err(RaftError::APIError(e)) => Err(Error::InvalidInput(e.to_string()).into()),
            Err(RaftError::Fatal(e)) => Err(Error::Internal(e.to_string()).into()),
        }
    }

    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::NodeStatus>, Status> {
        let m = self.node.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let mut status = pb::NodeStatus {
            id: m.id,
            addr: self.node.config.advertise_addr(),
            cluster_id: self.node.config.cluster_id.clone(),
            role: role(m.state) as i32,
            term: m.current_term,
            leader_id: m.current_leader,
            leader_addr: m
                .current_leader
                .and_then(|id| membership.get_node(&id).map(|n| n.addr.clone()))
                .unwrap_or_default(),
            last_log_index: m.last_log_index,
            committed_index: m.local_committed.map(|l| l.index),
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            initialized: !voters.is_empty(),
            records: self.node.state_machine.record_count_estimate().await?,
            transactions_in_flight: self.coordinator.in_flight_count() as u64,
            counters: self.counters(),
            ..Default::default()
        };
        for (id, node) in membership.nodes() {
            let member = convert::member_to_pb(*id, node);
            if voters.contains(id) { status.voters.push(member) } else { status.learners.push(member) }
        }
        Ok(Response::new(status))
    }

    async fn add_learner(
        &self,
        request: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let member = request.get_ref().member.clone().ok_or_else(|| Error::InvalidInput("member is missing".into()))?;
        let (id, node) = convert::member_from_pb(&member)?;
        let taken = self
            .node
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .nodes()
            .find_map(|(other, n)| (*other != id && n.addr == node.addr).then_some(*other));
        if let Some(other) = taken {
            return Err(Error::InvalidInput(format!("node {other} already has the address {}", node.addr)).into());
        }
        let local = match self.node.raft.add_learner(id, node, true).await {
            Ok(resp) => Ok(self.membership_response(resp)),
            Err(e) => Err(self.node.write_error(e)),
        };
        local_or_forward!(self, request, local, ClusterClient, add_learner)
    }

    async fn change_membership(
        &self,
        request: Request<pb::ChangeMembershipRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let req = request.get_ref();
        if req.voters.is_empty() {
            return Err(Error::InvalidInput("the new membership needs at least one voter".into()).into());
        }
        let voters: BTreeSet<u64> = req.voters.iter().copied().collect();
        let local = match self.node.raft.change_membership(voters, req.retain_as_learners).await {
            Ok(resp) => Ok(self.membership_response(resp)),
            Err(e) => Err(self.node.write_error(e)),
        };
        local_or_forward!(self, request, local, ClusterClient, change_membership)
    }

    async fn set_fail_point(
        &self,
        request: Request<pb::SetFailPointRequest>,
    ) -> Result<Response<pb::SetFailPointResponse>, Status> {
        let req = request.into_inner();
        crate::failpoint::configure(&req.name, &req.actions)?;
        tracing::warn!(point = %req.name, actions = %req.actions, "fail point set");
        Ok(Response::new(pb::SetFailPointResponse {}))
    }
}
