//! `GET /dwh/{table}` and `POST /dwh/{table}`.
//!
//! Guarantees: a POST is validated whole before anything is written; one invalid
//! record fails the request with 422 naming its index and field. Valid records are
//! written in one transaction, chunked by the two DWH limits; re-posting the same
//! records inserts nothing new.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json_};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::{validate, AppState};
use crate::catalogue::{self, value, Row, Table};
use crate::store::{Batch, ReadQuery};

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 10_000;

/// One route serves the seven tables; the OpenAPI document lists each table's
/// path with its own record schema (see `openapi.rs`).
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list, insert))
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

/// Reads rows in id order; the table's key columns filter by equality.
#[utoipa::path(get, path = "/dwh/{table}", tag = "tables",
    params(("table" = String, Path, description = "One of the seven tables"), Page),
    responses(
        (status = 200, description = "A page of rows", body = Rows),
        (status = 400, description = "A parameter is invalid or unknown", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
        (status = 503, description = "The database cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Rows>, ApiError> {
    let table = table(&name)?;
    let query = read_query(table, params)?;
    let rows = state.dwh.read(table, &query).await?;
    Ok(Json(Rows {
        count: rows.len(),
        rows,
    }))
}

/// `limit`, `after_id`, and equality filters on the natural key's columns.
fn read_query(table: Table, params: HashMap<String, String>) -> Result<ReadQuery, ApiError> {
    let spec = table.spec();
    let mut query = ReadQuery {
        filters: Vec::new(),
        after_id: None,
        limit: DEFAULT_LIMIT,
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
                validate::check_filter(column, &raw).map_err(ApiError::bad_request)?;
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
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
        (status = 413, description = "The body is over HTTP_MAX_BODY_BYTES", body = ErrorBody),
        (status = 415, description = "The body is not application/json", body = ErrorBody),
        (status = 422, description = "A record is invalid (its index and field are named) or refused by the database", body = ErrorBody),
        (status = 503, description = "The database cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn insert(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<InsertBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Inserted>, ApiError> {
    let table = table(&name)?;
    let Json(body) = body?;
    if body.data.is_empty() {
        return Err(ApiError::bad_request("\"data\" must hold at least one record"));
    }
    let rows = decode_all(table, body.data, state.dwh.limits().1)?;
    let outcome = state.dwh.write(Batch::rows(table, &rows)).await?;
    tracing::info!(
        table = table.name(),
        records = rows.len(),
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

/// Decodes every record or fails on the first invalid one, naming its index. A
/// record the decoder reads must also match the table's published schema.
fn decode_all(table: Table, data: Vec<Json_>, max_bytes: usize) -> Result<Vec<Row>, ApiError> {
    data.into_iter()
        .enumerate()
        .map(|(i, record)| {
            let invalid = |e: String| ApiError::unprocessable(format!("data[{i}]: {e}"));
            let decoded = match &record {
                Json_::Object(map) => catalogue::decode_record(table, map),
                other => Err(catalogue::RecordError::NotAnObject(value::describe(other))),
            }
            .map_err(|e| invalid(e.to_string()))?;
            validate::check_record(table, &record).map_err(invalid)?;
            let size = decoded.row.approx_bytes();
            if size > max_bytes {
                return Err(ApiError::unprocessable(format!(
                    "data[{i}]: {}",
                    catalogue::RecordError::TooLarge { size, limit: max_bytes }
                )));
            }
            Ok(decoded.row)
        })
        .collect()
}
