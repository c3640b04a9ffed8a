//! The DWH writer against real databases: PostgreSQL (bulk path and conflict path)
//! and SQLite, with the same assertions on both.

mod common;

use common::{dwh, events, Db};
use dwh_helper::catalogue::{decode_json, Row, Table};
use dwh_helper::store::{Batch, Dwh, OffsetAdvance, Origin, Origins, ReadQuery, RejectedRecord, StoreError};
use serde_json::{json, Value};

const BOTH: [Db; 2] = [Db::Postgres, Db::Sqlite];

fn rows(table: Table, records: &[Value]) -> Vec<Row> {
    records
        .iter()
        .map(|r| decode_json(table, r.clone()).expect("valid record").row)
        .collect()
}

async fn read_all(dwh: &Dwh, table: Table) -> Vec<serde_json::Map<String, Value>> {
    dwh.read(
        table,
        &ReadQuery {
            filters: vec![],
            after_id: None,
            limit: 10_000,
            max_bytes: usize::MAX,
        },
    )
    .await
    .expect("read")
    .rows
}

#[tokio::test]
async fn insert_only_writes_once_and_ignores_redelivery() {
    for db in BOTH {
        let (dwh, _, _guard) = dwh(db, &[]).await;
        let batch = rows(Table::EventsPart, &events(300, 1));
        let first = dwh.write(Batch::rows(Table::EventsPart, &batch)).await.expect("write");
        assert_eq!(first.inserted_ids.len(), 300, "{db:?}");
        let mut ids = first.inserted_ids.clone();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 300, "{db:?}: ids are distinct");

        // The same records again, plus 50 new ones: only the new ones land.
        let mut again = events(300, 1);
        again.extend(events(50, 2));
        let second = dwh
            .write(Batch::rows(Table::EventsPart, &rows(Table::EventsPart, &again)))
            .await
            .expect("write");
        assert_eq!(second.inserted_ids.len(), 50, "{db:?}");
        assert!(
            second.inserted_ids.iter().all(|id| !first.inserted_ids.contains(id)),
            "{db:?}"
        );
        assert_eq!(read_all(&dwh, Table::EventsPart).await.len(), 350, "{db:?}");
    }
}

#[tokio::test]
async fn two_versions_of_a_key_in_one_batch_do_not_fail_it() {
    for db in BOTH {
        let (dwh, _, _guard) = dwh(db, &[]).await;
        // Insert-only: the first version in the batch stays.
        let loc = |city: &str| json!({"uuid": "11111111-1111-4111-8111-111111111111", "event_time": 0, "latitude": 1, "longitude": 2, "city": city});
        let batch = rows(Table::UserLocations, &[loc("first"), loc("second")]);
        let out = dwh
            .write(Batch::rows(Table::UserLocations, &batch))
            .await
            .expect("write");
        assert_eq!(out.inserted_ids.len(), 1, "{db:?}");
        let stored = read_all(&dwh, Table::UserLocations).await;
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0]["city"], "first", "{db:?}");

        // Newest-wins: the newest version in the batch wins, whatever its position.
        let profile =
            |ts: &str, name: &str| json!({"application_id": 1, "profile_id": "p", "name": name, "updated_at": ts});
        let batch = rows(
            Table::PermanentUserProperties,
            &[
                profile("2024-01-02T00:00:00Z", "middle"),
                profile("2024-01-03T00:00:00Z", "newest"),
                profile("2024-01-01T00:00:00Z", "oldest"),
            ],
        );
        dwh.write(Batch::rows(Table::PermanentUserProperties, &batch))
            .await
            .expect("write");
        let stored = read_all(&dwh, Table::PermanentUserProperties).await;
        assert_eq!(stored.len(), 1, "{db:?}");
        assert_eq!(stored[0]["name"], "newest", "{db:?}");
    }
}

#[tokio::test]
async fn newest_wins_never_goes_back_in_time() {
    for db in BOTH {
        let (dwh, _, _guard) = dwh(db, &[]).await;
        let profile = |ts: &str, gender: &str| {
            rows(
                Table::PermanentUserProperties,
                &[json!({"application_id": 7, "profile_id": "u1", "gender": gender, "updated_at": ts})],
            )
        };
        let write = |r: Vec<Row>| {
            let dwh = dwh.clone();
            async move {
                dwh.write(Batch::rows(Table::PermanentUserProperties, &r))
                    .await
                    .expect("write")
            }
        };
        let inserted = write(profile("2024-05-01T00:00:00Z", "f")).await;
        assert_eq!((inserted.inserted_ids.len(), inserted.updated), (1, 0), "{db:?}");
        let older = write(profile("2024-04-01T00:00:00Z", "m")).await;
        assert_eq!(
            (older.inserted_ids.len(), older.updated),
            (0, 0),
            "{db:?}: older version ignored"
        );
        assert_eq!(read_all(&dwh, Table::PermanentUserProperties).await[0]["gender"], "f");
        let newer = write(profile("2024-06-01T00:00:00Z", "x")).await;
        assert_eq!(
            (newer.inserted_ids.len(), newer.updated),
            (0, 1),
            "{db:?}: newer version replaces"
        );
        let stored = read_all(&dwh, Table::PermanentUserProperties).await;
        assert_eq!(stored[0]["gender"], "x", "{db:?}");
        assert_eq!(stored[0]["updated_at"], "2024-06-01T00:00:00Z", "{db:?}");
    }
}

