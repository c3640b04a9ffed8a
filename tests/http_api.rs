//! The tables API over real HTTP against a real database.

mod common;

use common::{config_for, dwh, events, locations, pg_admin_url, status_and_json, Api, Db};
use serde_json::{json, Value};

async fn api(db: Db, extra: &[(&str, &str)]) -> (Api, Option<tempfile::TempDir>) {
    let (dwh, dwh_config, guard) = dwh(db, extra).await;
    let config = config_for(dwh_config.database_url.expose(), extra);
    (Api::start(dwh, &config).await, guard)
}

#[tokio::test]
async fn the_seed_example_posts_1500_locations_in_two_batches() {
    for db in [Db::Postgres, Db::Sqlite] {
        let (api, _guard) = api(db, &[]).await;
        let (status, body) = api
            .post("/dwh/user-locations", &json!({ "data": locations(1500) }))
            .await;
        assert_eq!(status, 200, "{db:?}: {body}");
        assert_eq!(body["count"], 1500, "{db:?}");
        assert_eq!(body["batches"], 2, "{db:?}");
        assert_eq!(body["inserted_ids"].as_array().map(Vec::len), Some(1500), "{db:?}");
        let (status, body) = api.get("/dwh/user_locations?limit=10000").await;
        assert_eq!(status, 200);
        assert_eq!(body["count"], 1500, "{db:?}: both spellings are one table");
    }
}

#[tokio::test]
async fn posting_2500_events_takes_three_batches_and_reposting_inserts_nothing() {
    let (api, _guard) = api(Db::Postgres, &[]).await;
    let data = json!({ "data": events(2500, 0) });
    let (status, body) = api.post("/dwh/events_part", &data).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["count"].clone(), body["batches"].clone()),
        (json!(2500), json!(3))
    );
    let (status, body) = api.post("/dwh/events_part", &data).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], 0);
    assert_eq!(body["inserted_ids"], json!([]));
    let (_, body) = api.get("/dwh/events_part?limit=10000").await;
    assert_eq!(body["count"], 2500);
}

#[tokio::test]
async fn a_small_batch_returns_its_ids_and_rows_read_back() {
    let (api, _guard) = api(Db::Postgres, &[]).await;
    let (status, body) = api.post("/dwh/events-part", &json!({ "data": events(3, 0) })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["count"].clone(), body["batches"].clone()), (json!(3), json!(1)));
    let ids = body["inserted_ids"].clone();
    let (_, body) = api.get("/dwh/events_part").await;
    let rows = body["rows"].as_array().expect("rows");
    assert_eq!(
        rows.iter().map(|r| r["id"].clone()).collect::<Vec<_>>(),
        ids.as_array().cloned().unwrap_or_default()
    );
    assert_eq!(rows[0]["event_name"], "event_0");
    assert_eq!(rows[0]["application_id"], 4242);
    assert_eq!(rows[0]["appmetrica_device_id"], "10000000000000000000");
    assert_eq!(rows[0]["event_date"], "2024-03-01");
}

/// A body of thousands of records is decoded in parts on the machine's cores,
/// each part written while the next decodes: the first invalid record in the
/// body's order is the one named, wherever the parts split; the parts written
/// before it are rolled back; the rows keep the body's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_names_its_first_invalid_record_and_keeps_its_order() {
    for db in [Db::Postgres, Db::Sqlite] {
        let (api, _guard) = api(db, &[]).await;
        let data = events(3000, 0);
        for (bad, named) in [(&[1400, 2100][..], 1400), (&[2100, 2900][..], 2100)] {
            let mut body = data.clone();
            for &i in bad {
                body[i]["mcc"] = json!("abc");
            }
            let (status, body) = api.post("/dwh/events_part", &json!({ "data": body })).await;
            assert_eq!(
                (status, body),
                (
                    422,
                    json!({"error": format!("data[{named}]: field \"mcc\": expected integer, got \"abc\"")})
                ),
                "{db:?}"
            );
        }
        let (_, body) = api.get("/dwh/events_part").await;
        assert_eq!(body["count"], 0, "{db:?}: an invalid record writes nothing");
        let (status, body) = api.post("/dwh/events_part", &json!({ "data": data })).await;
        assert_eq!((status, body["count"].clone()), (200, json!(3000)), "{db:?}: {body}");
        let ids = body["inserted_ids"].as_array().cloned().unwrap_or_default();
        if db == Db::Postgres {
            // The failed posts had written their first parts (1,000 rows each at
            // DWH_MAX_ROWS_PER_INSERT's default), which took ids from the
            // sequence, before their invalid record rolled them back.
            let first = ids.first().and_then(Value::as_i64).expect("ids");
            assert!(first > 2 * 1000, "{db:?}: the first id is {first}");
        }
        let (_, body) = api.get("/dwh/events_part?limit=10000").await;
        let rows = body["rows"].as_array().expect("rows");
        let by_id: std::collections::HashMap<_, _> = rows
            .iter()
            .map(|r| (r["id"].clone(), r["session_id"].clone()))
            .collect();
        let names: Vec<_> = ids.iter().map(|id| by_id[id].clone()).collect();
        let expected: Vec<_> = data.iter().map(|r| r["session_id"].clone()).collect();
        assert_eq!(names, expected, "{db:?}: the ids follow the body's order");
    }
}

