//! `GET /dwh/{table}` and `POST /dwh/{table}`.
//!
//! Guarantees: a POST commits all its records or none. Its body is parsed whole
//! before anything is written (a syntax error is a 400); its records are then
//! decoded and checked in parts, each part written while the next decodes (on
//! PostgreSQL; SQLite, with its one writer, takes them all at the end), all in
//! one transaction. One invalid record fails the request with 422 naming its
//! index and field, and rolls back what was written of it. Statements are
//! chunked by the two DWH limits; re-posting the same records inserts nothing new.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json_};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt as _};
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody, Unauthorized};
use super::{validate, AppState};
use crate::catalogue::{value, Row, Table};
use crate::store::ReadQuery;

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 10_000;

/// One route serves the seven tables; the OpenAPI document lists each table's
/// path with its own record schema (see `openapi.rs`).
/// Bodies may come gzip-compressed (every limit counts the decompressed bytes);
/// answers are compressed for a client that accepts it.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(
        routes!(list, insert)
            .layer::<_, Infallible>(tower_http::decompression::RequestDecompressionLayer::new().gzip(true))
            .layer::<_, Infallible>(axum::middleware::from_fn(known_encoding))
            .layer::<_, Infallible>(tower_http::compression::CompressionLayer::new().gzip(true)),
    )
}

/// 415 with a JSON body for a `Content-Encoding` other than gzip (or none).
async fn known_encoding(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    let encoding = request
        .headers()
        .get(axum::http::header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("gzip") | Some("x-gzip") | Some("identity") => Ok(next.run(request).await),
        Some(other) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding \"{other}\" is not supported: send gzip, or no encoding"),
        )),
    }
}

/// The path of the generic operations, expanded per table in the document.
pub const PATH: &str = "/dwh/{table}";

fn table(name: &str) -> Result<Table, ApiError> {
    name.parse::<Table>().map_err(|e| ApiError::not_found(e.to_string()))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Rows {
    /// Rows in id order, each with its columns (`id` and `ingested_at` included).
    #[schema(value_type = Vec<Object>)]
    pub rows: Vec<Map<String, Json_>>,
    pub count: usize,
    /// The page ended before `limit` at HTTP_TABLES_MAX_RESPONSE_BYTES: ask for the
    /// next with `after_id` set to the last row's id.
    pub truncated: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct Page {
    /// Rows at most
    #[param(minimum = 1, maximum = 10000, default = 100)]
    limit: Option<u32>,
    /// Only rows with a larger id (the last id of the previous page)
    after_id: Option<i64>,
}

/// The answer of a table route to a name that is none of the seven (for the
/// OpenAPI document).
#[derive(utoipa::IntoResponses)]
#[response(status = 404, description = "No such table")]
#[allow(dead_code)] // a description of a response, never built
struct NoSuchTable(ErrorBody);

/// The answer of a read when the database does not answer.
#[derive(utoipa::IntoResponses)]
#[response(status = 503, description = "The database cannot be reached")]
#[allow(dead_code)] // a description of a response, never built
struct DatabaseUnreachable(ErrorBody);

/// Reads rows in id order; the table's key columns filter by equality.
#[utoipa::path(get, path = "/dwh/{table}", tag = "tables",
    params(("table" = String, Path, description = "One of the seven tables"), Page),
    responses(
        (status = 200, description = "A page of rows", body = Rows),
        (status = 400, description = "A parameter is invalid or unknown", body = ErrorBody),
        Unauthorized,
        NoSuchTable,
        DatabaseUnreachable,
    ),
    security(("bearer" = [])))]