#[tokio::test]
async fn devices_keep_newest_fields_and_earliest_first_seen() {
    for db in BOTH {
        let (dwh, _, _guard) = dwh(db, &[]).await;
        let device = |first: &str, last: &str, model: &str| {
            json!({"application_id": 1, "appmetrica_device_id": "18446744073709551615",
                   "first_seen_at": first, "last_seen_at": last, "device_model": model})
        };
        for batch in [
            vec![device("2024-03-05T00:00:00Z", "2024-03-10T00:00:00Z", "Pixel 7")],
            // Older sighting: first_seen moves back, the newer model stays.
            vec![device("2024-03-01T00:00:00Z", "2024-03-02T00:00:00Z", "Pixel 6")],
            // Newer sighting in the same batch as an even older one.
            vec![
                device("2024-03-12T00:00:00Z", "2024-03-20T00:00:00Z", "Pixel 8"),
                device("2024-02-01T00:00:00Z", "2024-02-02T00:00:00Z", "Pixel 5"),
            ],
        ] {
            dwh.write(Batch::rows(Table::MobileDevices, &rows(Table::MobileDevices, &batch)))
                .await
                .expect("write");
        }
        let stored = read_all(&dwh, Table::MobileDevices).await;
        assert_eq!(stored.len(), 1, "{db:?}");
        assert_eq!(stored[0]["device_model"], "Pixel 8", "{db:?}");
        assert_eq!(stored[0]["first_seen_at"], "2024-02-01T00:00:00Z", "{db:?}");
        assert_eq!(stored[0]["last_seen_at"], "2024-03-20T00:00:00Z", "{db:?}");
        assert_eq!(
            stored[0]["appmetrica_device_id"], "18446744073709551615",
            "{db:?}: exact digits"
        );
    }
}

#[tokio::test]
async fn user_properties_take_the_latest_write() {
    for db in BOTH {
        let (dwh, _, _guard) = dwh(db, &[]).await;
        let prop = |v: &str| {
            json!({"application_id": 1, "profile_id": "p", "property_name": "plan", "property_kind": "temporary",
                   "value_text": v, "snapshot_date": "2024-03-01", "source": "test"})
        };
        for v in ["gold", "silver"] {
            dwh.write(Batch::rows(
                Table::TmpUserProperties,
                &rows(Table::TmpUserProperties, &[prop(v)]),
            ))
            .await
            .expect("write");
        }
        let stored = read_all(&dwh, Table::TmpUserProperties).await;
        assert_eq!(stored.len(), 1, "{db:?}");
        assert_eq!(stored[0]["value_text"], "silver", "{db:?}");
    }
}

fn advance(partition: i32, from: i64, to: i64) -> OffsetAdvance {
    OffsetAdvance {
        group_id: "g".into(),
        topic: "dwh.events_part".into(),
        partition,
        from,
        to,
    }
}

#[tokio::test]
async fn a_fenced_offset_rolls_back_rows_and_rejects_too() {
    for db in BOTH {
        let (dwh, _, _guard) = dwh(db, &[]).await;
        let reject = |offset| RejectedRecord {
            table: Table::EventsPart,
            topic: "dwh.events_part".into(),
            partition: 0,
            offset,
            key: Some(b"k".to_vec()),
            payload: b"{oops".to_vec(),
            reason: "record is not valid JSON".into(),
            class: "invalid_json",
        };
        let first = rows(Table::EventsPart, &events(10, 1));
        let rejects = [reject(10)];
        let ok = dwh
            .write(Batch {
                table: Table::EventsPart,
                rows: &first,
                rejects: &rejects,
                offsets: &[advance(0, 0, 11)],
                origins: None,
                gaps: &[],
                identity: None,
            })
            .await
            .expect("first batch");
        assert_eq!(ok.inserted_ids.len(), 10);
        assert_eq!(
            dwh.stored_offset("g", "dwh.events_part", 0).await.expect("read"),
            Some(11)
        );

        // A consumer that lost the partition still believes it starts at 0.
        let stale = rows(Table::EventsPart, &events(5, 2));
        let stale_rejects = [reject(3)];
        let err = dwh
            .write(Batch {
                table: Table::EventsPart,
                rows: &stale,
                rejects: &stale_rejects,
                offsets: &[advance(1, 0, 4), advance(0, 0, 6)],
                origins: None,
                gaps: &[],
                identity: None,
            })
            .await
            .expect_err("fenced");
        assert!(
            matches!(
                err,
                StoreError::Fenced {
                    partition: 0,
                    batch_start: 0,
                    stored: Some(11),
                    ..
                }
            ),
            "{db:?}: {err}"
        );
        assert_eq!(
            err.to_string(),
            "offset fenced: group g dwh.events_part[0] batch starts at 0 but the stored next offset is 11"
        );
        assert_eq!(
            read_all(&dwh, Table::EventsPart).await.len(),
            10,
            "{db:?}: no row of the fenced batch"
        );
        assert_eq!(
            dwh.stored_offset("g", "dwh.events_part", 1).await.expect("read"),
            None,
            "{db:?}: nor its other offsets"
        );
        assert_eq!(count_rejects(&dwh).await, 1, "{db:?}: nor its rejects");

        // The owner continues from where it stopped.
        dwh.write(Batch {
            table: Table::EventsPart,
            rows: &stale,
            rejects: &[],
            offsets: &[advance(0, 11, 16)],
            origins: None,
            gaps: &[],
            identity: None,
        })
        .await
        .expect("owner continues");
        assert_eq!(
            dwh.stored_offset("g", "dwh.events_part", 0).await.expect("read"),
            Some(16)
        );
    }
}

async fn count_rejects(dwh: &Dwh) -> i64 {
    dwh.count_rows("dwh_rejected_records").await.expect("count")
}

