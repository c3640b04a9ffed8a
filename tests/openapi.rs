//! `/openapi.json` and `/docs`: a valid OpenAPI 3.1 document that describes the
//! routes the server really has, record schemas that agree with the decoder, and
//! a docs page that renders with nothing loaded from any other host.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::*;
use dwh_helper::catalogue::Table;
use serde_json::{json, Value};

const TOKEN: &str = "openapi-test-token";

async fn api() -> (Api, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("dwh.db").display());
    let config = config_for(&url, &[("HTTP_API_TOKEN", TOKEN)]);
    let dwh = migrated(&config).await;
    (Api::start(dwh, &config).await, dir)
}

async fn document(api: &Api) -> Value {
    let response = api.client.get(api.url("/openapi.json")).send().await.expect("request");
    assert_eq!(response.status(), 200, "the document needs no token");
    response.json().await.expect("JSON")
}

/// Runs Python with `script`, the arguments after it, in `dir` (or here);
/// returns success and output.
fn python_in(dir: Option<&std::path::Path>, script: &str, args: &[&str]) -> (bool, String) {
    let mut command = Command::new("python3");
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let out = command.arg("-c").arg(script).args(args).output().expect("python3 runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn python(script: &str, args: &[&str]) -> (bool, String) {
    python_in(None, script, args)
}

const VALIDATE: &str = r#"
import json, sys
from openapi_spec_validator import validate
validate(json.load(open(sys.argv[1])))
"#;

#[tokio::test]
async fn the_document_is_valid_openapi_3_1_and_lists_every_route_the_server_has() {
    let (api, dir) = api().await;
    let doc = document(&api).await;
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, doc.to_string()).unwrap();
    let (valid, output) = python(VALIDATE, &[path.to_str().unwrap()]);
    assert!(valid, "openapi-spec-validator: {output}");
    // The validator does refuse a broken document.
    let mut broken = doc.clone();
    broken["paths"]["/s3/objects"]["get"]["responses"] = json!("none");
    std::fs::write(&path, broken.to_string()).unwrap();
    assert!(
        !python(VALIDATE, &[path.to_str().unwrap()]).0,
        "a broken document validates"
    );

    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|m| ["get", "post", "put", "patch", "delete"].contains(&m.as_str()))
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let mut expected: BTreeSet<(String, String)> = [
        ("GET", "/health/live"),
        ("GET", "/health/ready"),
        ("GET", "/metrics"),
        ("GET", "/status"),
        ("GET", "/s3/objects"),
        ("GET", "/s3/object-info"),
        ("GET", "/s3/download"),
        ("POST", "/s3/upload"),
        ("PUT", "/s3/update"),
        ("PATCH", "/s3/patch"),
        ("DELETE", "/s3/delete"),
        ("GET", "/s3/lifecycle"),
        ("PUT", "/s3/lifecycle"),
        ("DELETE", "/s3/lifecycle"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    for table in Table::ALL {
        expected.insert(("GET".into(), format!("/dwh/{}", table.name())));
        expected.insert(("POST".into(), format!("/dwh/{}", table.name())));
    }
    assert_eq!(documented, expected);

    // Each documented operation is served: with the token it is never the 404 of
    // an unknown route nor a 405; without it, every protected one is 401.
    for (method, path) in &documented {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let op = &doc["paths"][path][method.as_str().to_lowercase()];
        let authed = api
            .client
            .request(method.clone(), api.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("request");
        let status = authed.status().as_u16();
        let body: Value = authed.json().await.unwrap_or(Value::Null);
        assert_ne!(status, 405, "{method} {path}");
        assert!(
            !(status == 404 && body["error"] == "no such route"),
            "{method} {path} is documented but not served"
        );
        assert!(
            op["responses"].get(status.to_string()).is_some(),
            "{method} {path} answered {status}, which is not documented: {body}"
        );
        let protected = !path.starts_with("/health/");
        assert_eq!(
            op["security"] == json!([{ "bearer": [] }]),
            protected,
            "{method} {path}"
        );
        if protected {
            let anonymous = api
                .client
                .request(method.clone(), api.url(path))
                .send()
                .await
                .expect("request");
            assert_eq!(anonymous.status(), 401, "{method} {path}");
            assert!(op["responses"]["401"].is_object(), "{method} {path}");
        }
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({ "type": "http", "scheme": "bearer" })
    );
}

/// Validates `instances` (a JSON array) against `schema` with jsonschema's 2020-12
/// validator (OpenAPI 3.1's dialect); prints one line per instance: ok or the error.
const CHECK_RECORDS: &str = r#"
import json, sys
from jsonschema import Draft202012Validator
schema = json.load(open(sys.argv[1]))
for instance in json.load(open(sys.argv[2])):
    errors = list(Draft202012Validator(schema).iter_errors(instance))
    print('ok' if not errors else 'invalid: ' + errors[0].message)
"#;

#[tokio::test]
async fn each_record_schema_agrees_with_the_decoder() {
    let (api, dir) = api().await;
    let doc = document(&api).await;
    for table in Table::ALL {
        let name = table.name();
        let schema = &doc["components"]["schemas"][name];
        let required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(!required.is_empty(), "{name}");
        // Valid records (the demo's sample data) match the schema and are written.
        let mut records = dwh_helper::sample::records(table, 3, 7);
        // A record missing each required field, and one with a field of the wrong kind.
        let mut expect = vec!["ok"; records.len()];
        for field in &required {
            let mut r = records[0].clone();
            r.as_object_mut().unwrap().remove(*field);
            records.push(r);
            expect.push("invalid");
        }
        let mut wrong = records[0].clone();
        wrong[required[0]] = json!({ "an": "object" });
        records.push(wrong);
        expect.push("invalid");

        let schema_path = dir.path().join(format!("{name}.schema.json"));
        let records_path = dir.path().join(format!("{name}.records.json"));
        // References point into the document's components.
        let mut schema = schema.clone();
        schema["components"] = doc["components"].clone();
        std::fs::write(&schema_path, schema.to_string()).unwrap();
        std::fs::write(&records_path, Value::Array(records.clone()).to_string()).unwrap();
        let (ran, output) = python(
            CHECK_RECORDS,
            &[schema_path.to_str().unwrap(), records_path.to_str().unwrap()],
        );
        assert!(ran, "{output}");
        let verdicts: Vec<&str> = output.lines().collect();
        for ((record, verdict), expected) in records.iter().zip(&verdicts).zip(&expect) {
            assert!(
                verdict.starts_with(expected),
                "{name}: {record} is {verdict}, expected {expected}"
            );
            let response = api
                .client
                .post(api.url(&format!("/dwh/{name}")))
                .bearer_auth(TOKEN)
                .json(&json!({ "data": [record] }))
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            match *expected {
                "ok" => assert_eq!(status, 200, "{name}: {record}"),
                _ => assert_eq!(status, 422, "{name}: {record}"),
            }
        }
        // What is read back matches the row schema of the GET operation.
        let rows_schema =
            &doc["paths"][format!("/dwh/{name}")]["get"]["responses"]["200"]["content"]["application/json"]["schema"];
        let response = api
            .client
            .get(api.url(&format!("/dwh/{name}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("request");
        let page: Value = response.json().await.expect("JSON");
        assert_eq!(page["count"], 3, "{name}");
        let schema_path = dir.path().join(format!("{name}.rows.schema.json"));
        let mut schema = rows_schema.clone();
        schema["components"] = doc["components"].clone();
        std::fs::write(&schema_path, schema.to_string()).unwrap();
        std::fs::write(&records_path, json!([page]).to_string()).unwrap();
        let (ran, output) = python(
            CHECK_RECORDS,
            &[schema_path.to_str().unwrap(), records_path.to_str().unwrap()],
        );
        assert!(
            ran && output.trim() == "ok",
            "{name}: the rows read back do not match: {output}"
        );
    }
}

/// Chromium from Debian's packages (scripts/test.sh installs it). Without it the
/// test fails rather than skips.
fn chromium() -> String {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find(|b| Command::new("which").arg(b).output().is_ok_and(|o| o.status.success()))
        .map(|b| b.to_string())
        .expect("chromium is installed (scripts/test.sh installs Debian's chromium)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_page_renders_the_operations_from_this_service_alone() {
    let browser = chromium();
    let (api, dir) = api().await;
    // The page needs no token; its assets are this service's.
    let page = api.client.get(api.url("/docs/")).send().await.expect("request");
    assert_eq!(page.status(), 200);
    let html = page.text().await.expect("HTML");
    let outside: Vec<&str> = html
        .split(['"', '\''])
        .filter(|s| s.starts_with("http://") || s.starts_with("https://") || s.starts_with("//"))
        .collect();
    assert!(outside.is_empty(), "the page refers to other hosts: {outside:?}");
    assert!(html.contains("swagger-ui"), "{html}");
    let screenshot = dir.path().join("docs.png");
    let base = api.base.clone();
    let (dom, shot) = tokio::task::spawn_blocking(move || {
        let run = |extra: &[String]| {
            Command::new(&browser)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    // Any host but this service's fails to resolve.
                    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                    "--virtual-time-budget=20000",
                    "--window-size=1280,3000",
                ])
                .args(extra)
                .arg(format!("{base}/docs/"))
                .output()
                .expect("chromium runs")
        };
        let dom = run(&["--dump-dom".into()]);
        let shot = run(&[format!("--screenshot={}", screenshot.display())]);
        (dom, (shot, screenshot))
    })
    .await
    .expect("browser task");
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    for table in Table::ALL {
        assert!(
            dom.contains(&format!("/dwh/{}", table.name())),
            "the rendered page lists /dwh/{}: {}",
            table.name(),
            &dom[..dom.len().min(2000)]
        );
    }
    for operation in [
        "/s3/upload",
        "/s3/lifecycle",
        "/health/ready",
        "/status",
        "Read events_part",
        "Write user_locations",
    ] {
        assert!(dom.contains(operation), "the rendered page lists {operation}");
    }
    let (out, path) = shot;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let png = std::fs::read(&path).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    assert!(
        png.len() > 20_000,
        "the screenshot shows a rendered page ({} bytes)",
        png.len()
    );
}

/// schemathesis (PyPI; scripts/test.sh installs it) against the API on
/// PostgreSQL and the test S3 server, from the document the API serves:
/// examples, coverage, fuzzing and stateful phases, every default check
/// (no 5xx, responses and statuses as documented, schema-valid requests
/// accepted, schema-violating ones refused, auth not ignored, ...). Returns the
/// success and the output.
fn schemathesis(document: &str, base: &str, extra: &[&str], dir: &std::path::Path) -> (bool, String) {
    let examples = std::env::var("DWH_TEST_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "40".into());
    let seed = std::env::var("DWH_TEST_SCHEMATHESIS_SEED").unwrap_or_else(|_| "20261126".into());
    // Its entry point through python3, as pip may put the script off PATH.
    const CLI: &str =
        "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'schemathesis'; sys.exit(schemathesis())";
    let auth = format!("Authorization: Bearer {TOKEN}");
    let mut args = vec!["run", document, "--url", base, "--mode", "all", "--no-color"];
    args.extend([
        "--max-examples",
        &examples,
        "--seed",
        &seed,
        "--generation-database",
        "none",
    ]);
    args.extend(["--request-timeout", "30", "-H", &auth]);
    args.extend(extra);
    python_in(Some(dir), CLI, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failure_in_the_api_fuzzed_from_its_own_document() {
    // The whole service's surroundings: PostgreSQL, the S3 server and a broker
    // (which /status reads).
    let url = fresh_pg_url().await;
    let (broker, prefix) = broker(1).await;
    let mut env = ingest_env(&broker, &prefix, &url);
    env.extend(s3_env(&s3_endpoint()));
    let config = config_from(&env, &[("HTTP_API_TOKEN", TOKEN)]);
    dwh_helper::s3::S3::new(&config.s3)
        .create_bucket()
        .await
        .expect("bucket created");
    let dwh = migrated(&config).await;
    let api = Api::start(dwh, &config).await;
    let dir = tempfile::tempdir().expect("dir");
    let base = api.base.clone();
    let served = format!("{base}/openapi.json");
    let work = dir.path().to_owned();
    let (passed, output) = tokio::task::spawn_blocking(move || schemathesis(&served, &base, &[], &work))
        .await
        .expect("schemathesis task");
    // The numbers the run reports, for the log (cargo test --nocapture shows them).
    let summary: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("generated") || l.contains("Tested:") || l.contains("passed"))
        .collect();
    println!("schemathesis: {}", summary.join(" | "));
    assert!(passed, "schemathesis found failures:\n{output}");
    // It did test every operation the document lists.
    let operations = document(&api).await["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum::<usize>();
    assert!(
        output.contains(&format!("Tested: {operations}")),
        "not every one of the {operations} operations was tested:\n{output}"
    );
    assert!(!output.contains(" 0 generated"), "{output}");

    // The same run does fail a server that breaks its document: here the document
    // claims /s3/objects takes limits up to 20,000, which the server refuses.
    let mut claimed = document(&api).await;
    claimed["paths"]["/s3/objects"]["get"]["parameters"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .filter(|p| p["name"] == "limit")
        .for_each(|p| p["schema"]["maximum"] = json!(20_000));
    let path = dir.path().join("claimed.json");
    std::fs::write(&path, claimed.to_string()).unwrap();
    let (base, work) = (api.base.clone(), dir.path().to_owned());
    let (passed, output) = tokio::task::spawn_blocking(move || {
        schemathesis(
            path.to_str().unwrap(),
            &base,
            &["--include-path", "/s3/objects", "--include-method", "GET"],
            &work,
        )
    })
    .await
    .expect("schemathesis task");
    assert!(!passed, "a document the server breaks passes:\n{output}");
    assert!(output.contains("Schema-valid request rejected"), "{output}");
}