async fn list(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Rows>, ApiError> {
    let table = table(&name)?;
    let mut query = read_query(table, params, &state.validators)?;
    query.max_bytes = state.config.http.tables_max_response_bytes;
    let page = state.dwh.read(table, &query).await?;
    Ok(Json(Rows {
        count: page.rows.len(),
        rows: page.rows,
        truncated: page.truncated,
    }))
}

/// `limit`, `after_id`, and equality filters on the natural key's columns.
fn read_query(
    table: Table,
    params: HashMap<String, String>,
    validators: &validate::Validators,
) -> Result<ReadQuery, ApiError> {
    let spec = table.spec();
    let mut query = ReadQuery {
        filters: Vec::new(),
        after_id: None,
        limit: DEFAULT_LIMIT,
        max_bytes: usize::MAX,
    };
    let mut params: Vec<(String, String)> = params.into_iter().collect();
    params.sort();
    for (name, raw) in params {
        match name.as_str() {
            "limit" => {
                query.limit = raw
                    .parse::<u32>()
                    .ok()
                    .filter(|l| (1..=MAX_LIMIT).contains(l))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("limit must be an integer from 1 to {MAX_LIMIT}, got \"{raw}\""))
                    })?;
            }
            "after_id" => {
                query.after_id = Some(
                    raw.parse::<i64>()
                        .map_err(|_| ApiError::bad_request(format!("after_id must be an integer, got \"{raw}\"")))?,
                );
            }
            _ => {
                let column = spec
                    .column(&name)
                    .filter(|c| spec.key.contains(&c.name))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "unknown query parameter \"{name}\"; use limit, after_id or a key column of {}: {}",
                            spec.name,
                            spec.key.join(", ")
                        ))
                    })?;
                let value = value::decode(column.ty, &Json_::String(raw.clone()))
                    .map_err(|p| ApiError::bad_request(format!("filter \"{name}\": {p}")))?;
                validators.check_filter(column, &raw).map_err(ApiError::bad_request)?;
                query.filters.push((column, value));
            }
        }
    }
    Ok(query)
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct InsertBody {
    /// The records, as on the table's topic.
    #[schema(value_type = Vec<Object>, min_items = 1)]
    pub data: Vec<Json_>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Inserted {
    pub inserted_ids: Vec<i64>,
    /// Rows inserted (re-posted, existing rows are not counted).
    pub count: usize,
    /// Rows that replaced an older stored version (newest-wins tables).
    pub updated: u64,
    /// Statements the write took, chunked by the DWH limits.
    pub batches: usize,
}

/// Validates every record, then writes them in one transaction (re-posted
/// records insert nothing new).
#[utoipa::path(post, path = "/dwh/{table}", tag = "tables",
    params(("table" = String, Path, description = "One of the seven tables")),
    request_body = InsertBody,
    responses(
        (status = 200, description = "Written", body = Inserted),
        (status = 400, description = "The body is not JSON, or holds no record", body = ErrorBody),
        Unauthorized,
        NoSuchTable,
        (status = 413, description = "The body (decompressed) is over HTTP_TABLES_MAX_BODY_BYTES, or holds over HTTP_TABLES_MAX_RECORDS records", body = ErrorBody),
        (status = 415, description = "The body is not application/json, or its Content-Encoding is not gzip", body = ErrorBody),
        (status = 422, description = "A record is invalid (its index and field are named) or refused by the database", body = ErrorBody),
        (status = 503, description = "The database cannot be reached, or HTTP_TABLES_MAX_CONCURRENT_WRITES writes are running (Retry-After)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn insert(
    State(state): State<AppState>,
    Path(name): Path<String>,
    request: axum::extract::Request,
) -> Result<Json<Inserted>, ApiError> {
    let table = table(&name)?;
    if !is_json(request.headers()) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Expected request with `Content-Type: application/json`",
        ));
    }
    // The permit comes before the body is read: a write beyond the limit holds
    // no memory at all.
    let Ok(_permit) = state.table_writes.clone().try_acquire_owned() else {
        let mut busy = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} writes are running (HTTP_TABLES_MAX_CONCURRENT_WRITES); try again shortly",
                state.config.http.tables_max_concurrent_writes
            ),
        );
        busy.retry_after = Some(1);
        return Err(busy);
    };
    let limits = &state.config.http;
    let body = axum::body::to_bytes(request.into_body(), limits.tables_max_body_bytes)
        .await
        .map_err(|e| body_error(e, limits.tables_max_body_bytes))?;
    let (max_records, (part_rows, max_row_bytes)) = (limits.tables_max_records, state.dwh.limits());
    let (validators, window) = (state.validators.clone(), state.config.dwh.events_window);
    // Decoded off the runtime's threads, a part ahead of the write: a part is
    // written while the next one decodes.
    let (decoded, mut parts) = tokio::sync::mpsc::channel(PARTS_AHEAD);
    let (counted, count) = tokio::sync::oneshot::channel();
    let decoding = tokio::task::spawn_blocking(move || {
        let parse = records::Parse::new(table, max_records, max_row_bytes, &validators, &window);
        // A request given up on takes neither the count nor the parts.
        let counted = |records| {
            let _ = counted.send(records);
        };
        parse_records(parse, &body, part_rows, counted, |part| {
            decoded.blocking_send(part).is_ok()
        });
    });
    // The transaction opens, with the records' ids, while the first part decodes.
    let mut begun = match count.await {
        Ok(records) => Some(state.dwh.begin_rows(table, records).await),
        // The body is refused: the reason comes as the one part.
        Err(_) => None,
    };
    let mut writer = None;
    let mut records = 0;
    while let Some(part) = parts.recv().await {
        // An invalid record ends the request (even when the database could not
        // be reached); dropping the writer rolls back the parts written before it.
        let rows = part?;
        let writer = match &mut writer {
            Some(writer) => writer,
            None => writer.insert(
                begun
                    .take()
                    .ok_or_else(|| undecoded("a part came before the count"))??,
            ),
        };
        records += rows.len();
        writer.write(rows).await?;
    }
    decoding.await.map_err(|e| undecoded(&e.to_string()))?;
    let Some(writer) = writer else {
        return Err(undecoded("no part came"));
    };
    let outcome = writer.commit().await?;
    tracing::info!(
        table = table.name(),
        records,
        inserted = outcome.inserted_ids.len(),
        updated = outcome.updated,
        statements = outcome.statements,
        "rows posted"
    );
    Ok(Json(Inserted {
        count: outcome.inserted_ids.len(),
        inserted_ids: outcome.inserted_ids,
        updated: outcome.updated,
        batches: outcome.statements,
    }))
}

