//! The `tandem` binary: `tandem serve` runs a node; the other subcommands are
//! the command-line client.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use std::time::Instant;

use clap::Args;
use clap::Parser;
use clap::Subcommand;
use tandem::client::Client;
use tandem::config::NodeConfig;
use tandem::error::Error;
use tandem::error::Result;
use tandem::proto as pb;
use tandem::txn::Branch;
use tandem::txn::Decision;
use tandem::txn::RecordState;
use tandem::txn::TxId;

#[derive(Parser)]
#[command(name = "tandem", version, about = "A Raft-replicated distributed transaction coordinator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve(ServeArgs),
    /// Cluster administration.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Read and write the replicated decision log directly (operators, tests).
    #[command(subcommand)]
    Log(LogCommand),
    /// Transactions across participants.
    #[command(subcommand)]
    Txn(TxnCommand),
    /// Workloads and the checker of their invariants (scripts/chaos.sh).
    #[command(subcommand)]
    Workload(WorkloadCommand),
    /// The bank-transfer benchmark: Tandem against bare 2PC, two local
    /// commits and one database, side by side (scripts/bench.sh).
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    nodes: Nodes,
    /// A `[[participants]]` file naming `bench_a` and `bench_b` (the
    /// cluster's participants, reached directly by the other modes).
    #[arg(long)]
    participants: PathBuf,
    /// Modes, comma-separated: tandem, bare_2pc, non_atomic, single_db,
    /// decisions_only.
    #[arg(long, value_delimiter = ',', default_value = "tandem,bare_2pc,non_atomic,single_db,decisions_only")]
    modes: Vec<String>,
    /// The decision log alone: decisions through the cluster with no
    /// participant work (`--modes decisions_only`); the databases are left
    /// untouched.
    #[arg(long, conflicts_with = "modes")]
    empty: bool,
    /// Client counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    concurrency: Vec<usize>,
    /// Seconds per mode and client count.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Instead of --duration-s: transfers per mode and client count. From
    /// 200,000 up, the first 100,000's throughput is compared with the last.
    #[arg(long)]
    transactions: Option<u64>,
    /// Accounts per database.
    #[arg(long, default_value_t = 100_000)]
    accounts: i64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Clients (of the modes through the cluster) sharing one connection to
    /// each node; 1 gives each client its own.
    #[arg(long, default_value_t = 16)]
    clients_per_connection: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw latency against throughput here (SVG).
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct BankArgs {
    /// The `[[participants]]` file the cluster runs with (two or more).
    #[arg(long)]
    participants: PathBuf,
    #[arg(long, default_value_t = 10)]
    accounts: i64,
    #[arg(long, default_value_t = 1000)]
    opening: i64,
    /// Directory for outcomes.jsonl.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum WorkloadCommand {
    /// Concurrent transfers between accounts in different participants;
    /// every outcome goes to OUT/outcomes.jsonl.
    Bank {
        #[command(flatten)]
        nodes: Nodes,
        #[command(flatten)]
        bank: BankArgs,
        #[arg(long, default_value_t = 8)]
        workers: usize,
        #[arg(long, default_value_t = 60)]
        duration_s: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Each transfer's deadline.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u32,
        /// Recreate the tables first (drops balances and markers).
        #[arg(long)]
        reset: bool,
    },
    /// Check the invariants after a bank run; prints a report, writes it as
    /// JSON to --report and exits non-zero on any violation.
    Check {
        #[command(flatten)]
        nodes: Nodes,
        #[command(flatten)]
        bank: BankArgs,
        /// Fault events (`<unix ms> <event>` per line).
        #[arg(long)]
        events: Option<PathBuf>,
        #[arg(long)]
        report: Option<PathBuf>,
        /// The cluster id (gids start with tdm_<cluster_id>_).
        #[arg(long, default_value = "local")]
        cluster_id: String,
        /// Longest wait for in-doubt branches and for the nodes to converge.
        #[arg(long, default_value_t = 120)]
        settle_s: u64,
    },
    /// A TCP proxy that passes, delays, drops or resets connections as its
    /// control file says (`pass`, `delay MS`, `drop`, `reset`).
    Proxy {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        control: PathBuf,
    },
}

