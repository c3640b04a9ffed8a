//! SQL text for the tables, generated from the catalogue. Pure: no I/O.
//!
//! Guarantees: identifiers come only from the catalogue (never from requests), and
//! the conflict statements implement each table's policy on both backends:
//! insert-only keeps the stored row; newest-wins replaces it unless the incoming
//! version is older, and a keep-earliest column only ever moves back in time.

use crate::catalogue::{ConflictPolicy, TableSpec, Value};
use crate::config::Backend;

/// Column names of the table, comma-separated, in catalogue order.
pub fn column_list(spec: &TableSpec) -> String {
    spec.columns.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
}

fn key_list(spec: &TableSpec) -> String {
    spec.key.join(", ")
}

/// `COPY` straight into the table (the fast path): with the ids given, or left
/// to the column's default.
pub fn copy_into_table(spec: &TableSpec, with_ids: bool) -> String {
    let id = if with_ids { "id, " } else { "" };
    format!("COPY {} ({id}{}) FROM STDIN", spec.name, column_list(spec))
}

/// The per-connection staging table of the conflict path.
pub fn stage_name(spec: &TableSpec) -> String {
    format!("dwh_stage_{}", spec.name)
}

pub fn create_stage(spec: &TableSpec) -> String {
    let columns: Vec<String> = spec
        .columns
        .iter()
        .map(|c| format!("{} {}", c.name, c.ty.pg_type()))
        .collect();
    format!(
        "CREATE TEMP TABLE IF NOT EXISTS {} (dwh_ord bigint, {}) ON COMMIT DELETE ROWS",
        stage_name(spec),
        columns.join(", ")
    )
}

pub fn copy_into_stage(spec: &TableSpec) -> String {
    format!("COPY {} (dwh_ord, {}) FROM STDIN", stage_name(spec), column_list(spec))
}

/// The `ON CONFLICT` clause implementing the table's policy. Refers to the stored
/// row by the table's name, which both PostgreSQL and SQLite accept.
pub fn on_conflict(spec: &TableSpec, backend: Backend) -> String {
    let table = spec.name;
    let key = key_list(spec);
    match spec.policy {
        ConflictPolicy::InsertOnly => format!("ON CONFLICT ({key}) DO NOTHING"),
        ConflictPolicy::NewestWins { version, keep_earliest } => {
            // `newer` holds when the incoming version is not older than the stored one.
            let newer = version.map(|v| format!("{table}.{v} <= excluded.{v}"));
            let mut sets = Vec::new();
            for column in spec.columns.iter().filter(|c| !spec.key.contains(&c.name)) {
                let c = column.name;
                if Some(c) == keep_earliest {
                    let least = match backend {
                        Backend::Postgres => "LEAST",
                        Backend::Sqlite => "min",
                    };
                    sets.push(format!("{c} = {least}({table}.{c}, excluded.{c})"));
                } else if keep_earliest.is_some() {
                    // The update may happen only to move the earliest bound: then the
                    // other columns keep the stored, newer version.
                    let cond = newer.as_deref().unwrap_or("true");
                    sets.push(format!("{c} = CASE WHEN {cond} THEN excluded.{c} ELSE {table}.{c} END"));
                } else {
                    sets.push(format!("{c} = excluded.{c}"));
                }
            }
            sets.push(match (&newer, keep_earliest) {
                (Some(cond), Some(_)) => {
                    format!("ingested_at = CASE WHEN {cond} THEN excluded.ingested_at ELSE {table}.ingested_at END")
                }
                _ => "ingested_at = excluded.ingested_at".to_owned(),
            });
            let mut clause = format!("ON CONFLICT ({key}) DO UPDATE SET {}", sets.join(", "));
            let mut conditions: Vec<String> = newer.into_iter().collect();
            if let Some(e) = keep_earliest {
                conditions.push(format!("excluded.{e} < {table}.{e}"));
            }
            if !conditions.is_empty() {
                clause.push_str(&format!(" WHERE {}", conditions.join(" OR ")));
            }
            clause
        }
    }
}