#[tokio::test]
async fn bad_posts_get_clear_json_errors_and_write_nothing() {
    let (api, _guard) = api(Db::Postgres, &[]).await;
    let (status, body) = api.post("/dwh/events_part", &json!({ "data": [] })).await;
    assert_eq!(
        (status, body),
        (400, json!({"error": "\"data\" must hold at least one record"}))
    );

    let mut data = events(5, 0);
    data[3]["mcc"] = json!("abc");
    let (status, body) = api.post("/dwh/events_part", &json!({ "data": data })).await;
    assert_eq!(status, 422);
    assert_eq!(
        body,
        json!({"error": "data[3]: field \"mcc\": expected integer, got \"abc\""})
    );

    // A value the topics' decoder would read, but not in the form the API's
    // schema states: refused, and nothing of the request is written.
    let mut data = events(5, 0);
    data[2]["mcc"] = json!(" 250");
    let (status, body) = api.post("/dwh/events_part", &json!({ "data": data })).await;
    assert_eq!(
        (status, body),
        (
            422,
            json!({"error": "data[2]: field \"mcc\": \" 250\" is not in the form the API takes: \
                an integer of 32 bits, or a string of at most 9 digits"})
        )
    );
    assert_eq!(api.get("/dwh/events_part").await.1["count"], 0);

    let mut data = events(5, 0);
    data[1].as_object_mut().expect("object").remove("event_name");
    let (status, body) = api.post("/dwh/events_part", &json!({ "data": data })).await;
    assert_eq!(
        (status, body),
        (422, json!({"error": "data[1]: missing required field \"event_name\""}))
    );

    let (status, body) = api.post("/dwh/events_part", &json!({ "data": [42] })).await;
    assert_eq!(
        (status, body),
        (422, json!({"error": "data[0]: record must be a JSON object, got 42"}))
    );

    let (status, body) = api.post("/dwh/events_part", &json!({ "rows": [] })).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("missing field `data`")),
        "{body}"
    );

    let response = api
        .client
        .post(api.url("/dwh/events_part"))
        .header("content-type", "application/json")
        .body("{\"data\": [")
        .send()
        .await
        .expect("request");
    let (status, body) = common::status_and_json(response).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].is_string());

    let response = api
        .client
        .post(api.url("/dwh/events_part"))
        .body("data")
        .send()
        .await
        .expect("request");
    let (status, body) = common::status_and_json(response).await;
    assert_eq!(status, 415, "{body}");

    let (_, body) = api.get("/dwh/events_part").await;
    assert_eq!(body["count"], 0, "nothing of the rejected requests was written");
}

#[tokio::test]
async fn unknown_tables_and_routes_are_json_404s() {
    let (api, _guard) = api(Db::Sqlite, &[]).await;
    let (status, body) = api.get("/dwh/users").await;
    assert_eq!(status, 404);
    assert_eq!(
        body["error"],
        "unknown table \"users\"; valid tables: events_part, mobile_devices, permanent_user_properties, \
         technical_data, tmp_event_properties, tmp_user_properties, user_locations"
    );
    let (status, body) = api.post("/dwh/users", &json!({"data": [{}]})).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = api.get("/nowhere").await;
    assert_eq!((status, body), (404, json!({"error": "no such route"})));
    let response = api
        .client
        .delete(api.url("/dwh/events_part"))
        .send()
        .await
        .expect("request");
    let (status, body) = common::status_and_json(response).await;
    assert_eq!(
        (status, body),
        (405, json!({"error": "method not allowed on this route"}))
    );
}