/// A 500: the decoding of the records broke off.
fn undecoded(reason: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the records could not be decoded: {reason}"),
    )
}

/// `application/json` or `application/*+json`, as axum's `Json` takes.
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(mime) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
    else {
        return false;
    };
    let mime = mime.trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

fn body_error(e: axum::Error, limit: usize) -> ApiError {
    // axum reports the limit as a `LengthLimitError` somewhere in the chain.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut too_large = false;
    while let Some(c) = cause {
        too_large |= c.to_string().contains("length limit exceeded");
        cause = c.source();
    }
    match too_large {
        true => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {limit} bytes (HTTP_TABLES_MAX_BODY_BYTES, counted decompressed); send the records in parts"),
        ),
        false => ApiError::bad_request(format!("the body could not be read: {e}")),
    }
}

/// Decoded parts a POST's decoding may run ahead of its write.
const PARTS_AHEAD: usize = 2;

/// `{"data": [...]}` in two passes: the records' text is found in one pass over
/// the body (a syntax error anywhere is a 400), their number handed to
/// `counted`, then the records are decoded and checked in parts of `part_rows`,
/// each on the machine's cores, and handed to `send` in order; the first
/// invalid record in order is the last thing sent.
/// Fields the table does not have are skipped unread. Memory holds the body and
/// the parts decoded ahead, never a tree of the whole request. Stops when `send`
/// returns false (the write gave up).
fn parse_records(
    parse: records::Parse<'_>,
    body: &[u8],
    part_rows: usize,
    counted: impl FnOnce(usize),
    mut send: impl FnMut(Result<Vec<Row>, ApiError>) -> bool,
) {
    let parse = match scan_records(parse, body) {
        Ok(parse) => parse,
        Err(e) => {
            send(Err(e));
            return;
        }
    };
    counted(parse.records.len());
    let part_rows = part_rows.max(1);
    for (n, part) in parse.records.chunks(part_rows).enumerate() {
        let decoded = parse.decode(n * part_rows, part);
        let invalid = decoded.is_err();
        if !send(decoded) || invalid {
            return;
        }
    }
}

/// The first pass: every record's text, or what is wrong with the body.
fn scan_records<'b>(mut parse: records::Parse<'b>, body: &'b [u8]) -> Result<records::Parse<'b>, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let result = records::scan(&mut deserializer, &mut parse).and_then(|()| deserializer.end());
    if let Some(problem) = parse.problem.take() {
        return Err(problem);
    }
    match result {
        Ok(()) => {}
        Err(e) if e.is_data() => {
            return Err(ApiError::unprocessable(format!(
                "Failed to deserialize the JSON body into the target type: {e}"
            )))
        }
        Err(e) => {
            return Err(ApiError::bad_request(format!(
                "Failed to parse the request body as JSON: {e}"
            )))
        }
    }
    if !parse.seen_data {
        return Err(ApiError::unprocessable(
            "Failed to deserialize the JSON body into the target type: missing field `data`",
        ));
    }
    if parse.records.is_empty() {
        return Err(ApiError::bad_request("\"data\" must hold at least one record"));
    }
    Ok(parse)
}

