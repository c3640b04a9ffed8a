//! The store's errors, and the one place where database error codes are mapped.

use super::chunk::Oversized;

/// What can go wrong talking to the DWH.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refuses work for now: retry later.
    // The cause is in the message, not also a `source`: a chain printed with
    // `{:#}` then names it once.
    #[error("database unreachable: {0}")]
    Unavailable(sqlx::Error),
    /// The offset row did not start where the batch did: another consumer owns the
    /// partition now. Nothing of the batch was written.
    #[error(
        "offset fenced: group {group_id} {topic}[{partition}] batch starts at {batch_start} \
         but the stored next offset is {}",
        stored.map_or("absent".to_owned(), |s| s.to_string())
    )]
    Fenced {
        group_id: String,
        topic: String,
        partition: i32,
        batch_start: i64,
        stored: Option<i64>,
    },
    /// A row larger than a statement may be.
    #[error(transparent)]
    Oversized(#[from] Oversized),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database holds a migration a newer release applied and marked
    /// breaking: this release cannot work on that schema.
    #[error(
        "the database has migration {version} ({description}) from a newer release, marked breaking: \
         this release cannot work on its schema; run a release that has it"
    )]
    BreakingMigrationAhead { version: i64, description: String },
    /// The database refused the data of a row: a value it cannot store or a
    /// constraint it violates. Retrying the same rows fails the same way.
    #[error("the database refused the data: {0}")]
    Refused(sqlx::Error),
    /// The database refuses the rows of a batch for a reason of the table's, not
    /// of the rows': a column added NOT NULL without a default, or every row of
    /// the batch refused for the one same reason (a new constraint, a column's
    /// type changed). Nothing is rejected: the batch is retried until the table
    /// accepts it.
    #[error(
        "the table refuses the rows, for a reason of the table's and not of the data ({why}): {message}; \
         nothing was rejected, the batch is retried until the table accepts it"
    )]
    TableRefuses { why: String, message: String },
    /// Any other database error: a missing permission, a read-only or full
    /// database, a timeout, a schema out of step with this release. Nothing in the
    /// data is wrong; the same batch may land once the cause is fixed.
    #[error("database error: {0}")]
    Database(sqlx::Error),
}

impl StoreError {
    /// Whether the same work may succeed when tried again later without anybody
    /// acting (the database is away or busy).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// Whether the error belongs to the data written, not to the database.
    pub fn is_refused(&self) -> bool {
        matches!(self, StoreError::Refused(_))
    }
}

/// What a refusal is about, to tell one reason from another: the SQLSTATE (or
/// SQLite's code and message, which names no value) and the objects the
/// database names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    code: String,
    constraint: Option<String>,
    column: Option<String>,
    /// SQLite names the column only in its message.
    message: Option<String>,
}

impl Refusal {
    /// The reason of a [`StoreError::Refused`] from the database; `None` for any
    /// other error.
    pub(super) fn of(e: &StoreError) -> Option<Refusal> {
        let StoreError::Refused(sqlx::Error::Database(db)) = e else {
            return None;
        };
        let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
        if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
            return Some(Refusal {
                code,
                constraint: None,
                column: None,
                message: Some(db.message().to_owned()),
            });
        }
        let column = db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .and_then(|pg| pg.column())
            .map(str::to_owned);
        Some(Refusal {
            code,
            constraint: db.constraint().map(str::to_owned),
            column,
            message: None,
        })
    }

    /// The column a NOT NULL refusal names, when it is not one of `columns`:
    /// a column this release does not write, so no row of it can ever land.
    pub(super) fn foreign_not_null(&self, columns: &[&str]) -> Option<&str> {
        let column = match (&self.column, &self.message) {
            (Some(column), _) if self.code == NOT_NULL_VIOLATION => column.as_str(),
            // SQLITE_CONSTRAINT_NOTNULL: "NOT NULL constraint failed: table.column".
            (None, Some(message)) if self.code == "1299" => message.rsplit('.').next()?,
            _ => return None,
        };
        (!columns.contains(&column)).then_some(column)
    }

    /// Whether a constraint refused the row (SQLSTATE class 23, SQLite's
    /// CONSTRAINT codes), not its value alone.
    pub(super) fn is_constraint(&self) -> bool {
        match self.message {
            Some(_) => self.code.parse::<u32>().is_ok_and(|c| c & 0xff == 19),
            None => self.code.starts_with("23"),
        }
    }

    /// How the reason reads in an error: its code and the objects named.
    pub(super) fn describe(&self) -> String {
        let mut out = format!("SQLSTATE {}", self.code);
        if let Some(constraint) = &self.constraint {
            out.push_str(&format!(", constraint {constraint}"));
        }
        if let Some(column) = &self.column {
            out.push_str(&format!(", column {column}"));
        }
        out
    }
}

/// PostgreSQL SQLSTATE of a NOT NULL violation.
const NOT_NULL_VIOLATION: &str = "23502";

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            StoreError::Unavailable(e)
        } else if is_data_error(&e) {
            StoreError::Refused(e)
        } else {
            StoreError::Database(e)
        }
    }
}

/// SQLite primary result codes that belong to the data: TOOBIG, CONSTRAINT, MISMATCH.
const SQLITE_DATA_CODES: [u32; 3] = [18, 19, 20];

/// Errors that belong to the row written, so that rejecting the row is right:
/// PostgreSQL's SQLSTATE classes 22 (data exception) and 23 (integrity constraint
/// violation), SQLite's TOOBIG, CONSTRAINT and MISMATCH. Everything else (a
/// permission, a read-only transaction, a full disk, a timeout) is about the
/// database, and rejecting good rows for it would move them out of their table.
fn is_data_error(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    let code = db.code();
    let code = code.as_deref().unwrap_or_default();
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        return code
            .parse::<u32>()
            .is_ok_and(|c| SQLITE_DATA_CODES.contains(&(c & 0xff)));
    }
    code.starts_with("22") || code.starts_with("23")
}

/// PostgreSQL SQLSTATE of a unique violation.
pub const UNIQUE_VIOLATION: &str = "23505";

pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some(UNIQUE_VIOLATION))
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or_default();
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // SQLITE_BUSY (5) and SQLITE_LOCKED (6), possibly as extended codes.
                return code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6));
            }
            // Class 08: connection exceptions; class 28 and 3D000: the server refuses
            // the login or has no such database (a configuration to fix, never the
            // request's fault); 57P0x: shutdown / cannot connect now; 53300: too
            // many connections; 40001/40P01: serialization / deadlock.
            code.starts_with("08")
                || code.starts_with("28")
                || matches!(
                    code,
                    "3D000" | "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
                )
        }
        _ => false,
    }
}
