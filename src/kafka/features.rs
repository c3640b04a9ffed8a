//! What the librdkafka in this binary can do, checked against what a client's
//! settings need, before the client is created.
//!
//! Guarantees: a client is refused, with every missing feature named and what asks
//! for it, when this build of librdkafka lacks a codec a topic may carry (every
//! consumer must read gzip, snappy, lz4 and zstd: a record batch it cannot
//! decompress is refetched for ever), TLS for `security.protocol=SSL`/`SASL_SSL`,
//! or the SASL mechanism configured. librdkafka reports its features in the
//! `builtin.features` property; [`missing`] is the pure comparison.

use rdkafka::ClientConfig;

/// Codecs any topic may carry: a consumer needs all of them.
const CODECS: [&str; 4] = ["gzip", "snappy", "lz4", "zstd"];

/// One feature the settings need and the build lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// librdkafka's name for it, as `builtin.features` lists it.
    pub feature: &'static str,
    /// What asks for it, for the message.
    pub needed_by: String,
}

/// What can be missing, in a message that names each feature and what needs it.
#[derive(Debug, thiserror::Error)]
#[error(
    "the librdkafka built into dwh-helper lacks {}; it has: {builtin}",
    .missing.iter().map(|m| format!("{} (needed by {})", m.feature, m.needed_by)).collect::<Vec<_>>().join(", ")
)]
pub struct MissingFeatures {
    pub missing: Vec<Missing>,
    pub builtin: String,
}

/// The features `settings` need (librdkafka's names), each with what needs it.
pub fn needed(settings: &ClientConfig) -> Vec<(&'static str, String)> {
    let mut needs: Vec<(&'static str, String)> = CODECS
        .iter()
        .map(|codec| (*codec, "reading topics, which may carry any codec".to_owned()))
        .collect();
    let protocol = settings
        .get("security.protocol")
        .unwrap_or("plaintext")
        .to_ascii_lowercase();
    if protocol == "ssl" || protocol == "sasl_ssl" {
        needs.push(("ssl", format!("security.protocol={protocol}")));
    }
    if protocol.starts_with("sasl_") {
        needs.push(("sasl", format!("security.protocol={protocol}")));
        let mechanisms = settings
            .get("sasl.mechanisms")
            .or_else(|| settings.get("sasl.mechanism"))
            .unwrap_or("GSSAPI");
        for mechanism in mechanisms.split(',').map(|m| m.trim().to_ascii_uppercase()) {
            let feature = match mechanism.as_str() {
                "PLAIN" => "sasl_plain",
                "SCRAM-SHA-256" | "SCRAM-SHA-512" => "sasl_scram",
                "OAUTHBEARER" => "sasl_oauthbearer",
                "GSSAPI" => "sasl_gssapi",
                // librdkafka refuses an unknown mechanism itself, naming it.
                _ => continue,
            };
            needs.push((feature, format!("sasl.mechanisms={mechanism}")));
        }
        if settings
            .get("sasl.oauthbearer.method")
            .is_some_and(|m| m.eq_ignore_ascii_case("oidc"))
        {
            needs.push(("oidc", "sasl.oauthbearer.method=oidc".to_owned()));
        }
    }
    if let Some(codec) = settings
        .get("compression.type")
        .or_else(|| settings.get("compression.codec"))
    {
        let codec = codec.to_ascii_lowercase();
        if let Some(known) = CODECS.iter().find(|c| **c == codec) {
            needs.push((known, format!("compression.type={codec}")));
        }
    }
    needs
}

/// The features of `needs` that `builtin` (librdkafka's comma-separated
/// `builtin.features`) does not list, once each.
pub fn missing(needs: &[(&'static str, String)], builtin: &str) -> Vec<Missing> {
    let has: Vec<&str> = builtin.split(',').map(str::trim).collect();
    let mut missing: Vec<Missing> = Vec::new();
    for (feature, needed_by) in needs {
        if has.contains(feature) || missing.iter().any(|m| m.feature == *feature) {
            continue;
        }
        missing.push(Missing {
            feature,
            needed_by: needed_by.clone(),
        });
    }
    missing
}

/// This build's `builtin.features`, read once.
pub fn builtin() -> &'static str {
    static BUILTIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUILTIN.get_or_init(super::ffi::builtin_features)
}

/// Refuses `settings` when this build lacks something they need.
pub fn check(settings: &ClientConfig) -> Result<(), MissingFeatures> {
    let builtin = builtin();
    let missing = missing(&needed(settings), builtin);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingFeatures {
            missing,
            builtin: builtin.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (k, v) in pairs {
            config.set(*k, *v);
        }
        config
    }

    fn features(needs: &[(&'static str, String)]) -> Vec<&'static str> {
        needs.iter().map(|(f, _)| *f).collect()
    }

    #[test]
    fn every_client_needs_every_codec_and_security_adds_what_it_names() {
        assert_eq!(features(&needed(&settings(&[]))), CODECS);
        let scram_ssl = needed(&settings(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
        ]));
        assert_eq!(
            features(&scram_ssl)[4..],
            ["ssl", "sasl", "sasl_scram"],
            "{scram_ssl:?}"
        );
        let plain = needed(&settings(&[
            ("security.protocol", "sasl_plaintext"),
            ("sasl.mechanism", "plain"),
        ]));
        assert_eq!(features(&plain)[4..], ["sasl", "sasl_plain"]);
        // librdkafka's default mechanism is GSSAPI.
        let kerberos = needed(&settings(&[("security.protocol", "SASL_PLAINTEXT")]));
        assert_eq!(features(&kerberos)[4..], ["sasl", "sasl_gssapi"]);
        let oidc = needed(&settings(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "OAUTHBEARER"),
            ("sasl.oauthbearer.method", "oidc"),
        ]));
        assert_eq!(features(&oidc)[4..], ["ssl", "sasl", "sasl_oauthbearer", "oidc"]);
        assert_eq!(
            features(&needed(&settings(&[("security.protocol", "SSL")])))[4..],
            ["ssl"]
        );
    }

    #[test]
    fn what_the_build_lacks_is_named_once_with_what_needs_it() {
        let needs = needed(&settings(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("compression.type", "zstd"),
        ]));
        // The features of rdkafka built without zstd and without TLS.
        let missing = missing(&needs, "gzip, snappy,sasl,regex,lz4,sasl_plain,plugins");
        assert_eq!(
            missing,
            vec![
                Missing {
                    feature: "zstd",
                    needed_by: "reading topics, which may carry any codec".into()
                },
                Missing {
                    feature: "ssl",
                    needed_by: "security.protocol=sasl_ssl".into()
                },
                Missing {
                    feature: "sasl_scram",
                    needed_by: "sasl.mechanisms=SCRAM-SHA-512".into()
                },
            ]
        );
        let error = MissingFeatures {
            missing,
            builtin: "gzip,snappy".into(),
        };
        assert_eq!(
            error.to_string(),
            "the librdkafka built into dwh-helper lacks zstd (needed by reading topics, which may carry any codec), \
             ssl (needed by security.protocol=sasl_ssl), sasl_scram (needed by sasl.mechanisms=SCRAM-SHA-512); \
             it has: gzip,snappy"
        );
    }

    #[test]
    fn this_build_reads_every_codec_and_speaks_tls_and_scram() {
        let builtin = builtin();
        let needs = needed(&settings(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512,PLAIN"),
        ]));
        assert_eq!(missing(&needs, builtin), vec![], "builtin.features: {builtin}");
    }
}
