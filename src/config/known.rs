//! The variables the configuration reads, and the check that refuses the ones
//! under its prefixes that it does not (a typo such as `DWH_DATABSE_URL` would
//! otherwise leave the setting at its default, in silence). Pure.
//!
//! The names come from the settings' own definitions: each block's fields, read
//! from its `Deserialize` implementation, so that no list is kept by hand.

use std::collections::BTreeSet;

use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::ConfigError;

/// The field names `T` deserializes (a struct with named fields).
pub(super) fn fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Fields<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Fields<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("only the field names were wanted"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }

    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut names));
    names
}

/// The variables of one prefix: `prefix` followed by each field, upper case.
pub(super) fn names(prefix: &str, fields: &[&str]) -> Vec<String> {
    fields
        .iter()
        .map(|f| format!("{prefix}{}", f.to_ascii_uppercase()))
        .collect()
}

/// Whether `name`, under one of the service's prefixes, belongs to something
/// else: librdkafka's pass-through, the test suite's servers, the build's
/// commit, a proxy every HTTP client reads, and the variables Kubernetes sets
/// for each Service of the namespace (a Service named `kafka` sets
/// `KAFKA_PORT`, `KAFKA_SERVICE_HOST`, `KAFKA_PORT_9092_TCP`, …).
fn foreign(name: &str) -> bool {
    const PREFIXES: &[&str] = &[super::LIBRDKAFKA_PREFIX, "DWH_TEST_"];
    const NAMES: &[&str] = &["DWH_HELPER_GIT_COMMIT", "HTTP_PROXY"];
    if PREFIXES.iter().any(|p| name.starts_with(p)) || NAMES.contains(&name) {
        return true;
    }
    let service_link = |rest: &str| {
        rest == "PORT"
            || rest.starts_with("SERVICE_HOST")
            || rest.starts_with("SERVICE_PORT")
            || rest
                .strip_prefix("PORT_")
                .is_some_and(|p| p.split('_').next().is_some_and(|n| n.parse::<u16>().is_ok()))
    };
    name.match_indices('_').any(|(at, _)| service_link(&name[at + 1..]))
}

/// The unknown variables among `vars` (names under `prefixes` that no setting
/// reads and that belong to nothing else), each with the known name it most
/// likely meant, if one is close.
pub(super) fn unknown<'a>(
    vars: impl IntoIterator<Item = &'a str>,
    prefixes: &[&str],
    known: &BTreeSet<String>,
) -> Vec<ConfigError> {
    let mut unknown: Vec<ConfigError> = vars
        .into_iter()
        .filter(|name| prefixes.iter().any(|p| name.starts_with(p)))
        .filter(|name| !known.contains(*name) && !foreign(name))
        .map(|name| {
            let problem = match closest(name, known) {
                Some(meant) => format!("unknown variable {name}; did you mean {meant}?"),
                None => format!("unknown variable {name}: no setting of dwh-helper has that name"),
            };
            ConfigError::new(name, problem)
        })
        .collect();
    unknown.sort_by(|a, b| a.variable.cmp(&b.variable));
    unknown.dedup_by(|a, b| a.variable == b.variable);
    unknown
}

/// The known name nearest to `name` (by edit distance), when it is near enough
/// to be a typo: at most a third of the name's length away.
fn closest<'k>(name: &str, known: &'k BTreeSet<String>) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (distance(name, k), k))
        .filter(|(d, _)| *d <= name.len() / 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

/// Levenshtein distance, by characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Raw {
        database_url: Option<String>,
        pool_size: Option<String>,
    }

    fn known() -> BTreeSet<String> {
        names("DWH_", fields::<Raw>()).into_iter().collect()
    }

    #[test]
    fn the_names_come_from_the_settings_own_fields() {
        assert_eq!(fields::<Raw>(), ["database_url", "pool_size"]);
        assert_eq!(names("DWH_", fields::<Raw>()), ["DWH_DATABASE_URL", "DWH_POOL_SIZE"]);
    }

    #[test]
    fn a_typo_is_named_with_the_variable_it_meant() {
        let found = unknown(["DWH_DATABSE_URL", "DWH_POOL_SIZE", "PATH"], &["DWH_"], &known());
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].to_string(),
            "DWH_DATABSE_URL: unknown variable DWH_DATABSE_URL; did you mean DWH_DATABASE_URL?"
        );
        let far = unknown(["DWH_SOMETHING_ELSE_ENTIRELY"], &["DWH_"], &known());
        assert!(
            far[0].problem.ends_with("no setting of dwh-helper has that name"),
            "{:?}",
            far[0]
        );
    }

    #[test]
    fn variables_of_others_under_the_same_prefixes_pass() {
        for name in [
            "KAFKA_LIBRDKAFKA_SASL_MECHANISMS",
            "DWH_TEST_DATABASE_URL",
            "DWH_HELPER_GIT_COMMIT",
            "HTTP_PROXY",
            "KAFKA_PORT",
            "KAFKA_SERVICE_HOST",
            "KAFKA_SERVICE_PORT_BROKER",
            "KAFKA_PORT_9092_TCP_ADDR",
            "DWH_HELPER_API_PORT_8000_TCP",
        ] {
            assert!(
                unknown([name], &["DWH_", "KAFKA_", "HTTP_"], &known()).is_empty(),
                "{name}"
            );
        }
        // Not a Service's: a port number must follow PORT_.
        assert_eq!(unknown(["KAFKA_PORT_NUMBER"], &["KAFKA_"], &known()).len(), 1);
    }
}