#[tokio::test]
async fn statements_are_chunked_by_rows_and_bytes() {
    for db in BOTH {
        let (by_rows, _, _guard) = dwh(db, &[("DWH_MAX_ROWS_PER_INSERT", "100")]).await;
        let out = by_rows
            .write(Batch::rows(
                Table::EventsPart,
                &rows(Table::EventsPart, &events(250, 1)),
            ))
            .await
            .expect("write");
        assert_eq!((out.inserted_ids.len(), out.statements), (250, 3), "{db:?}");
        // The row bound is the API's: a batch of the ingest (with origins) is bounded
        // by KAFKA_BATCH_MAX_ROWS already, and goes in one statement.
        let out = by_rows
            .write(ingest_batch(&rows(Table::EventsPart, &events(250, 2)), &mut Vec::new()))
            .await
            .expect("write");
        assert_eq!((out.inserted, out.statements), (250, 1), "{db:?}");

        // The byte bound holds for both.
        let (dwh, _, _guard) = dwh(db, &[("DWH_MAX_WRITE_BATCH_BYTES", "2048")]).await;
        let batch = rows(Table::EventsPart, &events(40, 1));
        let per_row = batch[0].approx_bytes();
        let out = dwh.write(Batch::rows(Table::EventsPart, &batch)).await.expect("write");
        let expected = 40usize.div_ceil(2048 / per_row);
        assert_eq!(
            (out.inserted_ids.len(), out.statements),
            (40, expected),
            "{db:?}: {per_row} bytes a row"
        );
        let out = dwh
            .write(ingest_batch(&rows(Table::EventsPart, &events(40, 2)), &mut Vec::new()))
            .await
            .expect("write");
        assert_eq!((out.inserted, out.statements), (40, expected), "{db:?}");
    }
}

/// `rows` as the ingest writes them: with origins (offsets from 0).
fn ingest_batch<'a>(rows: &'a [Row], origins: &'a mut Vec<Origin>) -> Batch<'a> {
    *origins = (0..rows.len() as i64)
        .map(|offset| Origin { partition: 0, offset })
        .collect();
    Batch {
        origins: Some(Origins {
            topic: "dwh.events_part",
            rows: origins,
        }),
        gaps: &[],
        identity: None,
        ..Batch::rows(Table::EventsPart, rows)
    }
}

#[tokio::test]
async fn every_table_round_trips_typed_values() {
    /// A table, a record as a producer sends it, and stored values to expect.
    type Sample = (Table, Value, Vec<(&'static str, Value)>);
    let samples: Vec<Sample> = vec![
        (
            Table::EventsPart,
            json!({"application_id": "4242", "event_name": "open", "event_timestamp": "1709296200",
                   "event_datetime": "2024-03-01 12:30:00", "appmetrica_device_id": "12345678901234567890", "mcc": "250"}),
            vec![
                ("application_id", json!(4242)),
                ("event_date", json!("2024-03-01")),
                ("mcc", json!(250)),
                ("event_datetime", json!("2024-03-01T12:30:00")),
                ("appmetrica_device_id", json!("12345678901234567890")),
                ("dup_seq", json!(0)),
                ("os_name", Value::Null),
            ],
        ),
        (
            Table::MobileDevices,
            json!({"application_id": 1, "appmetrica_device_id": 5, "last_seen_at": 1709296200, "app_build_number": "77"}),
            vec![
                ("first_seen_at", json!("2024-03-01T12:30:00Z")),
                ("app_build_number", json!(77)),
            ],
        ),
        (
            Table::PermanentUserProperties,
            json!({"application_id": 1, "profile_id": "p", "notifications_enabled": "true",
                   "first_session_date": "2024-01-02", "updated_at": "2024-03-01T15:30:00+03:00"}),
            vec![
                ("notifications_enabled", json!(true)),
                ("first_session_date", json!("2024-01-02")),
                ("updated_at", json!("2024-03-01T12:30:00Z")),
            ],
        ),
        (
            Table::TechnicalData,
            json!({"uuid": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "app": 5, "event_type": "click",
                   "server_upload_time": "2024-03-01 10:00:00.123", "data": {"nested": [1, "two", null]},
                   "paying": false, "sample_rate": "0.25"}),
            vec![
                ("uuid", json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
                ("data", json!({"nested": [1, "two", null]})),
                ("paying", json!(false)),
                ("sample_rate", json!(0.25)),
                ("server_upload_time", json!("2024-03-01T10:00:00.123")),
            ],
        ),
        (
            Table::TmpEventProperties,
            json!({"application_id": 1, "event_hash": "h", "event_name": "buy", "event_timestamp": 1709296200,
                   "properties": "{\"sum\": 10.5, \"items\": [\"a\"]}", "source": "appmetrica"}),
            vec![
                ("properties", json!({"sum": 10.5, "items": ["a"]})),
                ("event_date", json!("2024-03-01")),
                ("raw_properties", Value::Null),
            ],
        ),
        (
            Table::TmpUserProperties,
            json!({"application_id": 1, "profile_id": "p", "property_name": "tags", "property_kind": "permanent",
                   "value_json": ["x", "y"], "snapshot_date": "2024-03-01", "source": "appmetrica"}),
            vec![("value_json", json!(["x", "y"])), ("property_kind", json!("permanent"))],
        ),
        (
            Table::UserLocations,
            json!({"uuid": "b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "event_time": "2024-03-01T10:00:00Z",
                   "latitude": "-33.8688", "longitude": 151.2093, "city": "Sydney\ttab\\slash\nline"}),
            vec![
                ("latitude", json!(-33.8688)),
                ("longitude", json!(151.2093)),
                ("city", json!("Sydney\ttab\\slash\nline")),
                ("event_time", json!("2024-03-01T10:00:00")),
            ],
        ),
    ];
    for db in BOTH {
        let (dwh, _, _guard) = dwh(db, &[]).await;
        for (table, record, expect) in &samples {
            let out = dwh
                .write(Batch::rows(*table, &rows(*table, std::slice::from_ref(record))))
                .await
                .expect("write");
            assert_eq!(out.inserted_ids.len(), 1, "{db:?} {table}");
            let stored = read_all(&dwh, *table).await;
            assert_eq!(stored.len(), 1, "{db:?} {table}");
            assert_eq!(stored[0]["id"], json!(out.inserted_ids[0]), "{db:?} {table}");
            assert!(stored[0]["ingested_at"].is_string(), "{db:?} {table}");
            for (column, value) in expect {
                assert_eq!(&stored[0][*column], value, "{db:?} {table}.{column}");
            }
        }
    }
}

#[tokio::test]
async fn reads_filter_on_key_columns_and_page_by_id() {
    for db in BOTH {
        let (dwh, _, _guard) = dwh(db, &[]).await;
        let batch = rows(Table::EventsPart, &events(30, 0));
        let out = dwh.write(Batch::rows(Table::EventsPart, &batch)).await.expect("write");
        let spec = Table::EventsPart.spec();
        let column = spec.column("event_date").expect("column");
        let page = dwh
            .read(
                Table::EventsPart,
                &ReadQuery {
                    filters: vec![(
                        column,
                        dwh_helper::catalogue::Value::Date(chrono::NaiveDate::from_ymd_opt(2024, 3, 1).expect("date")),
                    )],
                    after_id: Some(out.inserted_ids[9]),
                    limit: 5,
                    max_bytes: usize::MAX,
                },
            )
            .await
            .expect("read")
            .rows;
        let ids: Vec<i64> = page.iter().map(|r| r["id"].as_i64().expect("id")).collect();
        assert_eq!(ids, out.inserted_ids[10..15].to_vec(), "{db:?}");
    }
}

#[tokio::test]
async fn events_get_a_partition_per_month_before_writing() {
    let (dwh, config, _) = dwh(Db::Postgres, &[]).await;
    let pool = sqlx::PgPool::connect(config.database_url.expose())
        .await
        .expect("connect");
    let month =
        |ts: i64| json!({"application_id": 1, "event_name": "e", "event_timestamp": ts, "appmetrica_device_id": 1});
    // 2031-07-16 and 2031-08-03: two months never seen before.
    let batch = rows(Table::EventsPart, &[month(1_941_926_400), month(1_943_481_600)]);
    dwh.write(Batch::rows(Table::EventsPart, &batch)).await.expect("write");
    let placed: Vec<(String, String)> =
        sqlx::query_as("SELECT tableoid::regclass::text, event_date::text FROM events_part ORDER BY event_date")
            .fetch_all(&pool)
            .await
            .expect("query");
    assert_eq!(
        placed,
        vec![
            ("events_part_y2031m07".to_owned(), "2031-07-16".to_owned()),
            ("events_part_y2031m08".to_owned(), "2031-08-03".to_owned())
        ]
    );

    // A month whose rows already sit in the default partition stays writable there.
    sqlx::query("INSERT INTO events_part_default (application_id, event_date, event_hash, event_name, event_timestamp, appmetrica_device_id) VALUES (1, '2032-01-10', 'x', 'e', 0, 1)")
        .execute(&pool)
        .await
        .expect("seed default partition");
    let batch = rows(Table::EventsPart, &[month(1_957_000_000)]); // 2032-01-06
    dwh.write(Batch::rows(Table::EventsPart, &batch))
        .await
        .expect("write into default");
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM events_part_default")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(in_default, 2);
}

/// Writers that each find a month missing (lanes of one table, ingest and the
/// API, several instances) all create it or find it: none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_a_new_month_all_land() {
    let (_, config, _) = dwh(Db::Postgres, &[]).await;
    for round in 0..5 {
        // A month no writer has seen: each handle's partition cache is empty.
        let ts = 1_900_000_000 + round * 40 * 86_400;
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let config = config.clone();
                tokio::spawn(async move {
                    let dwh = Dwh::connect(&config).expect("pool");
                    let record = json!({"application_id": 1, "event_name": format!("e{i}"), "event_timestamp": ts, "appmetrica_device_id": i});
                    dwh.write(Batch::rows(Table::EventsPart, &rows(Table::EventsPart, &[record]))).await
                })
            })
            .collect();
        for writer in writers {
            let written = writer.await.expect("task");
            assert!(written.is_ok(), "round {round}: {:?}", written.err());
        }
    }
}