#[tokio::test]
async fn reads_page_filter_and_validate_parameters() {
    let (api, _guard) = api(Db::Postgres, &[]).await;
    let (_, posted) = api
        .post("/dwh/user_locations", &json!({ "data": locations(250) }))
        .await;
    let ids: Vec<i64> = posted["inserted_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(Value::as_i64)
        .collect();

    let (_, body) = api.get("/dwh/user_locations").await;
    assert_eq!(body["count"], 100, "default limit");
    let (_, body) = api
        .get(&format!("/dwh/user_locations?limit=7&after_id={}", ids[100]))
        .await;
    let page: Vec<i64> = body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["id"].as_i64())
        .collect();
    assert_eq!(page, ids[101..108].to_vec());

    let (_, body) = api
        .get("/dwh/user_locations?uuid=00000000-0000-4000-8000-00000000000a")
        .await;
    assert_eq!(body["count"], 1);
    assert_eq!(body["rows"][0]["uuid"], "00000000-0000-4000-8000-00000000000a");

    for (query, error) in [
        ("limit=0", "limit must be an integer from 1 to 10000, got \"0\""),
        ("limit=10001", "limit must be an integer from 1 to 10000, got \"10001\""),
        ("after_id=x", "after_id must be an integer, got \"x\""),
        (
            "city=Moscow",
            "unknown query parameter \"city\"; use limit, after_id or a key column of user_locations: uuid",
        ),
        ("uuid=nope", "filter \"uuid\": expected UUID, got \"nope\""),
        (
            "uuid=%7B00000000-0000-4000-8000-00000000000a%7D",
            "filter \"uuid\": \"{00000000-0000-4000-8000-00000000000a}\" is not in the form the API takes (see /openapi.json)",
        ),
    ] {
        let (status, body) = api.get(&format!("/dwh/user_locations?{query}")).await;
        assert_eq!((status, body), (400, json!({ "error": error })), "{query}");
    }
}

#[tokio::test]
async fn health_reports_the_database() {
    let (api, _guard) = api(Db::Postgres, &[]).await;
    assert_eq!(api.get("/health/live").await, (200, json!({"status": "ok"})));
    assert_eq!(api.get("/health/ready").await, (200, json!({"status": "ok"})));

    // A database nobody listens on: live, but not ready; writes are 503.
    let config = config_for("postgres://postgres:pw-not-shown@127.0.0.1:1/none", &[]);
    let down = dwh_helper::store::Dwh::connect(&config.dwh).expect("lazy pool");
    let api = Api::start(down, &config).await;
    assert_eq!(api.get("/health/live").await.0, 200);
    // Anyone may ask: the reason is short, with nothing of the database's own
    // error (user, host, the server's message).
    let (status, body) = api.get("/health/ready").await;
    assert_eq!((status, body), (503, json!({"error": "database unavailable"})));
    let (status, body) = api.post("/dwh/events_part", &json!({ "data": events(1, 0) })).await;
    assert_eq!(
        (status, body),
        (503, json!({"error": "database unavailable, try again later"}))
    );
    // A server that answers and refuses (here: no such database) says no more,
    // and a write there is the database's trouble too: 503, never a 500.
    let mut refusing = url::Url::parse(&pg_admin_url()).expect("URL");
    refusing.set_path("/no_such_database_here");
    let config = config_for(refusing.as_str(), &[]);
    let refused = Api::start(
        dwh_helper::store::Dwh::connect(&config.dwh).expect("lazy pool"),
        &config,
    )
    .await;
    let (status, body) = refused.get("/health/ready").await;
    assert_eq!((status, body), (503, json!({"error": "database unavailable"})));
    let (status, body) = refused.post("/dwh/events_part", &json!({ "data": events(1, 0) })).await;
    assert_eq!(
        (status, body),
        (503, json!({"error": "database unavailable, try again later"}))
    );
}