#[derive(Subcommand)]
enum TxnCommand {
    /// Run one transaction. Each --sql belongs to the --participant before
    /// it, each --param to the --sql before it, in order ($1, $2, …):
    ///
    ///   tandem txn transact --participant accounts_a --sql 'UPDATE balances SET balance = balance - $1 WHERE id = $2' --param int:30 --param int:1 --participant accounts_b --sql '…'
    ///
    /// Params: null, bool:true, int:42, float:1.5, str:text, and timestamp:…,
    /// uuid:…, numeric:…, json:… (converted to the column's type).
    Transact {
        #[command(flatten)]
        nodes: Nodes,
        #[arg(long, required = true)]
        participant: Vec<String>,
        #[arg(long, required = true)]
        sql: Vec<String>,
        #[arg(long)]
        param: Vec<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(long)]
        timeout_ms: Option<u32>,
        /// KEY=VALUE, kept with the transaction (repeatable).
        #[arg(long)]
        label: Vec<String>,
    },
    /// Show one transaction: state, branches, times, labels, last error.
    Get {
        #[command(flatten)]
        nodes: Nodes,
        txid: String,
    },
    /// List transactions, running and decided, in txid order.
    List {
        #[command(flatten)]
        nodes: Nodes,
        /// active, preparing, committing, committed, aborting or aborted.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Start after this txid.
        #[arg(long)]
        after: Option<String>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// The node's TOML config file.
    #[arg(long, env = "TANDEM_CONFIG")]
    config: PathBuf,
    /// Overrides `id` in the file.
    #[arg(long, env = "TANDEM_ID")]
    id: Option<u64>,
    /// Overrides `listen` in the file.
    #[arg(long, env = "TANDEM_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Overrides `advertise` in the file.
    #[arg(long, env = "TANDEM_ADVERTISE")]
    advertise: Option<String>,
    /// Overrides `data_dir` in the file.
    #[arg(long, env = "TANDEM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Overrides `cluster_id` in the file.
    #[arg(long, env = "TANDEM_CLUSTER_ID")]
    cluster_id: Option<String>,
    /// A TOML file of `[[participants]]`, added to those in the config.
    #[arg(long, env = "TANDEM_PARTICIPANTS")]
    participants: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct Nodes {
    /// Addresses (host:port) of cluster nodes, comma-separated.
    #[arg(
        long,
        env = "TANDEM_NODES",
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
        value_delimiter = ','
    )]
    nodes: Vec<String>,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Initialise a new cluster (once, on one of its members).
    Init {
        /// The node to run init on; must be one of the members.
        #[arg(long)]
        node: String,
        /// Members as ID=HOST:PORT, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<String>,
    },
    /// The status of every node: role, term, leader, log and applied indexes, membership.
    Status {
        #[command(flatten)]
        nodes: Nodes,
        /// Wait up to this many seconds until the nodes agree on a leader.
        #[arg(long)]
        wait_leader: Option<u64>,
        /// One JSON object per node instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add a non-voting member; waits until it has caught up.
    AddLearner {
        #[command(flatten)]
        nodes: Nodes,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        addr: String,
    },
    /// Replace the set of voters (each must already be a member).
    ChangeMembership {
        #[command(flatten)]
        nodes: Nodes,
        /// Voter ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        voters: Vec<u64>,
        /// Keep removed voters as learners.
        #[arg(long)]
        retain: bool,
    },
}

#[derive(Subcommand)]
enum LogCommand {
    /// Record a decision (compare-and-set: the first decision for a txid holds).
    Decide {
        #[command(flatten)]
        nodes: Nodes,
        #[arg(long)]
        txid: String,
        /// Record COMMIT naming these participants' branches (comma-separated).
        #[arg(long, value_delimiter = ',', conflicts_with = "abort")]
        commit: Option<Vec<String>>,
        #[arg(long, requires = "commit")]
        idempotency_key: Option<String>,
        /// Record ABORT with this reason.
        #[arg(long)]
        abort: Option<String>,
    },
    /// Mark a decided transaction complete.
    Complete {
        #[command(flatten)]
        nodes: Nodes,
        #[arg(long)]
        txid: String,
    },
    /// Drop completed records older than the given age, with their idempotency keys.
    Forget {
        #[command(flatten)]
        nodes: Nodes,
        #[arg(long)]
        older_than_s: u64,
    },
    /// One transaction's record.
    Get {
        #[command(flatten)]
        nodes: Nodes,
        txid: String,
        /// Read the first node's own state machine (may lag).
        #[arg(long)]
        local: bool,
    },
    /// Records, ordered by txid.
    List {
        #[command(flatten)]
        nodes: Nodes,
        /// committed, aborted or completed.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        after: Option<String>,
        #[arg(long)]
        local: bool,
    },
}

