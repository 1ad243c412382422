//! Data-driven tests of the transaction state machine: each script in
//! `src/txn/testdata/` is a list of events (`> …`), each followed by the
//! actions the machine returns and its state after them. The runner replays
//! the events and compares. `UPDATE_GOLDEN=1 cargo test` rewrites the
//! expected lines; read the diff before committing it.

use std::fmt::Write;
use std::path::Path;

use super::*;

fn format_action(a: &Action) -> String {
    match a {
        Action::Prepare { branch } => format!("prepare {branch}"),
        Action::RollbackActive { branch } => format!("rollback-active {branch}"),
        Action::ProposeDecision(Decision::Commit { branches, idempotency_key }) => format!(
            "propose commit {}{}",
            branches.iter().map(|b| b.participant.as_str()).collect::<Vec<_>>().join(","),
            idempotency_key.as_ref().map(|k| format!(" key={k}")).unwrap_or_default()
        ),
        Action::ProposeDecision(Decision::Abort { reason }) => format!("propose abort: {reason}"),
        Action::CommitPrepared { branch } => format!("commit-prepared {branch}"),
        Action::RollbackPrepared { branch } => format!("rollback-prepared {branch}"),
        Action::ScheduleRetry { branch, after_ms } => format!("retry {branch} after {after_ms}ms"),
        Action::CheckOutcome { branch, xid } => {
            format!("check-outcome {branch}{}", xid.map(|x| format!(" xid={x}")).unwrap_or_default())
        }
        Action::ReportHeuristic { branch, decided_commit } => {
            format!("HEURISTIC {branch} (decided {})", if *decided_commit { "commit" } else { "abort" })
        }
        Action::ProposeComplete => "propose complete".into(),
        Action::Answer(Outcome::Committed { pending, heuristic }) => {
            format!("answer committed pending={pending:?} heuristic={heuristic:?}")
        }
        Action::Answer(Outcome::Aborted { reason }) => format!("answer aborted: {reason}"),
    }
}

fn parse_event(txn: &Txn, line: &str) -> Event {
    let words: Vec<&str> = line.split_whitespace().collect();
    let branch = || words[1].parse::<usize>().expect("branch number");
    let rest = |from: usize| words[from..].join(" ");
    let xid = || words.get(2).and_then(|w| w.strip_prefix("xid=")).map(|x| x.parse().expect("xid"));
    match words[0] {
        "commit" => Event::CommitRequested,
        "rollback" => Event::RollbackRequested { reason: rest(1) },
        "timeout" => Event::TimedOut,
        "prepared" => Event::Prepared { branch: branch(), xid: xid() },
        "prepare-failed" => Event::PrepareFailed { branch: branch(), reason: rest(2) },
        "decided" => match words[1] {
            "commit" => Event::Decided(txn.commit_decision()),
            "commit-other" => {
                Event::Decided(Decision::Commit { branches: vec![Branch::new("elsewhere")], idempotency_key: None })
            }
            "abort" => Event::Decided(Decision::Abort { reason: rest(2) }),
            other => panic!("unknown decision {other}"),
        },
        "done" => Event::Phase2Done { branch: branch() },
        "failed" => Event::Phase2Failed { branch: branch(), error: rest(2) },
        "gid-missing" => Event::GidMissing { branch: branch() },
        "ended" => Event::BranchEnded {
            branch: branch(),
            committed: match words[2] {
                "committed" => Some(true),
                "rolled-back" => Some(false),
                "unknown" => None,
                other => panic!("unknown ending {other}"),
            },
        },
        "retry" => Event::RetryDue { branch: branch() },
        other => panic!("unknown event {other:?}"),
    }
}

/// Replays one script; returns it with the expected lines recomputed.
fn run_script(text: &str) -> String {
    let mut out = String::new();
    let mut txn: Option<Txn> = None;
    for line in text.lines() {
        if line.starts_with("  ") {
            continue; // expected output: recomputed below
        }
        writeln!(out, "{line}").unwrap();
        if let Some(spec) = line.strip_prefix("new") {
            let mut words = spec.split_whitespace();
            let participants = words.next().map_or(Vec::new(), |p| p.split(',').map(str::to_string).collect());
            let key = words.next().and_then(|w| w.strip_prefix("key=")).map(str::to_string);
            txn = Some(Txn::new(participants, key, Backoff { first_ms: 100, max_ms: 1000 }));
        } else if let Some(event) = line.strip_prefix("> ") {
            let txn = txn.as_mut().expect("`new` before events");
            let event = parse_event(txn, event);
            for action in txn.step(event) {
                writeln!(out, "  {}", format_action(&action)).unwrap();
            }
            let branches: Vec<String> = txn.branches().iter().map(ToString::to_string).collect();
            writeln!(out, "  = {:?} [{}]", txn.phase(), branches.join(", ")).unwrap();
        }
    }
    out
}

#[test]
fn golden_scripts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/txn/testdata");
    let mut failures = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    assert!(!entries.is_empty(), "no scripts in {}", dir.display());
    for path in entries {
        let text = std::fs::read_to_string(&path).unwrap();
        let got = run_script(&text);
        if got != text {
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::write(&path, &got).unwrap();
            } else {
                failures.push(format!("{}:\n--- expected\n{text}\n--- got\n{got}", path.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn backoff_doubles_up_to_the_cap() {
    let b = Backoff { first_ms: 100, max_ms: 1000 };
    assert_eq!([1, 2, 3, 4, 5, 60].map(|a| b.delay_ms(a)), [100, 200, 400, 800, 1000, 1000]);
}
