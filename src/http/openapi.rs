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
use serde_json::{json, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{InfoBuilder, OpenApi, OpenApiBuilder};
use utoipa_swagger_ui::{Config, SwaggerUi};

use super::paths::{DOCS_PATH, DOCUMENT_PATH};
use super::schema::{json_value_schema, query_schema, record_schema, row_schema, JSON_VALUE};
use super::tables;
use super::AppState;
use crate::catalogue::{DateWindow, Table};

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
pub fn finish(api: OpenApi, window: &DateWindow) -> Value {
    let mut document = serde_json::to_value(&api).expect("the document serializes");
    let generic = document["paths"]
        .as_object_mut()
        .and_then(|paths| paths.remove(tables::PATH))
        .expect("the tables' operations are annotated");
    for table in Table::ALL {
        let name = table.name();
        document["components"]["schemas"][name] = record_schema(table, window);
        document["components"]["schemas"][JSON_VALUE] = json_value_schema();
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
