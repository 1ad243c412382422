//! An inventory service with its own PostgreSQL that reserves stock as a
//! participant in Tandem transactions, and the order flow that uses it.
//!
//! The service keeps `stock (sku, available)` in its own database. An order
//! service begins a Tandem transaction, inserts the order into `orders` in a
//! database Tandem manages, and asks the inventory service to reserve stock
//! under the transaction's txid. The inventory service runs the `UPDATE` in
//! a branch of its own ([`PgResource`]), enlists that branch with
//! `Transactions.Enlist`, and from then on Tandem's coordinator prepares and
//! commits (or aborts) it together with the order, through the
//! `tandem.v1.Participant` service the inventory serves
//! ([`ParticipantService`]). Either the order exists and the stock is
//! reserved, or neither.
//!
//! # Modes
//!
//! ```text
//! inventory_service serve --db URL [--listen ADDR] [--advertise URL] [--api ADDR]
//!                         [--tandem NODES] [--cluster-id ID] [--seed SKU=N,...]
//! inventory_service order --sku SKU --qty N --orders-participant NAME
//!                         [--tandem NODES] [--inventory ADDR]
//! inventory_service stock --sku SKU [--inventory ADDR]
//! ```
//!
//! `serve` creates `stock` and Tandem's bookkeeping table if missing, seeds
//! stock, serves `tandem.v1.Participant` on `--listen` (gRPC, what the
//! coordinator calls) and the reservation API on `--api`, and runs the
//! in-doubt resolver and the retention of old branch records.
//!
//! # The reservation API
//!
//! Plain text over TCP, one request per line, one answer line per request
//! (try it with `nc 127.0.0.1 7102`):
//!
//! ```text
//! RESERVE <txid> <sku> <qty>   ->  OK <branch>       | ERR <message>
//! STOCK <sku>                  ->  OK <available>    | ERR <message>
//! ```
//!
//! Lines are at most 1 KiB; at most 64 connections are served at once, and
//! one idle for 30 s is closed.
//!
//! # Walk-through
//!
//! ```sh
//! # Two PostgreSQL servers with max_prepared_transactions > 0: one for the
//! # orders (a participant Tandem manages), one the inventory service owns.
//! psql -h 127.0.0.1 -p 55433 -U postgres -d orders -c \
//!   'CREATE TABLE orders (id bigserial PRIMARY KEY, txid text NOT NULL, sku text NOT NULL, qty int NOT NULL)'
//! cat > /tmp/participants.toml <<EOF
//! [[participants]]
//! name = "orders"
//! kind = "postgres"
//! url = "postgres://postgres@127.0.0.1:55433/orders"
//! EOF
//! scripts/cluster.sh up --participants /tmp/participants.toml
//!
//! cargo run --example inventory_service -- serve \
//!   --db postgres://postgres@127.0.0.1:55434/inventory --seed apple=10 &
//! cargo run --example inventory_service -- order --sku apple --qty 3 --orders-participant orders
//! cargo run --example inventory_service -- stock --sku apple     # 7
//! cargo run --example inventory_service -- order --sku apple --qty 30 --orders-participant orders
//! # refused: not enough stock; the order is rolled back too
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use clap::Parser;
use clap::Subcommand;
use tandem::client::Client;
use tandem::error::Error;
use tandem::error::Result;
use tandem::participant::sdk::BranchId;
use tandem::participant::sdk::ParticipantService;
use tandem::participant::sdk::postgres::PgOptions;
use tandem::participant::sdk::postgres::PgResource;
use tandem::participant::sdk::spawn_resolver;
use tandem::proto as pb;
use tandem::txn::TxId;
use tokio::io::AsyncBufReadExt;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::io::BufReader;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// The name the inventory's branch is enlisted under, in every transaction.
const BRANCH: &str = "inventory";
/// Longest request line of the reservation API.
const LINE_BYTES_MAX: u64 = 1024;
/// Most reservation API connections served at once.
const CONNECTIONS_MAX: usize = 64;
/// A reservation API connection idle this long is closed.
const CONNECTION_IDLE: Duration = Duration::from_secs(30);
/// How long records of ended branches are kept (the cluster keeps completed
/// transactions a day by default).
const BRANCH_RETENTION: Duration = Duration::from_secs(2 * 86400);

