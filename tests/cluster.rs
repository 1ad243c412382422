//! A real three-node cluster: replication, failover, restarts, the
//! compare-and-set, idempotency keys and bad input. Each test starts its own
//! `tandem serve` processes on ports chosen at run time.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::Options;
use common::TestCluster;
use tandem::client::Client;
use tandem::error::Error;
use tandem::proto as pb;
use tandem::proto::decision_log_client::DecisionLogClient;
use tandem::txn::Branch;
use tandem::txn::Decision;
use tandem::txn::TxId;
use tandem::txn::TxnRecord;

fn commit(key: Option<String>) -> Decision {
    Decision::Commit { branches: vec![Branch::new("accounts_a"), Branch::new("accounts_b")], idempotency_key: key }
}

fn abort(reason: &str) -> Decision {
    Decision::Abort { reason: reason.into() }
}

fn txid(prefix: &str, i: usize) -> TxId {
    TxId::parse(&format!("{prefix}{i}")).unwrap()
}

/// Writes `count` decisions from `tasks` concurrent writers, writer `w`
/// pinned to node `ids[w % ids.len()]` (a follower forwards to the leader).
/// Returns every acknowledged decision.
async fn write_decisions(
    cluster: &TestCluster,
    ids: &[u64],
    prefix: &str,
    count: usize,
    tasks: usize,
) -> BTreeMap<TxId, TxnRecord> {
    let mut handles = Vec::new();
    for w in 0..tasks {
        let addr = cluster.addr(ids[w % ids.len()]);
        let prefix = prefix.to_string();
        handles.push(tokio::spawn(async move {
            let mut client = Client::pinned(&addr).unwrap();
            let mut acked = Vec::new();
            for i in (w..count).step_by(tasks) {
                let t = txid(&prefix, i);
                let decision = if i % 3 == 0 { abort("test") } else { commit(Some(format!("{prefix}-key-{i}"))) };
                let (won, record) = client.decide(&t, &decision).await.expect("decide");
                assert!(won, "first decision for {t} must win");
                assert_eq!(record.decision, decision);
                acked.push(record);
            }
            acked
        }));
    }
    let mut out = BTreeMap::new();
    for h in handles {
        for r in h.await.unwrap() {
            out.insert(r.txid.clone(), r);
        }
    }
    assert_eq!(out.len(), count);
    out
}

/// Every acknowledged decision is in node `id`'s state machine, unchanged.
async fn assert_has_all(cluster: &TestCluster, id: u64, acked: &BTreeMap<TxId, TxnRecord>) {
    let records: BTreeMap<TxId, TxnRecord> =
        cluster.local_records(id).await.into_iter().map(|r| (r.txid.clone(), r)).collect();
    for (t, r) in acked {
        let held = records.get(t).unwrap_or_else(|| panic!("node {id} lost acknowledged decision {t}"));
        assert_eq!(held.decision, r.decision, "node {id} changed the decision of {t}");
        assert_eq!(held.decided_log_index, r.decided_log_index);
    }
}

