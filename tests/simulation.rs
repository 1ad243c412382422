//! Deterministic simulation of the two-phase-commit core.
//!
//! The pure transaction state machine ([`Txn`]) and a model of the leader's
//! recovery (the rules of `src/coordinator/recovery.rs`) run against model
//! participants with PostgreSQL's semantics and a model decision log with
//! compare-and-set semantics, under a schedule drawn from one seed: calls
//! lost before or after they took effect, answers lost or duplicated, calls
//! that land after their caller gave up, messages and timers delivered in any
//! order, coordinator crashes and leader changes (a deposed leader's drivers
//! keep running), participant crashes, and operators ending prepared
//! branches by hand (heuristic outcomes).
//!
//! Each seed builds a small world (2 to 4 participants, 1 to 4 transactions,
//! sometimes sharing an idempotency key), runs a fault phase, then a calm one
//! (no more faults, every call answered) until nothing is in flight, no
//! driver runs, no branch is open or prepared and every record is complete,
//! and checks the invariants:
//!
//! 1. Atomicity: the branches of a transaction all committed or all rolled
//!    back, as the decision log says (no record: rolled back). A branch an
//!    operator ended against the decision is reported as heuristic: by the
//!    driver, or by recovery and kept in the COMMIT record. (Under presumed
//!    abort, a branch committed by hand whose xid the coordinator never
//!    learned cannot be detected; such cases are counted, not failed.)
//! 2. A COMMIT is applied to the log only while every branch is prepared
//!    (or was ended by an operator).
//! 3. A client answered COMMITTED has a COMMIT in the log; one answered
//!    ABORTED has none (and, by 1, no branch committed but by hand).
//! 4. No branch is left open or prepared.
//! 5. No coordinator (driver or recovery) commits a branch without a recorded
//!    COMMIT, nor rolls one back under it (checked when it happens).
//! 6. Liveness: the calm phase reaches quiescence within a step bound, and no
//!    running driver ever waits with nothing in flight.
//!
//! Also: at most one COMMIT per idempotency key, and no false heuristic
//! report.
//!
//! A failure names its seed; rerun one seed with its full trace with
//!
//! ```text
//! SIM_SEED=1234 cargo test --features failpoints --test simulation -- --nocapture
//! ```
//!
//! `SIM_SEEDS=n` runs n seeds (default 20000) from `SIM_SEED_BASE` (default
//! 0); `SIM_KEEP_GOING=1` runs them all and lists every failing seed.
//! `SIM_XIDLESS=1` gives participant 0 no xids (a participant that cannot
//! tell how a vanished branch ended; PostgreSQL always can): the driver
//! then retries such a branch under COMMIT forever, so that mode fails on
//! liveness today.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use tandem::txn::Decision;
use tandem::txn::machine::Action;
use tandem::txn::machine::Backoff;
use tandem::txn::machine::BranchState;
use tandem::txn::machine::Event;
use tandem::txn::machine::Outcome;
use tandem::txn::machine::Phase;
use tandem::txn::machine::Txn;

/// Coordinator nodes; one leads at a time.
const NODES: usize = 3;
/// Tries at proposing a decision before the driver gives up (as the driver).
const PROPOSE_ATTEMPTS: u32 = 5;
/// Steps the calm phase may take to settle everything.
const CALM_STEPS_MAX: usize = 20_000;
const SEEDS_DEFAULT: u64 = 20_000;

// ---------------------------------------------------------------------------
// Randomness

/// splitmix64: small, fast, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next() >> 11) as f64) < p * (1u64 << 53) as f64
    }
}

// ---------------------------------------------------------------------------
// Trace

thread_local! {
    static TRACE: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

fn tracing() -> bool {
    TRACE.with(|t| t.borrow().is_some())
}

// ---------------------------------------------------------------------------
// The world

/// Branch `.1` of transaction `.0`: what a gid names.
type Gid = (usize, usize);

/// Who ended a branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ender {
    /// COMMIT/ROLLBACK PREPARED by a driver or by recovery.
    Coordinator,
    /// Its session ended before PREPARE: rolled back by the client, a failed
    /// statement, a lost connection or a participant crash.
    Session,
    /// An operator's COMMIT/ROLLBACK PREPARED by hand.
    Operator,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PState {
    Active,
    Prepared,
    Ended { committed: bool, by: Ender },
}

#[derive(Clone, Debug)]
struct PBranch {
    state: PState,
    xid: u64,
}

/// A PostgreSQL-like participant.
#[derive(Default)]
struct Participant {
    /// Whether PREPARE reports the branch's xid.
    xids: bool,
    next_xid: u64,
    branches: BTreeMap<Gid, PBranch>,
    by_xid: BTreeMap<u64, Gid>,
}

/// A record of the decision log.
struct Record {
    decision: Decision,
    completed: bool,
    heuristic: Vec<(usize, bool)>,
}

/// How a call fares on the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Ok,
    /// Lost before it took effect; the caller sees a failure.
    Lost,
    /// Took effect; its answer was lost, the caller sees a failure.
    AnswerLost,
    /// The caller sees a failure (a timeout) but the call is still on its
    /// way and takes effect later.
    Late,
    /// Delivered twice (a PREPARE, on its session, only once).
    Twice,
}

#[derive(Clone, Debug)]
enum Call {
    Prepare { branch: usize },
    Phase2 { branch: usize, commit: bool },
    Check { branch: usize, xid: u64 },
    Decide(Decision),
    Complete(Vec<(usize, bool)>),
}

/// What reaches a driver.
#[derive(Clone, Debug)]
enum Reply {
    Event(Event),
    /// The decision that holds.
    Decided(Decision),
    /// The COMMIT was refused: another committed txid holds its key.
    KeyTaken(usize),
    ProposeFailed,
}