fn main() -> ExitCode {
    tune_malloc();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // `txn transact` pairs its options by their order on the command line.
    let order = matches
        .subcommand_matches("txn")
        .and_then(|m| m.subcommand_matches("transact"))
        .map(argument_order)
        .unwrap_or_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".parse().expect("static filter")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if matches!(cli.command, Command::Serve(_)) {
        no_transparent_huge_pages();
    }
    let runtime = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
    match runtime.block_on(run(cli, order)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Rust's allocations go to mimalloc: in `tandem bench` it gave 6 to 19%
/// more throughput than glibc's allocator (README, Benchmark), for about
/// 20 to 34 MB more resident memory per node, measured while mimalloc
/// could take transparent huge pages (see [`no_transparent_huge_pages`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// RocksDB's C++ still allocates through glibc, which gives each thread
/// that allocates under contention an arena of its own, up to eight per
/// core, and returns little of a freed arena to the system (when every
/// allocation went through glibc, a node that built multi-megabyte
/// snapshots on many threads held about twice the memory it used). Two
/// arenas keep the resident size near what is in use.
///
/// glibc also raises its threshold for serving an allocation from its own
/// `mmap` each time such a block is freed, to that block's size (up to
/// 32 MB), after which blocks of that size (RocksDB's memtables take
/// theirs 1 MB at a time) come from the arenas and may stay there, free
/// but resident, once freed. A fixed threshold (which also ends the
/// adjustment) keeps them in their own mappings, returned when freed, and
/// a trim threshold of 512 kB (the adjusted one reaches 64 MB) returns a
/// freed arena top. With the same settings given through `GLIBC_TUNABLES`,
/// 256 clients held each node's peak 14 to 17 MB lower (README,
/// Benchmark). Called before any thread starts.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; no other thread
    // exists yet to race with it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 10);
    }
}

/// A node runs without transparent huge pages. mimalloc, unless built with
/// its `no_thp` feature (as here), asks the kernel for them on its arenas
/// (`madvise`), and a huge page is 2 MB resident as soon as any byte of it
/// is touched: in `tandem bench` at 64 clients a node held up to 74 MB in
/// huge pages in the runs where the kernel gave them, and peaked 29 to 44
/// MB lower without them (README, Benchmark). Off, its size no longer
/// depends on whether the kernel gives them. Where the kernel gives them to
/// every process (`always`) rather than only where asked, this keeps them
/// from mimalloc's and RocksDB's memory too. Called before the runtime's
/// threads start; it applies to memory touched from then on.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes no pointers and only sets a flag of
    // this process. Its arguments are read as unsigned longs, the unused
    // ones zero.
    unsafe {
        let (on, unused): (libc::c_ulong, libc::c_ulong) = (1, 0);
        if libc::prctl(libc::PR_SET_THP_DISABLE, on, unused, unused, unused) != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "could not turn transparent huge pages off");
        }
    }
}

async fn run(cli: Cli, order: Vec<(&'static str, usize)>) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Cluster(c) => cluster(c).await,
        Command::Log(c) => log(c).await,
        Command::Txn(c) => txn(c, order).await,
        Command::Workload(c) => workload(c).await,
        Command::Bench(args) => bench(args).await,
    }
}

/// The modes `tandem bench` runs: `--empty` is the decision log alone.
fn bench_modes(args: &BenchArgs) -> Result<Vec<tandem::workload::bench::Mode>> {
    use tandem::workload::bench::Mode;
    match args.empty {
        true => Ok(vec![Mode::DecisionsOnly]),
        false => args.modes.iter().map(|m| Mode::parse(m)).collect(),
    }
}