/// The counters named, each summed over the three nodes (the leader may
/// have changed meanwhile).
async fn summed_counters<const N: usize>(cluster: &TestCluster, names: [&str; N]) -> [u64; N] {
    let mut sums = [0; N];
    for id in 1..=3 {
        let status = cluster.status(id).await.expect("status");
        for (sum, name) in sums.iter_mut().zip(names) {
            *sum += status.counters[name];
        }
    }
    sums
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_decisions_through_every_node_apply_identically() {
    let cluster = TestCluster::start(3, Options::default()).await;
    let acked = write_decisions(&cluster, &[1, 2, 3], "r", 1000, 12).await;
    // Concurrent decisions shared entries (the decision batcher), and each
    // writer still got its own answer (above).
    let [decisions, entries] = summed_counters(&cluster, ["decisions_proposed", "decision_entries"]).await;
    assert!(decisions >= 1000 && entries < decisions, "{decisions} decisions in {entries} entries");

    // Complete 300 of them concurrently, through every node: concurrent
    // completions share entries too, and each caller gets its own record.
    let to_complete: Vec<TxId> = acked.keys().take(300).cloned().collect();
    let mut handles = Vec::new();
    for w in 0..12 {
        let mut client = Client::pinned(&cluster.addr(1 + w as u64 % 3)).unwrap();
        let mine: Vec<TxId> = to_complete.iter().skip(w).step_by(12).cloned().collect();
        handles.push(tokio::spawn(async move {
            for t in mine {
                let record = client.complete(&t).await.expect("complete");
                assert_eq!(record.txid, t);
                assert!(record.completed_unix_ms.is_some(), "{t} answered incomplete");
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let [completions, entries] =
        summed_counters(&cluster, ["api_completions_proposed", "api_completion_entries"]).await;
    assert!(completions >= 300 && entries < completions, "{completions} completions in {entries} entries");
    let unknown = txid("r", 1_000_000);
    assert!(matches!(cluster.client().complete(&unknown).await, Err(Error::NotFound(_))));

    cluster.wait_converged(&[1, 2, 3]).await;
    let one = cluster.local_records(1).await;
    assert_eq!(one.len(), 1000);
    assert_eq!(one.iter().filter(|r| r.completed_unix_ms.is_some()).count(), 300);
    assert_eq!(cluster.local_records(2).await, one, "node 2 differs from node 1");
    assert_eq!(cluster.local_records(3).await, one, "node 3 differs from node 1");
    assert_has_all(&cluster, 1, &acked).await;
}

/// Writers that keep going until told to stop, each through the whole
/// cluster (following the leader). Only acknowledged decisions count; an
/// error is an unknown outcome, never an absent one.
struct BackgroundWriters {
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<(Vec<TxnRecord>, usize)>>,
}

impl BackgroundWriters {
    fn start(cluster: &TestCluster, prefix: &str, tasks: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..tasks)
            .map(|w| {
                let stop = stop.clone();
                let mut client = cluster.client();
                let prefix = format!("{prefix}{w}x");
                tokio::spawn(async move {
                    let (mut acked, mut unknown) = (Vec::new(), 0);
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match client.decide(&txid(&prefix, i), &commit(None)).await {
                            Ok((true, record)) => acked.push(record),
                            Ok((false, record)) => panic!("nobody else decides {}: {record:?}", record.txid),
                            Err(_) => unknown += 1,
                        }
                    }
                    (acked, unknown)
                })
            })
            .collect();
        Self { stop, handles }
    }

    async fn stop(self) -> (BTreeMap<TxId, TxnRecord>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut acked, mut unknown) = (BTreeMap::new(), 0);
        for h in self.handles {
            let (records, u) = h.await.unwrap();
            acked.extend(records.into_iter().map(|r| (r.txid.clone(), r)));
            unknown += u;
        }
        (acked, unknown)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_new_leader_keeps_writing_and_restarted_node_catches_up_by_snapshot() {
    // Small snapshot interval, so the log the killed node misses is purged.
    let opts = Options { snapshot_logs_since_last: 100, logs_kept_after_snapshot: 10, ..Options::default() };
    let mut cluster = TestCluster::start(3, opts).await;
    let mut acked = write_decisions(&cluster, &[1, 2, 3], "a", 150, 6).await;

    // Writes in flight while the leader dies.
    let writers = BackgroundWriters::start(&cluster, "w", 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let old_leader = cluster.leader().await;
    cluster.kill(old_leader);
    let old_last_log = cluster.last_log_index_on_disk(old_leader).await;

    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, old_leader);
    let survivors = cluster.running();
    acked.extend(write_decisions(&cluster, &survivors, "b", 400, 6).await);
    let (in_flight, unknown) = writers.stop().await;
    assert!(!in_flight.is_empty(), "the background writers got nothing acknowledged");
    eprintln!("background writers: {} acknowledged, {unknown} unknown", in_flight.len());
    acked.extend(in_flight);
    // A follower learns that the last acknowledged entries are committed
    // only with the leader's next message: wait until it has applied them.
    cluster.wait_converged(&survivors).await;
    for id in &survivors {
        assert_has_all(&cluster, *id, &acked).await;
    }

    // Until the new leader has purged log the killed node never received,
    // so that it can only catch up from a snapshot. (Concurrent decisions
    // share entries, so the entries written so far may not be enough.)
    for round in 0.. {
        let purged = cluster.status(new_leader).await.unwrap().purged_index;
        if purged.is_some_and(|p| p > old_last_log) {
            break;
        }
        assert!(round < 20, "leader purged {purged:?}, killed node had {old_last_log}");
        acked.extend(write_decisions(&cluster, &survivors, &format!("c{round}x"), 100, 1).await);
    }

    cluster.start_node(old_leader);
    cluster.wait_converged(&[1, 2, 3]).await;
    let back = cluster.status(old_leader).await.unwrap();
    assert!(back.snapshot_index.is_some_and(|s| s > old_last_log), "no snapshot installed: {back:?}");
    assert_has_all(&cluster, old_leader, &acked).await;
    assert_eq!(cluster.local_records(old_leader).await, cluster.local_records(new_leader).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_all_three_loses_no_acknowledged_decision() {
    let mut cluster = TestCluster::start(3, Options::default()).await;
    let acked = write_decisions(&cluster, &[1, 2, 3], "s", 300, 6).await;

    for id in [1, 2, 3] {
        cluster.kill(id);
    }
    for id in [1, 2, 3] {
        cluster.start_node(id);
    }
    cluster.leader().await;
    cluster.wait_converged(&[1, 2, 3]).await;
    for id in [1, 2, 3] {
        assert_has_all(&cluster, id, &acked).await;
    }
    // A linearizable read through any node sees them too.
    let mut client = cluster.client();
    for (t, r) in acked.iter().step_by(37) {
        assert_eq!(client.get_record(t, false).await.unwrap().as_ref(), Some(r));
    }
    // And the cluster still takes writes.
    let (won, _) = client.decide(&txid("after", 1), &commit(None)).await.unwrap();
    assert!(won);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_conflicting_decisions_exactly_one_wins() {
    let cluster = TestCluster::start(3, Options::default()).await;
    for i in 0..20 {
        let t = txid("c", i);
        let mut a = cluster.pinned(1 + (i as u64 % 3));
        let mut b = cluster.pinned(1 + ((i as u64 + 1) % 3));
        let (ta, tb) = (t.clone(), t.clone());
        let (ra, rb) = tokio::join!(async move { a.decide(&ta, &commit(None)).await }, async move {
            b.decide(&tb, &abort("conflict")).await
        },);
        let (won_a, rec_a) = ra.unwrap();
        let (won_b, rec_b) = rb.unwrap();
        assert!(won_a ^ won_b, "{t}: exactly one must win (commit won: {won_a}, abort won: {won_b})");
        assert_eq!(rec_a, rec_b, "{t}: both callers must be told the same outcome");
        assert_eq!(rec_a.decision.is_commit(), won_a);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_reused_by_another_txid_is_refused() {
    let cluster = TestCluster::start(3, Options::default()).await;
    let mut client = cluster.client();
    let key = Some("order-42".to_string());
    let (won, _) = client.decide(&txid("k", 1), &commit(key.clone())).await.unwrap();
    assert!(won);
    // Through another node, a different txid with the same key.
    let mut other = cluster.pinned(2);
    let err = other.decide(&txid("k", 2), &commit(key.clone())).await.unwrap_err();
    assert!(matches!(&err, Error::AlreadyExists(m) if m.contains("k1")), "{err:?}");
    assert_eq!(client.get_record(&txid("k", 2), false).await.unwrap(), None);
    // The first txid retrying with its key is told its own decision.
    let (won, record) = other.decide(&txid("k", 1), &commit(key)).await.unwrap();
    assert!(won && record.decision.is_commit());
}

/// `Forget` through the API drops completed records in rounds of
/// `retention.forget_round_max`, one log entry each, and frees their keys;
/// incomplete and later records stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_goes_in_bounded_rounds() {
    let opts = Options {
        // The periodic forget out of the way: the test's own is counted.
        extra_config: "[retention]\nforget_round_max = 3\nforget_interval_s = 3600\n".into(),
        ..Options::default()
    };
    let cluster = TestCluster::start(3, opts).await;
    let mut client = cluster.client();
    let key = |i: usize| Some(format!("order-{i}"));
    for i in 0..10 {
        client.decide(&txid("f", i), &commit(key(i))).await.unwrap();
        client.complete(&txid("f", i)).await.unwrap();
        // Each completed in its own millisecond, so that rounds split evenly.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    client.decide(&txid("open", 0), &abort("stays")).await.unwrap();
    let before = tandem::server::now_unix_ms();
    tokio::time::sleep(Duration::from_millis(2)).await;
    client.decide(&txid("late", 0), &commit(None)).await.unwrap();
    client.complete(&txid("late", 0)).await.unwrap();

    let leader = cluster.leader().await;
    let index = |s: Option<pb::NodeStatus>| s.and_then(|s| s.last_log_index).unwrap();
    let start = index(cluster.status(leader).await);
    assert_eq!(client.forget(before).await.unwrap(), 10);
    // 3 + 3 + 3 + 1: four entries.
    assert_eq!(index(cluster.status(leader).await) - start, 4);
    for i in 0..10 {
        assert_eq!(client.get_record(&txid("f", i), false).await.unwrap(), None, "f{i}");
    }
    assert!(client.get_record(&txid("open", 0), false).await.unwrap().is_some());
    assert!(client.get_record(&txid("late", 0), false).await.unwrap().is_some());
    // The keys are free again.
    let (won, _) = client.decide(&txid("g", 0), &commit(key(0))).await.unwrap();
    assert!(won);
    cluster.wait_converged(&[1, 2, 3]).await;
    let on = |records: Vec<TxnRecord>| records.into_iter().map(|r| r.txid.to_string()).collect::<Vec<_>>();
    let expected = on(cluster.local_records(leader).await);
    assert_eq!(expected, ["g0", "late0", "open0"]);
    for id in [1, 2, 3] {
        assert_eq!(on(cluster.local_records(id).await), expected, "node {id}");
    }
}

/// A node runs with transparent huge pages off, so that its allocator's
/// arenas are not resident 2 MB at a time.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_runs_without_transparent_huge_pages() {
    // `THP_enabled` in /proc/PID/status, from Linux 5.0 on.
    let thp_enabled = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status.lines().find_map(|l| l.strip_prefix("THP_enabled:")).map(|v| v.trim().to_string())
    };
    // The flag is inherited: a test run that has it off already cannot
    // tell, nor can a kernel that does not report it.
    if thp_enabled(std::process::id()).as_deref() != Some("1") {
        eprintln!("skipped: this process's THP_enabled is not 1");
        return;
    }
    let cluster = TestCluster::spawn(1, Options::default());
    cluster.wait_answering(1).await;
    let pid = cluster.pid(1).expect("node 1 runs");
    assert_eq!(thp_enabled(pid).as_deref(), Some("0"));
}

async fn raw(addr: &str) -> DecisionLogClient<tonic::transport::Channel> {
    DecisionLogClient::connect(format!("http://{addr}")).await.unwrap()
}

fn abort_pb(reason: String) -> Option<pb::Decision> {
    Some(pb::Decision { kind: Some(pb::decision::Kind::Abort(pb::Abort { reason })) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let mut cluster = TestCluster::start(3, Options::default()).await;
    let mut client = cluster.client();
    client.decide(&txid("ok", 1), &commit(None)).await.unwrap();
    let before = cluster.local_records(cluster.leader().await).await;

    let mut raw_client = raw(&cluster.addr(2)).await;
    let cases = [
        (
            "unknown command version",
            pb::DecideRequest { version: 7, txid: "x1".into(), decision: abort_pb("r".into()) },
            "command version",
        ),
        (
            "empty txid",
            pb::DecideRequest { version: 0, txid: String::new(), decision: abort_pb("r".into()) },
            "txid is empty",
        ),
        (
            "bad txid",
            pb::DecideRequest { version: 0, txid: "Robert'); DROP".into(), decision: abort_pb("r".into()) },
            "outside [a-z0-9]",
        ),
        ("no decision", pb::DecideRequest { version: 0, txid: "x2".into(), decision: None }, "decision is missing"),
        (
            "oversize",
            pb::DecideRequest { version: 0, txid: "x3".into(), decision: abort_pb("r".repeat(1_200_000)) },
            "limits.request_bytes_max",
        ),
        (
            "commit without branches",
            pb::DecideRequest {
                version: 0,
                txid: "x4".into(),
                decision: Some(pb::Decision { kind: Some(pb::decision::Kind::Commit(pb::Commit::default())) }),
            },
            "names no branch",
        ),
    ];
    for (name, req, needle) in cases {
        let status = raw_client.decide(req).await.expect_err(name);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().contains(needle), "{name}: {:?} lacks {needle:?}", status.message());
    }
    let status = raw_client.complete(pb::CompleteRequest { version: 0, txid: "nothere".into() }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);

    // A node that belongs to no cluster refuses writes and says why.
    let lone = cluster.add_node();
    cluster.wait_answering(lone).await;
    let status = raw(&cluster.addr(lone))
        .await
        .decide(pb::DecideRequest { version: 0, txid: "x5".into(), decision: abort_pb("r".into()) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("not a member of any cluster"), "{status:?}");

    cluster.wait_converged(&[1, 2, 3]).await;
    for id in [1, 2, 3] {
        assert_eq!(cluster.local_records(id).await, before, "node {id} changed");
    }
    assert!(cluster.local_records(lone).await.is_empty());

    // Two members at one address are refused: a node would send Raft
    // messages to itself.
    let twins = vec![pb::Member { id: lone, addr: cluster.addr(lone) }, pb::Member { id: 9, addr: cluster.addr(lone) }];
    let err = Client::pinned(&cluster.addr(lone)).unwrap().init(twins).await.unwrap_err();
    assert!(err.to_string().contains("share the address"), "{err}");
    let err = client.add_learner(pb::Member { id: lone, addr: cluster.addr(1) }).await.unwrap_err();
    assert!(err.to_string().contains("already has the address"), "{err}");

    // Membership: the lone node joins as a learner, catches up, becomes a voter.
    client.add_learner(pb::Member { id: lone, addr: cluster.addr(lone) }).await.unwrap();
    let resp = client.change_membership(vec![1, 2, 3, lone], false).await.unwrap();
    assert_eq!(resp.voters.len(), 4);
    cluster.wait_converged(&[lone]).await;
    assert_eq!(cluster.local_records(lone).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer_on_every_node() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let cluster = TestCluster::start(3, Options::default()).await;
    for addr in cluster.addrs() {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut health = HealthClient::new(channel.clone());
        for service in ["", "tandem.v1.Cluster", "tandem.v1.DecisionLog"] {
            let resp = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
            assert_eq!(resp.status, ServingStatus::Serving as i32, "{addr} {service:?}");
        }

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
        let resp = stream.message().await.unwrap().expect("a reflection answer");
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected reflection answer {resp:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for expected in ["tandem.v1.Cluster", "tandem.v1.DecisionLog", "tandem.v1.Raft", "grpc.health.v1.Health"] {
            assert!(names.iter().any(|n| n == expected), "{addr}: {expected} missing from {names:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_without_prepared_transactions_is_reported_at_start() {
    let pg = common::postgres::PgServer::start(0);
    let opts = Options {
        extra_config: format!(
            "[[participants]]\nname = \"legacy\"\nkind = \"postgres\"\nurl = \"{}\"\npool_size = 2\n",
            pg.url("postgres")
        ),
        ..Options::default()
    };
    let cluster = TestCluster::start(1, opts).await;
    cluster.wait_log(1, "max_prepared_transactions = 0").await;
    // The node itself keeps serving.
    let (won, _) = cluster.client().decide(&txid("p", 1), &abort("test")).await.unwrap();
    assert!(won);
}
