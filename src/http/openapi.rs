//! The OpenAPI 3.1 document at `/openapi.json` and Swagger UI at `/docs`.
//!
//! The document comes from the handlers' annotations and types (utoipa), so it
//! cannot drift from them. The tables' operations are written once for
//! `/dwh/{table}`; here they are listed per table, with each table's record
//! schema derived from the catalogue. Swagger UI is compiled into the binary
//! (`utoipa-swagger-ui`'s `vendored` feature): the page loads nothing from any
//! other host. Neither route needs the token, so that a person can read them;
//! the routes they describe still do.

use axum::Router;
use serde_json::{json, Map, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{InfoBuilder, OpenApi, OpenApiBuilder};
use utoipa_swagger_ui::{Config, SwaggerUi};

use super::tables;
use super::AppState;
use crate::catalogue::{self, Check, Column, ColumnType, Table};

pub const DOCUMENT_PATH: &str = "/openapi.json";
pub const DOCS_PATH: &str = "/docs";

/// The document's frame: title, version, the bearer scheme.
pub fn base() -> OpenApi {
    let info = InfoBuilder::new()
        .title("dwh-helper")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "Product-analytics tables of the DWH, the S3 bucket, health, metrics and status. \
             Every route but /health/*, /openapi.json and /docs needs `Authorization: Bearer <HTTP_API_TOKEN>` \
             when a token is configured. Errors are `{\"error\": \"...\"}`.",
        ))
        .build();
    let mut api = OpenApiBuilder::new().info(info).build();
    api.components.get_or_insert_with(Default::default).add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    api
}

/// The document as served: the tables' operations listed per table, each with
/// its record schema.
pub fn finish(api: OpenApi) -> Value {
    let mut document = serde_json::to_value(&api).expect("the document serializes");
    let generic = document["paths"]
        .as_object_mut()
        .and_then(|paths| paths.remove(tables::PATH))
        .expect("the tables' operations are annotated");
    for table in Table::ALL {
        let name = table.name();
        document["components"]["schemas"][name] = record_schema(table);
        document["paths"][format!("/dwh/{name}")] = table_operations(table, &generic);
    }
    document
}

/// `GET` and `POST /dwh/{name}`: the generic operations without the path
/// parameter, with the table's key filters and record schema.
fn table_operations(table: Table, generic: &Value) -> Value {
    let name = table.name();
    let mut item = generic.clone();
    let record = json!({ "$ref": format!("#/components/schemas/{name}") });
    for method in ["get", "post"] {
        let op = &mut item[method];
        op["operationId"] = json!(format!("{method}_{name}"));
        op["summary"] = json!(match method {
            "get" => format!("Read {name}"),
            _ => format!("Write {name}"),
        });
        if let Some(params) = op["parameters"].as_array_mut() {
            params.retain(|p| p["in"] != "path");
        }
        if let Some(responses) = op["responses"].as_object_mut() {
            responses.remove("404");
        }
    }
    let spec = table.spec();
    let filters = item["get"]["parameters"].as_array_mut().expect("GET has parameters");
    for key in spec.key {
        let column = spec.column(key).expect("key columns exist");
        filters.push(json!({
            "name": key,
            "in": "query",
            "required": false,
            "description": format!("Rows whose {key} equals this (a key column of {name})"),
            "schema": query_schema(column.ty),
        }));
    }
    item["get"]["responses"]["200"]["content"]["application/json"]["schema"] = json!({
        "type": "object",
        "required": ["rows", "count"],
        "properties": {
            "rows": { "type": "array", "items": row_schema(table) },
            "count": { "type": "integer", "minimum": 0 },
        },
    });
    item["post"]["requestBody"]["content"]["application/json"]["schema"] = json!({
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": { "type": "array", "minItems": 1, "items": record },
        },
    });
    item
}

/// A record of `table` as producers send it: the types each column accepts
/// (the decoder is lenient: numbers may come as strings, ids as numbers), the
/// fields a record must carry, ranges and allowed values. Unknown fields are
/// allowed (and ignored).
pub fn record_schema(table: Table) -> Value {
    let spec = table.spec();
    let derived = catalogue::derived_columns(table);
    let mut properties = Map::new();
    let mut required = Vec::new();
    for column in spec.columns {
        let needed = column.required && !derived.contains(&column.name);
        if needed {
            required.push(json!(column.name));
        }
        properties.insert(column.name.to_owned(), field_schema(column, needed));
    }
    json!({
        "type": "object",
        "description": format!(
            "A record of {} (natural key: {}). Fields not listed are ignored.",
            spec.name,
            spec.key.join(", ")
        ),
        "required": required,
        "properties": properties,
    })
}

