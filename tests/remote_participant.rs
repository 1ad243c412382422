//! Remote participants (`proto/tandem/v1/participant.proto`): services that
//! take part in a transaction through the participant protocol, with the
//! SDK (`tandem::participant::sdk`), enlisted in interactive transactions.

mod common;

use common::Options;
use common::TestCluster;
use tandem::error::Error;
use tandem::proto as pb;
use tandem::txn::Decision;
use tandem::txn::TxId;

fn begin() -> pb::BeginRequest {
    pb::BeginRequest { timeout_ms: 20_000, ..Default::default() }
}

/// A cluster with no participant configured.
async fn bare_cluster() -> TestCluster {
    let opts = Options { recovery_interval_ms: 1_000, recover_on_leadership: true, ..Options::default() };
    TestCluster::start(3, opts).await
}

/// Enlisting an endpoint that is malformed, unreachable, not a gRPC server
/// or not a participant gets a clear error, and leaves the coordinator
/// serving and the transaction open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enlisting_a_bad_endpoint_is_refused_clearly() {
    let cluster = bare_cluster().await;
    let mut client = cluster.client();
    let txid = client.begin(begin()).await.unwrap();

    for (endpoint, expect) in [
        ("localhost:1", "must look like http://host:port"),
        ("http://h:1/some/path", "must have no path"),
        ("not a uri", "is not a URI"),
    ] {
        match client.enlist(&txid, "", endpoint, "stock").await {
            Err(Error::InvalidInput(m)) => assert!(m.contains(expect), "{endpoint}: {m}"),
            other => panic!("{endpoint}: {other:?}"),
        }
    }
    match client.enlist(&txid, "", "http://127.0.0.1:1", "Bad Name").await {
        Err(Error::InvalidInput(m)) => assert!(m.contains("branch name"), "{m}"),
        other => panic!("{other:?}"),
    }
    match client.enlist(&txid, "inventory", "", "stock").await {
        Err(Error::InvalidInput(m)) => assert!(m.contains("not a configured remote participant"), "{m}"),
        other => panic!("{other:?}"),
    }

    // Nobody listens.
    let closed = format!("http://127.0.0.1:{}", common::free_port());
    match client.enlist(&txid, "", &closed, "stock").await {
        Err(Error::FailedPrecondition(m)) => assert!(m.contains("cannot reach"), "{m}"),
        other => panic!("{other:?}"),
    }

    // Garbage on the port: a listener that writes junk and hangs up.
    let junk = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let junk_addr = junk.local_addr().unwrap();
    let junk_server = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        loop {
            let Ok((mut s, _)) = junk.accept().await else { return };
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\n\x00\xff garbage \xfe\r\n").await.ok();
        }
    });
    match client.enlist(&txid, "", &format!("http://{junk_addr}"), "stock").await {
        Err(Error::FailedPrecondition(m)) => assert!(m.contains("cannot reach"), "{m}"),
        other => panic!("{other:?}"),
    }
    junk_server.abort();

    // A gRPC server that is not a participant: a Tandem node.
    match client.enlist(&txid, "", &format!("http://{}", cluster.addr(2)), "stock").await {
        Err(Error::FailedPrecondition(m)) => assert!(m.contains("does not serve tandem.v1.Participant"), "{m}"),
        other => panic!("{other:?}"),
    }

    // Every node still serves, and the transaction is still open.
    for id in 1..=3 {
        assert!(cluster.status(id).await.is_some(), "node {id} stopped answering");
    }
    client.rollback(&txid).await.unwrap();
}