#[tokio::test]
async fn the_conflict_path_returns_only_new_ids_on_postgres() {
    let (dwh, _, _) = dwh(Db::Postgres, &[]).await;
    let first = dwh
        .write(Batch::rows(
            Table::EventsPart,
            &rows(Table::EventsPart, &events(100, 1)),
        ))
        .await
        .expect("write");
    // Half old, half new, and one new record twice: the fast COPY fails on the old
    // keys, the staging merge keeps one of each new key.
    let mut mixed = events(100, 1)[50..].to_vec();
    let new = events(50, 2);
    mixed.extend(new.iter().cloned());
    mixed.push(new[0].clone());
    let out = dwh
        .write(Batch::rows(Table::EventsPart, &rows(Table::EventsPart, &mixed)))
        .await
        .expect("write");
    assert_eq!(out.inserted_ids.len(), 50);
    assert!(out.inserted_ids.iter().all(|id| !first.inserted_ids.contains(id)));
    assert_eq!(dwh.count_rows("events_part").await.expect("count"), 150);
}

#[tokio::test]
async fn an_unreachable_database_is_reported_as_unavailable() {
    let config = common::config_for("postgres://postgres:secret-pw@127.0.0.1:1/none", &[]).dwh;
    let dwh = Dwh::connect(&config).expect("lazy pool");
    let err = dwh
        .ping(std::time::Duration::from_secs(5))
        .await
        .expect_err("unreachable");
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().starts_with("database unreachable"), "{err}");
    assert!(!format!("{err} {err:?}").contains("secret-pw"));
}

/// Runs `sql` (several statements allowed) on the database of `config`.
async fn exec(config: &dwh_helper::config::DwhConfig, sql: &str) {
    use sqlx::Connection as _;
    let url = config.database_url.expose();
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.expect("connect");
        sqlx::raw_sql(sql).execute(&mut conn).await.expect("statement runs");
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        sqlx::raw_sql(sql).execute(&mut conn).await.expect("statement runs");
    }
}

fn location_advance(from: i64, to: i64) -> OffsetAdvance {
    OffsetAdvance {
        topic: "dwh.user_locations".into(),
        ..advance(0, from, to)
    }
}