#[tokio::test]
async fn a_configured_token_guards_everything_but_health() {
    let (api, _guard) = api(Db::Sqlite, &[("HTTP_API_TOKEN", "s3cret-token")]).await;
    let (status, body) = api.get("/dwh/events_part").await;
    assert_eq!(status, 401);
    assert_eq!(
        body["error"],
        "missing API token: send \"Authorization: Bearer <HTTP_API_TOKEN>\""
    );
    let response = api
        .client
        .get(api.url("/dwh/events_part"))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("request");
    assert_eq!(
        common::status_and_json(response).await,
        (401, json!({"error": "invalid API token"}))
    );
    let response = api
        .client
        .get(api.url("/dwh/events_part"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .expect("request");
    assert_eq!(common::status_and_json(response).await.0, 200);
    assert_eq!(api.get("/health/live").await.0, 200);
    assert_eq!(api.get("/health/ready").await.0, 200);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let (api, _guard) = api(Db::Sqlite, &[("HTTP_TABLES_MAX_BODY_BYTES", "64KiB")]).await;
    let (status, body) = api.post("/dwh/events_part", &json!({ "data": events(1000, 0) })).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("HTTP_TABLES_MAX_BODY_BYTES"),
        "{body}"
    );
    let (status, _) = api.post("/dwh/events_part", &json!({ "data": events(10, 0) })).await;
    assert_eq!(status, 200, "a body under the limit passes");
}

/// A request's records, the writes at once and a page's bytes are bounded: over
/// them, a 413, a 503 with Retry-After (before the body is read), a page that
/// stops early and says so. Nothing of a refused request is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_concurrent_writes_and_pages_are_bounded() {
    let (api, _guard) = api(
        Db::Sqlite,
        &[
            ("HTTP_TABLES_MAX_RECORDS", "40"),
            ("HTTP_TABLES_MAX_CONCURRENT_WRITES", "1"),
            ("HTTP_TABLES_MAX_RESPONSE_BYTES", "4KiB"),
        ],
    )
    .await;
    let (status, body) = api.post("/dwh/events_part", &json!({ "data": events(41, 0) })).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("over 40 records"),
        "{body}"
    );
    assert_eq!(api.get("/dwh/events_part").await.1["count"], 0);

    // One write in flight (its body still coming) holds the only permit.
    let body = json!({ "data": events(40, 1) }).to_string().into_bytes();
    let (head, tail) = body.split_at(body.len() / 2);
    let probe = || async {
        api.client
            .post(api.url("/dwh/events_part"))
            .json(&json!({ "data": events(1, 2) }))
            .send()
            .await
            .expect("request")
    };
    let mut attempts = 0;
    let (slow, send, busy) = loop {
        attempts += 1;
        let (send, receive) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
        send.send(Ok(head.to_vec())).await.expect("first half");
        let slow = tokio::spawn(
            api.client
                .post(api.url("/dwh/events_part"))
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(tokio_stream_of(receive)))
                .send(),
        );
        // While its body is unfinished it holds the permit: another write gets
        // 503 (were the permit free, none would, and this would time out).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut busy = None;
        while busy.is_none() && !slow.is_finished() && std::time::Instant::now() < deadline {
            let response = probe().await;
            if response.status() == 503 {
                busy = Some(response);
            } else {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        match busy {
            Some(busy) => break (slow, send, busy),
            // The slow write came while a probe held the permit and got the 503
            // itself (nothing of it was written): send it again.
            None if slow.is_finished() && attempts < 5 => {
                let refused = slow.await.expect("task").expect("request");
                assert_eq!(refused.status(), 503, "the slow write ended early");
            }
            None => panic!("no write saw the permit taken within 10 s (attempt {attempts})"),
        }
    };
    assert_eq!(busy.headers()["retry-after"], "1");
    let (_, body) = status_and_json(busy).await;
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("HTTP_TABLES_MAX_CONCURRENT_WRITES"),
        "{body}"
    );
    send.send(Ok(tail.to_vec())).await.expect("second half");
    drop(send);
    let response = slow.await.expect("task").expect("request");
    assert_eq!(response.status(), 200);
    let (status, _) = api.post("/dwh/events_part", &json!({ "data": events(1, 2) })).await;
    assert_eq!(status, 200, "the permit is back");

    // 41 rows stored; a page of up to 100 stops after about 4 KiB, and says so.
    let (status, page) = api.get("/dwh/events_part?limit=100").await;
    assert_eq!(status, 200);
    let count = page["count"].as_u64().unwrap();
    assert!((1..41).contains(&count), "{count}");
    assert_eq!(page["truncated"], true);
    let mut seen = count;
    let mut last = page["rows"][count as usize - 1]["id"].as_i64().unwrap();
    loop {
        let (_, page) = api.get(&format!("/dwh/events_part?limit=100&after_id={last}")).await;
        let n = page["count"].as_u64().unwrap();
        seen += n;
        if page["truncated"] == false {
            break;
        }
        last = page["rows"][n as usize - 1]["id"].as_i64().unwrap();
    }
    assert_eq!(seen, 41, "the pages together hold every row once");
}