/// `GetOutcome` of a txid nobody runs records ABORT through Raft before
/// answering ABORTED; of a running transaction it answers "not yet".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_outcome_records_abort_before_answering() {
    let cluster = bare_cluster().await;
    let mut client = cluster.client();

    let unknown = TxId::parse("neverran1").unwrap();
    match client.get_outcome(&unknown).await {
        Ok(outcome) => assert_eq!(outcome, Some(false)),
        Err(e) => {
            let logs: Vec<String> = (1..=3).map(|id| cluster.log_tail(id)).collect();
            panic!("GetOutcome failed: {e}\nlogs:\n{}", logs.join("\n---\n"));
        }
    }
    // The ABORT is in the log, on every node, so nothing can commit it now.
    let record = client.get_record(&unknown, false).await.unwrap().expect("an ABORT record");
    assert!(matches!(record.decision, Decision::Abort { .. }), "{record:?}");
    let (won, held) = client
        .decide(&unknown, &Decision::Commit { branches: vec![tandem::txn::Branch::new("a")], idempotency_key: None })
        .await
        .unwrap();
    assert!(!won && !held.decision.is_commit(), "a COMMIT after the answer must lose: {held:?}");

    // A transaction still open on the leader: no answer yet, and no record.
    let open = client.begin(begin()).await.unwrap();
    assert_eq!(client.get_outcome(&open).await.unwrap(), None);
    assert!(client.get_record(&open, false).await.unwrap().is_none());
    client.rollback(&open).await.unwrap();
    // Rolled back: the rollback recorded nothing, so asking records ABORT.
    assert_eq!(client.get_outcome(&open).await.unwrap(), Some(false));

    match client.get_outcome(&TxId::parse("x").unwrap()).await {
        Ok(Some(false)) => {}
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// With an SDK participant: an inventory service keeping stock in its own
// PostgreSQL (`PgResource`), beside an `orders` database Tandem manages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use common::WAIT;
use common::postgres::PgServer;
use tandem::participant::sdk::BranchId;
use tandem::participant::sdk::ParticipantService;
use tandem::participant::sdk::postgres::PgOptions;
use tandem::participant::sdk::postgres::PgResource;
use tandem::proto::participant_client::ParticipantClient;

const STOCK: i64 = 1_000;

/// The inventory service: `tandem.v1.Participant` over a `PgResource`, on
/// a fixed address so that it can be stopped and started again there.
struct Inventory {
    pg: PgServer,
    addr: SocketAddr,
    /// Where the coordinator is told to reach it (a proxy, say).
    advertised: Option<String>,
    resource: Arc<PgResource>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    resolver: Option<tokio::task::JoinHandle<()>>,
}

impl Inventory {
    async fn start() -> Self {
        let pg = PgServer::start(64);
        pg.create_database("inventory").await;
        pg.client("inventory")
            .await
            .batch_execute(&format!(
                "CREATE TABLE stock (sku text PRIMARY KEY, available bigint NOT NULL CHECK (available >= 0));
                 INSERT INTO stock VALUES ('apple', {STOCK});
                 CREATE TABLE reservations (txid text NOT NULL, sku text NOT NULL, qty bigint NOT NULL);"
            ))
            .await
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port()).parse().unwrap();
        let resource = Arc::new(PgResource::connect(&pg.url("inventory"), PgOptions::default()).unwrap());
        resource.install().await.unwrap();
        let mut inventory = Self { pg, addr, advertised: None, resource, shutdown: None, server: None, resolver: None };
        inventory.serve().await;
        inventory
    }

    fn endpoint(&self) -> String {
        self.advertised.clone().unwrap_or_else(|| format!("http://{}", self.addr))
    }

    async fn serve(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let service = ParticipantService::new(self.resource.clone()).into_server();
        self.server = Some(tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                    rx.await.ok();
                })
                .await
                .unwrap();
        }));
        self.shutdown = Some(tx);
    }

    /// Stops serving and forgets every open branch, as a crash would;
    /// prepared branches stay in PostgreSQL.
    async fn crash(&mut self) {
        if let Some(r) = self.resolver.take() {
            r.abort();
        }
        if let Some(tx) = self.shutdown.take() {
            tx.send(()).ok();
        }
        if let Some(s) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), s).await.ok();
        }
        self.resource = Arc::new(PgResource::connect(&self.pg.url("inventory"), PgOptions::default()).unwrap());
    }

    /// Starts again, with the in-doubt resolver asking `nodes`.
    async fn restart(&mut self, nodes: Vec<String>) {
        self.serve().await;
        self.spawn_resolver(nodes);
    }

    fn spawn_resolver(&mut self, nodes: Vec<String>) {
        let interval = tandem::participant::sdk::RESOLVE_INTERVAL_MIN;
        let resolver = tandem::participant::sdk::spawn_resolver(self.resource.clone(), nodes, "test", interval);
        self.resolver = Some(resolver.unwrap());
    }

    /// The service's work for one request: reserve `qty` apples under
    /// `txid` in branch `branch`, then enlist it.
    async fn reserve(
        &self,
        client: &mut tandem::client::Client,
        txid: &TxId,
        branch: &str,
        qty: i64,
    ) -> tandem::error::Result<()> {
        let id = BranchId::new("test", txid.as_str(), branch)?;
        let b = self.resource.begin(&id).await?;
        // A service waits only so long for a row another branch holds.
        let work = async {
            b.batch_execute("SET LOCAL lock_timeout = '2s'").await?;
            let n = b
                .execute("UPDATE stock SET available = available - $1 WHERE sku = 'apple' AND available >= $1", &[&qty])
                .await?;
            if n == 1 {
                b.execute("INSERT INTO reservations VALUES ($1, 'apple', $2)", &[&txid.as_str(), &qty]).await?;
            }
            Ok::<_, tokio_postgres::Error>(n == 1)
        };
        match work.await {
            Ok(true) => drop(b),
            Ok(false) => {
                b.rollback().await?;
                return Err(Error::FailedPrecondition("not enough stock".into()));
            }
            Err(e) => {
                b.rollback().await.ok();
                return Err(Error::FailedPrecondition(e.to_string()));
            }
        }
        client.enlist(txid, "", &self.endpoint(), branch).await?;
        Ok(())
    }

    async fn available(&self) -> i64 {
        self.pg.client("inventory").await.query_one("SELECT available FROM stock", &[]).await.unwrap().get(0)
    }

    /// Reservation rows per txid.
    async fn reservations(&self) -> std::collections::BTreeMap<String, i64> {
        let rows = self
            .pg
            .client("inventory")
            .await
            .query("SELECT txid, count(*) FROM reservations GROUP BY txid", &[])
            .await
            .unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    async fn prepared(&self) -> i64 {
        self.pg.client("inventory").await.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await.unwrap().get(0)
    }
}

