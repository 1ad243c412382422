//! Conversions between protobuf messages and domain types, all in one place.

use std::time::Duration;

use crate::coordinator::BeginSpec;
use crate::coordinator::BranchSpec;
use crate::coordinator::TransactOutcome;
use crate::coordinator::TransactSpec;
use crate::coordinator::TransactionStatus;
use crate::coordinator::TxnState;
use crate::error::Error;
use crate::error::Result;
use crate::participant::Statement;
use crate::participant::StatementResult;
use crate::participant::Value;
use crate::proto as pb;
use crate::raft::COMMAND_VERSION;
use crate::raft::COMMAND_VERSION_MIN;
use crate::raft::Node;
use crate::raft::NodeId;
use crate::txn::Branch;
use crate::txn::Decision;
use crate::txn::HeuristicBranch;
use crate::txn::RecordState;
use crate::txn::RemoteBranch;
use crate::txn::TxId;
use crate::txn::TxnInfo;
use crate::txn::TxnRecord;

/// Checks a request's command version: 0 means the current one.
pub fn command_version(version: u32) -> Result<()> {
    if version == 0 || (COMMAND_VERSION_MIN..=COMMAND_VERSION).contains(&version) {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "unsupported command version {version}; this node speaks version {COMMAND_VERSION}"
        )))
    }
}

pub fn decision_from_pb(d: Option<pb::Decision>) -> Result<Decision> {
    let kind = d.and_then(|d| d.kind).ok_or_else(|| Error::InvalidInput("decision is missing".into()))?;
    let decision = match kind {
        pb::decision::Kind::Commit(c) => Decision::Commit {
            branches: c
                .branches
                .into_iter()
                .map(|b| Branch {
                    participant: b.participant,
                    xid: b.xid,
                    remote: (!b.remote_endpoint.is_empty() || !b.remote_branch.is_empty())
                        .then_some(RemoteBranch { endpoint: b.remote_endpoint, branch: b.remote_branch }),
                })
                .collect(),
            idempotency_key: Some(c.idempotency_key).filter(|k| !k.is_empty()),
        },
        pb::decision::Kind::Abort(a) => Decision::Abort { reason: a.reason },
    };
    decision.validate()?;
    Ok(decision)
}

pub fn decision_to_pb(d: &Decision) -> pb::Decision {
    let kind = match d {
        Decision::Commit { branches, idempotency_key } => pb::decision::Kind::Commit(pb::Commit {
            branches: branches
                .iter()
                .map(|b| pb::Branch {
                    participant: b.participant.clone(),
                    xid: b.xid,
                    remote_endpoint: b.remote.as_ref().map(|r| r.endpoint.clone()).unwrap_or_default(),
                    remote_branch: b.remote.as_ref().map(|r| r.branch.clone()).unwrap_or_default(),
                })
                .collect(),
            idempotency_key: idempotency_key.clone().unwrap_or_default(),
        }),
        Decision::Abort { reason } => pb::decision::Kind::Abort(pb::Abort { reason: reason.clone() }),
    };
    pb::Decision { kind: Some(kind) }
}

pub fn state_to_pb(s: RecordState) -> pb::RecordState {
    match s {
        RecordState::Committed => pb::RecordState::Committed,
        RecordState::Aborted => pb::RecordState::Aborted,
        RecordState::Completed => pb::RecordState::Completed,
    }
}

pub fn state_from_pb(s: i32) -> Result<Option<RecordState>> {
    match pb::RecordState::try_from(s) {
        Ok(pb::RecordState::Unspecified) => Ok(None),
        Ok(pb::RecordState::Committed) => Ok(Some(RecordState::Committed)),
        Ok(pb::RecordState::Aborted) => Ok(Some(RecordState::Aborted)),
        Ok(pb::RecordState::Completed) => Ok(Some(RecordState::Completed)),
        Err(_) => Err(Error::InvalidInput(format!("unknown record state {s}"))),
    }
}