#[tokio::test]
async fn a_row_the_database_refuses_is_rejected_with_its_message_and_the_rest_lands_with_the_offsets() {
    for db in BOTH {
        // The API's row bound is 4: the ingest's batch (with origins) is one
        // statement all the same, and a refusal is found by halving it.
        let (dwh, config, _guard) = dwh(db, &[("DWH_MAX_ROWS_PER_INSERT", "4")]).await;
        exec(
            &config,
            match db {
                Db::Postgres => "ALTER TABLE user_locations ADD CONSTRAINT latitude_below_80 CHECK (latitude < 80)",
                Db::Sqlite => {
                    "CREATE TRIGGER latitude_below_80 BEFORE INSERT ON user_locations WHEN NEW.latitude >= 80 \
                     BEGIN SELECT RAISE(ABORT, 'latitude_below_80 violated'); END"
                }
            },
        )
        .await;
        let mut records = common::locations(200);
        records[3]["latitude"] = json!(85.0);
        records[150]["latitude"] = json!(86.0);
        let batch_rows = rows(Table::UserLocations, &records);
        let origins: Vec<Origin> = (0..200).map(|offset| Origin { partition: 0, offset }).collect();
        let decoded_reject = RejectedRecord {
            table: Table::UserLocations,
            topic: "dwh.user_locations".into(),
            partition: 0,
            offset: 200,
            key: None,
            payload: b"{oops".to_vec(),
            reason: "record is not valid JSON".into(),
            class: "invalid_json",
        };
        let outcome = dwh
            .write(Batch {
                table: Table::UserLocations,
                rows: &batch_rows,
                rejects: std::slice::from_ref(&decoded_reject),
                offsets: &[location_advance(0, 201)],
                origins: Some(Origins {
                    topic: "dwh.user_locations",
                    rows: &origins,
                }),
                gaps: &[],
                identity: None,
            })
            .await
            .expect("the batch lands without the refused rows");
        assert_eq!(outcome.inserted, 198, "{db:?}");
        assert_eq!(outcome.skipped, 0, "{db:?}");
        let refused: Vec<i64> = outcome.refused.iter().map(|r| r.offset).collect();
        assert_eq!(refused, [3, 150], "{db:?}");
        // The rows landed in their order (ids follow offsets), and each refused row
        // cost two halves per level of the halving (8 levels for 200 rows), not a
        // statement per row.
        let stored: Vec<Value> = read_all(&dwh, Table::UserLocations)
            .await
            .into_iter()
            .map(|row| row["uuid"].clone())
            .collect();
        let expected: Vec<Value> = records
            .iter()
            .enumerate()
            .filter(|(i, _)| ![3, 150].contains(i))
            .map(|(_, r)| r["uuid"].clone())
            .collect();
        assert_eq!(stored, expected, "{db:?}");
        assert!(
            outcome.statements > 1 && outcome.statements <= 1 + 2 * 2 * 8,
            "{db:?}: {} statements",
            outcome.statements
        );
        for reject in &outcome.refused {
            assert!(
                reject.reason.starts_with("the database refused the data: ")
                    && reject.reason.contains("latitude_below_80"),
                "{db:?}: {}",
                reject.reason
            );
            let payload: Value = serde_json::from_slice(&reject.payload).expect("the row as JSON");
            assert!(
                payload["latitude"].as_f64().expect("latitude") >= 85.0,
                "{db:?}: {payload}"
            );
        }
        // All in the one transaction: 198 rows, 3 rejects, the offset past the batch.
        assert_eq!(dwh.count_rows("user_locations").await.expect("count"), 198, "{db:?}");
        assert_eq!(count_rejects(&dwh).await, 3, "{db:?}");
        assert_eq!(
            dwh.stored_offset("g", "dwh.user_locations", 0).await.expect("read"),
            Some(201),
            "{db:?}"
        );

        // Without origins (the HTTP API) the refusal fails the whole write.
        let bad = rows(Table::UserLocations, &[records[3].clone()]);
        let err = dwh
            .write(Batch::rows(Table::UserLocations, &bad))
            .await
            .expect_err("refused");
        assert!(err.is_refused() && !err.is_transient(), "{db:?}: {err}");
        assert_eq!(dwh.count_rows("user_locations").await.expect("count"), 198, "{db:?}");
    }
}

#[tokio::test]
async fn an_error_of_the_database_rather_than_the_data_fails_the_whole_batch_and_rejects_nothing() {
    for db in BOTH {
        let (dwh, config, _guard) = dwh(db, &[]).await;
        let url = config.database_url.expose().to_owned();
        // Read-only, the database's fault and not the rows': PostgreSQL after a
        // failover (25006), SQLite's file opened read-only (SQLITE_READONLY).
        let (read_only, message) = match db {
            Db::Postgres => {
                let name = url.rsplit('/').next().expect("database name").to_owned();
                exec(
                    &config,
                    &format!("ALTER DATABASE {name} SET default_transaction_read_only = on"),
                )
                .await;
                (Dwh::connect(&config).expect("pool"), "read-only transaction")
            }
            Db::Sqlite => {
                let read_only = common::config_for(&format!("{url}?mode=ro"), &[]).dwh;
                (Dwh::connect(&read_only).expect("pool"), "readonly")
            }
        };
        let records = rows(Table::UserLocations, &common::locations(5));
        let origins: Vec<Origin> = (0..5).map(|offset| Origin { partition: 0, offset }).collect();
        let err = read_only
            .write(Batch {
                table: Table::UserLocations,
                rows: &records,
                rejects: &[],
                offsets: &[location_advance(0, 5)],
                origins: Some(Origins {
                    topic: "dwh.user_locations",
                    rows: &origins,
                }),
                gaps: &[],
                identity: None,
            })
            .await
            .expect_err("read-only");
        assert!(matches!(err, StoreError::Database(_)), "{db:?}: {err:?}");
        assert!(err.to_string().contains(message), "{db:?}: {err}");
        assert_eq!(dwh.count_rows("user_locations").await.expect("count"), 0, "{db:?}");
        assert_eq!(count_rejects(&dwh).await, 0, "{db:?}: no good row became a reject");
        assert_eq!(
            dwh.stored_offset("g", "dwh.user_locations", 0).await.expect("read"),
            None,
            "{db:?}"
        );
    }
}

