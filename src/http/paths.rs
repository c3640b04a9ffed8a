//! Paths the API serves outside its route tables, which more than one module
//! names: the OpenAPI document and its docs page (both open without a token).

pub const DOCUMENT_PATH: &str = "/openapi.json";
pub const DOCS_PATH: &str = "/docs";