mod records {

    use serde_json::value::RawValue;
    use serde_json::{Map, Value as Json};

    use super::{validate, ApiError};
    use crate::catalogue::{self, admit, envelope, DateWindow, Row, Table};

    /// Records decoded on one thread at least, so that small bodies stay on one.
    const MIN_RECORDS_PER_THREAD: usize = 256;

    /// What the parse found; `problem` stops it at the first bad record.
    pub struct Parse<'b> {
        table: Table,
        max_records: usize,
        max_row_bytes: usize,
        validators: &'b validate::Validators,
        window: &'b DateWindow,
        today: chrono::NaiveDate,
        /// Each record's text, in order.
        pub records: Vec<&'b RawValue>,
        pub seen_data: bool,
        pub problem: Option<ApiError>,
    }

    impl<'b> Parse<'b> {
        pub fn new(
            table: Table,
            max_records: usize,
            max_row_bytes: usize,
            validators: &'b validate::Validators,
            window: &'b DateWindow,
        ) -> Parse<'b> {
            Parse {
                table,
                max_records,
                max_row_bytes,
                validators,
                window,
                today: chrono::Utc::now().date_naive(),
                records: Vec::new(),
                seen_data: false,
                problem: None,
            }
        }

        /// Decodes and checks `records` (found by the parse, the first of them
        /// at index `first`) in parts on up to [`catalogue::decoder_threads`]
        /// threads ([`admit::in_parallel`]); the first invalid record in order is
        /// the answer.
        pub fn decode(&self, first: usize, records: &[&RawValue]) -> Result<Vec<Row>, ApiError> {
            admit::in_parallel(records, MIN_RECORDS_PER_THREAD, |i, raw| self.accept(first + i, raw))
                .map_err(|_| {
                    ApiError::new(
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "a decoding thread failed",
                    )
                })?
                .into_iter()
                .collect()
        }

        /// Decodes and checks record `index`.
        fn accept(&self, index: usize, raw: &RawValue) -> Result<Row, ApiError> {
            let invalid = |e: String| ApiError::unprocessable(format!("data[{index}]: {e}"));
            let fields = catalogue::read_record(self.table, raw.get()).map_err(|e| invalid(e.to_string()))?;
            let decoded = if self.validators.slots_valid(self.table, &fields.values) {
                catalogue::decode_fields_read(self.table, fields).map_err(|e| invalid(e.to_string()))?
            } else {
                // Checked whole to name what is wrong: the decoder's complaint
                // first, then the schema's.
                let record: Map<String, Json> = self
                    .table
                    .spec()
                    .columns
                    .iter()
                    .zip(fields.values)
                    .filter_map(|(column, value)| Some((column.name.to_owned(), value?)))
                    .collect();
                let decoded = catalogue::decode_record(self.table, &record).map_err(|e| invalid(e.to_string()))?;
                self.validators
                    .check_record(self.table, &Json::Object(record))
                    .map_err(invalid)?;
                decoded
            };
            admit::admit_row(self.table, decoded.row, self.max_row_bytes, self.window, self.today)
                .map_err(|e| invalid(e.to_string()))
        }
    }

    /// Stops the parse; the reason is in `Parse::problem`.
    const STOP: &str = "stopped at an invalid record";

    /// Finds every record's text in the body's `data` array.
    pub fn scan<'de: 'b, 'b, D: serde::Deserializer<'de>>(
        deserializer: D,
        parse: &mut Parse<'b>,
    ) -> Result<(), D::Error> {
        parse.seen_data = envelope::stream(deserializer, parse)?.is_some();
        Ok(())
    }

    impl<'de: 'b, 'b> envelope::Sink<'de> for Parse<'b> {
        type Item = &'de RawValue;

        fn push(&mut self, index: u64, raw: &'de RawValue) -> Result<(), String> {
            if index >= self.max_records as u64 {
                self.problem = Some(ApiError::new(
                    axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request holds over {} records (HTTP_TABLES_MAX_RECORDS); send them in parts",
                        self.max_records
                    ),
                ));
                return Err(STOP.to_owned());
            }
            self.records.push(raw);
            Ok(())
        }
    }
}
