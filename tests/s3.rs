//! The S3 client and the `/s3` endpoints against a real S3-protocol server over
//! HTTP (moto's server mode, started by scripts/test.sh).

mod common;

use std::time::Duration;

use common::*;
use dwh_helper::s3::{S3Error, S3};
use futures_util::StreamExt as _;

/// Bytes that do not repeat in any short period.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn read_all(s3: &S3, key: &str) -> Vec<u8> {
    s3.get_bytes(key).await.expect("object readable").to_vec()
}

async fn api_for(config: &dwh_helper::config::Config) -> (Api, Option<tempfile::TempDir>) {
    let (dwh, _, dir) = dwh(Db::Sqlite, &[]).await;
    (Api::start(dwh, config).await, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listings_are_complete_newest_first_and_only_direct_children() {
    let (s3, config) = s3_bucket(&[]).await;
    let keys: Vec<String> = (0..2_500).map(|i| format!("many/object-{i:05}.json")).collect();
    futures_util::stream::iter(keys.clone())
        .map(|key| {
            let s3 = s3.clone();
            async move { put_bytes(&s3, &key, key.as_bytes().to_vec()).await }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    put_bytes(&s3, "many/sub/deeper.json", b"{}".to_vec()).await;
    put_bytes(&s3, "other/elsewhere.json", b"{}".to_vec()).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    put_bytes(&s3, "many/newest.json", b"{}".to_vec()).await;

    let listing = s3.list_objects("many/", usize::MAX).await.expect("listing");
    assert_eq!(listing.objects.len(), 2_501, "every object past the 1,000 of one page");
    assert_eq!(listing.folders, ["many/sub/"], "deeper objects show as a folder only");
    assert_eq!(listing.objects[0].key, "many/newest.json", "newest first");
    assert!(
        listing
            .objects
            .windows(2)
            .all(|w| w[0].last_modified >= w[1].last_modified),
        "ordered newest first"
    );
    let mut listed: Vec<&str> = listing.objects.iter().map(|o| o.key.as_str()).collect();
    listed.sort_unstable();
    let mut expected: Vec<&str> = keys.iter().map(String::as_str).collect();
    expected.push("many/newest.json");
    expected.sort_unstable();
    assert_eq!(listed, expected);

    // The API pages the same listing with a cursor.
    let (api, _dir) = api_for(&config).await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => "/s3/objects?prefix=many/&limit=1000".to_owned(),
            Some(c) => format!("/s3/objects?prefix=many/&limit=1000&cursor={}", urlencode(c)),
        };
        let (status, body) = api.get(&path).await;
        assert_eq!(status, 200, "{body}");
        pages += 1;
        seen.extend(
            body["objects"]
                .as_array()
                .expect("objects")
                .iter()
                .map(|o| o["key"].as_str().expect("key").to_owned()),
        );
        assert_eq!(body["folders"], serde_json::json!(["many/sub/"]));
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 2_501);
    assert_eq!(seen[0], "many/newest.json");
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 2_501, "no object on two pages");
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_report_existence_size_and_info_and_can_be_deleted() {
    let (s3, _) = s3_bucket(&[]).await;
    put_bytes(&s3, "a/b.txt", b"hello".to_vec()).await;
    assert!(s3.object_exists("a/b.txt").await.expect("exists"));
    assert!(!s3.object_exists("a/none.txt").await.expect("exists"));
    assert_eq!(s3.get_object_size("a/b.txt").await.expect("size"), 5);
    let info = s3.object_info("a/b.txt").await.expect("info");
    assert_eq!(info.size, 5);
    assert!(info.etag.is_some() && info.last_modified.is_some());
    s3.delete_object("a/b.txt").await.expect("deleted");
    assert!(!s3.object_exists("a/b.txt").await.expect("exists"));
    assert_eq!(
        s3.delete_object("a/b.txt").await,
        Err(S3Error::NotFound { key: "a/b.txt".into() })
    );
    assert!(matches!(s3.get_object("a/b.txt").await, Err(S3Error::NotFound { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patches_are_byte_exact_on_small_and_large_objects() {
    const MIB: usize = 1024 * 1024;
    // A 5 MiB threshold: the 12 MiB object is patched with server-side part copies.
    let (s3, _) = s3_bucket(&[("S3_MULTIPART_THRESHOLD", "5MiB")]).await;
    for (name, size) in [("small", 1000usize), ("large", 12 * MIB)] {
        let key = format!("patch/{name}.bin");
        let mut expected = noise(size, size as u64);
        put_bytes(&s3, &key, expected.clone()).await;
        let cases = [
            ("inside", 100usize, 50usize),
            ("inside, across the middle", size / 2 - 7, 3000.min(size / 4)),
            ("ending at the end", size - 10, 10),
            ("past the end", size - 5, 20),
            ("appended at the end", size + 15, 8),
        ];
        for (what, offset, len) in cases {
            let data = noise(len, (offset + len) as u64);
            let info = s3
                .patch_object(&key, data.clone().into(), offset as u64, None)
                .await
                .unwrap_or_else(|e| panic!("{name}, {what}: {e}"));
            expected = dwh_helper::s3::patch::splice(&expected, &data, offset);
            assert_eq!(info.size as usize, expected.len(), "{name}, {what}");
            let stored = read_all(&s3, &key).await;
            assert!(stored == expected, "{name}, {what}: bytes differ");
        }
        let size_now = expected.len() as u64;
        assert_eq!(
            s3.patch_object(&key, b"x".to_vec().into(), size_now + 1, None).await,
            Err(S3Error::PastTheEnd {
                key: key.clone(),
                offset: size_now + 1,
                size: size_now
            })
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_that_lost_a_race_is_reported_and_writes_nothing() {
    const MIB: usize = 1024 * 1024;
    let (s3, config) = s3_bucket(&[("S3_MULTIPART_THRESHOLD", "5MiB")]).await;
    for (name, size) in [("small", 64usize), ("large", 11 * MIB)] {
        let key = format!("race/{name}.bin");
        put_bytes(&s3, &key, noise(size, 1)).await;
        let seen = s3.object_info(&key).await.expect("info").etag.expect("etag");
        // Someone else changes the object after we read it.
        let theirs = noise(size, 2);
        put_bytes(&s3, &key, theirs.clone()).await;
        let result = s3.patch_object(&key, b"ours".to_vec().into(), 10, Some(&seen)).await;
        assert_eq!(result, Err(S3Error::Conflict { key: key.clone() }), "{name}");
        assert!(read_all(&s3, &key).await == theirs, "{name}: their change stands");
    }
    // Over HTTP: If-Match with a stale ETag is a 409 with a JSON error.
    let (api, _dir) = api_for(&config).await;
    put_bytes(&s3, "race/http.txt", b"0123456789".to_vec()).await;
    let stale = s3.object_info("race/http.txt").await.expect("info").etag.expect("etag");
    put_bytes(&s3, "race/http.txt", b"abcdefghij".to_vec()).await;
    let response = api
        .client
        .patch(api.url("/s3/patch?key=race/http.txt&offset=2"))
        .header("if-match", stale)
        .body("XY")
        .send()
        .await
        .expect("request");
    let (status, body) = status_and_json(response).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().expect("error").contains("changed"), "{body}");
    assert_eq!(read_all(&s3, "race/http.txt").await, b"abcdefghij");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_rules_are_set_read_back_and_removed() {
    let (_, config) = s3_bucket(&[]).await;
    let (api, _dir) = api_for(&config).await;
    assert_eq!(
        api.get("/s3/lifecycle").await,
        (200, serde_json::json!({ "rules": [] }))
    );
    let put = |body: serde_json::Value| {
        let request = api.client.put(api.url("/s3/lifecycle")).json(&body);
        async move { status_and_json(request.send().await.expect("request")).await }
    };
    assert_eq!(put(serde_json::json!({ "prefix": "tmp/", "days": 7 })).await.0, 200);
    assert_eq!(
        put(serde_json::json!({ "prefix": "exports/", "days": 30, "id": "exports" }))
            .await
            .0,
        200
    );
    assert_eq!(
        put(serde_json::json!({ "prefix": "tmp/", "days": 3 })).await.0,
        200,
        "replaces"
    );
    let (status, body) = api.get("/s3/lifecycle").await;
    assert_eq!(status, 200);
    let mut rules: Vec<(String, i64)> = body["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            (
                r["prefix"].as_str().expect("prefix").to_owned(),
                r["days"].as_i64().expect("days"),
            )
        })
        .collect();
    rules.sort();
    assert_eq!(rules, [("exports/".to_owned(), 30), ("tmp/".to_owned(), 3)]);
    let (status, _) = put(serde_json::json!({ "prefix": "tmp/", "days": 0 })).await;
    assert_eq!(status, 400);
    let delete = |q: &str| {
        let request = api.client.delete(api.url(&format!("/s3/lifecycle{q}")));
        async move { status_and_json(request.send().await.expect("request")).await }
    };
    assert_eq!(delete("?prefix=tmp/").await.0, 200);
    assert_eq!(delete("?prefix=tmp/").await.0, 404);
    assert_eq!(delete("").await.0, 400);
    let (_, body) = api.get("/s3/lifecycle").await;
    assert_eq!(body["rules"].as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_missing_objects_get_json_errors() {
    let (s3, config) = s3_bucket(&[]).await;
    put_bytes(&s3, "data/file.csv", b"a,b\n1,2\n".to_vec()).await;
    let (api, _dir) = api_for(&config).await;
    let long = "k".repeat(1025);
    let cases: Vec<(reqwest::Method, String, u16, &str)> = vec![
        (
            reqwest::Method::GET,
            "/s3/object-info?key=".into(),
            400,
            "key must not be empty",
        ),
        (reqwest::Method::GET, "/s3/object-info".into(), 400, "key is required"),
        (
            reqwest::Method::GET,
            format!("/s3/download?key={long}"),
            400,
            "over the limit of 1024",
        ),
        (
            reqwest::Method::GET,
            "/s3/download?key=%C3%28".into(),
            400,
            "not valid UTF-8",
        ),
        (
            reqwest::Method::GET,
            "/s3/objects?limit=0".into(),
            400,
            "limit must be between",
        ),
        (reqwest::Method::GET, "/s3/objects?cursor=zzz".into(), 400, "cursor"),
        (
            reqwest::Method::GET,
            "/s3/object-info?key=data/none.csv".into(),
            404,
            "does not exist",
        ),
        (
            reqwest::Method::GET,
            "/s3/download?key=data/none.csv".into(),
            404,
            "does not exist",
        ),
        (
            reqwest::Method::DELETE,
            "/s3/delete?key=data/none.csv".into(),
            404,
            "does not exist",
        ),
        (
            reqwest::Method::PUT,
            "/s3/update?key=data/none.csv".into(),
            404,
            "does not exist",
        ),
        (
            reqwest::Method::PATCH,
            "/s3/patch?key=data/none.csv&offset=0".into(),
            404,
            "does not exist",
        ),
        (
            reqwest::Method::PATCH,
            "/s3/patch?key=data/file.csv".into(),
            400,
            "offset is required",
        ),
        (
            reqwest::Method::PATCH,
            "/s3/patch?key=data/file.csv&offset=-1".into(),
            400,
            "non-negative integer",
        ),
        (
            reqwest::Method::PATCH,
            "/s3/patch?key=data/file.csv&offset=99".into(),
            409,
            "past the end",
        ),
        (
            reqwest::Method::POST,
            "/s3/upload?key=data/x.csv".into(),
            400,
            "multipart/form-data",
        ),
    ];
    for (method, path, status, fragment) in cases {
        let response = api
            .client
            .request(method.clone(), api.url(&path))
            .body("xy")
            .send()
            .await
            .expect("request");
        let (got, body) = status_and_json(response).await;
        assert_eq!(got, status, "{method} {path}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(fragment),
            "{method} {path}: {message:?} should say {fragment:?}"
        );
    }
    // The form is one field, `file`: without it, or with another field before or
    // after it, the upload is refused and nothing is stored.
    let forms = [
        (
            reqwest::multipart::Form::new().text("other", "x"),
            "unexpected form field \"other\"",
        ),
        (
            reqwest::multipart::Form::new().text("other", "x").text("file", "data"),
            "unexpected form field \"other\"",
        ),
        (
            reqwest::multipart::Form::new().text("file", "data").text("note", "x"),
            "unexpected form field \"note\"",
        ),
        (reqwest::multipart::Form::new(), "malformed multipart body"),
    ];
    for (form, error) in forms {
        let response = api
            .client
            .post(api.url("/s3/upload?key=data/x.csv"))
            .multipart(form)
            .send()
            .await
            .expect("request");
        let (status, body) = status_and_json(response).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap_or_default().contains(error), "{body}");
        assert_eq!(
            s3.object_info("data/x.csv").await.map(|_| ()),
            Err(S3Error::NotFound {
                key: "data/x.csv".into()
            }),
            "{error}: nothing is stored"
        );
    }

    // A key with characters XML cannot carry is listed (percent-encoded on the
    // wire) and read back by its own name.
    let odd = "data/odd\u{17}\u{1}name.txt";
    put_bytes(&s3, odd, b"odd".to_vec()).await;
    let (status, body) = api.get("/s3/objects?prefix=data/").await;
    assert_eq!(status, 200, "{body}");
    let keys: Vec<&str> = body["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap())
        .collect();
    assert!(keys.contains(&odd), "{keys:?}");
    assert!(keys.contains(&"data/file.csv"), "{keys:?}");
    // Nor can a lifecycle rule's prefix hold them: refused before the store sees it.
    let response = api
        .client
        .put(api.url("/s3/lifecycle"))
        .json(&serde_json::json!({ "prefix": "tmp/\u{18}", "days": 3 }))
        .send()
        .await
        .expect("request");
    let (status, body) = status_and_json(response).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("XML 1.0"), "{body}");

    // A store that cannot be reached is a 503.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut env = s3_env(&format!("http://127.0.0.1:{closed}"));
    env.push(("DWH_DATABASE_URL".into(), "sqlite::memory:".into()));
    let down = dwh_helper::config::Config::from_vars(env).expect("config");
    let (api_down, _dir2) = api_for(&down).await;
    let (status, body) = api_down.get("/s3/objects?prefix=x/").await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().expect("error").contains("unreachable"), "{body}");
}

/// The seed's curl examples, against `dwh-helper run` as a child process: a 50 MiB
/// file goes up and comes back byte for byte while the server's peak memory grows
/// by less than a quarter of the file (about one 5 MiB part in practice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_go_up_and_down_through_the_api_in_bounded_memory() {
    const SIZE: usize = 50 * 1024 * 1024;
    let (s3, _) = s3_bucket(&[]).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let dir = tempfile::tempdir().expect("dir");
    let mut env = s3_env(&s3_endpoint());
    env.retain(|(k, _)| k != "S3_BUCKET_NAME");
    env.extend([
        ("S3_BUCKET_NAME".to_owned(), s3.bucket().to_owned()),
        ("HTTP_BIND".to_owned(), format!("127.0.0.1:{port}")),
        (
            "DWH_DATABASE_URL".to_owned(),
            format!("sqlite://{}", dir.path().join("dwh.db").display()),
        ),
        ("LOG_LEVEL".to_owned(), "warn".to_owned()),
    ]);
    let child = Child::run(&env, "api");
    let base = format!("http://127.0.0.1:{port}");
    wait_for(Duration::from_secs(30), "the API", || async {
        reqwest::get(format!("{base}/health/live")).await.ok().map(|_| ())
    })
    .await;
    // Warm up the paths once with a small file, then take the baseline.
    let small = dir.path().join("small.csv");
    std::fs::write(&small, b"a,b,c\n").expect("write");
    let curl = |args: &[&str]| {
        let output = std::process::Command::new("curl")
            .args(["-sS", "--fail-with-body"])
            .args(args)
            .output()
            .expect("curl runs");
        assert!(
            output.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        output.stdout
    };
    let upload = |file: &std::path::Path, key: &str| {
        curl(&[
            "-X",
            "POST",
            &format!("{base}/s3/upload?key={key}"),
            "-F",
            &format!("file=@{}", file.display()),
        ])
    };
    upload(&small, "data/file.csv");
    assert_eq!(curl(&[&format!("{base}/s3/download?key=data/file.csv")]), b"a,b,c\n");
    let (_, baseline) = memory_of(child.child.id());

    let big = dir.path().join("big.bin");
    let content = noise(SIZE, 99);
    std::fs::write(&big, &content).expect("write");
    let answer: serde_json::Value = serde_json::from_slice(&upload(&big, "data/big.bin")).expect("json");
    assert_eq!(answer["size"], SIZE as u64);
    assert!(
        answer["etag"].as_str().is_some_and(|e| e.contains('-')),
        "went up as a multipart upload: {answer}"
    );
    let (after_upload, _) = memory_of(child.child.id());
    eprintln!("peak after the upload: {} MiB", after_upload >> 20);
    let downloaded = dir.path().join("down.bin");
    curl(&[
        "-o",
        &downloaded.display().to_string(),
        &format!("{base}/s3/download?key=data/big.bin"),
    ]);
    let back = std::fs::read(&downloaded).expect("downloaded");
    assert!(
        back.len() == SIZE && back == content,
        "the download is byte for byte the upload"
    );
    let (peak, _) = memory_of(child.child.id());
    let growth = peak.saturating_sub(baseline);
    eprintln!("baseline RSS {} MiB, peak {} MiB", baseline >> 20, peak >> 20);
    assert!(
        growth < (SIZE as u64) / 4,
        "the server's memory grew by {} MiB for a 50 MiB file",
        growth >> 20
    );
    let info: serde_json::Value =
        serde_json::from_slice(&curl(&[&format!("{base}/s3/object-info?key=data/big.bin")])).expect("json");
    assert_eq!(info["size"], SIZE as u64);
    let status = child.terminate(Duration::from_secs(20)).expect("stops");
    assert!(status.success());
}

/// An upload cut off half-way leaves the old object as it was and no parts behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_upload_is_aborted_and_leaves_no_parts() {
    use tokio::io::AsyncWriteExt as _;
    let (s3, config) = s3_bucket(&[("S3_MULTIPART_THRESHOLD", "5MiB")]).await;
    put_bytes(&s3, "cut/file.bin", b"the old content".to_vec()).await;
    let (api, _dir) = api_for(&config).await;
    let address = api.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connect");
    let head = format!(
        "PUT /s3/update?key=cut/file.bin HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        30 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let chunk = noise(1024 * 1024, 5);
    for _ in 0..12 {
        stream.write_all(&chunk).await.expect("body");
    }
    // 12 of the promised 30 MiB are in: parts are being stored.
    wait_for(Duration::from_secs(30), "the multipart upload to start", || async {
        let pending = s3.unfinished_uploads("cut/").await.expect("uploads");
        (!pending.is_empty()).then_some(())
    })
    .await;
    // Then the client goes away.
    drop(stream);
    wait_for(Duration::from_secs(30), "the upload to be aborted", || async {
        let pending = s3.unfinished_uploads("cut/").await.expect("uploads");
        pending.is_empty().then_some(())
    })
    .await;
    // Give a wrongly completed upload the time to show, then check nothing changed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(read_all(&s3, "cut/file.bin").await, b"the old content");
    assert!(s3.unfinished_uploads("").await.expect("uploads").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_replaces_an_object_and_download_sends_its_headers() {
    let (s3, config) = s3_bucket(&[]).await;
    let (api, _dir) = api_for(&config).await;
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"id,name\n1,a\n".to_vec())
            .file_name("people.csv")
            .mime_str("text/csv")
            .expect("mime"),
    );
    let response = api
        .client
        .post(api.url("/s3/upload?key=exports/people.csv"))
        .multipart(form)
        .send()
        .await
        .expect("upload");
    let (status, body) = status_and_json(response).await;
    assert_eq!((status, body["size"].as_u64()), (201, Some(12)), "{body}");

    let response = api
        .client
        .put(api.url("/s3/update?key=exports/people.csv"))
        .header("content-type", "text/csv")
        .body("id,name\n1,a\n2,b\n")
        .send()
        .await
        .expect("update");
    let (status, body) = status_and_json(response).await;
    assert_eq!((status, body["size"].as_u64()), (200, Some(16)), "{body}");

    let response = api
        .client
        .get(api.url("/s3/download?key=exports/people.csv"))
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/csv");
    assert_eq!(headers["content-length"], "16");
    // A download, never a page: no browser renders or sniffs it in the API's origin.
    assert_eq!(
        headers["content-disposition"],
        "attachment; filename=\"people.csv\"; filename*=UTF-8''people.csv"
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["content-security-policy"], "sandbox");
    assert_eq!(
        headers["etag"].to_str().ok(),
        s3.object_info("exports/people.csv")
            .await
            .expect("info")
            .etag
            .as_deref()
    );
    assert_eq!(response.bytes().await.expect("body").as_ref(), b"id,name\n1,a\n2,b\n");
    let (status, info) = api.get("/s3/object-info?key=exports/people.csv").await;
    assert_eq!(
        (status, info["size"].as_u64(), info["content_type"].as_str()),
        (200, Some(16), Some("text/csv"))
    );

    // curl --data-binary says form-urlencoded for any file: stored as bytes.
    let response = api
        .client
        .put(api.url("/s3/update?key=exports/people.csv"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("<html><script>alert(1)</script>")
        .send()
        .await
        .expect("update");
    let (status, body) = status_and_json(response).await;
    assert_eq!(
        (status, body["content_type"].as_str()),
        (200, Some("application/octet-stream")),
        "{body}"
    );
    // A hostile key still gets a valid header, and the download still answers.
    let hostile = "exports/x\u{1}\".html";
    put_bytes(&s3, hostile, b"<html>".to_vec()).await;
    let response = api
        .client
        .get(api.url("/s3/download?key=exports/x%01%22.html"))
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-disposition"],
        "attachment; filename=\"x__.html\"; filename*=UTF-8''x%01%22.html"
    );
}

/// A forged Content-Length never sizes a buffer: 413 at once, nothing stored, and
/// the process (ingest and archive with it) serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_content_length_is_a_413_and_the_process_serves_on() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (s3, config) = s3_bucket(&[]).await;
    put_bytes(&s3, "data/file.csv", b"a,b\n".to_vec()).await;
    let (api, _dir) = api_for(&config).await;
    let address = api.base.trim_start_matches("http://").to_owned();
    for (method, path) in [("PUT", "/s3/update"), ("POST", "/s3/upload")] {
        let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connect");
        let request = format!(
            "{method} {path}?key=data/file.csv HTTP/1.1\r\nHost: {address}\r\n\
             Content-Type: multipart/form-data; boundary=X\r\nContent-Length: 4611686018427387904\r\n\
             Connection: close\r\n\r\nabc"
        );
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
            .await
            .expect("an answer")
            .expect("read");
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 413"), "{method} {path}: {text}");
        assert!(text.contains("over the upload limit"), "{text}");
    }
    assert_eq!(read_all(&s3, "data/file.csv").await, b"a,b\n");
    assert_eq!(api.get("/health/live").await.0, 200);
}

/// A form that never reaches its file (no blank line after `--X`, gigabytes of
/// it) is cut off at 64 KiB: 413, and the server stops reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_that_never_reaches_its_file_is_cut_off() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (s3, config) = s3_bucket(&[]).await;
    let (api, _dir) = api_for(&config).await;
    let address = api.base.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&address).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    const OFFERED: u64 = 1 << 30;
    let writer = tokio::spawn(async move {
        let head = format!(
            "POST /s3/upload?key=data/endless HTTP/1.1\r\nHost: {address}\r\n\
             Content-Type: multipart/form-data; boundary=X\r\nContent-Length: {OFFERED}\r\n\r\n--X\r\n"
        );
        let mut written = 0u64;
        if write.write_all(head.as_bytes()).await.is_err() {
            return written;
        }
        let junk = vec![b'a'; 64 * 1024];
        while written < OFFERED {
            if write.write_all(&junk).await.is_err() {
                break;
            }
            written += junk.len() as u64;
        }
        written
    });
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    // The answer comes while the client is still sending.
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&buffer[..n]),
            }
            if response.windows(4).any(|w| w == b"\r\n\r\n") && response.ends_with(b"}") {
                break;
            }
        }
    })
    .await;
    assert!(answered.is_ok(), "no answer within 60 s");
    let text = String::from_utf8_lossy(&response).into_owned();
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("before its file field"), "{text}");
    drop(read);
    let written = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("the server stops reading")
        .expect("writer");
    assert!(written < OFFERED / 8, "the server read on: {written} bytes sent");
    assert_eq!(
        s3.object_info("data/endless").await.map(|_| ()),
        Err(S3Error::NotFound {
            key: "data/endless".into()
        })
    );
}