/// PostgreSQL conflict path: moves the staged rows into the table. Within the batch
/// one version per key survives (the newest, or the first for insert-only), because
/// `ON CONFLICT DO UPDATE` may not touch a row twice in one statement. Returns `id`
/// and whether the row was inserted (`xmax = 0`) rather than updated.
pub fn merge_stage(spec: &TableSpec) -> String {
    let columns = column_list(spec);
    let key = key_list(spec);
    let stage = stage_name(spec);
    let (order, earliest) = match spec.policy {
        ConflictPolicy::InsertOnly => ("dwh_ord".to_owned(), None),
        ConflictPolicy::NewestWins {
            version: Some(v),
            keep_earliest,
        } => (format!("{v} DESC, dwh_ord DESC"), keep_earliest),
        ConflictPolicy::NewestWins {
            version: None,
            keep_earliest,
        } => ("dwh_ord DESC".to_owned(), keep_earliest),
    };
    let (window, projected) = match earliest {
        Some(e) => (
            format!(", min({e}) OVER (PARTITION BY {key}) AS dwh_earliest"),
            spec.columns
                .iter()
                .map(|c| {
                    if c.name == e {
                        format!("dwh_earliest AS {e}")
                    } else {
                        c.name.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
        ),
        None => (String::new(), columns.clone()),
    };
    // `DO NOTHING` returns inserted rows only; an update is told apart by `xmax`,
    // which partitioned tables (events_part, insert-only) cannot return.
    let inserted = match spec.policy {
        ConflictPolicy::InsertOnly => "true",
        ConflictPolicy::NewestWins { .. } => "(xmax = 0)",
    };
    format!(
        "INSERT INTO {table} ({columns}) \
         SELECT {projected} FROM (SELECT DISTINCT ON ({key}) *{window} FROM {stage} ORDER BY {key}, {order}) s \
         ORDER BY dwh_ord {conflict} RETURNING id, {inserted} AS inserted",
        table = spec.name,
        conflict = on_conflict(spec, Backend::Postgres),
    )
}

/// SQLite: one row, with `?` placeholders; `DO NOTHING` first tells inserts apart.
pub fn sqlite_insert(spec: &TableSpec, policy_clause: bool) -> String {
    let placeholders = vec!["?"; spec.columns.len()].join(", ");
    let conflict = if policy_clause {
        on_conflict(spec, Backend::Sqlite)
    } else {
        format!("ON CONFLICT ({}) DO NOTHING", key_list(spec))
    };
    format!(
        "INSERT INTO {} ({}) VALUES ({placeholders}) {conflict} RETURNING id",
        spec.name,
        column_list(spec)
    )
}

/// One value in PostgreSQL's COPY text format, appended to `out`.
pub fn push_copy_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("\\N"),
        Value::Bool(b) => out.push(if *b { 't' } else { 'f' }),
        Value::Text(text) => push_copy_escaped(out, text),
        Value::Json(_) => {
            // JSON text holds backslashes (its own escapes) but no raw control characters.
            let start = out.len();
            value.write_canonical(out);
            if out[start..].contains('\\') {
                let json = out.split_off(start);
                push_copy_escaped(out, &json);
            }
        }
        // Digits, signs, dots, dashes, colons: nothing to escape.
        _ => {
            value.write_canonical(out);
        }
    }
}

/// `text` with COPY's specials (backslash, newline, carriage return, tab) escaped.
fn push_copy_escaped(out: &mut String, text: &str) {
    if !text.bytes().any(|b| matches!(b, b'\\' | b'\n' | b'\r' | b'\t')) {
        out.push_str(text);
        return;
    }
    for ch in text.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Table;

    #[test]
    fn insert_only_tables_do_nothing_on_conflict() {
        assert_eq!(
            on_conflict(Table::UserLocations.spec(), Backend::Postgres),
            "ON CONFLICT (uuid) DO NOTHING"
        );
    }

    #[test]
    fn newest_wins_updates_only_from_newer_versions() {
        let sql = on_conflict(Table::PermanentUserProperties.spec(), Backend::Postgres);
        assert!(sql.starts_with("ON CONFLICT (application_id, profile_id) DO UPDATE SET appmetrica_device_id = excluded.appmetrica_device_id"), "{sql}");
        assert!(
            sql.ends_with(" WHERE permanent_user_properties.updated_at <= excluded.updated_at"),
            "{sql}"
        );
        assert!(!sql.contains("profile_id = excluded"), "keys are not updated: {sql}");
    }

    #[test]
    fn devices_keep_the_earliest_first_seen() {
        let sql = on_conflict(Table::MobileDevices.spec(), Backend::Sqlite);
        assert!(
            sql.contains("first_seen_at = min(mobile_devices.first_seen_at, excluded.first_seen_at)"),
            "{sql}"
        );
        assert!(sql.contains("os_name = CASE WHEN mobile_devices.last_seen_at <= excluded.last_seen_at THEN excluded.os_name ELSE mobile_devices.os_name END"), "{sql}");
        assert!(sql.ends_with("WHERE mobile_devices.last_seen_at <= excluded.last_seen_at OR excluded.first_seen_at < mobile_devices.first_seen_at"), "{sql}");
        assert!(on_conflict(Table::MobileDevices.spec(), Backend::Postgres).contains("LEAST("));
    }

    #[test]
    fn arrival_order_tables_always_update() {
        let sql = on_conflict(Table::TmpUserProperties.spec(), Backend::Postgres);
        assert!(!sql.contains("WHERE"), "{sql}");
        assert!(sql.ends_with("ingested_at = excluded.ingested_at"), "{sql}");
    }

    #[test]
    fn merge_picks_one_version_per_key() {
        let sql = merge_stage(Table::MobileDevices.spec());
        assert!(
            sql.contains("DISTINCT ON (application_id, appmetrica_device_id)"),
            "{sql}"
        );
        assert!(
            sql.contains("ORDER BY application_id, appmetrica_device_id, last_seen_at DESC, dwh_ord DESC"),
            "{sql}"
        );
        assert!(
            sql.contains("min(first_seen_at) OVER (PARTITION BY application_id, appmetrica_device_id)"),
            "{sql}"
        );
        assert!(sql.contains("dwh_earliest AS first_seen_at"), "{sql}");
        let sql = merge_stage(Table::EventsPart.spec());
        assert!(
            sql.contains("ORDER BY application_id, event_date, event_hash, dup_seq, dwh_ord)"),
            "{sql}"
        );
    }

    #[test]
    fn copy_text_escapes_specials_and_nulls() {
        let mut out = String::new();
        for v in [
            Value::Text("a\tb\\c\nd\re".into()),
            Value::Null,
            Value::Bool(true),
            Value::Int(-3),
            Value::Text("plain".into()),
            Value::Json(serde_json::json!({"q": "say \"hi\"\n", "n": 1})),
            Value::Json(serde_json::json!([1, "two"])),
        ] {
            push_copy_value(&mut out, &v);
            out.push('|');
        }
        assert_eq!(
            out,
            "a\\tb\\\\c\\nd\\re|\\N|t|-3|plain|{\"n\":1,\"q\":\"say \\\\\"hi\\\\\"\\\\n\"}|[1,\"two\"]|"
        );
    }
}
