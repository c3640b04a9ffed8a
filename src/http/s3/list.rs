//! `GET /s3/objects`: the listing, a page at a time, newest first or by key,
//! resumed with an opaque cursor.

use axum::extract::{RawQuery, State};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;

use super::super::error::ErrorBody;
use super::super::{ApiError, AppState};
use super::{confined, store, ObjectPage, Order, Params, StoreFailures, Unauthorized, DEFAULT_LIMIT, MAX_LIMIT};

/// `GET /s3/objects?prefix=&limit=&cursor=&order=`: the objects directly under
/// the prefix, a page at a time: newest first (from a bounded scan), or by key.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct ListParams {
    /// Only keys under this prefix (a "folder" ends with `/`); default: the
    /// whole bucket, or `S3_API_PREFIX` when set
    prefix: Option<String>,
    /// `newest` (default): newest first, among the first `S3_LIST_SCAN_LIMIT`
    /// entries of the prefix in key order. `key`: by key, one LIST request a
    /// page, every object reachable
    order: Option<Order>,
    /// Objects per page
    #[param(minimum = 1, maximum = 10000, default = 1000)]
    limit: Option<u64>,
    /// `next_cursor` of the previous page
    #[param(pattern = "^-?[0-9]{1,18}:")]
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/s3/objects", tag = "s3", params(ListParams),
    responses(
        (status = 200, description = "A page of the objects under the prefix", body = ObjectPage),
        (status = 400, description = "A parameter is invalid", body = ErrorBody),
        (status = 403, description = "The prefix is outside S3_API_PREFIX", body = ErrorBody),
        Unauthorized,
        StoreFailures,
    ),
    security(("bearer" = [])))]
pub(super) async fn list(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<ObjectPage>, ApiError> {
    let params = Params::parse(query);
    let prefix = match params.get("prefix")? {
        Some(prefix) => confined(&state, prefix, "listing")?.to_owned(),
        None => state.config.s3.api_prefix.clone().unwrap_or_default(),
    };
    let order = match params.get("order")? {
        None | Some("newest") => Order::Newest,
        Some("key") => Order::Key,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "order must be \"newest\" or \"key\", got \"{other}\""
            )))
        }
    };
    let limit = params.number("limit")?.map_or(DEFAULT_LIMIT, |l| l as usize);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let cursor = params.get("cursor")?.map(Cursor::parse).transpose()?;
    let s3 = store(&state)?;
    if order == Order::Key {
        let page = s3
            .list_page(&prefix, cursor.as_ref().map(|c| c.key.as_str()), limit)
            .await?;
        // The cursor names the page's last entry; a folder has no time of its own.
        let next_cursor = page
            .next_after
            .map(|last| match page.objects.iter().find(|o| o.key == last) {
                Some(object) => Cursor::of(object).to_string(),
                None => Cursor { millis: 0, key: last }.to_string(),
            });
        return Ok(Json(ObjectPage {
            prefix,
            order,
            count: page.objects.len(),
            objects: page.objects,
            folders: page.folders,
            total: None,
            truncated: false,
            next_cursor,
        }));
    }
    let listing = s3.list_objects(&prefix, state.config.s3.list_scan_limit).await?;
    let start = match &cursor {
        None => 0,
        Some(cursor) => listing
            .objects
            .iter()
            .position(|o| cursor.precedes(o))
            .unwrap_or(listing.objects.len()),
    };
    let page: Vec<_> = listing.objects.iter().skip(start).take(limit).collect();
    let next_cursor = (start + page.len() < listing.objects.len())
        .then(|| page.last().map(|o| Cursor::of(o).to_string()))
        .flatten();
    Ok(Json(ObjectPage {
        prefix,
        order,
        count: page.len(),
        objects: page.into_iter().cloned().collect(),
        folders: listing.folders,
        total: Some(listing.objects.len()),
        truncated: listing.truncated,
        next_cursor,
    }))
}

/// The time of an object the store gave none, as a cursor can carry it (18 digits).
const NO_TIME: i64 = -999_999_999_999_999_999;

/// Where a page ended: the last entry's modification time and key. Newest
/// order resumes after both; key order after the key (a folder's time is 0).
struct Cursor {
    millis: i64,
    key: String,
}

impl Cursor {
    fn of(o: &crate::s3::ObjectSummary) -> Cursor {
        Cursor {
            millis: o.last_modified.map_or(NO_TIME, |t| t.timestamp_millis()),
            key: o.key.clone(),
        }
    }

    fn parse(text: &str) -> Result<Cursor, ApiError> {
        let bad = || ApiError::bad_request(format!("cursor \"{text}\" is not one this API returned"));
        let (millis, key) = text.split_once(':').ok_or_else(bad)?;
        if millis.trim_start_matches('-').len() > 18 {
            return Err(bad());
        }
        Ok(Cursor {
            millis: millis.parse().map_err(|_| bad())?,
            key: key.to_owned(),
        })
    }

    /// Whether `o` comes after the cursor in the listing's order.
    fn precedes(&self, o: &crate::s3::ObjectSummary) -> bool {
        let millis = o.last_modified.map_or(NO_TIME, |t| t.timestamp_millis());
        millis < self.millis || (millis == self.millis && o.key > self.key)
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.millis, self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_order_like_the_listing() {
        let at = |ms: i64, key: &str| crate::s3::ObjectSummary {
            key: key.into(),
            size: 0,
            last_modified: chrono::DateTime::from_timestamp_millis(ms),
            etag: None,
        };
        let cursor = Cursor::parse(&Cursor::of(&at(2000, "b:c")).to_string()).expect("parses");
        assert_eq!((cursor.millis, cursor.key.as_str()), (2000, "b:c"));
        assert!(cursor.precedes(&at(1000, "a")), "older comes later");
        assert!(cursor.precedes(&at(2000, "c")), "same time, later key");
        assert!(!cursor.precedes(&at(2000, "a")));
        assert!(!cursor.precedes(&at(3000, "z")));
        assert!(Cursor::parse("nonsense").is_err());
    }
}