/// An operation that takes effect when it lands.
#[derive(Clone, Debug)]
enum Op {
    Prepare { gid: Gid },
    Finish { gid: Gid, commit: bool, who: &'static str },
    Decide { txn: usize, decision: Decision },
    Complete { txn: usize, heuristic: Vec<(usize, bool)> },
}

#[derive(Clone, Debug)]
enum Msg {
    /// A driver's call on its way to a participant or the log.
    Call { txn: usize, call: Call },
    /// An answer, a timer or a client's request, on its way to a driver.
    Reply { txn: usize, reply: Reply },
    /// An open branch's connection closed: the participant rolls it back.
    Disconnect { gid: Gid },
    /// A call whose caller already gave up on it.
    Late(Op),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Committed,
    Aborted,
    /// The driver stopped (crashed, or could not record the decision).
    Unknown,
}

struct Driver {
    txn: Txn,
    node: usize,
    /// Running, and so in flight on its node.
    alive: bool,
    /// The decision being proposed and the attempt number.
    proposal: Option<(Decision, u32)>,
    /// Per branch, whether the machine ever held its xid.
    xid_known: Vec<bool>,
}

struct TxnModel {
    parts: Vec<usize>,
    key: Option<String>,
    driver: Option<Driver>,
    answer: Option<Answer>,
    /// Branches reported heuristic by the driver.
    driver_reported: BTreeSet<usize>,
    /// Branches found heuristic by recovery.
    recovery_reported: BTreeSet<usize>,
}

/// One recovery round on one node, one call per step.
struct Round {
    todo: VecDeque<Step>,
    prepared: BTreeMap<usize, Vec<usize>>,
    listed_all: bool,
    /// For the COMMIT record being re-driven.
    all: bool,
    heuristic: Vec<(usize, bool)>,
}

#[derive(Clone, Debug)]
enum Step {
    List(usize),
    Plan,
    Orphan(usize),
    Finish { gid: Gid, commit: bool },
    Incomplete { commit: bool },
    Record(usize),
    CommitBranch { txn: usize, branch: usize },
    Outcome { txn: usize, branch: usize, xid: u64 },
    Completion(usize),
}

impl Round {
    fn new(participants: usize) -> Self {
        let mut todo: VecDeque<Step> = (0..participants).map(Step::List).collect();
        todo.push_back(Step::Plan);
        Self { todo, prepared: BTreeMap::new(), listed_all: true, all: true, heuristic: Vec::new() }
    }
}

/// Per-seed fault rates.
struct Faults {
    lost: f64,
    answer_lost: f64,
    late: f64,
    twice: f64,
    dup_reply: f64,
    delay: f64,
    statement_fails: f64,
    participant_crash: f64,
    operator: f64,
    coordinator_crash: f64,
    depose: f64,
    list_fails: f64,
    outcome_unknown: f64,
}

impl Faults {
    fn scaled(f: f64) -> Self {
        Self {
            lost: 0.06 * f,
            answer_lost: 0.05 * f,
            late: 0.05 * f,
            twice: 0.04 * f,
            dup_reply: 0.03 * f,
            delay: 0.1 * f,
            statement_fails: 0.03 * f,
            participant_crash: 0.004 * f,
            operator: 0.02 * f,
            coordinator_crash: 0.003 * f,
            depose: 0.003 * f,
            list_fails: 0.1 * f,
            outcome_unknown: 0.15 * f,
        }
    }
}

#[derive(Default, Clone, Debug)]
struct Stats {
    seeds: u64,
    steps: u64,
    txns: u64,
    committed: u64,
    aborted: u64,
    unknown: u64,
    key_conflicts: u64,
    decision_unknown: u64,
    lost: u64,
    answer_lost: u64,
    late: u64,
    twice: u64,
    dup_replies: u64,
    participant_crashes: u64,
    operator_actions: u64,
    coordinator_crashes: u64,
    crashes_during_recovery: u64,
    deposed: u64,
    deposed_drivers_finished: u64,
    rounds: u64,
    presumed_aborts: u64,
    reconciled: u64,
    heuristics_reported: u64,
    heuristics_undetectable: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        macro_rules! sum {
            ($($f:ident),*) => { $(self.$f += o.$f;)* };
        }
        sum!(
            seeds,
            steps,
            txns,
            committed,
            aborted,
            unknown,
            key_conflicts,
            decision_unknown,
            lost,
            answer_lost,
            late,
            twice,
            dup_replies,
            participant_crashes,
            operator_actions,
            coordinator_crashes,
            crashes_during_recovery,
            deposed,
            deposed_drivers_finished,
            rounds,
            presumed_aborts,
            reconciled,
            heuristics_reported,
            heuristics_undetectable
        );
    }
}

struct World {
    rng: Rng,
    faults: Faults,
    calm: bool,
    step: usize,
    parts: Vec<Participant>,
    txns: Vec<TxnModel>,
    started: usize,
    log: BTreeMap<usize, Record>,
    keys: BTreeMap<String, usize>,
    /// Messages in flight, each with the step from which it may land.
    net: Vec<(usize, Msg)>,
    leader: usize,
    rounds: Vec<Option<Round>>,
    violation: Option<String>,
    stats: Stats,
    summary: String,
    fault_steps: usize,
    /// The step at which each transaction begins.
    begins: Vec<usize>,
}

fn name(p: usize) -> String {
    format!("p{p}")
}