/// One field: what the decoder accepts; `null` stands for absent unless the
/// field is required.
fn field_schema(column: &Column, required: bool) -> Value {
    let (types, mut schema): (&[&str], Value) = match column.ty {
        ColumnType::BigInt => (
            &["integer", "string"],
            json!({ "description": "an integer, or a string holding one" }),
        ),
        ColumnType::Int => (
            &["integer", "string"],
            json!({ "description": "an integer of 32 bits, or a string holding one" }),
        ),
        ColumnType::Double => (
            &["number", "string"],
            json!({ "description": "a number, or a string holding one" }),
        ),
        ColumnType::Bool => (
            &["boolean", "integer", "string"],
            json!({ "description": "true/false, 1/0, or \"true\", \"yes\", \"t\", \"1\" and their opposites" }),
        ),
        ColumnType::Text => (
            &["string", "number", "boolean"],
            json!({ "description": "text (a number or boolean is kept as its text)" }),
        ),
        ColumnType::Date => (
            &["string", "number"],
            json!({ "description": "YYYY-MM-DD, a timestamp (its day), or Unix seconds" }),
        ),
        ColumnType::Timestamp | ColumnType::TimestampTz => (
            &["string", "number"],
            json!({ "description": "RFC 3339, YYYY-MM-DD HH:MM:SS (UTC), a date, or Unix seconds" }),
        ),
        ColumnType::Numeric20 => (
            &["integer", "string"],
            json!({ "description": "an unsigned integer of up to 20 digits, or a string of digits", "minimum": 0 }),
        ),
        ColumnType::Uuid => (&["string"], json!({ "format": "uuid" })),
        ColumnType::Json => (&[], json!({ "description": "any JSON value" })),
    };
    match column.check {
        Check::None => {}
        Check::Range(lo, hi) => {
            schema["minimum"] = json!(lo);
            schema["maximum"] = json!(hi);
        }
        // The one such column (tmp_event_properties.properties) also takes its
        // object as a JSON string, AppMetrica's `event_json`.
        Check::Object => {
            schema["type"] = json!(["object", "string"]);
            schema["description"] = json!("a JSON object, or a string holding one");
        }
        Check::OneOf(allowed) => {
            let mut values: Vec<Value> = allowed.iter().map(|v| json!(v)).collect();
            if !required {
                values.push(Value::Null);
            }
            schema["enum"] = Value::Array(values);
        }
    }
    if !types.is_empty() {
        let mut types: Vec<Value> = types.iter().map(|t| json!(t)).collect();
        if !required {
            types.push(json!("null"));
        }
        schema["type"] = Value::Array(types);
    }
    schema
}

/// A row as read back: the stored columns, plus `id` and `ingested_at`.
fn row_schema(table: Table) -> Value {
    let mut properties = Map::new();
    properties.insert("id".into(), json!({ "type": "integer" }));
    properties.insert("ingested_at".into(), json!({ "type": "string" }));
    for column in table.spec().columns {
        let ty = match column.ty {
            ColumnType::BigInt | ColumnType::Int => json!(["integer", "null"]),
            ColumnType::Double => json!(["number", "null"]),
            ColumnType::Bool => json!(["boolean", "null"]),
            ColumnType::Json => Value::Null,
            _ => json!(["string", "null"]),
        };
        properties.insert(
            column.name.to_owned(),
            if ty.is_null() { json!({}) } else { json!({ "type": ty }) },
        );
    }
    json!({ "type": "object", "required": ["id"], "properties": properties })
}

/// A key column in a query string: its text.
fn query_schema(ty: ColumnType) -> Value {
    match ty {
        ColumnType::BigInt | ColumnType::Int => json!({ "type": "integer" }),
        ColumnType::Uuid => json!({ "type": "string", "format": "uuid" }),
        _ => json!({ "type": "string" }),
    }
}

/// `/openapi.json` and Swagger UI at `/docs`, served from the binary.
pub fn router(document: Value) -> Router<AppState> {
    SwaggerUi::new(DOCS_PATH)
        .external_url_unchecked(DOCUMENT_PATH, document)
        .config(
            Config::new([DOCUMENT_PATH])
                // The validator badge would send the document to an outside host.
                .validator_url("none")
                .try_it_out_enabled(true),
        )
        .into()
}