/// The receiving end of a channel as a stream (for a body sent in parts).
fn tokio_stream_of<T: Send + 'static>(
    mut receive: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| receive.poll_recv(cx))
}

#[tokio::test]
async fn a_record_over_the_statement_byte_limit_is_a_422() {
    let (api, _guard) = api(Db::Sqlite, &[("DWH_MAX_WRITE_BATCH_BYTES", "4KiB")]).await;
    let mut data = events(3, 0);
    data[2]["city"] = json!("x".repeat(5000));
    let (status, body) = api.post("/dwh/events_part", &json!({ "data": data })).await;
    assert_eq!(status, 422, "{body}");
    let error = body["error"].as_str().expect("error");
    assert!(
        error.starts_with("data[2]: record is ") && error.ends_with("bytes, over the limit of 4096 bytes"),
        "{error}"
    );
}

/// A natural-key value too long for PostgreSQL's unique index (entries of at most
/// 2,704 bytes) is the record's fault: a 422 naming the field and the limit on
/// both backends, never a 500; nothing of the request is written.
#[tokio::test]
async fn a_key_value_over_the_limit_is_a_422_naming_the_field_on_both_backends() {
    for db in [Db::Postgres, Db::Sqlite] {
        let (api, _guard) = api(db, &[]).await;
        let mut data = events(3, 0);
        data[1]["event_hash"] = json!("h".repeat(3_000));
        let (status, body) = api.post("/dwh/events_part", &json!({ "data": data })).await;
        assert_eq!(status, 422, "{db:?}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.starts_with("data[1]: field \"event_hash\""), "{error}");
        assert!(
            error.contains("3000 bytes, over the 1024-byte limit of a key column"),
            "{error}"
        );
        // Within the topics' byte limit but over the API's 256 characters.
        data[1]["event_hash"] = json!("h".repeat(300));
        let (status, body) = api.post("/dwh/events_part", &json!({ "data": data })).await;
        assert_eq!(status, 422, "{db:?}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("at most 256 characters"),
            "{body}"
        );
        assert_eq!(api.get("/dwh/events_part").await.1["count"], 0, "{db:?}");
        // The longest key value the API takes is stored.
        data[1]["event_hash"] = json!("ж".repeat(256));
        let (status, body) = api.post("/dwh/events_part", &json!({ "data": data })).await;
        assert_eq!((status, body["count"].clone()), (200, json!(3)), "{db:?}: {body}");
    }
}

/// Tokens: the configured one is trimmed (a secret file's newline), the scheme is
/// read in any case, and an unknown method on a protected route is 401 before 405.
#[tokio::test]
async fn tokens_are_read_as_people_write_them() {
    let (api, _guard) = api(Db::Sqlite, &[("HTTP_API_TOKEN", "padded-token-0123456789abcdef0123\n")]).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let response = api
            .client
            .get(api.url("/dwh/events_part"))
            .header("authorization", format!("{scheme} padded-token-0123456789abcdef0123"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "{scheme}");
    }
    let response = api
        .client
        .put(api.url("/dwh/events_part"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 401, "no token: 401 before 405");
    let response = api
        .client
        .put(api.url("/dwh/events_part"))
        .bearer_auth("padded-token-0123456789abcdef0123")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 405, "with the token: 405");
    // The open routes stay open to any method's 405.
    let response = api.client.put(api.url("/health/live")).send().await.expect("request");
    assert_eq!(response.status(), 405);
}