async fn bench(args: BenchArgs) -> Result<()> {
    use tandem::workload::bench;
    let participants = tandem::config::load_participants_file(&args.participants)?;
    let find = |name: &str| {
        participants.iter().find(|p| p.name == name).cloned().ok_or_else(|| {
            Error::InvalidInput(format!("{} names no participant {name:?}", args.participants.display()))
        })
    };
    let modes = bench_modes(&args)?;
    let cfg = bench::BenchConfig {
        nodes: args.nodes.nodes,
        a: find("bench_a")?,
        b: find("bench_b")?,
        modes,
        concurrency: args.concurrency,
        duration: Duration::from_secs(args.duration_s.max(1)),
        transactions: args.transactions.map(|n| n.max(1)),
        accounts: args.accounts.max(1),
        seed: args.seed,
        clients_per_connection: args.clients_per_connection.max(1),
    };
    if cfg.modes.iter().any(|m| m.touches_databases()) {
        eprintln!("setting up {} accounts in bench_a and bench_b", cfg.accounts);
        bench::setup(&cfg).await?;
    }
    let results = bench::run(&cfg).await?;
    println!("{}", bench::table(&results));
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).map_err(|e| Error::InvalidInput(format!("cannot write {}: {e}", path.display())))
    };
    if let Some(path) = &args.json {
        write(path, bench::json(&results))?;
    }
    if let Some(path) = &args.svg {
        write(path, bench::svg(&results))?;
    }
    Ok(())
}

async fn workload(c: WorkloadCommand) -> Result<()> {
    use tandem::workload::bank;
    use tandem::workload::check;
    match c {
        WorkloadCommand::Bank { nodes, bank: b, workers, duration_s, seed, timeout_ms, reset } => {
            let participants = tandem::config::load_participants_file(&b.participants)?;
            if reset {
                bank::setup(&participants, b.accounts, b.opening).await?;
            }
            let (committed, aborted, unknown) = bank::run(bank::BankConfig {
                nodes: nodes.nodes,
                participants,
                accounts: b.accounts,
                opening: b.opening,
                workers,
                duration: Duration::from_secs(duration_s),
                seed,
                out: b.out,
                timeout_ms,
            })
            .await?;
            println!("bank: {committed} committed, {aborted} aborted, {unknown} unknown");
            Ok(())
        }
        WorkloadCommand::Proxy { listen, to, control } => tandem::workload::proxy::run(&listen, &to, control).await,
        WorkloadCommand::Check { nodes, bank: b, events, report, cluster_id, settle_s } => {
            let participants = tandem::config::load_participants_file(&b.participants)?;
            let r = check::check(&check::CheckConfig {
                nodes: nodes.nodes,
                participants,
                accounts: b.accounts,
                opening: b.opening,
                out: b.out,
                events,
                gid_prefix: tandem::txn::gid::Gid::cluster_prefix(&cluster_id),
                settle: Duration::from_secs(settle_s),
            })
            .await?;
            print!("{}", r.summary());
            if let Some(path) = report {
                std::fs::write(&path, serde_json::to_string_pretty(&r).map_err(Error::internal)?)?;
            }
            if r.violations.is_empty() {
                Ok(())
            } else {
                Err(Error::FailedPrecondition(format!("{} invariant violations", r.violations.len())))
            }
        }
    }
}

/// The `--participant`, `--sql` and `--param` options in command-line order,
/// as (name, position within its own list).
fn argument_order(m: &clap::ArgMatches) -> Vec<(&'static str, usize)> {
    let mut all = Vec::new();
    for name in ["participant", "sql", "param"] {
        if let Some(indices) = m.indices_of(name) {
            all.extend(indices.enumerate().map(|(i, at)| (at, name, i)));
        }
    }
    all.sort();
    all.into_iter().map(|(_, name, i)| (name, i)).collect()
}

fn parse_param(s: &str) -> Result<pb::Value> {
    use pb::value::Kind;
    let (kind, value) = s.split_once(':').unwrap_or((s, ""));
    let bad = || Error::InvalidInput(format!("bad --param {s:?}"));
    let kind = match kind {
        "null" => Kind::Null(true),
        "bool" => Kind::Bool(value.parse().map_err(|_| bad())?),
        "int" => Kind::Int64(value.parse().map_err(|_| bad())?),
        "float" => Kind::Double(value.parse().map_err(|_| bad())?),
        "str" => Kind::String(value.into()),
        "timestamp" => Kind::Timestamp(value.into()),
        "uuid" => Kind::Uuid(value.into()),
        "numeric" => Kind::Numeric(value.into()),
        "json" => Kind::Json(value.into()),
        _ => return Err(bad()),
    };
    Ok(pb::Value { kind: Some(kind) })
}

