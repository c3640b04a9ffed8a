//! Values that must never reach logs, errors or `Debug` output.

use std::fmt;

/// A secret string. `Debug` and `Display` print `***`; [`Secret::expose`] is the only
/// way to the value, so every use of it is visible in review.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Which database a URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A database URL whose password is hidden from `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    url: Secret,
    backend: Backend,
}

impl DatabaseUrl {
    /// Accepts `postgres://`, `postgresql://` and `sqlite:` URLs. The error never
    /// repeats the URL, which may hold a password.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        let scheme = raw.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
        let backend = match scheme.as_deref() {
            Some("postgres" | "postgresql") => {
                url::Url::parse(raw).map_err(|e| format!("not a valid PostgreSQL URL ({e})"))?;
                Backend::Postgres
            }
            Some("sqlite") => {
                if raw.len() <= "sqlite:".len() {
                    return Err("a sqlite URL needs a file path, e.g. sqlite://dwh-helper.db".into());
                }
                Backend::Sqlite
            }
            Some(other) if !other.is_empty() && !other.contains('/') => {
                return Err(format!(
                    "unsupported scheme \"{other}\"; expected postgres://, postgresql:// or sqlite:"
                ))
            }
            _ => return Err("expected a URL starting with postgres://, postgresql:// or sqlite:".into()),
        };
        Ok(DatabaseUrl {
            url: Secret::new(raw),
            backend,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn expose(&self) -> &str {
        self.url.expose()
    }

    /// The URL with any password replaced by `***`, for logs.
    pub fn redacted(&self) -> String {
        match url::Url::parse(self.url.expose()) {
            Ok(mut parsed) if parsed.password().is_some() => {
                // Setting a password only fails for URLs that cannot have one.
                let _ = parsed.set_password(Some("***"));
                parsed.to_string()
            }
            Ok(parsed) if self.backend == Backend::Postgres => {
                // libpq also takes `?password=`; hide query values wholesale.
                if parsed.query().is_some_and(|q| q.contains("password")) {
                    let mut shown = parsed.clone();
                    shown.set_query(Some("***"));
                    shown.to_string()
                } else {
                    parsed.to_string()
                }
            }
            _ => self.url.expose().to_owned(),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn database_urls_hide_passwords() {
        let url = DatabaseUrl::parse("postgres://app:hunter2@db:5432/dwh").expect("valid");
        assert_eq!(url.backend(), Backend::Postgres);
        assert_eq!(url.to_string(), "postgres://app:***@db:5432/dwh");
        assert!(!format!("{url:?}").contains("hunter2"));
        let url = DatabaseUrl::parse("postgresql://db/dwh?user=a&password=hunter2").expect("valid");
        assert!(!url.to_string().contains("hunter2"));
        let url = DatabaseUrl::parse("sqlite://dwh-helper.db").expect("valid");
        assert_eq!(url.backend(), Backend::Sqlite);
        assert_eq!(url.to_string(), "sqlite://dwh-helper.db");
    }

    #[test]
    fn database_url_errors_do_not_repeat_the_url() {
        assert_eq!(
            DatabaseUrl::parse("mysql://root:hunter2@x"),
            Err("unsupported scheme \"mysql\"; expected postgres://, postgresql:// or sqlite:".into())
        );
        let err = DatabaseUrl::parse("just-a-word").expect_err("invalid");
        assert!(!err.contains("just-a-word"), "{err}");
        assert!(DatabaseUrl::parse("sqlite:").is_err());
    }
}
