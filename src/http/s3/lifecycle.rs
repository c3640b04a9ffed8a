//! `/s3/lifecycle`: the bucket's expiration rules that dwh-helper manages.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::super::error::ErrorBody;
use super::super::{ApiError, AppState};
use super::{archive_refusal, confined, store, Params, Rules, RulesRemoved, StoreFailures, Unauthorized};
use crate::s3::{xml_char, ExpirationRule, MANAGED_RULE_PREFIX, MAX_KEY_BYTES};

#[utoipa::path(get, path = "/s3/lifecycle", tag = "s3",
    responses(
        (status = 200, description = "The bucket's expiration rules", body = Rules),
        Unauthorized,
        StoreFailures,
    ),
    security(("bearer" = [])))]
pub(super) async fn lifecycle(State(state): State<AppState>) -> Result<Json<Rules>, ApiError> {
    Ok(Json(Rules {
        rules: store(&state)?.lifecycle().await?,
    }))
}

/// An expiration rule to add or replace.
#[derive(Debug, serde::Deserialize, ToSchema)]
pub(super) struct RuleRequest {
    /// Objects under this prefix expire (at most 1,024 bytes; no character that
    /// XML 1.0 cannot carry, as the rule travels in XML)
    #[schema(max_length = 1024, pattern = "^[^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\uFFFE\\uFFFF]*$")]
    prefix: String,
    /// After this many days
    #[schema(value_type = i32, minimum = 1)]
    #[serde(deserialize_with = "whole_days")]
    days: i32,
    id: Option<String>,
    enabled: Option<bool>,
}

/// `PUT /s3/lifecycle` with `{"prefix": "tmp/", "days": 7}`: objects under the
/// prefix expire after that many days.
#[utoipa::path(put, path = "/s3/lifecycle", tag = "s3",
    request_body = RuleRequest,
    responses(
        (status = 200, description = "The rules after the change", body = Rules),
        (status = 400, description = "The rule is invalid", body = ErrorBody),
        (status = 403, description = "The prefix is empty, touches the archive (S3_ARCHIVE_PREFIX) or is outside S3_API_PREFIX", body = ErrorBody),
        (status = 413, description = "The body is over HTTP_MAX_BODY_BYTES", body = ErrorBody),
        (status = 415, description = "The body is not application/json", body = ErrorBody),
        (status = 422, description = "The body is not such a rule", body = ErrorBody),
        Unauthorized,
        StoreFailures,
    ),
    security(("bearer" = [])))]
pub(super) async fn set_lifecycle(
    State(state): State<AppState>,
    body: Result<Json<RuleRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Rules>, ApiError> {
    let Json(request) = body?;
    if request.days < 1 {
        return Err(ApiError::bad_request("days must be at least 1"));
    }
    if request.prefix.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request("prefix is over 1024 bytes"));
    }
    if let Some(c) = request.prefix.chars().find(|&c| !xml_char(c)) {
        return Err(ApiError::bad_request(format!(
            "prefix holds {c:?}, which the lifecycle configuration (XML 1.0) cannot carry"
        )));
    }
    let archive = format!("{}/", state.config.s3.archive_prefix);
    confined(&state, &request.prefix, "a lifecycle rule for")?;
    if request.prefix.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("an empty prefix would expire the whole bucket, the archive ({archive}) included"),
        ));
    }
    if archive.starts_with(&request.prefix) || request.prefix.starts_with(&archive) {
        return Err(archive_refusal(&archive, "a lifecycle rule over"));
    }
    // The API's rules carry its id prefix: the only rules it replaces or removes.
    let id = request.id.unwrap_or_else(|| format!("expire-{}", request.prefix));
    let id = match id.starts_with(MANAGED_RULE_PREFIX) {
        true => id,
        false => format!("{MANAGED_RULE_PREFIX}{id}"),
    };
    // S3 takes ids of up to 255 characters.
    let id = match id.chars().count() > 255 {
        true => format!(
            "{MANAGED_RULE_PREFIX}expire-{:016x}",
            xxhash_rust::xxh3::xxh3_64(request.prefix.as_bytes())
        ),
        false => id,
    };
    let rule = ExpirationRule {
        id,
        prefix: request.prefix,
        days: request.days,
        enabled: request.enabled.unwrap_or(true),
        managed: true,
    };
    Ok(Json(Rules {
        rules: store(&state)?.set_expiration(rule).await?,
    }))
}

/// An integer of days, also written as an integral float (`7.0`), as JSON
/// Schema's "integer" allows.
fn whole_days<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    n.as_i64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
                .map(|f| f as i64)
        })
        .and_then(|v| i32::try_from(v).ok())
        .ok_or_else(|| serde::de::Error::custom(format!("days must be a whole number of days, got {n}")))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct PrefixParam {
    /// The prefix whose rules go
    prefix: String,
}

/// `DELETE /s3/lifecycle?prefix=`: removes the expiration rules of the prefix.
#[utoipa::path(delete, path = "/s3/lifecycle", tag = "s3", params(PrefixParam),
    responses(
        (status = 200, description = "Removed", body = RulesRemoved),
        (status = 400, description = "The prefix is missing", body = ErrorBody),
        (status = 403, description = "The prefix is outside S3_API_PREFIX", body = ErrorBody),
        (status = 404, description = "No rule for that prefix", body = ErrorBody),
        Unauthorized,
        StoreFailures,
    ),
    security(("bearer" = [])))]
pub(super) async fn delete_lifecycle(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<RulesRemoved>, ApiError> {
    let params = Params::parse(query);
    let prefix = params
        .get("prefix")?
        .ok_or_else(|| ApiError::bad_request("prefix is required"))?
        .to_owned();
    confined(&state, &prefix, "removing the lifecycle rules of")?;
    let removed = store(&state)?.delete_expiration(&prefix).await?;
    if removed == 0 {
        return Err(ApiError::not_found(format!(
            "no expiration rule for prefix \"{prefix}\""
        )));
    }
    Ok(Json(RulesRemoved { removed, prefix }))
}
