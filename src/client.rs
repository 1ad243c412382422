//! The Rust client: talks to any node and follows the leader.
//!
//! A request goes to the node the client last had success with. When a node
//! answers UNAVAILABLE, the client retries, with capped exponential backoff,
//! at the leader the node named, or else at the next known node. It retries
//! only requests that are safe to repeat: every decision-log command is
//! (a decision is a compare-and-set; complete and forget are idempotent), and
//! reads are, and so is `Commit`; `Transact` after an unknown outcome only
//! with an idempotency key; `Begin` and `Execute` never. Other errors come
//! back to the caller as they are.
//!
//! ```no_run
//! # async fn example() -> tandem::error::Result<()> {
//! use tandem::client::Client;
//! use tandem::proto as pb;
//!
//! let int = |i: i64| pb::Value { kind: Some(pb::value::Kind::Int64(i)) };
//! let sql = |sql: &str, params| pb::Statement { sql: sql.into(), params };
//! let mut client = Client::new(["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])?;
//! let txid = client.begin(pb::BeginRequest { timeout_ms: 10_000, ..Default::default() }).await?;
//! let row = client.execute(&txid, "accounts_a", sql("SELECT balance FROM balances WHERE id = $1", vec![int(1)])).await?;
//! println!("balance row: {:?}", row.rows);
//! client.execute(&txid, "accounts_a", sql("UPDATE balances SET balance = balance - $1 WHERE id = $2", vec![int(5), int(1)])).await?;
//! client.execute(&txid, "accounts_b", sql("UPDATE balances SET balance = balance + $1 WHERE id = $2", vec![int(5), int(2)])).await?;
//! let outcome = client.commit(&txid).await?;
//! println!("{} {:?}", outcome.txid, pb::Outcome::try_from(outcome.outcome));
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use tonic::transport::Channel;

use crate::error::Error;
use crate::error::Result;
use crate::proto as pb;
use crate::proto::cluster_client::ClusterClient;
use crate::proto::decision_log_client::DecisionLogClient;
use crate::proto::transactions_client::TransactionsClient;
use crate::raft::network::PeerChannels;
use crate::server::RESPONSE_BYTES_MAX;
use crate::server::convert;
use crate::txn::Decision;
use crate::txn::RecordState;
use crate::txn::TxId;
use crate::txn::TxnRecord;

/// How many times one request is tried before the last error is returned.
const ATTEMPTS_MAX: u32 = 12;
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Deadline of one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Client {
    addrs: Vec<String>,
    current: usize,
    /// A pinned client talks to its one node only and never follows a leader.
    pinned: bool,
    channels: PeerChannels,
}

/// One page of records.
#[derive(Debug)]
pub struct RecordPage {
    pub records: Vec<TxnRecord>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next_after: Option<TxId>,
}

impl Client {
    /// A client for a cluster, given the addresses (`host:port`) of any of
    /// its nodes.
    pub fn new<S: AsRef<str>>(addrs: impl IntoIterator<Item = S>) -> Result<Self> {
        let addrs: Vec<String> = addrs.into_iter().map(|a| a.as_ref().to_string()).collect();
        if addrs.is_empty() {
            return Err(Error::InvalidInput("the client needs at least one node address".into()));
        }
        for a in &addrs {
            crate::raft::network::endpoint(a)?;
        }
        Ok(Self { addrs, current: 0, pinned: false, channels: PeerChannels::default() })
    }

    /// A client for exactly one node: no leader following, no retries
    /// elsewhere. For per-node status and local reads.
    pub fn pinned(addr: &str) -> Result<Self> {
        let mut c = Self::new([addr])?;
        c.pinned = true;
        Ok(c)
    }

    /// A client on this one's connections: concurrent callers multiplex
    /// their requests on one HTTP/2 connection per node, as one service's
    /// callers usually do.
    pub fn share(&self) -> Self {
        Self { addrs: self.addrs.clone(), current: self.current, pinned: self.pinned, channels: self.channels.clone() }
    }

    /// The address requests currently go to.
    pub fn current_addr(&self) -> &str {
        &self.addrs[self.current]
    }

