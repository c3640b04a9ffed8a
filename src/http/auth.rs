//! Bearer-token check for the protected routes.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;

pub async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Result<Response, ApiError> {
    authorize(&state, request.headers())?;
    Ok(next.run(request).await)
}

/// Whether `uri` is one of the routes anyone may read.
pub fn is_open(uri: &Uri) -> bool {
    let path = uri.path();
    path.starts_with("/health/") || path == super::paths::DOCUMENT_PATH || path.starts_with(super::paths::DOCS_PATH)
}

/// Ok when no token is configured or `headers` present it (`Authorization:
/// Bearer <token>`, the scheme in any case); otherwise 401.
pub fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.api_token else {
        return Ok(());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    match presented {
        // Constant-time comparison: response timing does not reveal the token.
        Some(token) if bool::from(token.as_bytes().ct_eq(expected.expose().as_bytes())) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid API token")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing API token: send \"Authorization: Bearer <HTTP_API_TOKEN>\"",
        )),
    }
}

/// The token of a `Bearer` credential (RFC 7235: the scheme is case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// 405 for a known path with another method; a protected path asks for the token
/// first (401), so that a route's methods are no clue without it.
pub async fn method_not_allowed(
    axum::extract::State(state): axum::extract::State<AppState>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> ApiError {
    if !is_open(&uri) {
        if let Err(unauthorized) = authorize(&state, &headers) {
            return unauthorized;
        }
    }
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc "), Some("abc"));
        assert_eq!(bearer("BEARER  abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
    }
}

/// Without a token the API is for this machine alone (the configuration refuses
/// a non-loopback bind without one). A web page in the operator's browser can
/// still reach 127.0.0.1: a form post needs no preflight, and a rebound DNS name
/// points at loopback. So, without a token, only a loopback `Host` is served, and
/// a request with an `Origin` only when that origin is the API's own.
pub async fn loopback_only(request: Request, next: Next) -> Result<Response, ApiError> {
    let headers = request.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !is_loopback_host(host) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "Host \"{host}\" is not this machine: without HTTP_API_TOKEN the API answers requests to \
                 localhost, 127.0.0.1 or [::1] only"
            ),
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let own = [format!("http://{host}"), format!("https://{host}")];
        if !own.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "a request from the page of origin \"{origin}\" is refused: without HTTP_API_TOKEN only \
                     the API's own pages may call it"
                ),
            ));
        }
    }
    Ok(next.run(request).await)
}

/// `localhost`, `*.localhost`, a 127.0.0.0/8 address or `[::1]`, with any port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || port.starts_with(':') => {
                return v6.parse::<std::net::Ipv6Addr>().is_ok_and(|a| a.is_loopback())
            }
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

#[cfg(test)]
mod host_tests {
    use super::is_loopback_host;

    #[test]
    fn only_loopback_hosts_pass() {
        for host in [
            "localhost",
            "localhost:8000",
            "127.0.0.1:8000",
            "127.1.2.3",
            "[::1]:8000",
            "[::1]",
            "app.localhost:80",
            "LOCALHOST.",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "",
            "example.com",
            "evil.example:8000",
            "10.0.0.1:8000",
            "[::2]:80",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "[::1]x",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
