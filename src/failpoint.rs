//! Fail points: named places in the code where a test can make a node stop
//! dead (as if killed with SIGKILL) or pause, to hit one moment of the
//! protocol deterministically.
//!
//! Compiled in only with the `failpoints` feature (the test build); without
//! it [`hit`] is empty and [`configure`] refuses. A test arms a point on one
//! node through the `Cluster.SetFailPoint` RPC with the `fail` crate's
//! action syntax, e.g. `1*return(abort)` (the first time it is hit, abort
//! the process) or `return(sleep 3000)` (pause that task 3 s each time).
//!
//! The points, in the order a commit meets them:
//! - `coordinator::before_prepare`: a branch's statements ran, its PREPARE
//!   is next (for a PostgreSQL branch whose statements go out with its
//!   PREPARE in one write, just before that write);
//! - `coordinator::after_prepare`: a branch's PREPARE succeeded;
//! - `coordinator::before_commit_decision`: every branch is prepared, the
//!   COMMIT is about to be proposed;
//! - `coordinator::after_commit_proposed`: 1 ms after the COMMIT was handed
//!   to Raft, before it is known applied;
//! - `coordinator::after_commit_decision`: the COMMIT decision is applied
//!   (before any COMMIT PREPARED);
//! - `coordinator::before_commit_prepared`: about to send COMMIT PREPARED to
//!   the first branch;
//! - `coordinator::after_commit_prepared`: a branch's COMMIT PREPARED
//!   succeeded;
//! - `coordinator::before_answer`: committed, about to answer the client;
//! - `server::before_transact_answer`: `Transact` has its outcome, about to
//!   send it.

use crate::error::Result;

/// Runs the action armed at point `name`, if any.
#[cfg(feature = "failpoints")]
pub async fn hit(name: &str) {
    let Some(action) = fail::eval(name, |arg| arg.unwrap_or_default()) else { return };
    let action = action.trim();
    if action == "abort" {
        tracing::error!(point = name, "fail point: stopping the process");
        std::process::abort();
    }
    if let Some(ms) = action.strip_prefix("sleep").and_then(|ms| ms.trim().parse::<u64>().ok()) {
        tracing::warn!(point = name, ms, "fail point: pausing");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        return;
    }
    tracing::warn!(point = name, action, "fail point: unknown action ignored");
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub async fn hit(_name: &str) {}

/// Arms (or with `actions` empty, disarms) the point `name`.
pub fn configure(name: &str, actions: &str) -> Result<()> {
    #[cfg(feature = "failpoints")]
    {
        if actions.is_empty() {
            fail::remove(name);
            return Ok(());
        }
        fail::cfg(name, actions).map_err(crate::error::Error::InvalidInput)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = (name, actions);
        Err(crate::error::Error::FailedPrecondition(
            "this build has no fail points (build with --features failpoints)".into(),
        ))
    }
}