/// Without a token the API is for this machine: a loopback Host only (a rebound DNS
/// name is refused), and no cross-origin call (a web page's form post).
#[tokio::test]
async fn without_a_token_only_this_machine_and_its_own_pages_are_served() {
    let (api, _guard) = api(Db::Sqlite, &[]).await;
    let port = api.base.rsplit(':').next().expect("port").to_owned();
    // Each request posts an event of its own.
    let request = |seed: u64, host: String, origin: Option<&str>| {
        let mut request = api
            .client
            .post(api.url("/dwh/events_part"))
            .header("host", host)
            .json(&json!({ "data": events(1, seed) }));
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    let own = format!("http://127.0.0.1:{port}");
    let response = request(1, format!("127.0.0.1:{port}"), Some(&own))
        .await
        .expect("request");
    assert_eq!(response.status(), 200, "the API's own page");
    let response = request(2, format!("localhost:{port}"), None).await.expect("request");
    assert_eq!(response.status(), 200, "no Origin: curl");

    let response = request(3, format!("127.0.0.1:{port}"), Some("http://evil.example"))
        .await
        .expect("request");
    let (status, body) = status_and_json(response).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("http://evil.example"),
        "{body}"
    );
    let response = request(4, format!("evil.example:{port}"), None).await.expect("request");
    let (status, body) = status_and_json(response).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("evil.example"),
        "{body}"
    );
    // The two served requests wrote their events; the refused ones nothing.
    assert_eq!(api.get("/dwh/events_part").await.1["count"], 2);
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("compress");
    encoder.finish().expect("compress")
}

/// Gzip bodies are taken, and every limit counts the decompressed bytes: a gzip
/// bomb gets a 413, never a full buffer. Answers are compressed on request.
#[tokio::test]
async fn gzip_bodies_are_read_and_a_gzip_bomb_is_a_413() {
    let (api, _guard) = api(Db::Sqlite, &[("HTTP_TABLES_MAX_BODY_BYTES", "1MiB")]).await;
    let post = |body: Vec<u8>, encoding: &'static str| {
        api.client
            .post(api.url("/dwh/events_part"))
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(body)
            .send()
    };
    let records = json!({ "data": events(100, 0) }).to_string();
    let response = post(gzip(records.as_bytes()), "gzip").await.expect("request");
    let (status, body) = status_and_json(response).await;
    assert_eq!((status, body["count"].clone()), (200, json!(100)), "{body}");

    // 16 MiB of JSON white space inside a valid document, a few KiB gzipped.
    let mut bomb = b"{\"data\": [".to_vec();
    bomb.resize(16 << 20, b' ');
    bomb.extend_from_slice(b"]}");
    let compressed = gzip(&bomb);
    assert!(compressed.len() < 1 << 20, "{} bytes compressed", compressed.len());
    let response = post(compressed, "gzip").await.expect("request");
    let (status, body) = status_and_json(response).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("decompressed"),
        "{body}"
    );

    let response = post(records.into_bytes(), "br").await.expect("request");
    let (status, body) = status_and_json(response).await;
    assert_eq!(status, 415, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("\"br\""), "{body}");

    // A client that asks for gzip gets it (this one does not decompress by itself).
    let raw = reqwest::Client::builder().no_gzip().build().expect("client");
    let response = raw
        .get(api.url("/dwh/events_part?limit=100"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("request");
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let compressed = response.bytes().await.expect("body");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&compressed[..]), &mut text).expect("gzip");
    let page: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(page["count"], 100);
    assert!(
        compressed.len() * 3 < text.len(),
        "{} of {}",
        compressed.len(),
        text.len()
    );
}