/// The bucket's own lifecycle rules (abort incomplete uploads, expire by size, by
/// tag) come back exactly as they were after the API adds and removes its rules;
/// no rule, write or delete reaches the archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_changes_only_its_own_lifecycle_rules_and_never_the_archive() {
    use aws_sdk_s3::types::{
        AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, ExpirationStatus, LifecycleExpiration,
        LifecycleRule, LifecycleRuleFilter, Tag,
    };
    let (s3, config) = s3_bucket(&[]).await;
    let bucket = config.s3.bucket_name.clone();
    let expire = |days| LifecycleExpiration::builder().days(days).build();
    let owners = vec![
        LifecycleRule::builder()
            .id("ops-abort-mpu")
            .filter(LifecycleRuleFilter::builder().prefix("").build())
            .status(ExpirationStatus::Enabled)
            .abort_incomplete_multipart_upload(
                AbortIncompleteMultipartUpload::builder()
                    .days_after_initiation(2)
                    .build(),
            )
            .build()
            .expect("rule"),
        LifecycleRule::builder()
            .id("ops-big")
            .filter(LifecycleRuleFilter::builder().object_size_greater_than(1 << 30).build())
            .status(ExpirationStatus::Enabled)
            .expiration(expire(30))
            .build()
            .expect("rule"),
        LifecycleRule::builder()
            .id("ops-tagged")
            .filter(
                LifecycleRuleFilter::builder()
                    .tag(Tag::builder().key("scratch").value("yes").build().expect("tag"))
                    .build(),
            )
            .status(ExpirationStatus::Enabled)
            .expiration(expire(1))
            .build()
            .expect("rule"),
    ];
    s3.sdk()
        .put_bucket_lifecycle_configuration()
        .bucket(&bucket)
        .lifecycle_configuration(
            BucketLifecycleConfiguration::builder()
                .set_rules(Some(owners))
                .build()
                .expect("configuration"),
        )
        .send()
        .await
        .expect("the owner's rules are set");
    let rules = || async {
        s3.sdk()
            .get_bucket_lifecycle_configuration()
            .bucket(&bucket)
            .send()
            .await
            .expect("rules read")
            .rules()
            .to_vec()
    };
    let before = rules().await;
    assert_eq!(before.len(), 3, "{before:?}");
    let (api, _dir) = api_for(&config).await;
    let put = |body: serde_json::Value| {
        let request = api.client.put(api.url("/s3/lifecycle")).json(&body);
        async move { status_and_json(request.send().await.expect("request")).await }
    };

    let (status, body) = put(serde_json::json!({ "prefix": "tmp/", "days": 7 })).await;
    assert_eq!(status, 200, "{body}");
    let after = rules().await;
    let (own, others): (Vec<_>, Vec<_>) = after
        .iter()
        .cloned()
        .partition(|r| r.id().is_some_and(|id| id.starts_with("dwh-helper-")));
    assert_eq!(others, before, "the owner's rules are kept as they were");
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].expiration().and_then(|e| e.days()), Some(7));
    let listed = &body["rules"];
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(listed[0]["prefix"], "tmp/");
    assert_eq!(listed[0]["managed"], true);

    // Removing the API's rule leaves the owner's rules alone.
    let response = api
        .client
        .delete(api.url("/s3/lifecycle?prefix=tmp/"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(rules().await, before);

    // The archive: no rule over it, not even the whole bucket; no write or delete.
    for prefix in ["", "archive/", "arch", "archive/events_part/"] {
        let (status, body) = put(serde_json::json!({ "prefix": prefix, "days": 1 })).await;
        assert_eq!(status, 403, "{prefix:?}: {body}");
        assert!(body["error"].as_str().unwrap_or_default().contains("archive"), "{body}");
    }
    assert_eq!(rules().await, before);
    let planted = "archive/events_part/dt=2024-03-01/forged.jsonl.gz";
    put_bytes(&s3, planted, b"the archive's own".to_vec()).await;
    let form = reqwest::multipart::Form::new().text("file", "forged records");
    let attempts = [
        api.client
            .post(api.url(&format!("/s3/upload?key={planted}")))
            .multipart(form),
        api.client
            .put(api.url(&format!("/s3/update?key={planted}")))
            .body("forged"),
        api.client
            .patch(api.url(&format!("/s3/patch?key={planted}&offset=0")))
            .body("forged"),
        api.client.delete(api.url(&format!("/s3/delete?key={planted}"))),
    ];
    for attempt in attempts {
        let (status, body) = status_and_json(attempt.send().await.expect("request")).await;
        assert_eq!(status, 403, "{body}");
        assert!(
            body["error"].as_str().unwrap_or_default().contains("S3_ARCHIVE_PREFIX"),
            "{body}"
        );
    }
    assert_eq!(read_all(&s3, planted).await, b"the archive's own");
    // Reading the archive stays allowed.
    let (status, _) = api.get(&format!("/s3/object-info?key={planted}")).await;
    assert_eq!(status, 200);
}

/// The API's configuration with its S3 endpoint replaced (by a relay, say).
fn through(config: &dwh_helper::config::Config, endpoint: &str) -> dwh_helper::config::Config {
    let mut config = config.clone();
    config.s3.endpoint_url = Some(endpoint.parse().expect("endpoint URL"));
    config
}

/// The entries (objects, then folders) of a listing page.
fn entries(body: &serde_json::Value) -> (Vec<String>, Vec<String>) {
    let names = |field: &str, name: fn(&serde_json::Value) -> Option<&str>| -> Vec<String> {
        body[field]
            .as_array()
            .unwrap_or_else(|| panic!("{field} in {body}"))
            .iter()
            .map(|v| name(v).expect("a name").to_owned())
            .collect()
    };
    (
        names("objects", |o| o["key"].as_str()),
        names("folders", |f| f.as_str()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_objects_list_in_bounded_scans_and_one_request_pages_by_key() {
    let (s3, config) = s3_bucket(&[("S3_LIST_SCAN_LIMIT", "2500")]).await;
    let objects: Vec<String> = (0..10_000).map(|i| format!("big/o-{i:05}")).collect();
    // Folders before, between and after the objects, each holding several keys.
    let folders = ["big/a/", "big/o-05000/", "big/z/"];
    let under_folders = folders.iter().flat_map(|f| (0..3).map(move |i| format!("{f}k{i}")));
    futures_util::stream::iter(objects.iter().cloned().chain(under_folders))
        .map(|key| {
            let s3 = s3.clone();
            async move { put_bytes(&s3, &key, b"x".to_vec()).await }
        })
        .buffer_unordered(48)
        .collect::<Vec<()>>()
        .await;
    let (proxy, lists) = TcpProxy::watching(s3_endpoint().trim_start_matches("http://"), "list-type=2").await;
    let (api, _dir) = api_for(&through(&config, &proxy.url())).await;

    // Newest first: a scan of 2,500 entries at most (three LIST requests of
    // 1,000), said to be truncated, whatever the prefix holds.
    let (status, body) = api.get("/s3/objects?prefix=big/&limit=5").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(lists.seen(), 3, "LIST requests of the bounded scan");
    assert_eq!(body["order"], "newest");
    assert_eq!(body["truncated"], true, "{body}");
    assert_eq!(body["count"], 5);
    let (page, scanned_folders) = entries(&body);
    assert_eq!(page.len(), 5);
    let total = body["total"].as_u64().expect("total") as usize;
    assert_eq!(
        total + scanned_folders.len(),
        3_000,
        "the entries of three pages, no more"
    );
    assert!(total < objects.len());

    // By key: one LIST request per page, whatever the prefix holds.
    let before = lists.seen();
    let (status, body) = api.get("/s3/objects?prefix=big/&order=key&limit=10").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(lists.seen() - before, 1, "one LIST request for a page by key");
    assert_eq!(body["order"], "key");
    assert_eq!(body["total"], serde_json::Value::Null);
    assert_eq!(body["truncated"], false);
    let (page, page_folders) = entries(&body);
    assert_eq!(page_folders, ["big/a/"]);
    assert_eq!(page, objects[..9].to_vec(), "the first keys, in key order");

    // A page that ends on a folder resumes after everything under it.
    let (_, body) = api.get("/s3/objects?prefix=big/&order=key&limit=1").await;
    assert_eq!(entries(&body), (vec![], vec!["big/a/".to_owned()]));
    let cursor = body["next_cursor"].as_str().expect("a cursor after the folder");
    let (_, body) = api
        .get(&format!(
            "/s3/objects?prefix=big/&order=key&limit=1&cursor={}",
            urlencode(cursor)
        ))
        .await;
    assert_eq!(entries(&body), (vec![objects[0].clone()], vec![]), "{body}");

    // Every object and folder is reached, each once, one request a page.
    let (mut seen, mut seen_folders, mut pages) = (Vec::new(), Vec::new(), 0);
    let mut cursor: Option<String> = None;
    let before = lists.seen();
    loop {
        let path = match &cursor {
            None => "/s3/objects?prefix=big/&order=key&limit=1000".to_owned(),
            Some(c) => format!("/s3/objects?prefix=big/&order=key&limit=1000&cursor={}", urlencode(c)),
        };
        let (status, body) = api.get(&path).await;
        assert_eq!(status, 200, "{body}");
        pages += 1;
        let (page, page_folders) = entries(&body);
        assert!(page.len() + page_folders.len() <= 1000);
        seen.extend(page);
        seen_folders.extend(page_folders);
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(lists.seen() - before, pages, "one LIST request per page");
    assert_eq!(pages, 11, "10,003 entries in pages of 1,000");
    assert_eq!(seen, objects, "every object once, in key order");
    assert_eq!(seen_folders, folders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_api_prefix_confines_every_route() {
    let (s3, config) = s3_bucket(&[("S3_API_PREFIX", "/exports/")]).await;
    assert_eq!(config.s3.api_prefix.as_deref(), Some("exports/"));
    put_bytes(&s3, "exports/report.csv", b"a,b\n".to_vec()).await;
    put_bytes(&s3, "private/secret.csv", b"not the API's".to_vec()).await;
    let (api, _dir) = api_for(&config).await;

    // Inside: served. The listing defaults to the API's prefix.
    let (status, body) = api.get("/s3/objects").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["prefix"], "exports/");
    assert_eq!(entries(&body), (vec!["exports/report.csv".to_owned()], vec![]));
    let response = api
        .client
        .put(api.url("/s3/update?key=exports/report.csv"))
        .body("c,d\n")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(read_all(&s3, "exports/report.csv").await, b"c,d\n");

    // Outside: 403 naming the variable, for reads, writes, listings and rules.
    let form = reqwest::multipart::Form::new().text("file", "planted");
    let attempts = [
        api.client.get(api.url("/s3/objects?prefix=private/")),
        api.client.get(api.url("/s3/objects?prefix=")),
        api.client.get(api.url("/s3/object-info?key=private/secret.csv")),
        api.client.get(api.url("/s3/download?key=private/secret.csv")),
        api.client
            .post(api.url("/s3/upload?key=private/planted"))
            .multipart(form),
        api.client
            .put(api.url("/s3/update?key=private/secret.csv"))
            .body("overwritten"),
        api.client
            .patch(api.url("/s3/patch?key=private/secret.csv&offset=0"))
            .body("X"),
        api.client.delete(api.url("/s3/delete?key=private/secret.csv")),
        api.client
            .put(api.url("/s3/lifecycle"))
            .json(&serde_json::json!({"prefix": "private/", "days": 1})),
        api.client.delete(api.url("/s3/lifecycle?prefix=private/")),
    ];
    for attempt in attempts {
        let request = attempt.build().expect("request");
        let what = format!("{} {}", request.method(), request.url());
        let (status, body) = status_and_json(api.client.execute(request).await.expect("request")).await;
        assert_eq!(status, 403, "{what}: {body}");
        assert!(
            body["error"].as_str().unwrap_or_default().contains("S3_API_PREFIX"),
            "{what}: {body}"
        );
    }
    assert_eq!(read_all(&s3, "private/secret.csv").await, b"not the API's");
    assert!(!s3.object_exists("private/planted").await.expect("head"));

    // A prefix inside the archive is a configuration error.
    let mut env = s3_env(&s3_endpoint());
    env.push(("S3_API_PREFIX".into(), "archive/events_part".into()));
    let error = dwh_helper::config::Config::from_vars(env).expect_err("refused");
    assert!(error.to_string().contains("S3_API_PREFIX"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_changed_between_write_and_check_is_a_502() {
    let (s3, config) = s3_bucket(&[]).await;
    let (proxy, heads) = TcpProxy::watching(s3_endpoint().trim_start_matches("http://"), "HEAD /").await;
    let (api, _dir) = api_for(&through(&config, &proxy.url())).await;
    let key = "raced/report.csv";

    // The API's check (a HEAD after the write) waits while another writer
    // replaces the object with other bytes.
    let (held, release) = heads.hold_next(&format!("HEAD /{}/{key}", config.s3.bucket_name));
    let upload = tokio::spawn({
        let form = reqwest::multipart::Form::new().text("file", "the API's bytes");
        let request = api
            .client
            .post(api.url(&format!("/s3/upload?key={key}")))
            .multipart(form);
        async move { status_and_json(request.send().await.expect("request")).await }
    });
    tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .expect("the check reached the store")
        .expect("held");
    assert_eq!(read_all(&s3, key).await, b"the API's bytes", "the write happened first");
    put_bytes(&s3, key, b"another writer's, longer bytes".to_vec()).await;
    release.send(()).expect("release");

    let (status, body) = upload.await.expect("upload");
    assert_eq!(status, 502, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("another writer"), "{body}");
    assert!(error.contains(key), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_by_key_pass_keys_holding_control_characters() {
    let (s3, config) = s3_bucket(&[]).await;
    // Sorted by bytes: "\u{1}" < "\u{2}" < "b"; the folder "ctl/a\u{1}/" rolls up its keys.
    let keys = ["ctl/a\u{1}", "ctl/a\u{1}x", "ctl/a\u{2}", "ctl/b", "ctl/c\u{1f}"];
    for key in keys.iter().chain(&["ctl/a\u{1}/inner"]) {
        put_bytes(&s3, key, b"x".to_vec()).await;
    }
    let (api, _dir) = api_for(&config).await;
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..20 {
        let path = match &cursor {
            None => "/s3/objects?prefix=ctl/&order=key&limit=1".to_owned(),
            Some(c) => format!("/s3/objects?prefix=ctl/&order=key&limit=1&cursor={}", urlencode(c)),
        };
        let (status, body) = api.get(&path).await;
        assert_eq!(status, 200, "{body}");
        let (objects, folders) = entries(&body);
        assert_eq!(objects.len() + folders.len(), 1, "{body}");
        names.extend(objects.into_iter().chain(folders));
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        names,
        [
            "ctl/a\u{1}",
            "ctl/a\u{1}/",
            "ctl/a\u{1}x",
            "ctl/a\u{2}",
            "ctl/b",
            "ctl/c\u{1f}"
        ],
        "every entry once, in key order"
    );
}