/// The shop: `orders` (PostgreSQL, a configured participant), the
/// inventory service (remote, configured as `inventory` too, so recovery
/// lists it) and the cluster.
struct Shop {
    orders: PgServer,
    inventory: Inventory,
    cluster: TestCluster,
}

impl Shop {
    async fn start(coordinator: &str) -> Self {
        Self::start_with(coordinator, None).await
    }

    /// With `proxy_control`, the coordinator reaches the service through a
    /// TCP proxy (`tandem workload proxy`) switched by that file.
    async fn start_with(coordinator: &str, proxy_control: Option<std::path::PathBuf>) -> Self {
        let orders = PgServer::start(64);
        orders.create_database("orders").await;
        orders
            .client("orders")
            .await
            .batch_execute("CREATE TABLE orders (txid text PRIMARY KEY, sku text NOT NULL, qty bigint NOT NULL)")
            .await
            .unwrap();
        let mut inventory = Inventory::start().await;
        if let Some(control) = proxy_control {
            let listen = format!("127.0.0.1:{}", common::free_port());
            let to = inventory.addr.to_string();
            let proxy_listen = listen.clone();
            tokio::spawn(async move { tandem::workload::proxy::run(&proxy_listen, &to, control).await });
            inventory.advertised = Some(format!("http://{listen}"));
        }
        let opts = Options {
            extra_config: format!(
                "[[participants]]\nname = \"orders\"\nkind = \"postgres\"\nurl = \"{}\"\npool_size = 8\n\n\
                 [[participants]]\nname = \"inventory\"\nkind = \"remote\"\nurl = \"{}\"\n",
                orders.url("orders"),
                inventory.endpoint()
            ),
            recovery_interval_ms: 1_000,
            recover_on_leadership: true,
            coordinator_config: coordinator.to_string(),
            ..Options::default()
        };
        let cluster = TestCluster::start(3, opts).await;
        inventory.spawn_resolver(cluster.addrs());
        Self { orders, inventory, cluster }
    }

