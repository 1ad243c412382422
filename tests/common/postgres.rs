//! Throwaway PostgreSQL servers for tests: `initdb` into a temporary
//! directory, `pg_ctl start` on a free port, `max_prepared_transactions` as
//! asked, stopped and removed on drop. As root, the server runs as the
//! `postgres` user (PostgreSQL refuses to run as root).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub struct PgServer {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    as_postgres: bool,
}

/// The directory of the machine's PostgreSQL server binaries.
fn pg_bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql")
        .map(|e| e.unwrap().path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().expect("initdb not found")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PgServer {
    pub fn start(max_prepared_transactions: u32) -> Self {
        let bin = pg_bin_dir();
        let dir = tempfile::Builder::new().prefix("tandem-pg-").tempdir().expect("temp dir");
        let as_postgres = is_root();
        if as_postgres {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()));
        }
        let port = super::free_port();
        let server = Self { dir, port, bin, as_postgres };
        server.pg(&["initdb", "-D", &server.data(), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]);
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_prepared_transactions={max_prepared_transactions} -c fsync=off",
            server.dir.path().display()
        );
        server.pg(&["pg_ctl", "-D", &server.data(), "-l", &server.log(), "-o", &options, "-w", "-t", "60", "start"]);
        server
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn log(&self) -> String {
        self.dir.path().join("server.log").display().to_string()
    }

    /// Runs a PostgreSQL binary, as the `postgres` user when we are root.
    fn pg(&self, args: &[&str]) {
        let program = self.bin.join(args[0]);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(&args[1..]);
        run(&mut cmd);
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a database.
    pub async fn create_database(&self, name: &str) {
        self.client("postgres").await.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    }

    /// A plain connection, for setting up and checking.
    pub async fn client(&self, database: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(database), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }

    /// `pg_ctl restart -m immediate`: a crash as far as PostgreSQL knows.
    pub fn restart_immediate(&self) {
        self.pg(&["pg_ctl", "-D", &self.data(), "-l", &self.log(), "-m", "immediate", "-w", "-t", "60", "restart"]);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let program = self.bin.join("pg_ctl");
        let data = self.data();
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(["-D", &data, "-m", "immediate", "-w", "stop"]).output().ok();
    }
}
