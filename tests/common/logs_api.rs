//! A local HTTP server that plays the AppMetrica Logs API as documented: 202
//! while an export is prepared, 200 with `{"data": [...]}` (numbers as strings),
//! 429, 5xx, 401, "Try to use more parts." — and the faults of a real network:
//! connections dropped mid-body and truncated bodies. Each window follows a
//! script; every request is logged.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};

/// One answer of the script.
#[derive(Debug, Clone)]
pub enum Step {
    /// 202: the export is being prepared.
    Preparing,
    /// Any status with a small body.
    Status(u16, &'static str),
    /// 200 with the first half of the body, then the connection is cut.
    Drop,
    /// 200 with a body that ends in the middle of a row (Content-Length says so).
    Truncated,
}

/// A window's data and the faults before it is served.
#[derive(Debug, Clone, Default)]
pub struct Script {
    pub steps: VecDeque<Step>,
    pub rows: Vec<Value>,
    /// Below this many parts the API answers "Try to use more parts.".
    pub min_parts: u32,
    /// A pause between rows of the 200 body, to make the body slow.
    pub row_delay: Option<Duration>,
}

/// A request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub endpoint: String,
    pub query: HashMap<String, String>,
    pub authorization: Option<String>,
}

#[derive(Clone, Default)]
struct Shared {
    scripts: Arc<Mutex<HashMap<(String, String), Script>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

pub struct LogsApi {
    pub base: String,
    shared: Shared,
    _server: tokio::task::JoinHandle<()>,
}

impl LogsApi {
    pub async fn start() -> LogsApi {
        let shared = Shared::default();
        let app = Router::new()
            .route("/logs/v1/export/{file}", get(export))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        LogsApi {
            base,
            shared,
            _server: server,
        }
    }

    /// Sets the script of `endpoint` on `day` (YYYY-MM-DD).
    pub fn script(&self, endpoint: &str, day: &str, script: Script) {
        self.shared
            .scripts
            .lock()
            .expect("lock")
            .insert((endpoint.to_owned(), day.to_owned()), script);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().expect("lock").clone()
    }
}

async fn export(
    State(shared): State<Shared>,
    Path(file): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let endpoint = file.trim_end_matches(".json").to_owned();
    shared.seen.lock().expect("lock").push(Seen {
        endpoint: endpoint.clone(),
        query: query.clone(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("OAuth test-token") {
        return (
            StatusCode::UNAUTHORIZED,
            "{\"errors\":[{\"message\":\"Invalid oauth_token\"}]}",
        )
            .into_response();
    }
    let day = query
        .get("date_since")
        .map(|d| d[..10.min(d.len())].to_owned())
        .unwrap_or_default();
    let (step, script) = {
        let mut scripts = shared.scripts.lock().expect("lock");
        let Some(script) = scripts.get_mut(&(endpoint.clone(), day)) else {
            return Json(json!({ "data": [] })).into_response();
        };
        (script.steps.pop_front(), script.clone())
    };
    match step {
        Some(Step::Preparing) => return (StatusCode::ACCEPTED, "export is being prepared").into_response(),
        Some(Step::Status(code, body)) => {
            return (StatusCode::from_u16(code).expect("status"), body.to_owned()).into_response()
        }
        _ => {}
    }
    let parts: u32 = query.get("parts_count").and_then(|v| v.parse().ok()).unwrap_or(1);
    let number: u32 = query.get("part_number").and_then(|v| v.parse().ok()).unwrap_or(0);
    if parts < script.min_parts {
        return (
            StatusCode::BAD_REQUEST,
            "{\"errors\":[{\"message\":\"Export is too large. Try to use more parts.\"}]}",
        )
            .into_response();
    }
    let rows: Vec<Value> = script
        .rows
        .iter()
        .enumerate()
        .filter(|(i, _)| (*i as u32) % parts == number)
        .map(|(_, r)| r.clone())
        .collect();
    let body = json!({ "data": rows }).to_string();
    match step {
        Some(Step::Truncated) => {
            let cut = body.len() * 2 / 3;
            (StatusCode::OK, body[..cut].to_owned()).into_response()
        }
        Some(Step::Drop) => {
            let half = Bytes::from(body[..body.len() / 2].to_owned());
            let stream = futures_util::stream::iter([
                Ok::<Bytes, std::io::Error>(half),
                Err(std::io::Error::other("connection dropped")),
            ]);
            Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Body::from_stream(stream))
                .expect("response")
        }
        _ => match script.row_delay {
            None => (StatusCode::OK, [("content-type", "application/json")], body).into_response(),
            Some(delay) => {
                let pieces: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
                let stream = futures_util::stream::unfold((0usize, pieces), move |(i, pieces)| async move {
                    if i > pieces.len() {
                        return None;
                    }
                    let chunk = if i == 0 {
                        "{\"data\": [".to_owned()
                    } else {
                        tokio::time::sleep(delay).await;
                        let sep = if i < pieces.len() { "," } else { "]}" };
                        format!("{}{sep}", pieces[i - 1])
                    };
                    Some((Ok::<Bytes, std::io::Error>(Bytes::from(chunk)), (i + 1, pieces)))
                });
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Body::from_stream(stream))
                    .expect("response")
            }
        },
    }
}

use axum::Json;

/// `n` AppMetrica-style event rows of `day` (numbers as strings, as the API
/// sends them), distinct unless `twins` > 0: then the last `twins` rows repeat
/// the first ones exactly.
pub fn events(day: &str, n: usize, seed: u64, twins: usize) -> Vec<Value> {
    let base = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d")
        .expect("day")
        .and_hms_opt(0, 0, 0)
        .expect("time")
        .and_utc()
        .timestamp();
    let mut rows: Vec<Value> = (0..n - twins)
        .map(|i| {
            let k = seed * 100_000 + i as u64;
            let name = ["app_open", "purchase", "screen_view"][i % 3];
            json!({
                "event_name": name,
                "event_timestamp": (base + (i as i64 * 37) % 86_000).to_string(),
                "event_receive_timestamp": (base + (i as i64 * 37) % 86_000 + 5).to_string(),
                "event_json": format!("{{\"screen\":\"s{}\",\"value\":\"{}\"}}", i % 7, k),
                "session_id": (1_000_000 + k).to_string(),
                "appmetrica_device_id": (18_000_000_000_000_000_000u64 + k % 50).to_string(),
                "profile_id": format!("user-{}", k % 50),
                "os_name": "android",
                "os_version": "14",
                "device_manufacturer": "Google",
                "device_model": "Pixel 8",
                "mcc": "250",
                "mnc": "1",
                "city": "Moscow",
                "country_iso_code": "RU",
                "app_version_name": "5.12.0",
                "app_build_number": "51200",
            })
        })
        .collect();
    for i in 0..twins {
        rows.push(rows[i].clone());
    }
    rows
}