fn short(d: &Decision) -> String {
    match d {
        Decision::Commit { branches, idempotency_key } => format!(
            "COMMIT[{}]{}",
            branches
                .iter()
                .map(|b| format!("{}{}", b.participant, b.xid.map(|x| format!(":x{x}")).unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(","),
            idempotency_key.as_ref().map(|k| format!(" key={k}")).unwrap_or_default()
        ),
        Decision::Abort { reason } => format!("ABORT({reason})"),
    }
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let intensity = rng.below(4) as f64 / 2.0;
        let n_parts = 2 + rng.below(3);
        let xidless = std::env::var_os("SIM_XIDLESS").is_some();
        let parts = (0..n_parts).map(|p| Participant { xids: !(xidless && p == 0), ..Default::default() }).collect();
        let n_txns = 1 + rng.below(4);
        let fault_steps = 20 + rng.below(400);
        let shared_key = rng.chance(0.3);
        let mut txns = Vec::new();
        for t in 0..n_txns {
            // A random subset of the participants, in random order.
            let mut pool: Vec<usize> = (0..n_parts).collect();
            let k = 1 + rng.below(n_parts);
            let mut chosen = Vec::new();
            for _ in 0..k {
                chosen.push(pool.swap_remove(rng.below(pool.len())));
            }
            let key = if shared_key {
                Some("k".to_string())
            } else if rng.chance(0.3) {
                Some(format!("k{t}"))
            } else {
                None
            };
            txns.push(TxnModel {
                parts: chosen,
                key,
                driver: None,
                answer: None,
                driver_reported: BTreeSet::new(),
                recovery_reported: BTreeSet::new(),
            });
        }
        let summary = format!(
            "{n_parts} participants, fault intensity {intensity}, transactions: {}",
            txns.iter()
                .enumerate()
                .map(|(t, m)| format!(
                    "t{t}[{}{}]",
                    m.parts.iter().map(|p| name(*p)).collect::<Vec<_>>().join(","),
                    m.key.as_ref().map(|k| format!(" key={k}")).unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join(" ")
        );
        // When each transaction begins: the first at once, the others
        // spread over the first two thirds of the fault phase.
        let mut begins: Vec<usize> =
            (0..n_txns).map(|t| if t == 0 { 1 } else { 1 + rng.below(fault_steps * 2 / 3) }).collect();
        begins.sort_unstable();
        let leader = rng.below(NODES);
        let mut rounds: Vec<Option<Round>> = (0..NODES).map(|_| None).collect();
        rounds[leader] = Some(Round::new(n_parts));
        Self {
            rng,
            faults: Faults::scaled(intensity),
            calm: false,
            step: 0,
            parts,
            txns,
            started: 0,
            log: BTreeMap::new(),
            keys: BTreeMap::new(),
            net: Vec::new(),
            leader,
            rounds,
            violation: None,
            stats: Stats { seeds: 1, rounds: 1, ..Default::default() },
            summary,
            fault_steps,
            begins,
        }
    }

    fn note(&self, f: impl FnOnce() -> String) {
        if tracing() {
            let line = format!("{:5} {}", self.step, f());
            TRACE.with(|t| t.borrow_mut().as_mut().expect("tracing").push(line));
        }
    }

    fn violate(&mut self, what: String) {
        self.note(|| format!("VIOLATION: {what}"));
        self.violation.get_or_insert(what);
    }

    fn fate(&mut self) -> Fate {
        if self.calm {
            return Fate::Ok;
        }
        let f = &self.faults;
        let (lost, answer_lost, late, twice) = (f.lost, f.answer_lost, f.late, f.twice);
        let fate = if self.rng.chance(lost) {
            self.stats.lost += 1;
            Fate::Lost
        } else if self.rng.chance(answer_lost) {
            self.stats.answer_lost += 1;
            Fate::AnswerLost
        } else if self.rng.chance(late) {
            self.stats.late += 1;
            Fate::Late
        } else if self.rng.chance(twice) {
            self.stats.twice += 1;
            Fate::Twice
        } else {
            Fate::Ok
        };
        if fate != Fate::Ok {
            self.note(|| format!("  (fate: {fate:?})"));
        }
        fate
    }

    /// Sends a message; during the faults it may be held up for a while,
    /// and a late call always is.
    fn send(&mut self, msg: Msg) {
        let delay = if matches!(msg, Msg::Late(_)) {
            1 + self.rng.below(100)
        } else if self.fault(self.faults.delay) {
            1 + self.rng.below(40)
        } else {
            0
        };
        self.send_after(msg, delay);
    }

    fn send_after(&mut self, msg: Msg, steps: usize) {
        self.net.push((self.step + steps, msg));
    }

    fn fault(&mut self, p: f64) -> bool {
        !self.calm && self.rng.chance(p)
    }

    fn participant_of(&self, gid: Gid) -> usize {
        self.txns[gid.0].parts[gid.1]
    }

    fn recorded_commit(&self, txn: usize) -> Option<bool> {
        self.log.get(&txn).map(|r| r.decision.is_commit())
    }

    // -- participants -------------------------------------------------------

    fn prepare(&mut self, gid: Gid) -> Result<Option<u64>, String> {
        let fails = self.rng.chance(self.faults.statement_fails);
        let p = self.participant_of(gid);
        let part = &mut self.parts[p];
        let xids = part.xids;
        let b = part.branches.get_mut(&gid).expect("branch begun");
        let result = match b.state {
            PState::Active if fails => {
                b.state = PState::Ended { committed: false, by: Ender::Session };
                Err("a statement failed".to_string())
            }
            PState::Active => {
                b.state = PState::Prepared;
                Ok(xids.then_some(b.xid))
            }
            _ => Err("the branch's connection was lost".to_string()),
        };
        self.note(|| format!("  {} PREPARE t{}.{} -> {result:?}", name(p), gid.0, gid.1));
        result
    }

    /// COMMIT or ROLLBACK PREPARED; false if the gid is missing.
    fn finish(&mut self, gid: Gid, commit: bool, by: Ender, who: &str) -> bool {
        let p = self.participant_of(gid);
        let state = self.parts[p].branches[&gid].state;
        let verb = if commit { "COMMIT" } else { "ROLLBACK" };
        if state != PState::Prepared {
            self.note(|| format!("  {} {verb} PREPARED t{}.{} by {who} -> gid missing", name(p), gid.0, gid.1));
            return false;
        }
        if by == Ender::Coordinator {
            match (commit, self.recorded_commit(gid.0)) {
                (true, Some(true)) | (false, None | Some(false)) => {}
                (true, _) => self.violate(format!("{who} committed t{}.{} without a recorded COMMIT", gid.0, gid.1)),
                (false, _) => self.violate(format!("{who} rolled back t{}.{} under a recorded COMMIT", gid.0, gid.1)),
            }
        }
        self.parts[p].branches.get_mut(&gid).expect("branch").state = PState::Ended { committed: commit, by };
        self.note(|| format!("  {} {verb} PREPARED t{}.{} by {who} -> done", name(p), gid.0, gid.1));
        true
    }

    /// How the branch with `xid` ended (`pg_xact_status`).
    fn outcome(&mut self, p: usize, xid: u64) -> Option<bool> {
        let unknown = self.fault(self.faults.outcome_unknown);
        let part = &self.parts[p];
        let ended = part.by_xid.get(&xid).and_then(|gid| match part.branches[gid].state {
            PState::Ended { committed, .. } => Some(committed),
            _ => None,
        });
        let r = if unknown { None } else { ended };
        self.note(|| format!("  {} status of x{xid} -> {r:?}", name(p)));
        r
    }

    fn disconnect(&mut self, gid: Gid) {
        let p = self.participant_of(gid);
        let b = self.parts[p].branches.get_mut(&gid).expect("branch");
        if b.state == PState::Active {
            b.state = PState::Ended { committed: false, by: Ender::Session };
            self.note(|| format!("  {}: t{}.{} session closed, rolled back", name(p), gid.0, gid.1));
        }
    }

    // -- the decision log ---------------------------------------------------

    fn decide(&mut self, txn: usize, decision: Decision) -> Reply {
        if let Some(r) = self.log.get(&txn) {
            let held = r.decision.clone();
            self.note(|| format!("  log: t{txn} {} refused, {} holds", short(&decision), short(&held)));
            return Reply::Decided(held);
        }
        if let Decision::Commit { branches, idempotency_key } = &decision {
            if let Some(key) = idempotency_key {
                match self.keys.get(key) {
                    Some(&owner) if owner != txn => {
                        self.note(|| format!("  log: t{txn} COMMIT refused, key {key} belongs to t{owner}"));
                        return Reply::KeyTaken(owner);
                    }
                    _ => {
                        self.keys.insert(key.clone(), txn);
                    }
                }
            }
            // Invariant 2: every branch prepared (or ended by hand).
            let names: Vec<String> = self.txns[txn].parts.iter().map(|p| name(*p)).collect();
            if branches.iter().map(|b| &b.participant).ne(names.iter()) {
                self.violate(format!("t{txn}: COMMIT names other branches than the transaction's"));
            }
            for b in 0..self.txns[txn].parts.len() {
                let state = self.parts[self.participant_of((txn, b))].branches[&(txn, b)].state;
                if !matches!(state, PState::Prepared | PState::Ended { by: Ender::Operator, .. }) {
                    self.violate(format!("COMMIT of t{txn} applied while branch {b} is {state:?}"));
                }
            }
        }
        self.note(|| format!("  log: t{txn} {} recorded", short(&decision)));
        self.log.insert(txn, Record { decision: decision.clone(), completed: false, heuristic: Vec::new() });
        Reply::Decided(decision)
    }

    fn complete(&mut self, txn: usize, heuristic: Vec<(usize, bool)>) {
        if let Some(r) = self.log.get_mut(&txn)
            && !r.completed
        {
            r.completed = true;
            r.heuristic = heuristic;
            self.note(|| format!("  log: t{txn} complete"));
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Prepare { gid } => {
                self.prepare(gid).ok();
            }
            Op::Finish { gid, commit, who } => {
                self.finish(gid, commit, Ender::Coordinator, who);
            }
            Op::Decide { txn, decision } => {
                self.decide(txn, decision);
            }
            Op::Complete { txn, heuristic } => self.complete(txn, heuristic),
        }
    }

    // -- drivers --------------------------------------------------------------

    fn start_txn(&mut self) {
        let t = self.started;
        self.started += 1;
        self.stats.txns += 1;
        let parts = self.txns[t].parts.clone();
        for (b, &p) in parts.iter().enumerate() {
            let part = &mut self.parts[p];
            part.next_xid += 1;
            let xid = part.next_xid;
            part.branches.insert((t, b), PBranch { state: PState::Active, xid });
            part.by_xid.insert(xid, (t, b));
        }
        let txn = Txn::new(
            parts.iter().map(|p| name(*p)).collect(),
            self.txns[t].key.clone(),
            Backoff { first_ms: 100, max_ms: 1000 },
        );
        let node = self.leader;
        self.note(|| format!("t{t} begins on node {node}"));
        self.txns[t].driver =
            Some(Driver { txn, node, alive: true, proposal: None, xid_known: vec![false; parts.len()] });
        // The client commits, or (an interactive transaction) rolls back;
        // sometimes the deadline passes first.
        let request = if self.rng.chance(0.9) {
            Event::CommitRequested
        } else {
            Event::RollbackRequested { reason: "the client rolled back".into() }
        };
        self.send(Msg::Reply { txn: t, reply: Reply::Event(request) });
        if self.rng.chance(0.25) {
            let at = self.rng.below(150);
            self.send_after(Msg::Reply { txn: t, reply: Reply::Event(Event::TimedOut) }, at);
        }
    }

    fn driver(&mut self, t: usize) -> &mut Driver {
        self.txns[t].driver.as_mut().expect("started")
    }

    fn step_driver(&mut self, t: usize, event: Event) {
        let d = self.driver(t);
        let actions = d.txn.step(event);
        for (b, s) in d.txn.branches().iter().enumerate() {
            if s.xid().is_some() {
                d.xid_known[b] = true;
            }
        }
        let done = d.txn.phase() == Phase::Done;
        self.note(|| {
            let d = self.txns[t].driver.as_ref().expect("started");
            let branches: Vec<String> = d.txn.branches().iter().map(ToString::to_string).collect();
            format!("  t{t} = {:?} [{}]", d.txn.phase(), branches.join(", "))
        });
        for action in actions {
            self.perform(t, action);
        }
        if done {
            let d = self.driver(t);
            d.alive = false;
            let node = d.node;
            if node != self.leader {
                self.stats.deposed_drivers_finished += 1;
            }
            self.note(|| format!("  t{t} driver done"));
        }
    }

    fn perform(&mut self, t: usize, action: Action) {
        self.note(|| format!("  t{t} -> {action:?}"));
        let call = |call| Msg::Call { txn: t, call };
        match action {
            Action::Prepare { branch } => self.send(call(Call::Prepare { branch })),
            Action::RollbackActive { branch } => self.send(Msg::Disconnect { gid: (t, branch) }),
            Action::ProposeDecision(decision) => {
                self.driver(t).proposal = Some((decision.clone(), 1));
                self.send(call(Call::Decide(decision)));
            }
            Action::CommitPrepared { branch } => self.send(call(Call::Phase2 { branch, commit: true })),
            Action::RollbackPrepared { branch } => self.send(call(Call::Phase2 { branch, commit: false })),
            // A step is some 20 ms.
            Action::ScheduleRetry { branch, after_ms } => self.send_after(
                Msg::Reply { txn: t, reply: Reply::Event(Event::RetryDue { branch }) },
                after_ms as usize / 20,
            ),
            Action::CheckOutcome { branch, xid } => match xid {
                Some(xid) => self.send(call(Call::Check { branch, xid })),
                // The driver asks nothing without an xid.
                None => self
                    .send(Msg::Reply { txn: t, reply: Reply::Event(Event::BranchEnded { branch, committed: None }) }),
            },
            Action::ReportHeuristic { branch, .. } => {
                self.stats.heuristics_reported += 1;
                self.txns[t].driver_reported.insert(branch);
            }
            Action::ProposeComplete => {
                let heuristic = self
                    .driver(t)
                    .txn
                    .branches()
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| match s {
                        BranchState::Heuristic { committed } => Some((i, *committed)),
                        _ => None,
                    })
                    .collect();
                self.send(call(Call::Complete(heuristic)));
            }
            Action::Answer(outcome) => {
                let answer = match outcome {
                    Outcome::Committed { .. } => Answer::Committed,
                    Outcome::Aborted { .. } => Answer::Aborted,
                };
                self.answer(t, answer);
            }
        }
    }

    fn answer(&mut self, t: usize, answer: Answer) {
        if self.txns[t].answer.is_some() {
            if answer != Answer::Unknown {
                self.violate(format!("t{t} answered twice"));
            }
            return;
        }
        match answer {
            Answer::Committed => self.stats.committed += 1,
            Answer::Aborted => self.stats.aborted += 1,
            Answer::Unknown => self.stats.unknown += 1,
        }
        self.txns[t].answer = Some(answer);
        self.note(|| format!("  t{t} client answered {answer:?}"));
        // Invariant 3, when answered.
        match (answer, self.recorded_commit(t)) {
            (Answer::Committed, Some(true)) | (Answer::Aborted, None | Some(false)) | (Answer::Unknown, _) => {}
            (Answer::Committed, _) => self.violate(format!("t{t} answered COMMITTED without a recorded COMMIT")),
            (Answer::Aborted, _) => self.violate(format!("t{t} answered ABORTED under a recorded COMMIT")),
        }
    }

    fn deliver(&mut self, msg: Msg) {
        match msg {
            Msg::Call { txn, call } => self.deliver_call(txn, call),
            Msg::Reply { txn, reply } => self.deliver_reply(txn, reply),
            Msg::Disconnect { gid } => self.disconnect(gid),
            Msg::Late(op) => {
                self.note(|| format!("late call lands: {op:?}"));
                self.apply(op);
            }
        }
    }

    fn deliver_call(&mut self, t: usize, call: Call) {
        let (alive, node) = {
            let d = self.driver(t);
            (d.alive, d.node)
        };
        self.note(|| format!("t{t}{} call {call:?}", if alive { "" } else { " (driver gone)" }));
        let fate = self.fate();
        let mut replies = Vec::new();
        match call {
            Call::Prepare { branch } => {
                let gid = (t, branch);
                let failed = |reason: &str| Event::PrepareFailed { branch, reason: reason.into() };
                match fate {
                    Fate::Ok | Fate::Twice => replies.push(match self.prepare(gid) {
                        Ok(xid) => Event::Prepared { branch, xid },
                        Err(reason) => Event::PrepareFailed { branch, reason },
                    }),
                    Fate::Lost => replies.push(failed("connection lost")),
                    Fate::AnswerLost => {
                        self.prepare(gid).ok();
                        replies.push(failed("connection lost after PREPARE"));
                    }
                    Fate::Late => {
                        replies.push(failed("timed out"));
                        self.send(Msg::Late(Op::Prepare { gid }));
                    }
                }
                // A failed prepare drops its session: an open branch is
                // rolled back when the participant notices.
                if fate != Fate::Ok && fate != Fate::Twice {
                    self.send(Msg::Disconnect { gid });
                }
            }
            Call::Phase2 { branch, commit } => {
                let gid = (t, branch);
                let failed = Event::Phase2Failed { branch, error: "connection lost".into() };
                match fate {
                    Fate::Ok | Fate::Twice => {
                        if fate == Fate::Twice {
                            self.send(Msg::Call { txn: t, call: call.clone() });
                        }
                        let done = self.finish(gid, commit, Ender::Coordinator, "driver");
                        replies.push(if done { Event::Phase2Done { branch } } else { Event::GidMissing { branch } });
                    }
                    Fate::Lost => replies.push(failed),
                    Fate::AnswerLost => {
                        self.finish(gid, commit, Ender::Coordinator, "driver");
                        replies.push(failed);
                    }
                    Fate::Late => {
                        replies.push(failed);
                        self.send(Msg::Late(Op::Finish { gid, commit, who: "driver" }));
                    }
                }
            }
            Call::Check { branch, xid } => {
                if fate == Fate::Twice {
                    self.send(Msg::Call { txn: t, call: call.clone() });
                }
                let committed = match fate {
                    Fate::Ok | Fate::Twice => self.outcome(self.txns[t].parts[branch], xid),
                    _ => None,
                };
                replies.push(Event::BranchEnded { branch, committed });
            }
            Call::Decide(decision) => {
                // A deposed leader's proposals fail.
                let fate = if node == self.leader { fate } else { Fate::Lost };
                let reply = match fate {
                    Fate::Ok | Fate::Twice => {
                        if fate == Fate::Twice {
                            self.send(Msg::Late(Op::Decide { txn: t, decision: decision.clone() }));
                        }
                        self.decide(t, decision)
                    }
                    Fate::Lost => Reply::ProposeFailed,
                    Fate::AnswerLost => {
                        self.decide(t, decision);
                        Reply::ProposeFailed
                    }
                    Fate::Late => {
                        self.send(Msg::Late(Op::Decide { txn: t, decision }));
                        Reply::ProposeFailed
                    }
                };
                if alive {
                    self.send(Msg::Reply { txn: t, reply });
                }
            }
            Call::Complete(heuristic) => {
                let fate = if node == self.leader { fate } else { Fate::Lost };
                match fate {
                    Fate::Ok | Fate::Twice | Fate::AnswerLost => self.complete(t, heuristic),
                    Fate::Lost => {}
                    Fate::Late => self.send(Msg::Late(Op::Complete { txn: t, heuristic })),
                }
            }
        }
        if alive {
            for event in replies {
                self.send(Msg::Reply { txn: t, reply: Reply::Event(event) });
            }
        }
    }

    fn deliver_reply(&mut self, t: usize, reply: Reply) {
        if !self.driver(t).alive {
            return;
        }
        self.note(|| format!("t{t} gets {reply:?}"));
        match reply {
            Reply::Event(event) => {
                let answer = matches!(
                    event,
                    Event::Prepared { .. }
                        | Event::PrepareFailed { .. }
                        | Event::Phase2Done { .. }
                        | Event::Phase2Failed { .. }
                        | Event::GidMissing { .. }
                        | Event::BranchEnded { .. }
                );
                if answer && self.fault(self.faults.dup_reply) {
                    self.stats.dup_replies += 1;
                    self.note(|| "  (duplicated)".into());
                    self.send(Msg::Reply { txn: t, reply: Reply::Event(event.clone()) });
                }
                self.step_driver(t, event);
            }
            Reply::Decided(decision) => {
                if self.driver(t).proposal.take().is_some() {
                    self.step_driver(t, Event::Decided(decision));
                }
            }
            Reply::KeyTaken(owner) => {
                if let Some((_, attempt)) = self.driver(t).proposal.take() {
                    self.stats.key_conflicts += 1;
                    let abort = Decision::Abort { reason: format!("idempotency key already belongs to t{owner}") };
                    self.driver(t).proposal = Some((abort.clone(), attempt + 1));
                    self.send(Msg::Call { txn: t, call: Call::Decide(abort) });
                }
            }
            Reply::ProposeFailed => {
                if let Some((decision, attempt)) = self.driver(t).proposal.take() {
                    if attempt < PROPOSE_ATTEMPTS {
                        // After the driver's backoff, 100 << attempt ms.
                        self.driver(t).proposal = Some((decision.clone(), attempt + 1));
                        self.send_after(Msg::Call { txn: t, call: Call::Decide(decision) }, (100 << attempt) / 20);
                    } else {
                        // The driver stops; recovery settles the transaction.
                        self.stats.decision_unknown += 1;
                        self.note(|| format!("  t{t} could not record its decision; driver stops"));
                        self.driver(t).alive = false;
                        self.answer(t, Answer::Unknown);
                    }
                }
            }
        }
    }

    fn in_flight(&self, node: usize, t: usize) -> bool {
        self.txns[t].driver.as_ref().is_some_and(|d| d.alive && d.node == node)
    }

    // -- recovery -------------------------------------------------------------

    /// A participant call made by recovery: whether it answered.
    fn recovery_finish(&mut self, gid: Gid, commit: bool) -> Option<bool> {
        match self.fate() {
            Fate::Ok | Fate::Twice => Some(self.finish(gid, commit, Ender::Coordinator, "recovery")),
            Fate::Lost => None,
            Fate::AnswerLost => {
                self.finish(gid, commit, Ender::Coordinator, "recovery");
                None
            }
            Fate::Late => {
                self.send(Msg::Late(Op::Finish { gid, commit, who: "recovery" }));
                None
            }
        }
    }

    /// A proposal made by recovery: its answer, or None if it failed.
    fn recovery_propose(&mut self, node: usize, op: Op) -> Option<Reply> {
        if node != self.leader {
            self.note(|| "  proposal fails: not the leader".into());
            return None;
        }
        match self.fate() {
            Fate::Ok | Fate::Twice => Some(match op {
                Op::Decide { txn, decision } => self.decide(txn, decision),
                Op::Complete { txn, heuristic } => {
                    self.complete(txn, heuristic);
                    Reply::ProposeFailed // unused
                }
                _ => unreachable!("only log operations are proposed"),
            }),
            Fate::Lost => None,
            Fate::AnswerLost => {
                self.apply(op);
                None
            }
            Fate::Late => {
                self.send(Msg::Late(op));
                None
            }
        }
    }

    fn recovery_step(&mut self, node: usize) {
        let mut round = self.rounds[node].take().expect("a round");
        let Some(step) = round.todo.pop_front() else {
            self.note(|| format!("node {node}: recovery round done"));
            return;
        };
        self.note(|| format!("node {node} recovery: {step:?}"));
        match step {
            Step::List(p) => {
                if self.fault(self.faults.list_fails) {
                    self.note(|| "  listing failed".into());
                    round.listed_all = false;
                } else {
                    for (gid, b) in &self.parts[p].branches {
                        if b.state == PState::Prepared {
                            round.prepared.entry(gid.0).or_default().push(gid.1);
                        }
                    }
                }
            }
            Step::Plan => {
                for &t in round.prepared.keys() {
                    round.todo.push_back(Step::Orphan(t));
                }
                round.todo.push_back(Step::Incomplete { commit: true });
                round.todo.push_back(Step::Incomplete { commit: false });
            }
            Step::Orphan(t) => {
                if self.in_flight(node, t) {
                    self.note(|| "  in flight here".into());
                } else {
                    let decision = match self.log.get(&t) {
                        Some(r) => r.decision.clone(),
                        None => {
                            let reason = "presumed abort".to_string();
                            let op = Op::Decide { txn: t, decision: Decision::Abort { reason } };
                            match self.recovery_propose(node, op) {
                                Some(Reply::Decided(d)) => {
                                    if !d.is_commit() {
                                        self.stats.presumed_aborts += 1;
                                    }
                                    d
                                }
                                _ => {
                                    self.note(|| "  proposal failed: round ends".into());
                                    return;
                                }
                            }
                        }
                    };
                    let commit = decision.is_commit();
                    for &b in round.prepared[&t].iter().rev() {
                        round.todo.push_front(Step::Finish { gid: (t, b), commit });
                    }
                }
            }
            Step::Finish { gid, commit } => {
                if self.recovery_finish(gid, commit) == Some(true) {
                    self.stats.reconciled += 1;
                }
            }
            Step::Incomplete { commit } => {
                let records: Vec<usize> = self
                    .log
                    .iter()
                    .filter(|(_, r)| !r.completed && r.decision.is_commit() == commit)
                    .map(|(t, _)| *t)
                    .collect();
                for t in records.into_iter().rev() {
                    round.todo.push_front(Step::Record(t));
                }
            }
            Step::Record(t) => {
                if self.in_flight(node, t) {
                    self.note(|| "  in flight here".into());
                } else {
                    match self.log[&t].decision.clone() {
                        Decision::Commit { branches, .. } => {
                            round.all = true;
                            round.heuristic.clear();
                            round.todo.push_front(Step::Completion(t));
                            for b in (0..branches.len()).rev() {
                                round.todo.push_front(Step::CommitBranch { txn: t, branch: b });
                            }
                        }
                        Decision::Abort { .. } => {
                            if round.listed_all && !round.prepared.contains_key(&t) {
                                let op = Op::Complete { txn: t, heuristic: Vec::new() };
                                if self.recovery_propose(node, op).is_none() {
                                    self.note(|| "  proposal failed: round ends".into());
                                    return;
                                }
                            }
                        }
                    }
                }
            }
            Step::CommitBranch { txn, branch } => {
                let Decision::Commit { branches, .. } = &self.log[&txn].decision else { unreachable!("a COMMIT") };
                let xid = branches[branch].xid;
                let p: usize = branches[branch].participant[1..].parse().expect("participant name");
                assert_eq!(p, self.participant_of((txn, branch)), "the COMMIT names the branch's participant");
                match self.recovery_finish((txn, branch), true) {
                    Some(true) => self.stats.reconciled += 1,
                    Some(false) => {
                        if let Some(xid) = xid {
                            round.todo.push_front(Step::Outcome { txn, branch, xid });
                        }
                    }
                    None => round.all = false,
                }
            }
            Step::Outcome { txn, branch, xid } => {
                let answered = matches!(self.fate(), Fate::Ok | Fate::Twice);
                let p = self.participant_of((txn, branch));
                match answered.then(|| self.outcome(p, xid)).flatten() {
                    Some(true) => {}
                    Some(false) => {
                        self.note(|| format!("  HEURISTIC t{txn}.{branch} (decided commit)"));
                        self.stats.heuristics_reported += 1;
                        round.heuristic.push((branch, false));
                        self.txns[txn].recovery_reported.insert(branch);
                    }
                    None => round.all = false,
                }
            }
            Step::Completion(t) => {
                if round.all {
                    let op = Op::Complete { txn: t, heuristic: round.heuristic.clone() };
                    if self.recovery_propose(node, op).is_none() {
                        self.note(|| "  proposal failed: round ends".into());
                        return;
                    }
                }
            }
        }
        self.rounds[node] = Some(round);
    }

    // -- faults ---------------------------------------------------------------

    fn inject_faults(&mut self) {
        if self.fault(self.faults.participant_crash) {
            let p = self.rng.below(self.parts.len());
            self.stats.participant_crashes += 1;
            self.note(|| format!("{} CRASHES: open branches roll back, prepared ones survive", name(p)));
            for b in self.parts[p].branches.values_mut() {
                if b.state == PState::Active {
                    b.state = PState::Ended { committed: false, by: Ender::Session };
                }
            }
        }
        if self.fault(self.faults.operator) {
            let prepared: Vec<Gid> = self
                .parts
                .iter()
                .flat_map(|p| p.branches.iter().filter(|(_, b)| b.state == PState::Prepared).map(|(g, _)| *g))
                .collect();
            if !prepared.is_empty() {
                let gid = prepared[self.rng.below(prepared.len())];
                let commit = self.rng.chance(0.5);
                self.stats.operator_actions += 1;
                self.note(|| format!("OPERATOR ends t{}.{} by hand", gid.0, gid.1));
                self.finish(gid, commit, Ender::Operator, "an operator");
            }
        }
        if self.fault(self.faults.coordinator_crash) {
            let node = self.rng.below(NODES);
            self.stats.coordinator_crashes += 1;
            if self.rounds[node].is_some() {
                self.stats.crashes_during_recovery += 1;
            }
            self.note(|| format!("NODE {node} CRASHES (leader: {})", self.leader));
            self.rounds[node] = None;
            for t in 0..self.started {
                if self.in_flight(node, t) {
                    self.driver(t).alive = false;
                    self.answer(t, Answer::Unknown);
                    // Its sessions' connections close.
                    for b in 0..self.txns[t].parts.len() {
                        self.send(Msg::Disconnect { gid: (t, b) });
                    }
                }
            }
            if node == self.leader {
                // Maybe the same node again, restarted.
                let next = self.rng.below(NODES);
                self.elect(next);
            }
        }
        if self.fault(self.faults.depose) {
            let node = (self.leader + 1 + self.rng.below(NODES - 1)) % NODES;
            self.stats.deposed += 1;
            self.note(|| format!("LEADER CHANGE: node {} deposed, its drivers keep running", self.leader));
            self.elect(node);
        }
    }

    /// `node` becomes leader and recovers at once.
    fn elect(&mut self, node: usize) {
        self.leader = node;
        self.note(|| format!("node {node} becomes leader"));
        self.start_round();
    }

    /// A recovery round on the leader (replacing one under way).
    fn start_round(&mut self) {
        self.rounds[self.leader] = Some(Round::new(self.parts.len()));
        self.stats.rounds += 1;
    }

    // -- the schedule -----------------------------------------------------------

    fn run(&mut self) -> Result<(), String> {
        let fault_steps = self.fault_steps;
        self.note(|| format!("seed world: {}; fault phase {fault_steps} steps", self.summary));
        loop {
            if let Some(v) = self.violation.take() {
                return Err(v);
            }
            self.step += 1;
            self.stats.steps += 1;
            if !self.calm && self.step > fault_steps && self.started == self.txns.len() {
                self.calm = true;
                self.note(|| "--- calm: no more faults ---".into());
            }
            if self.step > fault_steps + CALM_STEPS_MAX {
                return Err(format!(
                    "liveness: not settled {CALM_STEPS_MAX} steps after the faults stopped: {}",
                    self.unsettled()
                ));
            }
            self.inject_faults();
            while self.started < self.txns.len() && self.begins[self.started] <= self.step {
                self.start_txn();
            }
            if self.rounds[self.leader].is_none() && self.rng.chance(0.02) {
                self.note(|| format!("node {}: periodic recovery round", self.leader));
                self.start_round();
            }
            let recovering: Vec<usize> = (0..NODES).filter(|n| self.rounds[*n].is_some()).collect();
            let ready = self.net.iter().filter(|(at, _)| *at <= self.step).count();
            if !recovering.is_empty() && (ready == 0 || self.rng.chance(0.2)) {
                let node = recovering[self.rng.below(recovering.len())];
                self.recovery_step(node);
            } else if ready > 0 {
                // Any message that may land, in any order.
                let k = self.rng.below(ready);
                let i = (0..self.net.len()).filter(|i| self.net[*i].0 <= self.step).nth(k).expect("k < ready");
                let (_, msg) = self.net.swap_remove(i);
                self.deliver(msg);
            } else if !self.net.is_empty() {
                // Everything in flight is held up: time passes.
            } else {
                // Nothing in flight, no round under way.
                if let Some(t) = (0..self.started).find(|t| self.txns[*t].driver.as_ref().is_some_and(|d| d.alive)) {
                    let phase = self.txns[t].driver.as_ref().map(|d| d.txn.phase());
                    return Err(format!("liveness: driver of t{t} waits in {phase:?} with nothing in flight"));
                }
                if self.calm {
                    if self.settled() {
                        return Ok(());
                    }
                    self.note(|| format!("node {}: recovery round", self.leader));
                    self.start_round();
                }
            }
        }
    }

    /// What keeps the world from settling.
    fn unsettled(&self) -> String {
        let mut out = Vec::new();
        for (p, part) in self.parts.iter().enumerate() {
            for ((t, b), branch) in &part.branches {
                if !matches!(branch.state, PState::Ended { .. }) {
                    out.push(format!("t{t}.{b} {:?} on {}", branch.state, name(p)));
                }
            }
        }
        for (t, r) in &self.log {
            if !r.completed {
                out.push(format!("t{t} {} incomplete", short(&r.decision)));
            }
        }
        for (t, m) in self.txns.iter().enumerate() {
            if let Some(d) = m.driver.as_ref().filter(|d| d.alive) {
                let branches: Vec<String> = d.txn.branches().iter().map(ToString::to_string).collect();
                out.push(format!("t{t} driver in {:?} [{}]", d.txn.phase(), branches.join(", ")));
            }
        }
        out.join("; ")
    }

    /// No branch open or prepared, every record complete.
    fn settled(&self) -> bool {
        self.parts.iter().all(|p| p.branches.values().all(|b| matches!(b.state, PState::Ended { .. })))
            && self.log.values().all(|r| r.completed)
    }

    /// The invariants that hold once everything settled.
    fn check_end(&mut self) -> Result<(), String> {
        let mut commits_by_key: BTreeMap<&str, usize> = BTreeMap::new();
        for (t, m) in self.txns.iter().enumerate() {
            let record = self.log.get(&t);
            let commit = record.is_some_and(|r| r.decision.is_commit());
            if commit && let Some(key) = &m.key {
                *commits_by_key.entry(key).or_default() += 1;
            }
            if let Some(r) = record
                && !r.completed
            {
                return Err(format!("t{t}: record not complete"));
            }
            for (b, &p) in m.parts.iter().enumerate() {
                let state = self.parts[p].branches[&(t, b)].state;
                let reported = m.driver_reported.contains(&b) || m.recovery_reported.contains(&b);
                match state {
                    PState::Active | PState::Prepared => return Err(format!("t{t}.{b} left {state:?}")),
                    PState::Ended { committed, by: Ender::Coordinator | Ender::Session } => {
                        if committed != commit {
                            return Err(format!(
                                "atomicity: t{t}.{b} {} by the coordinator, the decision is {}",
                                if committed { "committed" } else { "rolled back" },
                                if commit { "COMMIT" } else { "ABORT" }
                            ));
                        }
                        if reported {
                            return Err(format!("t{t}.{b} reported heuristic but ended as decided"));
                        }
                    }
                    PState::Ended { committed, by: Ender::Operator } if committed == commit => {
                        if reported {
                            return Err(format!("t{t}.{b} reported heuristic but the operator agreed"));
                        }
                    }
                    PState::Ended { by: Ender::Operator, .. } if commit => {
                        // Rolled back by hand under a COMMIT: the xid is in the
                        // record, so whoever finishes the branch must tell
                        // (unless the participant gives no xids).
                        let xid = match record.map(|r| &r.decision) {
                            Some(Decision::Commit { branches, .. }) => branches[b].xid,
                            _ => None,
                        };
                        if xid.is_none() {
                            self.note(|| format!("t{t}.{b}: heuristic, undetectable without an xid"));
                            self.stats.heuristics_undetectable += 1;
                            continue;
                        }
                        if !reported {
                            return Err(format!("t{t}.{b} rolled back by hand under COMMIT, not reported"));
                        }
                        if !record.is_some_and(|r| r.heuristic.contains(&(b, false))) {
                            return Err(format!("t{t}.{b} heuristic missing from the completed COMMIT record"));
                        }
                    }
                    PState::Ended { by: Ender::Operator, .. } => {
                        // Committed by hand under (presumed) abort: only a
                        // driver that held the branch's xid can tell.
                        if !reported {
                            let d = m.driver.as_ref().expect("started");
                            if d.txn.phase() == Phase::Done && d.xid_known[b] {
                                return Err(format!(
                                    "t{t}.{b} committed by hand under abort; its driver held the xid and did not report it"
                                ));
                            }
                            self.note(|| format!("t{t}.{b}: committed by hand under abort, undetectable"));
                            self.stats.heuristics_undetectable += 1;
                        }
                    }
                }
            }
            match (m.answer, commit) {
                (Some(Answer::Committed), false) => return Err(format!("t{t} answered COMMITTED, no COMMIT")),
                (Some(Answer::Aborted), true) => return Err(format!("t{t} answered ABORTED, COMMIT recorded")),
                (None, _) => return Err(format!("t{t}: the client was never answered")),
                _ => {}
            }
        }
        if let Some((key, n)) = commits_by_key.iter().find(|(_, n)| **n > 1) {
            return Err(format!("{n} COMMITs with idempotency key {key}"));
        }
        Ok(())
    }
}

/// Runs one seed; with `trace`, records every step.
fn run_seed(seed: u64, trace: bool) -> (Result<Stats, String>, Vec<String>, String) {
    TRACE.with(|t| *t.borrow_mut() = trace.then(Vec::new));
    let mut summary = String::new();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut world = World::new(seed);
        summary = world.summary.clone();
        world.run()?;
        world.check_end()?;
        Ok(world.stats)
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(format!("panicked: {what}"))
    });
    let lines = TRACE.with(|t| t.borrow_mut().take()).unwrap_or_default();
    (result, lines, summary)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

#[test]
fn seeded_fault_schedules_keep_the_invariants() {
    if let Some(seed) = env_u64("SIM_SEED") {
        let (result, lines, summary) = run_seed(seed, true);
        eprintln!("seed {seed}: {summary}");
        for line in &lines {
            eprintln!("{line}");
        }
        match result {
            Ok(stats) => eprintln!("seed {seed}: ok\n{stats:#?}"),
            Err(e) => panic!("seed {seed}: {e}"),
        }
        return;
    }
    let seeds = env_u64("SIM_SEEDS").unwrap_or(SEEDS_DEFAULT);
    let base = env_u64("SIM_SEED_BASE").unwrap_or(0);
    let keep_going = std::env::var_os("SIM_KEEP_GOING").is_some();
    let started = Instant::now();
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for seed in base..base + seeds {
        match run_seed(seed, false).0 {
            Ok(stats) => total.add(&stats),
            Err(e) => {
                failures.push(format!("seed {seed}: {e}"));
                if !keep_going {
                    // Deterministic: the same seed again, with its trace.
                    let (_, lines, summary) = run_seed(seed, true);
                    let tail = lines.len().saturating_sub(80);
                    panic!(
                        "seed {seed} failed: {e}\nworld: {summary}\nlast {} of {} trace lines:\n{}\n\
                         rerun with the full trace: SIM_SEED={seed} cargo test --features failpoints \
                         --test simulation -- --nocapture",
                        lines.len() - tail,
                        lines.len(),
                        lines[tail..].join("\n")
                    );
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {seeds} seeds failed:\n{}", failures.len(), failures.join("\n"));
    eprintln!(
        "simulation: {} seeds ({base}..{}) passed in {:.1?}, {} steps\n{total:#?}",
        total.seeds,
        base + seeds,
        started.elapsed(),
        total.steps
    );
}