fn show_value(v: &pb::Value) -> String {
    use pb::value::Kind;
    match &v.kind {
        None | Some(Kind::Null(_)) => "NULL".into(),
        Some(Kind::Bool(b)) => b.to_string(),
        Some(Kind::Int64(i)) => i.to_string(),
        Some(Kind::Double(d)) => d.to_string(),
        Some(Kind::Bytes(b)) => format!("\\x{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
        Some(Kind::String(s) | Kind::Timestamp(s) | Kind::Uuid(s) | Kind::Numeric(s) | Kind::Json(s)) => s.clone(),
    }
}

async fn txn(c: TxnCommand, order: Vec<(&'static str, usize)>) -> Result<()> {
    match c {
        TxnCommand::Get { nodes, txid } => {
            let t = Client::new(&nodes.nodes)?.get_transaction(&TxId::parse(&txid)?).await?;
            print_transaction(&t);
            Ok(())
        }
        TxnCommand::List { nodes, state, limit, after } => {
            let state = match state {
                None => pb::TransactionState::Unspecified,
                Some(s) => tandem::server::convert::txn_state_to_pb(tandem::coordinator::TxnState::parse(&s)?),
            };
            let after = after.map(|a| TxId::parse(&a)).transpose()?;
            for t in Client::new(&nodes.nodes)?.list_transactions(state, after.as_ref(), limit).await? {
                let branches: Vec<String> =
                    t.branches.iter().map(|b| format!("{}={}", b.participant, b.state)).collect();
                println!("{} {} {}{}", t.txid, state_name(t.state), branches.join(","), reason_suffix(&t.reason));
            }
            Ok(())
        }
        TxnCommand::Transact { nodes, participant, sql, param, idempotency_key, timeout_ms, label } => {
            let mut request = pb::TransactRequest {
                idempotency_key: idempotency_key.unwrap_or_default(),
                timeout_ms: timeout_ms.unwrap_or(0),
                ..Default::default()
            };
            for l in label {
                let (k, v) =
                    l.split_once('=').ok_or_else(|| Error::InvalidInput(format!("--label {l:?} is not KEY=VALUE")))?;
                request.labels.insert(k.to_string(), v.to_string());
            }
            for (name, i) in order {
                match name {
                    "participant" => request
                        .branches
                        .push(pb::BranchRequest { participant: participant[i].clone(), statements: vec![] }),
                    "sql" => request
                        .branches
                        .last_mut()
                        .ok_or_else(|| Error::InvalidInput("--sql before any --participant".into()))?
                        .statements
                        .push(pb::Statement { sql: sql[i].clone(), params: vec![] }),
                    _ => request
                        .branches
                        .last_mut()
                        .and_then(|b| b.statements.last_mut())
                        .ok_or_else(|| Error::InvalidInput("--param before any --sql".into()))?
                        .params
                        .push(parse_param(&param[i])?),
                }
            }
            let r = Client::new(&nodes.nodes)?.transact(request).await?;
            let outcome = if r.outcome == pb::Outcome::Committed as i32 { "COMMITTED" } else { "ABORTED" };
            println!(
                "{} {outcome}{}{}",
                r.txid,
                if r.duplicate { " (a repeat: this idempotency key had committed already)" } else { "" },
                reason_suffix(&r.reason)
            );
            for b in &r.branches {
                for (i, res) in b.results.iter().enumerate() {
                    println!("  {} statement {i}: {} rows", b.participant, res.rows_affected);
                    if !res.columns.is_empty() {
                        println!("    {}", res.columns.join(" | "));
                        for row in &res.rows {
                            println!("    {}", row.values.iter().map(show_value).collect::<Vec<_>>().join(" | "));
                        }
                    }
                }
            }
            if !r.pending.is_empty() {
                println!("  COMMIT PREPARED still pending on: {}", r.pending.join(", "));
            }
            if !r.heuristic.is_empty() {
                println!("  HEURISTIC outcome on: {}", r.heuristic.join(", "));
            }
            Ok(())
        }
    }
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() { String::new() } else { format!(": {reason}") }
}

fn state_name(state: i32) -> &'static str {
    match pb::TransactionState::try_from(state).unwrap_or(pb::TransactionState::Unspecified) {
        pb::TransactionState::Active => "ACTIVE",
        pb::TransactionState::Preparing => "PREPARING",
        pb::TransactionState::Committing => "COMMITTING",
        pb::TransactionState::Committed => "COMMITTED",
        pb::TransactionState::Aborting => "ABORTING",
        pb::TransactionState::Aborted => "ABORTED",
        pb::TransactionState::Unspecified => "UNKNOWN",
    }
}

fn print_transaction(t: &pb::Transaction) {
    println!("txid:        {}", t.txid);
    println!("state:       {}{}", state_name(t.state), reason_suffix(&t.reason));
    println!("interactive: {}", t.interactive);
    for b in &t.branches {
        let xid = b.xid.map(|x| format!(" (xid {x})")).unwrap_or_default();
        println!("branch:      {} {}{xid}", b.participant, b.state);
    }
    if !t.heuristic.is_empty() {
        println!("HEURISTIC:   {} ended against the decision", t.heuristic.join(", "));
    }
    for (k, v) in &t.labels {
        println!("label:       {k}={v}");
    }
    if t.started_unix_ms > 0 {
        println!("started:     {} (unix ms)", t.started_unix_ms);
    }
    if let Some(d) = t.deadline_unix_ms {
        println!("deadline:    {d}");
    }
    if let Some(d) = t.decided_unix_ms {
        println!("decided:     {d}");
    }
    if let Some(c) = t.completed_unix_ms {
        println!("completed:   {c}");
    }
    if !t.last_error.is_empty() {
        println!("last error:  {}", t.last_error);
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut config = NodeConfig::load(&args.config)?;
    if let Some(id) = args.id {
        config.id = id;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(a) = args.advertise {
        config.advertise = Some(a);
    }
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(c) = args.cluster_id {
        config.cluster_id = c;
    }
    if let Some(file) = args.participants {
        config.add_participants_file(&file)?;
    }
    tandem::server::serve(config).await
}

fn parse_member(s: &str) -> Result<pb::Member> {
    let (id, addr) =
        s.split_once('=').ok_or_else(|| Error::InvalidInput(format!("member {s:?} is not ID=HOST:PORT")))?;
    let id = id.trim().parse().map_err(|_| Error::InvalidInput(format!("member id {id:?} is not a number")))?;
    Ok(pb::Member { id, addr: addr.trim().to_string() })
}

fn role_name(role: i32) -> &'static str {
    match pb::Role::try_from(role).unwrap_or(pb::Role::Unspecified) {
        pb::Role::Leader => "leader",
        pb::Role::Follower => "follower",
        pb::Role::Candidate => "candidate",
        pb::Role::Learner => "learner",
        pb::Role::Shutdown => "shutdown",
        pb::Role::Unspecified => "?",
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".to_string(), |v| v.to_string())
}

fn members(ms: &[pb::Member]) -> String {
    ms.iter().map(|m| format!("{}={}", m.id, m.addr)).collect::<Vec<_>>().join(",")
}

/// Every node's status: the given nodes and every member they know of.
async fn collect_status(seeds: &[String]) -> Vec<(String, Result<pb::NodeStatus>)> {
    let mut addrs: Vec<String> = seeds.to_vec();
    let mut out: Vec<(String, Result<pb::NodeStatus>)> = Vec::new();
    let mut i = 0;
    while i < addrs.len() {
        let addr = addrs[i].clone();
        i += 1;
        let status = match Client::pinned(&addr) {
            Ok(mut c) => tokio::time::timeout(Duration::from_secs(3), c.status())
                .await
                .unwrap_or_else(|_| Err(Error::Unavailable { message: "no answer in 3s".into(), leader: None })),
            Err(e) => Err(e),
        };
        if let Ok(s) = &status {
            for m in s.voters.iter().chain(&s.learners) {
                if !addrs.contains(&m.addr) {
                    addrs.push(m.addr.clone());
                }
            }
        }
        out.push((addr, status));
    }
    out
}

/// True when every answering node names the same leader, which answers too.
fn agreed_leader(statuses: &[(String, Result<pb::NodeStatus>)]) -> Option<u64> {
    let answering: Vec<&pb::NodeStatus> = statuses.iter().filter_map(|(_, s)| s.as_ref().ok()).collect();
    let leader = answering.first()?.leader_id?;
    let all_agree = answering.iter().all(|s| s.leader_id == Some(leader));
    let leader_answers = answering.iter().any(|s| s.id == leader && s.role == pb::Role::Leader as i32);
    (all_agree && leader_answers).then_some(leader)
}

async fn cluster(c: ClusterCommand) -> Result<()> {
    match c {
        ClusterCommand::Init { node, members } => {
            let members = members.iter().map(|m| parse_member(m)).collect::<Result<Vec<_>>>()?;
            Client::pinned(&node)?.init(members).await?;
            println!("initialised; a leader will be elected within the election timeout");
            Ok(())
        }
        ClusterCommand::Status { nodes, wait_leader, json } => {
            let deadline = Instant::now() + Duration::from_secs(wait_leader.unwrap_or(0));
            let statuses = loop {
                let statuses = collect_status(&nodes.nodes).await;
                if wait_leader.is_none() || agreed_leader(&statuses).is_some() {
                    break statuses;
                }
                if Instant::now() >= deadline {
                    print_status(&statuses, json);
                    return Err(Error::Unavailable {
                        message: format!("no agreed leader after {}s", wait_leader.unwrap_or(0)),
                        leader: None,
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            print_status(&statuses, json);
            Ok(())
        }
        ClusterCommand::AddLearner { nodes, id, addr } => {
            let resp = Client::new(&nodes.nodes)?.add_learner(pb::Member { id, addr }).await?;
            println!(
                "log index {}: voters {} learners {}",
                resp.log_index,
                members(&resp.voters),
                members(&resp.learners)
            );
            Ok(())
        }
        ClusterCommand::ChangeMembership { nodes, voters, retain } => {
            let resp = Client::new(&nodes.nodes)?.change_membership(voters, retain).await?;
            println!(
                "log index {}: voters {} learners {}",
                resp.log_index,
                members(&resp.voters),
                members(&resp.learners)
            );
            Ok(())
        }
    }
}

fn print_status(statuses: &[(String, Result<pb::NodeStatus>)], json: bool) {
    if !json {
        println!(
            "{:<4} {:<22} {:<10} {:>5} {:>6} {:>9} {:>9} {:>9} {:>8}  membership",
            "id", "addr", "role", "term", "leader", "last_log", "applied", "snapshot", "records"
        );
    }
    for (addr, status) in statuses {
        match status {
            Ok(s) if json => println!(
                "{{\"id\":{},\"addr\":\"{}\",\"role\":\"{}\",\"term\":{},\"leader\":{},\"last_log_index\":{},\"applied_index\":{},\"initialized\":{},\"transactions_in_flight\":{},\"counters\":{}}}",
                s.id,
                s.addr,
                role_name(s.role),
                s.term,
                s.leader_id.map_or("null".into(), |l| l.to_string()),
                s.last_log_index.map_or("null".into(), |l| l.to_string()),
                s.applied_index.map_or("null".into(), |l| l.to_string()),
                s.initialized,
                s.transactions_in_flight,
                serde_json::to_string(&s.counters.iter().collect::<std::collections::BTreeMap<_, _>>())
                    .unwrap_or_default()
            ),
            Ok(s) => println!(
                "{:<4} {:<22} {:<10} {:>5} {:>6} {:>9} {:>9} {:>9} {:>8}  voters {}{}",
                s.id,
                s.addr,
                if s.initialized { role_name(s.role) } else { "uninit" },
                s.term,
                opt(s.leader_id),
                opt(s.last_log_index),
                opt(s.applied_index),
                opt(s.snapshot_index),
                s.records,
                members(&s.voters),
                if s.learners.is_empty() { String::new() } else { format!(" learners {}", members(&s.learners)) },
            ),
            Err(e) if json => println!("{{\"addr\":\"{addr}\",\"error\":{:?}}}", e.to_string()),
            Err(e) => println!("?    {addr:<22} unreachable: {e}"),
        }
    }
}

fn print_record(r: &tandem::txn::TxnRecord) {
    let decision = match &r.decision {
        Decision::Commit { branches, idempotency_key } => format!(
            "COMMIT branches={}{}",
            branches.iter().map(|b| b.participant.as_str()).collect::<Vec<_>>().join(","),
            idempotency_key.as_ref().map(|k| format!(" key={k}")).unwrap_or_default()
        ),
        Decision::Abort { reason } => format!("ABORT reason={reason:?}"),
    };
    println!(
        "{} {} {} decided_unix_ms={} completed_unix_ms={} log_index={}",
        r.txid,
        r.state(),
        decision,
        r.decided_unix_ms,
        opt(r.completed_unix_ms),
        r.decided_log_index
    );
}

async fn log(c: LogCommand) -> Result<()> {
    match c {
        LogCommand::Decide { nodes, txid, commit, idempotency_key, abort } => {
            let txid = TxId::parse(&txid)?;
            let decision = match (commit, abort) {
                (Some(branches), None) => {
                    Decision::Commit { branches: branches.into_iter().map(Branch::new).collect(), idempotency_key }
                }
                (None, Some(reason)) => Decision::Abort { reason },
                _ => return Err(Error::InvalidInput("give exactly one of --commit or --abort".into())),
            };
            let (won, record) = Client::new(&nodes.nodes)?.decide(&txid, &decision).await?;
            print!("{} ", if won { "won" } else { "lost" });
            print_record(&record);
            Ok(())
        }
        LogCommand::Complete { nodes, txid } => {
            let record = Client::new(&nodes.nodes)?.complete(&TxId::parse(&txid)?).await?;
            print_record(&record);
            Ok(())
        }
        LogCommand::Forget { nodes, older_than_s } => {
            let before = tandem::server::now_unix_ms().saturating_sub(older_than_s.saturating_mul(1000));
            let n = Client::new(&nodes.nodes)?.forget(before).await?;
            println!("forgot {n} records");
            Ok(())
        }
        LogCommand::Get { nodes, txid, local } => {
            let txid = TxId::parse(&txid)?;
            let mut client = if local { Client::pinned(&nodes.nodes[0])? } else { Client::new(&nodes.nodes)? };
            match client.get_record(&txid, local).await? {
                Some(r) => {
                    print_record(&r);
                    Ok(())
                }
                None => Err(Error::NotFound(format!("no decision recorded for txid {txid}"))),
            }
        }
        LogCommand::List { nodes, state, limit, after, local } => {
            let state = state.as_deref().map(RecordState::parse).transpose()?;
            let after = after.as_deref().map(TxId::parse).transpose()?;
            let mut client = if local { Client::pinned(&nodes.nodes[0])? } else { Client::new(&nodes.nodes)? };
            let page = client.list_records(state, after.as_ref(), limit, local).await?;
            for r in &page.records {
                print_record(r);
            }
            if let Some(next) = page.next_after {
                println!("(more: --after {next})");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use tandem::workload::bench::Mode;

    use super::*;

    fn bench_args(extra: &[&str]) -> std::result::Result<BenchArgs, clap::Error> {
        let argv = ["tandem", "bench", "--participants", "participants.toml"].into_iter().chain(extra.iter().copied());
        match Cli::try_parse_from(argv)?.command {
            Command::Bench(args) => Ok(args),
            _ => unreachable!("parsed as the bench command"),
        }
    }

    #[test]
    fn bench_empty_runs_the_decision_log_alone() {
        let args = bench_args(&["--empty"]).unwrap();
        assert_eq!(bench_modes(&args).unwrap(), vec![Mode::DecisionsOnly]);
        assert!(!Mode::DecisionsOnly.touches_databases());

        // Without it, every mode; with --modes, those.
        assert_eq!(bench_modes(&bench_args(&[]).unwrap()).unwrap(), Mode::ALL.to_vec());
        let args = bench_args(&["--modes", "tandem,bare_2pc"]).unwrap();
        assert_eq!(bench_modes(&args).unwrap(), vec![Mode::Tandem, Mode::Bare2pc]);
        assert!(args.modes.iter().all(|m| Mode::parse(m).unwrap().touches_databases()));

        // The two together are refused, as is an unknown mode.
        assert!(bench_args(&["--empty", "--modes", "tandem"]).is_err());
        assert!(bench_modes(&bench_args(&["--modes", "tandem,nope"]).unwrap()).is_err());
    }
}
