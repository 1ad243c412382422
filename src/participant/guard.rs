//! Refuses client statements that would take a branch's transaction out of
//! the coordinator's hands.
//!
//! A branch is one local transaction that Tandem begins, prepares and
//! commits; a client statement that begins, ends or prepares a transaction
//! itself (or changes its characteristics) would break that, so it is
//! refused before it reaches a participant. Savepoints are fine: they stay
//! inside the branch. So is `SET LOCAL`; a session-level `SET` or `RESET` is
//! refused, with an error that says to use `SET LOCAL`: it would set the
//! branch's session, which the participant resets when the branch ends (a
//! `set_config(…, false)` that gets past this check is undone there). So
//! are the commands that act on the session and that reset does not undo:
//! SQL-level `PREPARE`, `DEALLOCATE` (which would drop the participant's
//! own prepared statements), `DISCARD` and `LOAD`.
//!
//! Only the first statement of the text matters: statements run through the
//! extended protocol, which refuses several commands in one request, and
//! PostgreSQL refuses transaction control inside `DO` blocks and procedures
//! called within a transaction block.

use crate::error::Error;
use crate::error::Result;

/// `Err(InvalidInput)` naming the keyword if `sql` controls the transaction.
pub fn refuse_transaction_control(sql: &str) -> Result<()> {
    let mut words = keywords(sql);
    let first = words.next().unwrap_or_default();
    let second = words.next().unwrap_or_default();
    let refused = match first.as_str() {
        "BEGIN" | "COMMIT" | "END" | "ABORT" => true,
        // ROLLBACK TO [SAVEPOINT] stays inside the branch.
        "ROLLBACK" => second != "TO",
        "START" => second == "TRANSACTION",
        "PREPARE" if second == "TRANSACTION" => true,
        // Session-level commands: a prepared statement, a deallocation, a
        // discarded plan cache or a loaded library would act on a pooled
        // connection, shared with other clients' branches, past this one.
        "PREPARE" | "DEALLOCATE" | "DISCARD" | "LOAD" => {
            return Err(Error::InvalidInput(format!(
                "statement {first} acts on the session of a pooled connection, which later branches of other \
                 transactions share; a branch may send only statements of its own transaction"
            )));
        }
        "SET" if second == "TRANSACTION" || second == "SESSION" => true,
        // A branch runs on a pooled connection whose session is not the
        // client's: the setting belongs to the branch's transaction.
        "SET" | "RESET" if second != "LOCAL" && second != "CONSTRAINTS" => {
            return Err(Error::InvalidInput(format!(
                "statement {first} {second} changes a session setting, but a branch's session is a pooled \
                 connection's, reset when the branch ends; use SET LOCAL"
            )));
        }
        _ => false,
    };
    if refused {
        let shown = if second.is_empty() { first } else { format!("{first} {second}") };
        return Err(Error::InvalidInput(format!(
            "statement starts with {shown}: Tandem begins, prepares and ends each branch's transaction itself; \
             send only the statements inside it (savepoints are fine)"
        )));
    }
    Ok(())
}

/// The leading keywords of `sql`, upper-cased, skipping whitespace and
/// comments (`-- …` and nested `/* … */`).
fn keywords(sql: &str) -> impl Iterator<Item = String> + '_ {
    let mut rest = sql;
    std::iter::from_fn(move || {
        loop {
            rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix("--") {
                rest = after.find('\n').map_or("", |i| &after[i + 1..]);
            } else if rest.starts_with("/*") {
                rest = skip_block_comment(rest);
            } else {
                break;
            }
        }
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        if end == 0 {
            return None;
        }
        let word = rest[..end].to_ascii_uppercase();
        rest = &rest[end..];
        Some(word)
    })
}

/// Skips one (possibly nested) block comment at the start of `s`.
fn skip_block_comment(s: &str) -> &str {
    let mut depth = 0;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return &s[i..];
                }
            }
            _ => i += 1,
        }
    }
    // An unterminated comment: nothing follows it.
    ""
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_control_is_refused() {
        for sql in [
            "BEGIN",
            "begin transaction isolation level serializable",
            "START TRANSACTION",
            "COMMIT",
            "commit prepared 'x'",
            "END",
            "ROLLBACK",
            "rollback prepared 'tdm_x_1_0'",
            "ABORT",
            "PREPARE TRANSACTION 'x'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "set session characteristics as transaction read only",
            "  -- a comment\n  COMMIT",
            "/* one /* nested */ comment */ COMMIT",
            "\n\tBeGiN;",
        ] {
            let err = refuse_transaction_control(sql).unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)), "{sql:?}");
        }
    }

    #[test]
    fn session_settings_and_commands_are_refused() {
        for sql in [
            "SET search_path TO app",
            "set statement_timeout = 0",
            "RESET ALL",
            "SET SESSION foo = 1",
            "PREPARE q AS SELECT 1",
            "DEALLOCATE ALL",
            "deallocate prepare s0",
            "DISCARD PLANS",
            "LOAD 'auto_explain'",
        ] {
            let err = refuse_transaction_control(sql).unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)), "{sql:?}");
        }
    }

    #[test]
    fn ordinary_statements_and_savepoints_pass() {
        for sql in [
            "UPDATE balances SET balance = balance - $1 WHERE id = $2",
            "SELECT 1",
            "SAVEPOINT s1",
            "ROLLBACK TO SAVEPOINT s1",
            "rollback to s1",
            "RELEASE SAVEPOINT s1",
            "EXECUTE q",
            "SET LOCAL statement_timeout = '1s'",
            "set constraints all deferred",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "INSERT INTO log (msg) VALUES ('COMMIT')",
            "-- COMMIT\nSELECT 1",
            "/* BEGIN */ SELECT 1",
            "",
            "   ",
        ] {
            assert!(refuse_transaction_control(sql).is_ok(), "{sql:?}");
        }
    }
}