    /// One order: the order row through Tandem, the reservation by the
    /// service, then Commit. Answers the txid and the commit's answer.
    async fn order(&self, qty: i64) -> (TxId, tandem::error::Result<pb::TransactResponse>) {
        let mut client = self.cluster.client();
        let txid = client.begin(begin()).await.unwrap();
        let insert = pb::Statement {
            sql: "INSERT INTO orders VALUES ($1, 'apple', $2)".into(),
            params: vec![
                pb::Value { kind: Some(pb::value::Kind::String(txid.to_string())) },
                pb::Value { kind: Some(pb::value::Kind::Int64(qty)) },
            ],
        };
        client.execute(&txid, "orders", insert).await.unwrap();
        if let Err(e) = self.inventory.reserve(&mut client, &txid, "stock", qty).await {
            client.rollback(&txid).await.ok();
            return (txid, Err(e));
        }
        let answer = client.commit(&txid).await;
        (txid, answer)
    }

    async fn order_rows(&self) -> std::collections::BTreeSet<String> {
        let rows = self.orders.client("orders").await.query("SELECT txid FROM orders", &[]).await.unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Waits until no prepared branch is left on either side.
    async fn settled(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let orders: i64 = self
                .orders
                .client("orders")
                .await
                .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
                .await
                .unwrap()
                .get(0);
            let stock = self.inventory.prepared().await;
            if orders + stock == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{orders} order and {stock} stock branches still prepared");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every order has its reservation and the other way round, each
    /// reservation applied once, and the stock matches them.
    async fn check_atomic(&self) {
        self.settled().await;
        let orders = self.order_rows().await;
        let reservations = self.inventory.reservations().await;
        let reserved: std::collections::BTreeSet<String> = reservations.keys().cloned().collect();
        assert_eq!(orders, reserved, "orders and reservations differ");
        assert!(reservations.values().all(|&n| n == 1), "a reservation applied twice: {reservations:?}");
        let qty: i64 = self
            .inventory
            .pg
            .client("inventory")
            .await
            .query_one("SELECT coalesce(sum(qty), 0)::bigint FROM reservations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(self.inventory.available().await, STOCK - qty);
    }
}

fn committed(answer: &tandem::error::Result<pb::TransactResponse>) -> bool {
    matches!(answer, Ok(r) if r.outcome == pb::Outcome::Committed as i32)
}

/// A transaction spanning PostgreSQL and the remote service commits on
/// both; a remote ABORT vote aborts both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_across_postgres_and_a_remote_participant() {
    let shop = Shop::start("").await;
    let (txid, answer) = shop.order(3).await;
    assert!(committed(&answer), "{answer:?}");
    shop.check_atomic().await;
    assert!(shop.order_rows().await.contains(txid.as_str()));
    assert_eq!(shop.inventory.available().await, STOCK - 3);

    // The record names the remote branch with its endpoint.
    let status = shop.cluster.client().get_transaction(&txid).await.unwrap();
    let names: Vec<&str> = status.branches.iter().map(|b| b.participant.as_str()).collect();
    assert_eq!(names, ["orders", "stock"]);
    let record = shop.cluster.client().get_record(&txid, false).await.unwrap().unwrap();
    let Decision::Commit { branches, .. } = &record.decision else { panic!("{record:?}") };
    assert_eq!(branches[1].remote.as_ref().map(|r| r.endpoint.clone()), Some(shop.inventory.endpoint()));

    // The service votes ABORT: its branch ended before Prepare (the service
    // rolled it back after enlisting).
    let mut client = shop.cluster.client();
    let txid = client.begin(begin()).await.unwrap();
    let insert = pb::Statement {
        sql: "INSERT INTO orders VALUES ($1, 'apple', 1)".into(),
        params: vec![pb::Value { kind: Some(pb::value::Kind::String(txid.to_string())) }],
    };
    client.execute(&txid, "orders", insert).await.unwrap();
    shop.inventory.reserve(&mut client, &txid, "stock", 1).await.unwrap();
    let id = BranchId::new("test", txid.as_str(), "stock").unwrap();
    shop.inventory.resource.begin(&id).await.unwrap().rollback().await.unwrap();
    let answer = client.commit(&txid).await.unwrap();
    assert_eq!(answer.outcome, pb::Outcome::Aborted as i32, "{answer:?}");
    assert!(answer.reason.contains("voted ABORT"), "{}", answer.reason);
    shop.check_atomic().await;
    assert!(!shop.order_rows().await.contains(txid.as_str()));

    // Not enough stock: the service refuses the work, the caller rolls back.
    let (_, answer) = shop.order(STOCK * 10).await;
    assert!(matches!(answer, Err(Error::FailedPrecondition(_))), "{answer:?}");
    // A configured remote participant runs no statements.
    let txid = client.begin(begin()).await.unwrap();
    let select = pb::Statement { sql: "SELECT 1".into(), params: vec![] };
    match client.execute(&txid, "inventory", select).await {
        Err(Error::InvalidInput(m)) => assert!(m.contains("is remote"), "{m}"),
        other => panic!("{other:?}"),
    }
    shop.check_atomic().await;
}

/// Abort before Prepare (null compensation) and Prepare after Abort
/// (anti-hanging), sent straight to the service as a late or reordered
/// coordinator would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_before_prepare_and_prepare_after_abort() {
    let inventory = Inventory::start().await;
    let mut participant = ParticipantClient::connect(inventory.endpoint()).await.unwrap();
    let branch =
        |txid: &str| Some(pb::BranchRef { cluster_id: "test".into(), txid: txid.into(), branch: "stock".into() });
    let abort = |txid: &str| pb::AbortBranchRequest { branch: branch(txid), reason: "test".into() };
    let prepare = |txid: &str| pb::PrepareBranchRequest { branch: branch(txid) };

    // Abort of a branch the service never saw: answered, remembered.
    let r = participant.abort(abort("early1")).await.unwrap().into_inner();
    assert_eq!(r.result, pb::Phase2Result::Done as i32);
    // The work arrives late: it cannot begin, and its Prepare votes ABORT.
    let id = BranchId::new("test", "early1", "stock").unwrap();
    assert!(inventory.resource.begin(&id).await.is_err(), "an aborted branch must not begin again");
    let r = participant.prepare(prepare("early1")).await.unwrap().into_inner();
    assert_eq!(r.vote, pb::Vote::Abort as i32, "{r:?}");

    // Work done, then the Abort overtakes the Prepare: the work is rolled
    // back, and the late Prepare votes ABORT.
    let id = BranchId::new("test", "late2", "stock").unwrap();
    let b = inventory.resource.begin(&id).await.unwrap();
    b.execute("UPDATE stock SET available = available - 5", &[]).await.unwrap();
    drop(b);
    let r = participant.abort(abort("late2")).await.unwrap().into_inner();
    assert_eq!(r.result, pb::Phase2Result::Done as i32);
    let r = participant.prepare(prepare("late2")).await.unwrap().into_inner();
    assert_eq!(r.vote, pb::Vote::Abort as i32, "{r:?}");
    assert_eq!(inventory.available().await, STOCK);

    // Duplicates: Prepare twice, Commit twice, each applied once.
    let id = BranchId::new("test", "dup3", "stock").unwrap();
    let b = inventory.resource.begin(&id).await.unwrap();
    b.execute("UPDATE stock SET available = available - 2", &[]).await.unwrap();
    drop(b);
    for _ in 0..2 {
        let r = participant.prepare(prepare("dup3")).await.unwrap().into_inner();
        assert_eq!(r.vote, pb::Vote::Prepared as i32, "{r:?}");
    }
    // The service's own code asking for the prepared branch again is
    // refused, and leaves it prepared.
    assert!(inventory.resource.begin(&id).await.is_err(), "a prepared branch must not begin again");
    let r = participant.prepare(prepare("dup3")).await.unwrap().into_inner();
    assert_eq!(r.vote, pb::Vote::Prepared as i32, "{r:?}");
    for _ in 0..2 {
        let r = participant.commit(pb::CommitBranchRequest { branch: branch("dup3") }).await.unwrap().into_inner();
        assert_eq!(r.result, pb::Phase2Result::Done as i32);
    }
    assert_eq!(inventory.available().await, STOCK - 2);
    // An Abort of the committed branch cannot be honoured.
    let e = participant.abort(abort("dup3")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    // Commit of a branch it never saw: UNKNOWN_BRANCH, nothing created.
    let r = participant.commit(pb::CommitBranchRequest { branch: branch("ghost4") }).await.unwrap().into_inner();
    assert_eq!(r.result, pb::Phase2Result::UnknownBranch as i32);
    // Garbage in the request: refused, the service goes on.
    let e = participant
        .prepare(pb::PrepareBranchRequest {
            branch: Some(pb::BranchRef { cluster_id: "Bad!".into(), txid: "x".into(), branch: "s".into() }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let listed = participant.list_prepared(pb::ListPreparedRequest { cluster_id: "test".into() }).await.unwrap();
    assert!(listed.into_inner().branches.is_empty());
}

/// Faults between the coordinator and the service, through a TCP proxy that
/// delays, stalls and resets the connections while orders run: calls are
/// lost, repeated and overtaken, yet every order ends with its reservation
/// or without it, each reservation applied once, and every acknowledged
/// outcome holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_between_coordinator_and_participant_keep_atomicity() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("proxy");
    std::fs::write(&control, "pass").unwrap();
    let shop = Arc::new(Shop::start_with("remote_prepare_timeout_ms = 2000", Some(control.clone())).await);

    let until = Instant::now() + Duration::from_secs(25);
    let mut workers = Vec::new();
    for _ in 0..4 {
        let shop = shop.clone();
        workers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let (txid, answer) = shop.order(1).await;
                if t.elapsed() > Duration::from_secs(5) {
                    eprintln!("slow order {txid}: {:?} {answer:?}", t.elapsed());
                }
                answers.push((txid, answer));
            }
            answers
        }));
    }
    let modes = ["delay 200", "drop", "pass", "reset", "delay 50", "pass", "drop", "reset", "pass"];
    for mode in modes.iter().cycle() {
        if Instant::now() >= until {
            break;
        }
        std::fs::write(&control, mode).unwrap();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    std::fs::write(&control, "pass").unwrap();
    let mut answers = Vec::new();
    for w in workers {
        answers.extend(w.await.unwrap());
    }
    eprintln!("workers done at {:?} past the end", until.elapsed());
    shop.check_atomic().await;
    eprintln!("settled at {:?} past the end", until.elapsed());
    let orders = shop.order_rows().await;
    let (mut ok, mut aborted, mut failed) = (0, 0, 0);
    for (txid, answer) in &answers {
        match answer {
            Ok(r) if r.outcome == pb::Outcome::Committed as i32 => {
                ok += 1;
                assert!(orders.contains(txid.as_str()), "{txid} was answered COMMITTED but is not there");
            }
            Ok(r) => {
                aborted += 1;
                assert!(!orders.contains(txid.as_str()), "{txid} was answered ABORTED ({}) but is there", r.reason);
            }
            Err(_) => failed += 1,
        }
    }
    eprintln!("orders: {ok} committed, {aborted} aborted, {failed} failed before commit");
    assert!(
        ok > 0 && aborted + failed > 0,
        "{ok} committed, {aborted} aborted, {failed} failed: the faults did not bite"
    );
}

/// The service crashes with its branch prepared, after COMMIT is recorded
/// and before COMMIT reaches it: started again, its resolver asks
/// `GetOutcome` and commits the branch, with the coordinator still held
/// back; the coordinator's own late Commit then changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_restarted_while_prepared_asks_the_outcome() {
    let mut shop = Shop::start("").await;
    // Only the restarted service's resolver may settle the branch early.
    shop.inventory.resolver.take().unwrap().abort();
    let leader = shop.cluster.leader().await;
    shop.cluster
        .pinned(leader)
        .set_fail_point("coordinator::before_commit_prepared", "1*return(sleep 15000)")
        .await
        .unwrap();
    let shop_ref = &shop;
    let order = async move { shop_ref.order(2).await };
    let mut order = Box::pin(order);
    // Wait for the branch to be prepared and COMMIT recorded.
    let deadline = Instant::now() + WAIT;
    let txid = loop {
        tokio::select! {
            answer = &mut order => panic!("the order ended before the fail point held it: {answer:?}"),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let records = shop.cluster.client().list_all_records(None, false).await.unwrap();
        if let Some(r) = records.iter().find(|r| r.decision.is_commit()) {
            break r.txid.clone();
        }
        assert!(Instant::now() < deadline, "no COMMIT recorded");
    };
    assert_eq!(shop.inventory.prepared().await, 1);
    drop(order);

    let started = Instant::now();
    shop.inventory.crash().await;
    shop.inventory.restart(shop.cluster.addrs()).await;
    let deadline = Instant::now() + WAIT;
    while shop.inventory.prepared().await > 0 {
        assert!(Instant::now() < deadline, "the restarted service left its branch prepared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() < Duration::from_secs(12), "resolved only after the coordinator's own Commit");
    assert!(shop.inventory.reservations().await.contains_key(txid.as_str()));
    shop.check_atomic().await;
    assert!(shop.order_rows().await.contains(txid.as_str()));
    // The coordinator's own Commit arrives once the fail point lets it go,
    // finds the branch committed, and the transaction completes.
    let deadline = Instant::now() + WAIT;
    loop {
        let record = shop.cluster.client().get_record(&txid, false).await.unwrap().unwrap();
        if record.completed_unix_ms.is_some() {
            assert!(record.heuristic.is_empty(), "{record:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the transaction never completed: {record:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shop.check_atomic().await;
}

/// The leader dies with the remote branch prepared: after COMMIT is
/// recorded the new leader commits it from the record; before any decision
/// it finds it through `ListPrepared` and rolls it back (presumed abort).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_with_remote_branches_prepared() {
    let mut shop = Shop::start("").await;
    // No resolver: the new leader alone must settle the remote branch (from
    // the COMMIT record, whose endpoint is the enlisted one, or through
    // ListPrepared on the configured participant).
    shop.inventory.resolver.take().unwrap().abort();
    for (point, commits) in
        [("coordinator::after_commit_decision", true), ("coordinator::before_commit_decision", false)]
    {
        let leader = shop.cluster.leader().await;
        shop.cluster.pinned(leader).set_fail_point(point, "1*return(abort)").await.unwrap();
        let before = shop.order_rows().await.len();
        let (_, answer) = shop.order(1).await;
        assert!(answer.is_err() || !committed(&answer) || commits, "{point}: {answer:?}");
        shop.cluster.wait_exit(leader).await;
        shop.check_atomic().await;
        let after = shop.order_rows().await.len();
        assert_eq!(after, before + usize::from(commits), "{point}");
        shop.cluster.start_node(leader);
        shop.cluster.wait_answering(leader).await;
    }
}