    /// Runs `f` against the current node, moving to the leader or the next
    /// node on errors that say the request did not take effect.
    async fn call<T, F, Fut>(&mut self, f: F) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        // Every decision-log request and read is safe to repeat, so an
        // unknown outcome may be retried too.
        self.call_with(true, Some(ATTEMPT_TIMEOUT), f).await
    }

    /// [`Self::call`], retrying an unknown outcome only if `repeatable`, and
    /// bounding each attempt by `attempt_timeout` if given.
    async fn call_with<T, F, Fut>(&mut self, repeatable: bool, attempt_timeout: Option<Duration>, mut f: F) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let mut backoff = BACKOFF_FIRST;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let channel = self.channels.get(self.current_addr())?;
            let result = match attempt_timeout {
                Some(limit) => match tokio::time::timeout(limit, f(channel)).await {
                    Ok(r) => r.map_err(Error::from),
                    Err(_) => {
                        Err(Error::OutcomeUnknown(format!("no answer from {} in {limit:?}", self.current_addr())))
                    }
                },
                None => f(channel).await.map_err(Error::from),
            };
            let e = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            // A full leader (RESOURCE_EXHAUSTED) is the caller's to handle:
            // retrying here would only add load and hide the limit.
            let retry = matches!(e, Error::Unavailable { .. }) || (repeatable && matches!(e, Error::OutcomeUnknown(_)));
            if !retry || attempt >= ATTEMPTS_MAX {
                return Err(e);
            }
            if !self.pinned {
                // Another node may lead, or be up.
                match e.leader_hint() {
                    Some(hint) => self.switch_to(&hint.addr),
                    None => self.current = (self.current + 1) % self.addrs.len(),
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn switch_to(&mut self, addr: &str) {
        match self.addrs.iter().position(|a| a == addr) {
            Some(i) => self.current = i,
            None => {
                self.addrs.push(addr.to_string());
                self.current = self.addrs.len() - 1;
            }
        }
    }

    /// Records a decision for `txid`: the first decision holds. Returns
    /// whether `decision` is the one that holds, and the record.
    pub async fn decide(&mut self, txid: &TxId, decision: &Decision) -> Result<(bool, TxnRecord)> {
        let req =
            pb::DecideRequest { version: 0, txid: txid.to_string(), decision: Some(convert::decision_to_pb(decision)) };
        let resp = self
            .call(|ch| {
                let req = req.clone();
                async move { DecisionLogClient::new(ch).decide(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        let record = resp.record.ok_or_else(|| Error::Internal("decide answered without a record".into()))?;
        Ok((resp.won, convert::record_from_pb(record)?))
    }

    /// Runs one whole transaction (see `tandem.v1.Transactions/Transact`).
    ///
    /// Retried only where that is safe: when the node answered that it did
    /// not take the request (UNAVAILABLE), or, with an idempotency key, after
    /// an unknown outcome (the key keeps a second attempt from applying the
    /// transaction twice).
    pub async fn transact(&mut self, request: pb::TransactRequest) -> Result<pb::TransactResponse> {
        let keyed = !request.idempotency_key.is_empty();
        // No client-side deadline: the request carries its own timeout.
        self.call_with(keyed, None, |ch| {
            let req = request.clone();
            async move {
                TransactionsClient::new(ch)
                    .max_decoding_message_size(RESPONSE_BYTES_MAX)
                    .transact(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Begins an interactive transaction; answers its txid.
    pub async fn begin(&mut self, request: pb::BeginRequest) -> Result<TxId> {
        // Not repeated after an unknown outcome: a repeat would begin a
        // second transaction (the first is rolled back at its deadline).
        let resp = self
            .call_with(false, Some(ATTEMPT_TIMEOUT), |ch| {
                let req = request.clone();
                async move {
                    TransactionsClient::new(ch)
                        .max_decoding_message_size(RESPONSE_BYTES_MAX)
                        .begin(req)
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        TxId::parse(&resp.txid)
    }

    /// Runs one statement in an interactive transaction, on `participant`'s
    /// branch. A failing statement rolls the transaction back.
    pub async fn execute(
        &mut self,
        txid: &TxId,
        participant: &str,
        statement: pb::Statement,
    ) -> Result<pb::StatementResult> {
        let req = pb::ExecuteRequest {
            txid: txid.to_string(),
            participant: participant.to_string(),
            statement: Some(statement),
        };
        // Never repeated after an unknown outcome: it may have run.
        self.call_with(false, None, |ch| {
            let req = req.clone();
            async move {
                TransactionsClient::new(ch)
                    .max_decoding_message_size(RESPONSE_BYTES_MAX)
                    .execute(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Commits an interactive transaction. Safe to repeat: a repeat answers
    /// the recorded outcome.
    pub async fn commit(&mut self, txid: &TxId) -> Result<pb::TransactResponse> {
        let req = pb::CommitRequest { txid: txid.to_string() };
        self.call_with(true, None, |ch| {
            let req = req.clone();
            async move {
                TransactionsClient::new(ch)
                    .max_decoding_message_size(RESPONSE_BYTES_MAX)
                    .commit(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Rolls back an interactive transaction.
    pub async fn rollback(&mut self, txid: &TxId) -> Result<()> {
        let req = pb::RollbackRequest { txid: txid.to_string() };
        self.call(|ch| {
            let req = req.clone();
            async move {
                TransactionsClient::new(ch)
                    .max_decoding_message_size(RESPONSE_BYTES_MAX)
                    .rollback(req)
                    .await
                    .map(|_| ())
            }
        })
        .await
    }

    /// Enlists a remote participant's branch in the open interactive
    /// transaction `txid`: `endpoint` is where the coordinator reaches the
    /// service's `tandem.v1.Participant` (or give a configured remote
    /// participant's name in `participant`). Safe to repeat.
    pub async fn enlist(
        &mut self,
        txid: &TxId,
        participant: &str,
        endpoint: &str,
        branch: &str,
    ) -> Result<pb::BranchRef> {
        let req = pb::EnlistRequest {
            txid: txid.to_string(),
            participant: participant.to_string(),
            endpoint: endpoint.to_string(),
            branch: branch.to_string(),
        };
        self.call(|ch| {
            let req = req.clone();
            async move {
                let answer = TransactionsClient::new(ch).enlist(req).await?.into_inner();
                answer.branch.ok_or_else(|| tonic::Status::internal("Enlist answered no branch"))
            }
        })
        .await
    }

    /// The outcome of `txid` as the decision log holds it: `Some(true)`
    /// committed, `Some(false)` aborted (final: with no decision recorded
    /// and the transaction not running, the leader records ABORT first),
    /// `None` still running (ask again later).
    pub async fn get_outcome(&mut self, txid: &TxId) -> Result<Option<bool>> {
        let req = pb::GetOutcomeRequest { txid: txid.to_string() };
        self.call(|ch| {
            let req = req.clone();
            async move {
                let answer = TransactionsClient::new(ch).get_outcome(req).await?.into_inner();
                Ok(match pb::Outcome::try_from(answer.outcome) {
                    Ok(pb::Outcome::Committed) => Some(true),
                    Ok(pb::Outcome::Aborted) => Some(false),
                    _ => None,
                })
            }
        })
        .await
    }

    /// A transaction's state, branches, times, labels and last error.
    pub async fn get_transaction(&mut self, txid: &TxId) -> Result<pb::Transaction> {
        let req = pb::GetTransactionRequest { txid: txid.to_string() };
        self.call(|ch| {
            let req = req.clone();
            async move {
                TransactionsClient::new(ch)
                    .max_decoding_message_size(RESPONSE_BYTES_MAX)
                    .get_transaction(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// One page of transactions after `after`, in `state` if given.
    pub async fn list_transactions(
        &mut self,
        state: pb::TransactionState,
        after: Option<&TxId>,
        limit: u32,
    ) -> Result<Vec<pb::Transaction>> {
        let req = pb::ListTransactionsRequest {
            state: state as i32,
            after: after.map(|t| t.to_string()).unwrap_or_default(),
            limit,
        };
        let resp = self
            .call(|ch| {
                let req = req.clone();
                async move {
                    TransactionsClient::new(ch)
                        .max_decoding_message_size(RESPONSE_BYTES_MAX)
                        .list_transactions(req)
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        Ok(resp.transactions)
    }

    /// Arms a fail point on the node this client talks to (tests; see
    /// [`crate::failpoint`]).
    pub async fn set_fail_point(&mut self, name: &str, actions: &str) -> Result<()> {
        let req = pb::SetFailPointRequest { name: name.to_string(), actions: actions.to_string() };
        self.call(|ch| {
            let req = req.clone();
            async move { ClusterClient::new(ch).set_fail_point(req).await.map(|_| ()) }
        })
        .await
    }

    /// Marks `txid` complete.
    pub async fn complete(&mut self, txid: &TxId) -> Result<TxnRecord> {
        let req = pb::CompleteRequest { version: 0, txid: txid.to_string() };
        let resp = self
            .call(|ch| {
                let req = req.clone();
                async move { DecisionLogClient::new(ch).complete(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        convert::record_from_pb(
            resp.record.ok_or_else(|| Error::Internal("complete answered without a record".into()))?,
        )
    }

    /// Drops completed records completed before `before_unix_ms`.
    pub async fn forget(&mut self, before_unix_ms: u64) -> Result<u64> {
        let req = pb::ForgetRequest { version: 0, before_unix_ms };
        let resp =
            self.call(|ch| async move { DecisionLogClient::new(ch).forget(req).await.map(|r| r.into_inner()) }).await?;
        Ok(resp.forgotten)
    }

    /// The record of `txid`, `None` if no decision is recorded. `local` reads
    /// the answering node's own state machine, which may lag.
    pub async fn get_record(&mut self, txid: &TxId, local: bool) -> Result<Option<TxnRecord>> {
        let req = pb::GetRecordRequest { txid: txid.to_string(), local };
        match self
            .call(|ch| {
                let req = req.clone();
                async move { DecisionLogClient::new(ch).get_record(req).await.map(|r| r.into_inner()) }
            })
            .await
        {
            Ok(r) => Ok(Some(convert::record_from_pb(r)?)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One page of records, ordered by txid.
    pub async fn list_records(
        &mut self,
        state: Option<RecordState>,
        after: Option<&TxId>,
        limit: u32,
        local: bool,
    ) -> Result<RecordPage> {
        let req = pb::ListRecordsRequest {
            state: state.map_or(pb::RecordState::Unspecified, convert::state_to_pb) as i32,
            after: after.map(|a| a.to_string()).unwrap_or_default(),
            limit,
            local,
        };
        let resp = self
            .call(|ch| {
                let req = req.clone();
                async move { DecisionLogClient::new(ch).list_records(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        let records = resp.records.into_iter().map(convert::record_from_pb).collect::<Result<Vec<_>>>()?;
        let next_after = if resp.next_after.is_empty() { None } else { Some(TxId::parse(&resp.next_after)?) };
        Ok(RecordPage { records, next_after })
    }

    /// Every record, page by page.
    pub async fn list_all_records(&mut self, state: Option<RecordState>, local: bool) -> Result<Vec<TxnRecord>> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self.list_records(state, after.as_ref(), 1000, local).await?;
            out.extend(page.records);
            match page.next_after {
                Some(a) => after = Some(a),
                None => return Ok(out),
            }
        }
    }

    /// The status of the node the client currently talks to: one attempt,
    /// since another node's status would answer a different question.
    pub async fn status(&mut self) -> Result<pb::NodeStatus> {
        let channel = self.channels.get(self.current_addr())?;
        let mut request = tonic::Request::new(pb::StatusRequest {});
        request.set_timeout(ATTEMPT_TIMEOUT);
        Ok(ClusterClient::new(channel).status(request).await?.into_inner())
    }

    /// Initialises a new cluster. Goes to the current node, which must be a
    /// member.
    pub async fn init(&mut self, members: Vec<pb::Member>) -> Result<()> {
        let req = pb::InitRequest { members };
        let channel = self.channels.get(self.current_addr())?;
        ClusterClient::new(channel).init(req).await.map_err(Error::from)?;
        Ok(())
    }

    pub async fn add_learner(&mut self, member: pb::Member) -> Result<pb::MembershipResponse> {
        let req = pb::AddLearnerRequest { member: Some(member) };
        self.call(|ch| {
            let req = req.clone();
            async move { ClusterClient::new(ch).add_learner(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn change_membership(
        &mut self,
        voters: Vec<u64>,
        retain_as_learners: bool,
    ) -> Result<pb::MembershipResponse> {
        let req = pb::ChangeMembershipRequest { voters, retain_as_learners };
        self.call(|ch| {
            let req = req.clone();
            async move { ClusterClient::new(ch).change_membership(req).await.map(|r| r.into_inner()) }
        })
        .await
    }
}