#[derive(Parser)]
#[command(about = "An inventory service taking part in Tandem transactions, and an order flow using it")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the inventory service.
    Serve(ServeArgs),
    /// Place an order: insert it through Tandem, reserve its stock, commit.
    Order {
        #[arg(long)]
        sku: String,
        #[arg(long)]
        qty: i32,
        /// The Tandem participant holding the `orders` table.
        #[arg(long)]
        orders_participant: String,
        /// Tandem nodes (host:port), comma-separated.
        #[arg(
            long,
            env = "TANDEM_NODES",
            default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
            value_delimiter = ','
        )]
        tandem: Vec<String>,
        /// The inventory service's reservation API.
        #[arg(long, default_value = "127.0.0.1:7102")]
        inventory: String,
        /// Wait this many seconds between the reservation and Commit (to
        /// stop the service there, say).
        #[arg(long, default_value_t = 0)]
        pause_before_commit: u64,
    },
    /// Ask the inventory service how much of a SKU is available.
    Stock {
        #[arg(long)]
        sku: String,
        /// The inventory service's reservation API.
        #[arg(long, default_value = "127.0.0.1:7102")]
        inventory: String,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// The inventory's own PostgreSQL (max_prepared_transactions > 0).
    #[arg(long)]
    db: String,
    /// Where to serve tandem.v1.Participant (gRPC) for the coordinator.
    #[arg(long, default_value = "127.0.0.1:7101")]
    listen: SocketAddr,
    /// How the coordinator reaches --listen; default http://<listen>.
    #[arg(long)]
    advertise: Option<String>,
    /// Where to serve the reservation API (text over TCP).
    #[arg(long, default_value = "127.0.0.1:7102")]
    api: SocketAddr,
    /// Tandem nodes (host:port), comma-separated.
    #[arg(
        long,
        env = "TANDEM_NODES",
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
        value_delimiter = ','
    )]
    tandem: Vec<String>,
    /// The Tandem cluster's id (its nodes' `cluster_id`).
    #[arg(long, default_value = "local")]
    cluster_id: String,
    /// Stock to set at start: SKU=N, comma-separated. Meant for a first
    /// start: a row a prepared branch still holds is waited for 5 s at most.
    #[arg(long, value_delimiter = ',')]
    seed: Vec<String>,
    /// How often to settle branches left in doubt, in seconds.
    #[arg(long, default_value_t = 30)]
    resolve_interval_s: u64,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tokio_postgres=warn".parse().expect("static filter")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Order { sku, qty, orders_participant, tandem, inventory, pause_before_commit } => {
            let pause = Duration::from_secs(pause_before_commit);
            order(&tandem, &inventory, &orders_participant, &sku, qty, pause).await
        }
        Command::Stock { sku, inventory } => match request(&inventory, &format!("STOCK {sku}")).await {
            Ok(Ok(available)) => {
                println!("{sku}: {available} available");
                Ok(())
            }
            Ok(Err(refusal)) => Err(Error::FailedPrecondition(format!("the inventory answered: {refusal}"))),
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------
// The service.

struct Inventory {
    pg: Arc<PgResource>,
    /// For reads and setup, outside any branch.
    db: tokio_postgres::Client,
    /// One client for Enlist, shared: enlists take turns, which is enough
    /// for an example (a busy service would keep a few).
    tandem: tokio::sync::Mutex<Client>,
    cluster_id: String,
    /// Where the coordinator reaches our tandem.v1.Participant.
    endpoint: String,
}

async fn serve(args: ServeArgs) -> Result<()> {
    let ServeArgs { db: db_url, listen, advertise, api, tandem: nodes, cluster_id, seed, resolve_interval_s } = args;
    let endpoint = advertise.unwrap_or_else(|| format!("http://{listen}"));
    let (db, connection) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| Error::Unavailable { message: format!("connecting to {db_url}: {e}"), leader: None })?;
    tokio::spawn(connection);
    // Rows of prepared branches stay locked until the coordinator (or the
    // resolver, which starts below) finishes them: never wait on them long.
    db.batch_execute("SET lock_timeout = '5s'").await.map_err(|e| Error::Internal(e.to_string()))?;
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS stock (sku text PRIMARY KEY, available int NOT NULL CHECK (available >= 0))",
    )
    .await
    .map_err(|e| Error::Internal(format!("creating the stock table: {e}")))?;
    for s in &seed {
        let (sku, n) = s.split_once('=').ok_or_else(|| Error::InvalidInput(format!("--seed {s:?}: expected SKU=N")))?;
        let n: i32 = n.parse().map_err(|_| Error::InvalidInput(format!("--seed {s:?}: {n:?} is not a number")))?;
        db.execute(
            "INSERT INTO stock (sku, available) VALUES ($1, $2) ON CONFLICT (sku) DO UPDATE SET available = $2",
            &[&sku, &n],
        )
        .await
        .map_err(|e| Error::Internal(format!("seeding {sku}: {e}")))?;
        tracing::info!(sku, available = n, "stock set");
    }

    let pg = Arc::new(PgResource::connect(&db_url, PgOptions::default())?);
    pg.install().await?;
    let inventory = Arc::new(Inventory {
        pg: pg.clone(),
        db,
        tandem: tokio::sync::Mutex::new(Client::new(&nodes)?),
        cluster_id: cluster_id.clone(),
        endpoint: endpoint.clone(),
    });

    // Branches prepared before a restart, or whose decision did not arrive.
    spawn_resolver(pg.clone(), nodes, &cluster_id, Duration::from_secs(resolve_interval_s))?;
    tokio::spawn(forget_old_branches(pg.clone()));

    // Bound before serving, so that a port in use fails the start.
    let grpc_listener = TcpListener::bind(listen).await?;
    let api_listener = TcpListener::bind(api).await?;
    let participant = ParticipantService::new(pg);
    tracing::info!(%listen, %endpoint, "serving tandem.v1.Participant");
    tracing::info!(%api, "serving the reservation API");
    let grpc = tonic::transport::Server::builder()
        .add_service(participant.into_server())
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc_listener));
    tokio::select! {
        served = grpc => served.map_err(|e| Error::Internal(format!("the gRPC server failed: {e}"))),
        served = serve_api(inventory, api_listener) => served,
        stopped = tokio::signal::ctrl_c() => Ok(stopped?),
    }
}