/// Stalled clients: connections that never finish their request head are closed
/// after HTTP_HEADER_READ_TIMEOUT_SECONDS, past HTTP_MAX_CONNECTIONS the rest wait
/// their turn, and a shutdown is not held up by any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_are_closed_bounded_and_do_not_hold_up_a_shutdown() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (dwh, dwh_config, _guard) = dwh(Db::Sqlite, &[]).await;
    let config = config_for(
        dwh_config.database_url.expose(),
        &[
            ("HTTP_HEADER_READ_TIMEOUT_SECONDS", "1"),
            ("HTTP_MAX_CONNECTIONS", "20"),
        ],
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let app = dwh_helper::http::router(
        dwh_helper::http::AppState::new(dwh, &config),
        config.http.max_body_bytes,
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(dwh_helper::http::serve(
        listener,
        app,
        stop.clone(),
        config.http.clone(),
    ));

    // 30 connections that begin a request and never finish its head.
    let mut stalled = Vec::new();
    for _ in 0..30 {
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
        stream
            .write_all(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await
            .expect("partial head");
        stalled.push(stream);
    }
    let started = std::time::Instant::now();
    for stream in &mut stalled {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(std::time::Duration::from_secs(15), stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a stalled connection stays open");
        assert!(
            !String::from_utf8_lossy(&rest).contains("200 OK"),
            "a stalled request was answered"
        );
    }
    // Twenty at once, one second each: the thirty are all closed in a few seconds.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let response = reqwest::get(format!("http://{address}/health/live"))
        .await
        .expect("request");
    assert_eq!(response.status(), 200, "the server serves on");

    // A shutdown with stalled connections open finishes at once.
    let mut idle = Vec::new();
    for _ in 0..5 {
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
        stream
            .write_all(b"POST /dwh/events_part HTTP/1.1\r\n")
            .await
            .expect("partial head");
        idle.push(stream);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.cancel();
    let finished = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    assert!(finished.is_ok(), "the shutdown waits on stalled connections");
}

/// A request the database cannot answer in time gets 503 after
/// HTTP_REQUEST_TIMEOUT_SECONDS, and its write is rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_is_a_503_and_writes_nothing() {
    let (dwh, dwh_config, _guard) = dwh(Db::Postgres, &[]).await;
    let url = dwh_config.database_url.expose().to_owned();
    let config = config_for(&url, &[("HTTP_REQUEST_TIMEOUT_SECONDS", "1")]);
    let api = Api::start(dwh, &config).await;
    let (status, _) = api.post("/dwh/user_locations", &json!({ "data": locations(1) })).await;
    assert_eq!(status, 200);
    // Another session holds the table.
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let mut lock = pool.begin().await.expect("transaction");
    sqlx::query("LOCK TABLE user_locations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let started = std::time::Instant::now();
    let (status, body) = api.post("/dwh/user_locations", &json!({ "data": locations(3) })).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("HTTP_REQUEST_TIMEOUT_SECONDS"),
        "{body}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    lock.rollback().await.expect("unlock");
    let (status, page) = api.get("/dwh/user_locations").await;
    assert_eq!(
        (status, page["count"].clone()),
        (200, json!(1)),
        "the timed-out write left nothing"
    );
}

/// An event dated outside DWH_EVENTS_MIN_DATE .. today + DWH_EVENTS_MAX_DAYS_AHEAD
/// is refused naming the field and the window, and adds no partition.
#[tokio::test]
async fn an_event_of_year_9999_is_refused_and_creates_no_partition() {
    let (dwh, dwh_config, _guard) = dwh(Db::Postgres, &[]).await;
    let url = dwh_config.database_url.expose().to_owned();
    let config = config_for(&url, &[]);
    let api = Api::start(dwh, &config).await;
    let partitions = || async {
        common::pg_count(
            &url,
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'events_part'::regclass",
        )
        .await
        .expect("partitions")
    };
    let (status, _) = api.post("/dwh/events_part", &json!({ "data": events(1, 0) })).await;
    assert_eq!(status, 200);
    let before = partitions().await;
    let mut data = events(3, 1);
    data[1]["event_date"] = json!("9999-12-01");
    let (status, body) = api.post("/dwh/events_part", &json!({ "data": data })).await;
    assert_eq!(status, 422, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("data[1]: field \"event_date\""), "{error}");
    assert!(
        error.contains("2000-01-01 to"),
        "the API's form names its years: {error}"
    );
    // Within the API's form, past the window's day: the window itself answers.
    let mut data = events(3, 1);
    data[1]["event_timestamp"] = json!(99_999_999_999_i64);
    let (status, body) = api.post("/dwh/events_part", &json!({ "data": data })).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(partitions().await, before, "no partition was created");
    assert_eq!(api.get("/dwh/events_part").await.1["count"], 1);
}