pub fn record_to_pb(r: &TxnRecord) -> pb::TxnRecord {
    pb::TxnRecord {
        txid: r.txid.to_string(),
        decision: Some(decision_to_pb(&r.decision)),
        state: state_to_pb(r.state()) as i32,
        decided_unix_ms: r.decided_unix_ms,
        completed_unix_ms: r.completed_unix_ms,
        decided_log_index: r.decided_log_index,
        labels: r.info.labels.clone().into_iter().collect(),
        started_unix_ms: r.info.started_unix_ms,
        heuristic: r
            .heuristic
            .iter()
            .map(|h| pb::HeuristicBranch { branch: h.branch, committed: h.committed })
            .collect(),
    }
}

pub fn record_from_pb(r: pb::TxnRecord) -> Result<TxnRecord> {
    Ok(TxnRecord {
        txid: TxId::parse(&r.txid)?,
        decision: decision_from_pb(r.decision)?,
        decided_unix_ms: r.decided_unix_ms,
        completed_unix_ms: r.completed_unix_ms,
        decided_log_index: r.decided_log_index,
        info: TxnInfo { started_unix_ms: r.started_unix_ms, labels: r.labels.into_iter().collect() },
        heuristic: r.heuristic.iter().map(|h| HeuristicBranch { branch: h.branch, committed: h.committed }).collect(),
    })
}

pub fn member_to_pb(id: NodeId, node: &Node) -> pb::Member {
    pb::Member { id, addr: node.addr.clone() }
}

pub fn member_from_pb(m: &pb::Member) -> Result<(NodeId, Node)> {
    if m.id == 0 {
        return Err(Error::InvalidInput("member id must be at least 1".into()));
    }
    if m.addr.is_empty() {
        return Err(Error::InvalidInput(format!("member {} has no address", m.id)));
    }
    crate::raft::network::endpoint(&m.addr)?;
    Ok((m.id, Node { addr: m.addr.clone() }))
}

pub fn value_from_pb(v: &pb::Value) -> Result<Value> {
    use pb::value::Kind;
    Ok(match v.kind.as_ref().ok_or_else(|| Error::InvalidInput("a parameter has no value".into()))? {
        Kind::Null(_) => Value::Null,
        Kind::Bool(b) => Value::Bool(*b),
        Kind::Int64(i) => Value::Int64(*i),
        Kind::Double(d) => Value::Double(*d),
        Kind::String(s) => Value::String(s.clone()),
        Kind::Bytes(b) => Value::Bytes(b.clone()),
        Kind::Timestamp(s) | Kind::Uuid(s) | Kind::Numeric(s) | Kind::Json(s) => Value::Text(s.clone()),
    })
}

pub fn value_to_pb(v: &Value) -> pb::Value {
    use pb::value::Kind;
    let kind = match v {
        Value::Null => Kind::Null(true),
        Value::Bool(b) => Kind::Bool(*b),
        Value::Int64(i) => Kind::Int64(*i),
        Value::Double(d) => Kind::Double(*d),
        Value::String(s) | Value::Text(s) => Kind::String(s.clone()),
        Value::Bytes(b) => Kind::Bytes(b.clone()),
    };
    pb::Value { kind: Some(kind) }
}

pub fn statement_from_pb(s: &pb::Statement) -> Result<Statement> {
    let params = s.params.iter().map(value_from_pb).collect::<Result<Vec<_>>>()?;
    Ok(Statement { sql: s.sql.clone(), params })
}

fn timeout_from_pb(ms: u32) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms.into()))
}

fn key_from_pb(key: &str) -> Option<String> {
    Some(key.to_string()).filter(|k| !k.is_empty())
}