#[tokio::test]
async fn a_reason_with_nul_is_stored_escaped() {
    for db in BOTH {
        let (dwh, _, _guard) = dwh(db, &[]).await;
        let reject = RejectedRecord {
            table: Table::UserLocations,
            topic: "dwh.user_locations".into(),
            partition: 0,
            offset: 0,
            key: Some(b"\0k".to_vec()),
            payload: b"{\"uuid\":\"\\u0000abc\"}\0".to_vec(),
            reason: "field \"uuid\": expected UUID, got \"\0abc\"".into(),
            class: "invalid_field",
        };
        dwh.write(Batch {
            table: Table::UserLocations,
            rows: &[],
            rejects: std::slice::from_ref(&reject),
            offsets: &[location_advance(0, 1)],
            origins: None,
            gaps: &[],
            identity: None,
        })
        .await
        .expect("a NUL in a reason does not stall the table");
        assert_eq!(count_rejects(&dwh).await, 1, "{db:?}");
        // The store escapes it (storable_text); the catalogue's own reasons come
        // escaped already (the faults test), a database's message may not.
        let stored = dwh
            .rejects(Table::UserLocations, &dwh_helper::store::RejectFilter::default())
            .await
            .expect("rejects");
        assert_eq!(
            stored[0].reason, "field \"uuid\": expected UUID, got \"\\u0000abc\"",
            "{db:?}"
        );
        assert_eq!(
            stored[0].payload, reject.payload,
            "the payload is kept byte for byte: {db:?}"
        );
    }
}

/// Reads `sql`'s rows (every column as text) from the test database, in UTC.
async fn texts(url: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    use sqlx::{Connection as _, Row as _};
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query("SET timezone = 'UTC'")
        .execute(&mut conn)
        .await
        .expect("timezone");
    sqlx::query(sql)
        .fetch_all(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|row| (0..row.len()).map(|i| row.get::<Option<String>, _>(i)).collect())
        .collect()
}

/// Rows over the 64 KiB that suit binary go as COPY text, escapes and edge values
/// intact (the same values as through the binary COPY).
#[tokio::test]
async fn large_chunks_round_trip_through_the_text_copy() {
    let (dwh, config, _guard) = dwh(Db::Postgres, &[]).await;
    let pad = "\u{00e9}\\\t".repeat(24_000);
    technical_edge_values_round_trip(&dwh, config.database_url.expose(), &pad, false).await;
}

/// technical_data's edge values through the COPY (`binary` says which form the
/// rows take) and back: text with tabs, backslashes, newlines and the text
/// form's NULL marker, timestamps before 2000 and with microseconds, extreme
/// bigints and doubles, uuid, boolean, jsonb with unicode and escapes, NULLs; on
/// the bulk path, then on the conflict path (staging). `pad` goes into the
/// first record's document, to make the rows as large as wanted.
async fn technical_edge_values_round_trip(dwh: &Dwh, url: &str, pad: &str, binary: bool) {
    use dwh_helper::store::pgbinary;
    let data = json!({"ü": "日本語 😀", "n": [1, 2.5, null, true], "q": "say \"hi\"\n", "pad": pad});
    let technical = vec![
        json!({"uuid": "00000000-0000-0000-0000-000000000000", "app": i64::MIN, "event_type": "tab\there \\ back\nslash",
               "server_upload_time": "0001-01-01T00:00:00", "event_time": "1999-12-31T23:59:59.999999",
               "client_event_time": "2024-02-29T12:00:00.000001", "paying": true, "sample_rate": -0.5, "data": data}),
        json!({"uuid": "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF", "app": i64::MAX, "event_type": "",
               "server_upload_time": "9999-12-31T23:59:59.999999", "paying": false,
               "sample_rate": 1.797_693_134_862_315_7e308, "data": "just a string"}),
        json!({"uuid": "12345678-1234-4234-8234-123456789abc", "app": 0, "event_type": "nulls",
               "server_upload_time": 0}),
        json!({"uuid": "12345678-1234-4234-8234-123456789abd", "app": 1, "event_type": "\\N",
               "server_upload_time": 1}),
    ];
    let batch = rows(Table::TechnicalData, &technical);
    assert_eq!(
        pgbinary::suits(&batch) && pgbinary::encode(Table::TechnicalData.spec(), &batch, Some(0..)).is_some(),
        binary,
        "the rows go as binary: {binary}"
    );
    for expected in [4, 0] {
        // The same rows again: the bulk COPY meets the keys, the staging path skips them.
        let written = dwh
            .write(Batch::rows(Table::TechnicalData, &batch))
            .await
            .expect("write");
        assert_eq!(written.inserted_ids.len(), expected);
    }
    let s = |v: &str| Some(v.to_owned());
    let stored = texts(
        url,
        "SELECT uuid::text, app::text, event_type, server_upload_time::text, event_time::text, \
         client_event_time::text, paying::text, sample_rate::text, data::text FROM technical_data ORDER BY app",
    )
    .await;
    assert_eq!(
        stored.iter().map(|r| r[..8].to_vec()).collect::<Vec<_>>(),
        vec![
            vec![
                s("00000000-0000-0000-0000-000000000000"),
                s("-9223372036854775808"),
                s("tab\there \\ back\nslash"),
                s("0001-01-01 00:00:00"),
                s("1999-12-31 23:59:59.999999"),
                s("2024-02-29 12:00:00.000001"),
                s("true"),
                s("-0.5"),
            ],
            vec![
                s("12345678-1234-4234-8234-123456789abc"),
                s("0"),
                s("nulls"),
                s("1970-01-01 00:00:00"),
                None,
                None,
                None,
                None,
            ],
            vec![
                s("12345678-1234-4234-8234-123456789abd"),
                s("1"),
                s("\\N"),
                s("1970-01-01 00:00:01"),
                None,
                None,
                None,
                None,
            ],
            vec![
                s("ffffffff-ffff-ffff-ffff-ffffffffffff"),
                s("9223372036854775807"),
                s(""),
                s("9999-12-31 23:59:59.999999"),
                None,
                None,
                s("false"),
                s("1.7976931348623157e+308"),
            ],
        ]
    );
    let json_of = |text: &Option<String>| {
        text.as_deref()
            .map(|t| serde_json::from_str::<Value>(t).expect("jsonb text"))
    };
    assert_eq!(json_of(&stored[0][8]), Some(data));
    assert_eq!(json_of(&stored[1][8]), None);
    assert_eq!(json_of(&stored[2][8]), None);
    assert_eq!(json_of(&stored[3][8]), Some(json!("just a string")));
}

