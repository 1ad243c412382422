//! A TCP proxy that misbehaves on demand, to put between the coordinator
//! and a participant (`tandem workload proxy`).
//!
//! It forwards every connection from `listen` to `to`. Its mode is read
//! from a control file (a word per file, re-read every 100 ms), so a script
//! can switch it while it runs:
//! - `pass`: forward as is;
//! - `delay MS`: hold every chunk MS milliseconds before passing it on;
//! - `drop`: pass nothing either way (connections stay open, silent);
//! - `reset`: close every connection and refuse new ones.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::error::Error;
use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Delay(u64),
    Drop,
    Reset,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Self> {
        let mut words = s.split_whitespace();
        match (words.next(), words.next()) {
            (Some("pass") | None, _) => Ok(Mode::Pass),
            (Some("delay"), Some(ms)) => {
                ms.parse().map(Mode::Delay).map_err(|_| Error::InvalidInput(format!("bad delay {ms:?}")))
            }
            (Some("drop"), _) => Ok(Mode::Drop),
            (Some("reset"), _) => Ok(Mode::Reset),
            _ => Err(Error::InvalidInput(format!("unknown proxy mode {s:?} (pass, delay MS, drop, reset)"))),
        }
    }
}

/// Runs the proxy until the process ends.
pub async fn run(listen: &str, to: &str, control: PathBuf) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let (mode_tx, mode_rx) = watch::channel(Mode::Pass);
    tokio::spawn(async move {
        let mut last = Mode::Pass;
        loop {
            let text = tokio::fs::read_to_string(&control).await.unwrap_or_default();
            match Mode::parse(text.trim()) {
                Ok(m) if m != last => {
                    tracing::info!(mode = ?m, "proxy mode");
                    last = m;
                    mode_tx.send(m).ok();
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "proxy control file"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let connections = Arc::new(AtomicU64::new(0));
    loop {
        let (client, _) = listener.accept().await?;
        if *mode_rx.borrow() == Mode::Reset {
            drop(client);
            continue;
        }
        let to = to.to_string();
        let mode = mode_rx.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            connections.fetch_add(1, Ordering::Relaxed);
            if let Ok(server) = TcpStream::connect(&to).await {
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::select! {
                    _ = pipe(cr, sw, mode.clone()) => {}
                    _ = pipe(sr, cw, mode) => {}
                }
            }
            connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Copies one direction, as the mode says; returns when either side closes
/// or the mode turns to `reset`.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = mode.changed() => {
                if *mode.borrow() == Mode::Reset {
                    return;
                }
                continue;
            }
        };
        // Wait while dropping; give up on reset.
        loop {
            let m = *mode.borrow();
            match m {
                Mode::Reset => return,
                Mode::Drop => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
                Mode::Delay(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    break;
                }
                Mode::Pass => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!(Mode::parse("").unwrap(), Mode::Pass);
        assert_eq!(Mode::parse("delay 250").unwrap(), Mode::Delay(250));
        assert_eq!(Mode::parse("drop").unwrap(), Mode::Drop);
        assert_eq!(Mode::parse("reset").unwrap(), Mode::Reset);
        assert!(Mode::parse("delay x").is_err());
        assert!(Mode::parse("shout").is_err());
    }
}