pub fn transact_from_pb(req: &pb::TransactRequest) -> Result<TransactSpec> {
    let mut branches = Vec::with_capacity(req.branches.len());
    for b in &req.branches {
        let statements = b.statements.iter().map(statement_from_pb).collect::<Result<Vec<_>>>()?;
        branches.push(BranchSpec { participant: b.participant.clone(), statements });
    }
    Ok(TransactSpec {
        branches,
        timeout: timeout_from_pb(req.timeout_ms),
        idempotency_key: key_from_pb(&req.idempotency_key),
        labels: req.labels.clone().into_iter().collect(),
    })
}

pub fn begin_from_pb(req: &pb::BeginRequest) -> BeginSpec {
    BeginSpec {
        timeout: timeout_from_pb(req.timeout_ms),
        idempotency_key: key_from_pb(&req.idempotency_key),
        labels: req.labels.clone().into_iter().collect(),
    }
}

pub fn result_to_pb(r: &StatementResult) -> pb::StatementResult {
    pb::StatementResult {
        rows_affected: r.rows_affected,
        columns: r.columns.clone(),
        rows: r.rows.iter().map(|row| pb::Row { values: row.iter().map(value_to_pb).collect() }).collect(),
    }
}

/// `participants` names the branches in request order (one-shot
/// transactions, whose results are returned).
pub fn transact_to_pb(o: &TransactOutcome, participants: &[String]) -> pb::TransactResponse {
    pb::TransactResponse {
        txid: o.txid.to_string(),
        outcome: if o.aborted.is_none() { pb::Outcome::Committed } else { pb::Outcome::Aborted } as i32,
        reason: o.aborted.clone().unwrap_or_default(),
        branches: o
            .results
            .iter()
            .zip(participants)
            .map(|(results, p)| pb::BranchResult {
                participant: p.clone(),
                results: results.iter().map(result_to_pb).collect(),
            })
            .collect(),
        pending: o.pending.clone(),
        heuristic: o.heuristic.clone(),
        duplicate: o.duplicate,
    }
}

pub fn txn_state_to_pb(s: TxnState) -> pb::TransactionState {
    match s {
        TxnState::Active => pb::TransactionState::Active,
        TxnState::Preparing => pb::TransactionState::Preparing,
        TxnState::Committing => pb::TransactionState::Committing,
        TxnState::Committed => pb::TransactionState::Committed,
        TxnState::Aborting => pb::TransactionState::Aborting,
        TxnState::Aborted => pb::TransactionState::Aborted,
    }
}

pub fn txn_state_from_pb(s: i32) -> Result<Option<TxnState>> {
    Ok(Some(match pb::TransactionState::try_from(s) {
        Ok(pb::TransactionState::Unspecified) => return Ok(None),
        Ok(pb::TransactionState::Active) => TxnState::Active,
        Ok(pb::TransactionState::Preparing) => TxnState::Preparing,
        Ok(pb::TransactionState::Committing) => TxnState::Committing,
        Ok(pb::TransactionState::Committed) => TxnState::Committed,
        Ok(pb::TransactionState::Aborting) => TxnState::Aborting,
        Ok(pb::TransactionState::Aborted) => TxnState::Aborted,
        Err(_) => return Err(Error::InvalidInput(format!("unknown transaction state {s}"))),
    }))
}

pub fn transaction_to_pb(t: &TransactionStatus) -> pb::Transaction {
    pb::Transaction {
        txid: t.txid.to_string(),
        state: txn_state_to_pb(t.state) as i32,
        reason: t.reason.clone().unwrap_or_default(),
        branches: t
            .branches
            .iter()
            .map(|b| pb::TransactionBranch { participant: b.participant.clone(), state: b.state.clone(), xid: b.xid })
            .collect(),
        labels: t.labels.clone().into_iter().collect(),
        started_unix_ms: t.started_unix_ms,
        deadline_unix_ms: t.deadline_unix_ms,
        decided_unix_ms: t.decided_unix_ms,
        completed_unix_ms: t.completed_unix_ms,
        last_error: t.last_error.clone().unwrap_or_default(),
        heuristic: t.heuristic.clone(),
        interactive: t.interactive,
    }
}