/// Every column type goes through PostgreSQL's binary COPY and back, edge values
/// and NULLs included: bigint, int, double, boolean, text, date, timestamp,
/// timestamptz, numeric(20), uuid and jsonb, on the bulk path and on the
/// conflict path (staging).
#[tokio::test]
async fn every_column_type_round_trips_through_the_binary_copy() {
    use dwh_helper::store::pgbinary;
    let (dwh, config, _guard) = dwh(Db::Postgres, &[]).await;
    let url = config.database_url.expose().to_owned();
    let write = |table: Table, records: Vec<Value>| {
        let dwh = dwh.clone();
        async move {
            let batch = rows(table, &records);
            assert!(
                pgbinary::suits(&batch) && pgbinary::encode(table.spec(), &batch, Some(0..)).is_some(),
                "{table}: the rows go as binary"
            );
            dwh.write(Batch::rows(table, &batch)).await.expect("write")
        }
    };
    let s = |v: &str| Some(v.to_owned());

    technical_edge_values_round_trip(&dwh, &url, "", true).await;

    let device = |id: u64, n: &str, mcc: Value, first: &str, last: &str| json!({"application_id": id, "appmetrica_device_id": n, "mcc": mcc, "first_seen_at": first, "last_seen_at": last});
    let devices = vec![
        device(
            1,
            "18446744073709551615",
            json!(i32::MIN),
            "1999-12-31T23:59:59.000001Z",
            "2024-02-29T12:00:00.123456+00:00",
        ),
        device(2, "0", json!(i32::MAX), "0001-01-01T00:00:00Z", "2000-01-01T00:00:00Z"),
        device(
            3,
            "10000",
            Value::Null,
            "2000-01-01T00:00:00.5Z",
            "2000-01-01T00:00:00.5Z",
        ),
    ];
    assert_eq!(write(Table::MobileDevices, devices).await.inserted_ids.len(), 3);
    // A newer version of device 3 goes through staging and wins.
    let newer = vec![device(
        3,
        "00010000",
        json!(250),
        "2001-01-01T00:00:00Z",
        "2030-06-15T08:09:10.654321Z",
    )];
    assert_eq!(write(Table::MobileDevices, newer).await.updated, 1);
    assert_eq!(
        texts(
            &url,
            "SELECT application_id::text, appmetrica_device_id::text, mcc::text, first_seen_at::text, last_seen_at::text \
             FROM mobile_devices ORDER BY application_id",
        )
        .await,
        vec![
            vec![
                s("1"),
                s("18446744073709551615"),
                s("-2147483648"),
                s("1999-12-31 23:59:59.000001+00"),
                s("2024-02-29 12:00:00.123456+00"),
            ],
            vec![
                s("2"),
                s("0"),
                s("2147483647"),
                s("0001-01-01 00:00:00+00"),
                s("2000-01-01 00:00:00+00"),
            ],
            vec![
                s("3"),
                s("10000"),
                s("250"),
                s("2000-01-01 00:00:00.5+00"),
                s("2030-06-15 08:09:10.654321+00"),
            ],
        ]
    );

    let profile = |id: &str, date: Value, notifications: Value| {
        json!({"application_id": 9, "profile_id": id, "first_session_date": date,
               "notifications_enabled": notifications, "updated_at": "2024-01-01T00:00:00Z"})
    };
    let profiles = vec![
        profile("a", json!("0001-01-01"), json!(true)),
        profile("b", json!("1999-12-31"), json!(false)),
        profile("c", json!("2000-01-01"), Value::Null),
        profile("d", Value::Null, Value::Null),
    ];
    assert_eq!(
        write(Table::PermanentUserProperties, profiles).await.inserted_ids.len(),
        4
    );
    assert_eq!(
        texts(
            &url,
            "SELECT profile_id, first_session_date::text, notifications_enabled::text \
             FROM permanent_user_properties ORDER BY profile_id",
        )
        .await,
        vec![
            vec![s("a"), s("0001-01-01"), s("true")],
            vec![s("b"), s("1999-12-31"), s("false")],
            vec![s("c"), s("2000-01-01"), None],
            vec![s("d"), None, None],
        ]
    );
}

/// `n` user_locations rows as the ingest writes them, at offsets from 0 of
/// partition 0, with the offset advance past them.
async fn write_locations(dwh: &Dwh, records: &[Value]) -> Result<dwh_helper::store::WriteOutcome, StoreError> {
    let batch_rows = rows(Table::UserLocations, records);
    let origins: Vec<Origin> = (0..records.len() as i64)
        .map(|offset| Origin { partition: 0, offset })
        .collect();
    dwh.write(Batch {
        table: Table::UserLocations,
        rows: &batch_rows,
        rejects: &[],
        offsets: &[location_advance(0, records.len() as i64)],
        origins: Some(Origins {
            topic: "dwh.user_locations",
            rows: &origins,
        }),
        gaps: &[],
        identity: None,
    })
    .await
}

