//! The value parsers every block shares: booleans, counts, durations in
//! seconds, sizes (`10MiB`, `512KB`, a plain number of bytes) and URLs, each
//! failing with the variable's name and what it got.

use std::time::Duration;

use super::ConfigError;

pub(super) fn boolean(variable: &str, raw: Option<String>, default: bool) -> Result<bool, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(
            variable,
            format!("expected true or false, got \"{raw}\""),
        )),
    }
}

pub(super) fn count(variable: &str, raw: Option<String>, default: usize) -> Result<usize, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    raw.trim()
        .parse::<usize>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| ConfigError::new(variable, format!("expected a positive integer, got \"{raw}\"")))
}

pub(super) fn seconds(variable: &str, raw: Option<String>, default: u64) -> Result<Duration, ConfigError> {
    count(variable, raw, default as usize).map(|s| Duration::from_secs(s as u64))
}

/// A byte size: `1048576`, `512KiB`, `10MiB`, `1GiB` (also `KB`, `MB`, `GB` as
/// powers of 1000, and `K`, `M`, `G` as powers of 1024).
pub(super) fn size(variable: &str, raw: Option<String>, default: usize, min: usize) -> Result<usize, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    let bad = || {
        ConfigError::new(
            variable,
            format!("expected a size in bytes such as 10485760 or 10MiB, got \"{raw}\""),
        )
    };
    let text = raw.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: usize = digits.parse().map_err(|_| bad())?;
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(bad()),
    };
    let bytes = number.checked_mul(multiplier).ok_or_else(bad)?;
    if bytes < min {
        return Err(ConfigError::new(
            variable,
            format!("must be at least {min} bytes, got \"{raw}\""),
        ));
    }
    Ok(bytes)
}

pub(super) fn http_url(variable: &str, raw: &str) -> Result<url::Url, ConfigError> {
    let parsed = url::Url::parse(raw.trim())
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    parsed.ok_or_else(|| ConfigError::new(variable, format!("expected an http(s) URL, got \"{raw}\"")))
}

pub(super) const MIB: usize = 1024 * 1024;