/// Serves the reservation API, at most [`CONNECTIONS_MAX`] connections at
/// once.
async fn serve_api(inventory: Arc<Inventory>, listener: TcpListener) -> Result<()> {
    let limit = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (socket, peer) = listener.accept().await?;
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many API connections; refused");
            continue;
        };
        let inventory = inventory.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(&inventory, socket).await {
                tracing::debug!(%peer, error = %e, "API connection ended");
            }
            drop(permit);
        });
    }
}

/// Deletes records of branches that ended long ago, hourly.
async fn forget_old_branches(pg: Arc<PgResource>) {
    loop {
        match pg.forget_before(BRANCH_RETENTION).await {
            Ok(n) if n > 0 => tracing::info!(forgotten = n, "old branch records deleted"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "deleting old branch records failed"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

async fn serve_connection(inventory: &Inventory, socket: TcpStream) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        let n = match tokio::time::timeout(CONNECTION_IDLE, (&mut read).take(LINE_BYTES_MAX).read_line(&mut line)).await
        {
            Ok(n) => n?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') {
            write.write_all(format!("ERR a request line is at most {LINE_BYTES_MAX} bytes\n").as_bytes()).await?;
            return Ok(());
        }
        let answer = match inventory.handle(line.trim()).await {
            Ok(ok) => format!("OK {ok}\n"),
            Err(e) => format!("ERR {}\n", e.to_string().replace('\n', " ")),
        };
        write.write_all(answer.as_bytes()).await?;
    }
}

impl Inventory {
    async fn handle(&self, line: &str) -> Result<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["RESERVE", txid, sku, qty] => {
                let qty: i32 =
                    qty.parse().map_err(|_| Error::InvalidInput(format!("quantity {qty:?} is not a number")))?;
                self.reserve(txid, sku, qty).await
            }
            ["STOCK", sku] => self.available(sku).await.map(|n| n.to_string()),
            _ => Err(Error::InvalidInput(format!(
                "unknown request {line:?}; expected RESERVE <txid> <sku> <qty> or STOCK <sku>"
            ))),
        }
    }

    async fn available(&self, sku: &str) -> Result<i32> {
        let row = self
            .db
            .query_opt("SELECT available FROM stock WHERE sku = $1", &[&sku])
            .await
            .map_err(|e| Error::Unavailable { message: e.to_string(), leader: None })?;
        row.map(|r| r.get(0)).ok_or_else(|| Error::NotFound(format!("no SKU {sku:?}")))
    }

    /// Reserves `qty` of `sku` in this service's branch of transaction
    /// `txid`, and enlists the branch. The reservation holds only if the
    /// transaction commits.
    async fn reserve(&self, txid: &str, sku: &str, qty: i32) -> Result<String> {
        if qty <= 0 {
            return Err(Error::InvalidInput(format!("quantity {qty} must be above 0")));
        }
        let txid = TxId::parse(txid)?;
        let id = BranchId::new(&self.cluster_id, txid.as_str(), BRANCH)?;
        // One branch per transaction: a second reservation under the same
        // txid runs in the same branch.
        let branch = self.pg.begin(&id).await?;
        // Wait only so long for stock another transaction holds (prepared
        // branches keep their row locks until phase 2).
        let updated = match branch.batch_execute("SET LOCAL lock_timeout = '5s'").await {
            Ok(()) => {
                branch
                    .execute(
                        "UPDATE stock SET available = available - $2 WHERE sku = $1 AND available >= $2",
                        &[&sku, &qty],
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        let refused = match updated {
            Ok(1) => None,
            Ok(_) => Some(match self.available(sku).await {
                Ok(n) => Error::FailedPrecondition(format!("not enough {sku}: {n} available, {qty} asked")),
                Err(e) => e,
            }),
            Err(e) => Some(tandem::participant::postgres::pg_error("inventory", e)),
        };
        if let Some(e) = refused {
            // A branch begun for this request holds nothing else: end it
            // now. An earlier reservation's branch stays as it was.
            if branch.is_new() {
                branch.rollback().await?;
            }
            tracing::info!(branch = %id, sku, qty, error = %e, "reservation refused");
            return Err(e);
        }
        // Enlisted while still held, so a failure can roll it back.
        let enlisted = self.tandem.lock().await.enlist(&txid, "", &self.endpoint, BRANCH).await;
        match enlisted {
            Ok(b) => {
                if b.cluster_id != self.cluster_id {
                    tracing::error!(
                        ours = %self.cluster_id, theirs = %b.cluster_id,
                        "the Tandem cluster's id differs from --cluster-id: branches will not be found"
                    );
                }
                tracing::info!(branch = %id, sku, qty, "reserved and enlisted");
                Ok(BRANCH.to_string())
            }
            Err(e) => {
                if branch.is_new() {
                    branch.rollback().await?;
                }
                tracing::info!(branch = %id, error = %e, "enlisting failed; reservation rolled back");
                Err(e.context("enlisting the reservation"))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The order flow (what an order service would do).

async fn order(
    nodes: &[String],
    inventory: &str,
    orders_participant: &str,
    sku: &str,
    qty: i32,
    pause: Duration,
) -> Result<()> {
    let mut client = Client::new(nodes)?;
    let txid = client.begin(pb::BeginRequest { timeout_ms: 30_000, ..Default::default() }).await?;
    println!("began {txid}");
    let text = |s: &str| pb::Value { kind: Some(pb::value::Kind::String(s.to_string())) };
    let insert = pb::Statement {
        sql: "INSERT INTO orders (txid, sku, qty) VALUES ($1, $2, $3) RETURNING id".into(),
        params: vec![text(txid.as_str()), text(sku), pb::Value { kind: Some(pb::value::Kind::Int64(qty.into())) }],
    };
    let inserted = client.execute(&txid, orders_participant, insert).await?;
    let order_id = match inserted.rows.first().and_then(|r| r.values.first()).and_then(|v| v.kind.as_ref()) {
        Some(pb::value::Kind::Int64(id)) => id.to_string(),
        other => format!("{other:?}"),
    };
    println!("order {order_id} inserted in {orders_participant}");

    // Any failure here leaves the reservation unknown: rolling the whole
    // transaction back is always safe (an enlisted branch is aborted too).
    let refusal = match request(inventory, &format!("RESERVE {txid} {sku} {qty}")).await {
        Ok(Ok(branch)) => {
            println!("inventory reserved {qty} {sku} in branch {branch:?}");
            None
        }
        Ok(Err(refusal)) => Some(format!("the inventory refused: {refusal}")),
        Err(e) => Some(format!("asking the inventory failed: {e}")),
    };
    if let Some(why) = refusal {
        println!("{why}");
        client.rollback(&txid).await?;
        println!("{txid}: rolled back (no order, no reservation)");
        return Err(Error::FailedPrecondition(format!("order {txid} not placed")));
    }

    if !pause.is_zero() {
        println!("waiting {pause:?} before Commit");
        tokio::time::sleep(pause).await;
    }
    let outcome = client.commit(&txid).await?;
    match pb::Outcome::try_from(outcome.outcome) {
        Ok(pb::Outcome::Committed) => {
            println!("{txid}: COMMITTED (the order and the reservation)");
            Ok(())
        }
        _ => Err(Error::FailedPrecondition(format!("{txid}: ABORTED: {}", outcome.reason))),
    }
}

/// One request to the reservation API: `Ok(Ok(text after OK))`,
/// `Ok(Err(text after ERR))`, or an error reaching the service.
async fn request(addr: &str, line: &str) -> Result<std::result::Result<String, String>> {
    let unavailable =
        |e: std::io::Error| Error::Unavailable { message: format!("inventory at {addr}: {e}"), leader: None };
    let socket = TcpStream::connect(addr).await.map_err(unavailable)?;
    let (read, mut write) = socket.into_split();
    write.write_all(format!("{line}\n").as_bytes()).await.map_err(unavailable)?;
    let mut answer = String::new();
    // Enlisting may retry for a while: wait longer than the service does.
    let mut read = BufReader::new(read.take(LINE_BYTES_MAX));
    tokio::time::timeout(Duration::from_secs(60), read.read_line(&mut answer))
        .await
        .map_err(|_| Error::OutcomeUnknown(format!("inventory at {addr}: no answer in 60 s")))?
        .map_err(unavailable)?;
    let answer = answer.trim_end();
    match answer.split_once(' ') {
        Some(("OK", rest)) => Ok(Ok(rest.to_string())),
        Some(("ERR", message)) => Ok(Err(message.to_string())),
        _ => Err(Error::Internal(format!("inventory at {addr}: unexpected answer {answer:?}"))),
    }
}