/// Nothing of a batch is stored: no row, no reject, no offset.
async fn nothing_stored(dwh: &Dwh, db: Db) {
    assert_eq!(dwh.count_rows("user_locations").await.expect("count"), 0, "{db:?}");
    assert_eq!(count_rejects(dwh).await, 0, "{db:?}: no row became a reject");
    assert_eq!(
        dwh.stored_offset("g", "dwh.user_locations", 0).await.expect("read"),
        None,
        "{db:?}"
    );
}

#[tokio::test]
async fn a_table_that_refuses_every_row_for_one_reason_fails_the_batch_and_rejects_nothing() {
    for db in BOTH {
        let (dwh, config, _guard) = dwh(db, &[]).await;
        let records = common::locations(6);
        // A constraint no row of the batch meets: the table's doing, not the rows'.
        exec(
            &config,
            match db {
                Db::Postgres => "ALTER TABLE user_locations ADD CONSTRAINT latitude_above_1000 CHECK (latitude > 1000)",
                Db::Sqlite => {
                    "CREATE TRIGGER latitude_above_1000 BEFORE INSERT ON user_locations WHEN NEW.latitude <= 1000 \
                     BEGIN SELECT RAISE(ABORT, 'latitude_above_1000 violated'); END"
                }
            },
        )
        .await;
        let err = write_locations(&dwh, &records).await.expect_err("every row refused");
        assert!(matches!(err, StoreError::TableRefuses { .. }), "{db:?}: {err:?}");
        let text = err.to_string();
        assert!(
            text.contains("every row of the batch (6) refused") && text.contains("latitude_above_1000"),
            "{db:?}: {text}"
        );
        if db == Db::Postgres {
            assert!(
                text.contains("SQLSTATE 23514, constraint latitude_above_1000"),
                "{text}"
            );
        }
        assert!(
            !err.is_refused() && !err.is_transient(),
            "{db:?}: retried, not rejected"
        );
        nothing_stored(&dwh, db).await;

        // A batch of one row that a constraint refuses fails the same way.
        let err = write_locations(&dwh, &records[..1]).await.expect_err("refused");
        assert!(matches!(err, StoreError::TableRefuses { .. }), "{db:?}: {err:?}");
        assert!(
            err.to_string().contains("every row of the batch (1) refused"),
            "{db:?}: {err}"
        );
        nothing_stored(&dwh, db).await;

        // Once the table takes rows again the same batch lands whole.
        exec(
            &config,
            match db {
                Db::Postgres => "ALTER TABLE user_locations DROP CONSTRAINT latitude_above_1000",
                Db::Sqlite => "DROP TRIGGER latitude_above_1000",
            },
        )
        .await;
        let outcome = write_locations(&dwh, &records).await.expect("lands");
        assert_eq!((outcome.inserted, outcome.refused.len()), (6, 0), "{db:?}");
        assert_eq!(count_rejects(&dwh).await, 0, "{db:?}");
    }
}

#[tokio::test]
async fn a_not_null_column_this_release_does_not_write_fails_even_a_single_row_batch() {
    // SQLite cannot add a NOT NULL column without a default to a table.
    let (dwh, config, _guard) = dwh(Db::Postgres, &[]).await;
    exec(
        &config,
        "ALTER TABLE user_locations ADD COLUMN added_later text NOT NULL",
    )
    .await;
    let records = common::locations(3);
    for batch in [&records[..], &records[..1]] {
        let err = write_locations(&dwh, batch).await.expect_err("no row can land");
        let text = err.to_string();
        assert!(matches!(err, StoreError::TableRefuses { .. }), "{err:?}");
        assert!(
            text.contains("column added_later, which this release does not write, is NOT NULL")
                && text.contains("not-null constraint"),
            "{text}"
        );
        nothing_stored(&dwh, Db::Postgres).await;
    }
    exec(
        &config,
        "ALTER TABLE user_locations ALTER COLUMN added_later DROP NOT NULL",
    )
    .await;
    let outcome = write_locations(&dwh, &records).await.expect("lands");
    assert_eq!((outcome.inserted, outcome.refused.len()), (3, 0));
}

#[tokio::test]
async fn the_write_deadline_grows_with_the_statements_the_halving_adds() {
    // Each insert into the table takes 0.4 s; the statement timeout is 1 s, so the
    // batch's planned deadline (9 statements: 9 s) is passed by the halving alone.
    let (dwh, config, _guard) = dwh(Db::Postgres, &[("DWH_STATEMENT_TIMEOUT_SECONDS", "1")]).await;
    exec(
        &config,
        "ALTER TABLE user_locations ADD CONSTRAINT latitude_below_80 CHECK (latitude < 80); \
         CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN PERFORM pg_sleep(0.4); RETURN NULL; END $$; \
         CREATE TRIGGER slow_insert BEFORE INSERT ON user_locations \
           FOR EACH STATEMENT EXECUTE FUNCTION slow_insert()",
    )
    .await;
    let mut records = common::locations(64);
    records[5]["latitude"] = json!(85.0);
    records[40]["latitude"] = json!(86.0);
    let started = std::time::Instant::now();
    let outcome = write_locations(&dwh, &records)
        .await
        .expect("lands past its planned deadline");
    let took = started.elapsed();
    // The fault: the write took longer than its planned deadline.
    assert!(
        took > std::time::Duration::from_secs(9),
        "took {took:?}, {} statements",
        outcome.statements
    );
    assert_eq!(outcome.inserted, 62);
    let refused: Vec<i64> = outcome.refused.iter().map(|r| r.offset).collect();
    assert_eq!(refused, [5, 40]);
    assert_eq!(
        dwh.stored_offset("g", "dwh.user_locations", 0).await.expect("read"),
        Some(64)
    );
}
