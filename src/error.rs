//! One error type for the whole crate, and its one mapping to gRPC statuses.
//!
//! Every error says two things a caller needs: whether it may simply retry
//! ([`Error::is_retryable`]: the operation did not take effect) and, through
//! the gRPC code, what kind of failure it was.

use tonic::Code;
use tonic::Status;
use tonic::metadata::MetadataValue;

/// Metadata key carrying the leader's address on UNAVAILABLE answers.
pub const LEADER_ADDR_KEY: &str = "x-tandem-leader-addr";
/// Metadata key carrying the leader's node id on UNAVAILABLE answers.
pub const LEADER_ID_KEY: &str = "x-tandem-leader-id";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is malformed or breaks a limit; nothing was changed.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The thing asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is well-formed but the system is not in a state to take
    /// it (e.g. the node belongs to no cluster yet).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The request conflicts with what exists (e.g. a COMMIT whose
    /// idempotency key another committed txid holds); nothing was changed.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// No leader can take the request now; retry, at `leader` if known.
    #[error("unavailable: {message}")]
    Unavailable { message: String, leader: Option<LeaderHint> },
    /// A bounded resource is full.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The request may or may not have taken effect (e.g. a log entry was
    /// discarded in a leader change before anyone learnt whether it
    /// committed).
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The local store failed. The node stops taking writes.
    #[error("storage: {0}")]
    Storage(String),
    /// A bug or an unexpected state.
    #[error("internal: {0}")]
    Internal(String),
}

/// Where the leader is, as far as the answering node knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    pub id: u64,
    pub addr: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether a client may safely retry: the operation did not take effect.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::ResourceExhausted(_))
    }

    /// The leader hint carried by an UNAVAILABLE error.
    pub fn leader_hint(&self) -> Option<&LeaderHint> {
        match self {
            Error::Unavailable { leader, .. } => leader.as_ref(),
            _ => None,
        }
    }

    /// The same kind of error, its message prefixed with `context`.
    pub fn context(self, context: &str) -> Self {
        let prefix = |m: String| format!("{context}: {m}");
        match self {
            Error::InvalidInput(m) => Error::InvalidInput(prefix(m)),
            Error::NotFound(m) => Error::NotFound(prefix(m)),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(prefix(m)),
            Error::AlreadyExists(m) => Error::AlreadyExists(prefix(m)),
            Error::Unavailable { message, leader } => Error::Unavailable { message: prefix(message), leader },
            Error::ResourceExhausted(m) => Error::ResourceExhausted(prefix(m)),
            Error::OutcomeUnknown(m) => Error::OutcomeUnknown(prefix(m)),
            Error::Storage(m) => Error::Storage(prefix(m)),
            Error::Internal(m) => Error::Internal(prefix(m)),
        }
    }

    pub fn storage(e: impl std::fmt::Display) -> Self {
        Error::Storage(e.to_string())
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Error::Internal(e.to_string())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::InvalidInput(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::Unavailable { message, leader } => {
                let mut status = Status::unavailable(match &leader {
                    Some(l) => format!("{message} (leader is node {} at {})", l.id, l.addr),
                    None => message,
                });
                if let Some(l) = leader {
                    if let Ok(v) = MetadataValue::try_from(l.addr.as_str()) {
                        status.metadata_mut().insert(LEADER_ADDR_KEY, v);
                    }
                    status.metadata_mut().insert(LEADER_ID_KEY, MetadataValue::from(l.id));
                }
                status
            }
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::OutcomeUnknown(m) => Status::unknown(m),
            Error::Storage(m) => Status::internal(format!("storage: {m}")),
            Error::Internal(m) => Status::internal(m),
        }
    }
}

impl From<Status> for Error {
    fn from(s: Status) -> Error {
        let message = s.message().to_string();
        match s.code() {
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidInput(message),
            Code::NotFound => Error::NotFound(message),
            Code::FailedPrecondition => Error::FailedPrecondition(message),
            Code::AlreadyExists => Error::AlreadyExists(message),
            Code::Unavailable => {
                let meta = s.metadata();
                let addr = meta.get(LEADER_ADDR_KEY).and_then(|v| v.to_str().ok());
                let id = meta.get(LEADER_ID_KEY).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
                let leader = match (id, addr) {
                    (Some(id), Some(addr)) => Some(LeaderHint { id, addr: addr.to_string() }),
                    _ => None,
                };
                Error::Unavailable { message, leader }
            }
            Code::ResourceExhausted => Error::ResourceExhausted(message),
            // A deadline or cancellation leaves the outcome of a write open.
            Code::Unknown | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => Error::OutcomeUnknown(message),
            _ => Error::Internal(format!("{:?}: {message}", s.code())),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Storage(e.to_string())
    }
}

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Error {
        Error::Storage(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Error {
        Error::Internal(format!("encoding: {e}"))
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Error {
        Error::Unavailable { message: format!("transport: {e}"), leader: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_round_trips_leader_hint() {
        let e = Error::Unavailable {
            message: "not the leader".into(),
            leader: Some(LeaderHint { id: 2, addr: "127.0.0.1:7002".into() }),
        };
        let back = Error::from(Status::from(e));
        assert_eq!(back.leader_hint(), Some(&LeaderHint { id: 2, addr: "127.0.0.1:7002".into() }));
        assert!(back.is_retryable());
    }

    #[test]
    fn invalid_input_is_not_retryable() {
        let back = Error::from(Status::from(Error::InvalidInput("x".into())));
        assert_eq!(back, Error::InvalidInput("x".into()));
        assert!(!back.is_retryable());
    }
}
