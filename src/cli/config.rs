//! `dwh-helper config check`: the configuration as the service would read it,
//! each variable with where its value came from (the environment, `.env`, or
//! the default), secrets redacted, then the typed result or the error. Exit 0
//! when the configuration is valid, 2 when it is not.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::process::ExitCode;

use clap::Subcommand;

use crate::config::{self, Config, DatabaseUrl};

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (secrets redacted) with the source of each value; exit 2 on any error
    Check,
}

/// Where a variable's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Environment,
    DotEnv,
}

/// Runs `config check`: reads the environment and `.env` itself (the command
/// is dispatched before the configuration is loaded, so that an invalid one is
/// reported in full, not as the first error alone).
pub fn check() -> ExitCode {
    let environment: HashMap<String, String> = std::env::vars().collect();
    let dotenv: Vec<(String, String)> = match dotenvy::dotenv_iter() {
        Ok(entries) => match entries.collect::<Result<_, _>>() {
            Ok(entries) => entries,
            Err(e) => {
                println!("error: .env cannot be read: {e}");
                return ExitCode::from(2);
            }
        },
        Err(e) if e.not_found() => Vec::new(),
        Err(e) => {
            println!("error: .env cannot be read: {e}");
            return ExitCode::from(2);
        }
    };
    let (report, valid) = render(&environment, &dotenv);
    print!("{report}");
    if valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

/// The report, and whether the configuration is valid. Variables already set
/// in the environment win over `.env`, as at a start.
fn render(environment: &HashMap<String, String>, dotenv: &[(String, String)]) -> (String, bool) {
    let mut effective: BTreeMap<String, (String, Source)> = BTreeMap::new();
    for (name, value) in dotenv {
        if !environment.contains_key(name) {
            effective.insert(name.clone(), (value.clone(), Source::DotEnv));
        }
    }
    for (name, value) in environment {
        effective.insert(name.clone(), (value.clone(), Source::Environment));
    }
    let ours = |name: &str| config::PREFIXES.iter().any(|p| name.starts_with(p));
    let mut out = String::from("VARIABLE                                  SOURCE       VALUE\n");
    let known = config::known_variables();
    let passed: Vec<&String> = effective
        .keys()
        .filter(|n| n.starts_with(config::LIBRDKAFKA_PREFIX))
        .collect();
    for name in known.iter().chain(passed) {
        let line = match effective.get(name).filter(|(v, _)| !v.trim().is_empty()) {
            None => format!("{name:<41} {:<12} -", "default"),
            Some((value, source)) => {
                let source = match source {
                    Source::Environment => "environment",
                    Source::DotEnv => ".env",
                };
                format!("{name:<41} {source:<12} {}", shown(name, value))
            }
        };
        let _ = writeln!(out, "{line}");
    }
    let vars: Vec<(String, String)> = effective
        .iter()
        .filter(|(name, _)| ours(name))
        .map(|(name, (value, _))| (name.clone(), value.clone()))
        .collect();
    let unknown = config::unknown_variables(vars.iter().map(|(k, _)| k.as_str()));
    for problem in &unknown {
        let _ = writeln!(out, "unknown: {}", problem.problem);
    }
    match Config::from_vars(vars) {
        Ok(config) => {
            let _ = writeln!(
                out,
                "\neffective configuration (defaults included, secrets redacted):\n{config:#?}"
            );
            if !unknown.is_empty() {
                let _ = writeln!(
                    out,
                    "\nvalid: the unknown variables above are let through by {}",
                    config::ALLOW_UNKNOWN_VARIABLES
                );
            } else {
                let _ = writeln!(out, "\nvalid");
            }
            (out, true)
        }
        Err(e) => {
            let _ = writeln!(out, "\nerror: {e}");
            (out, false)
        }
    }
}

/// A value as it may be printed: secrets redacted.
fn shown(name: &str, value: &str) -> String {
    if name.ends_with("DATABASE_URL") {
        return DatabaseUrl::parse(value).map_or_else(|_| "*** (not a valid URL)".to_owned(), |u| u.redacted());
    }
    let upper = name.to_ascii_uppercase();
    let secret = [
        "PASSWORD",
        "SECRET",
        "TOKEN",
        "API_KEY",
        "ACCESS_KEY",
        "KEY_ID",
        "CREDENTIAL",
        "SASL_OAUTHBEARER",
    ]
    .iter()
    .any(|word| upper.contains(word));
    if secret {
        "***".to_owned()
    } else {
        value.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(environment: &[(&str, &str)], dotenv: &[(&str, &str)]) -> (String, bool) {
        let environment = environment
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let dotenv: Vec<(String, String)> = dotenv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        render(&environment, &dotenv)
    }

    fn line<'a>(report: &'a str, name: &str) -> &'a str {
        report
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} in {report}"))
    }

    #[test]
    fn each_value_names_its_source_and_secrets_are_redacted() {
        let (out, valid) = report(
            &[
                ("DWH_DATABASE_URL", "postgres://dwh:hunter2@db:5432/dwh"),
                ("HTTP_API_TOKEN", "a-token-of-forty-characters-0123456789abc"),
                ("KAFKA_LIBRDKAFKA_SASL_PASSWORD", "kafka-pass"),
                ("KAFKA_GROUP_ID", "from-the-environment"),
                ("PATH", "/usr/bin"),
            ],
            &[("KAFKA_GROUP_ID", "from-dotenv"), ("S3_REGION", "eu-west-1")],
        );
        assert!(valid, "{out}");
        assert!(
            !out.contains("hunter2") && !out.contains("kafka-pass") && !out.contains("0123456789abc"),
            "{out}"
        );
        assert!(
            line(&out, "DWH_DATABASE_URL").contains("environment  postgres://dwh:***@db:5432/dwh"),
            "{out}"
        );
        assert!(line(&out, "HTTP_API_TOKEN").ends_with("environment  ***"), "{out}");
        assert!(line(&out, "KAFKA_LIBRDKAFKA_SASL_PASSWORD").ends_with("***"), "{out}");
        // The environment wins over .env, as at a start.
        assert!(
            line(&out, "KAFKA_GROUP_ID").ends_with("environment  from-the-environment"),
            "{out}"
        );
        assert!(line(&out, "S3_REGION").ends_with(".env         eu-west-1"), "{out}");
        assert!(line(&out, "DWH_POOL_SIZE").ends_with("default      -"), "{out}");
        assert!(!out.contains("PATH"), "{out}");
        assert!(
            out.contains("effective configuration") && out.trim_end().ends_with("valid"),
            "{out}"
        );
    }

    #[test]
    fn a_typo_and_a_bad_value_make_it_invalid_and_are_named() {
        let (out, valid) = report(&[("DWH_DATABSE_URL", "postgres://db/dwh")], &[]);
        assert!(!valid);
        assert!(
            out.contains("unknown: unknown variable DWH_DATABSE_URL; did you mean DWH_DATABASE_URL?"),
            "{out}"
        );
        assert!(out.contains("\nerror: DWH_DATABSE_URL: unknown variable"), "{out}");
        let (out, valid) = report(&[], &[("DWH_POOL_SIZE", "many")]);
        assert!(!valid);
        assert!(out.contains("error: DWH_POOL_SIZE"), "{out}");
        // Let through on request: valid, and still shown.
        let (out, valid) = report(
            &[
                ("DWH_DATABSE_URL", "postgres://db/dwh"),
                ("DWH_ALLOW_UNKNOWN_VARIABLES", "true"),
            ],
            &[],
        );
        assert!(valid, "{out}");
        assert!(out.contains("unknown: unknown variable DWH_DATABSE_URL"), "{out}");
    }
}
