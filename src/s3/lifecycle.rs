//! The bucket's expiration rules: the ones dwh-helper manages (named
//! `dwh-helper-…`) are set and deleted; every other rule is kept as it is.

use aws_sdk_s3::types::{
    BucketLifecycleConfiguration, ExpirationStatus, LifecycleExpiration, LifecycleRule, LifecycleRuleFilter,
};
use serde::Serialize;

use super::error::classify;
use super::{S3Error, S3};

/// The expiration rules among `rules` that filter by prefix alone.
fn summaries(rules: &[LifecycleRule]) -> Vec<ExpirationRule> {
    rules
        .iter()
        .filter_map(|rule| {
            Some(ExpirationRule {
                id: rule.id().unwrap_or_default().to_owned(),
                prefix: rule_prefix(rule)?.to_owned(),
                days: rule.expiration()?.days()?,
                enabled: rule.status() == &ExpirationStatus::Enabled,
                managed: is_managed(rule),
            })
        })
        .collect()
}

/// An expiration rule of the bucket's lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ExpirationRule {
    pub id: String,
    pub prefix: String,
    pub days: i32,
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Whether the API manages the rule (its id starts with `dwh-helper-`); any
    /// other rule is the bucket owner's, listed here and never changed.
    #[serde(default)]
    pub managed: bool,
}

fn enabled() -> bool {
    true
}

/// The id prefix of the lifecycle rules the API manages.
pub const MANAGED_RULE_PREFIX: &str = "dwh-helper-";

fn is_managed(rule: &LifecycleRule) -> bool {
    rule.id().is_some_and(|id| id.starts_with(MANAGED_RULE_PREFIX))
}

/// The prefix a rule filters on: `Filter.Prefix`, or the legacy top-level
/// `Prefix`; `None` for a rule that filters otherwise (tags, sizes, `And`).
fn rule_prefix(rule: &LifecycleRule) -> Option<&str> {
    match rule.filter() {
        Some(filter) => filter
            .prefix()
            .filter(|_| filter.and().is_none() && filter.tag().is_none()),
        #[allow(deprecated)]
        None => rule.prefix(),
    }
}

impl S3 {
    /// The bucket's expiration rules by prefix, the API's own and the owner's.
    pub async fn lifecycle(&self) -> Result<Vec<ExpirationRule>, S3Error> {
        Ok(summaries(&self.lifecycle_rules().await?))
    }

    /// The bucket's lifecycle rules as the store holds them, every kind.
    async fn lifecycle_rules(&self) -> Result<Vec<LifecycleRule>, S3Error> {
        match self
            .client
            .get_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(response) => Ok(response.rules().to_vec()),
            Err(e) => match classify(e, &self.bucket, "") {
                S3Error::Other { code, .. } if code == "NoSuchLifecycleConfiguration" => Ok(Vec::new()),
                other => Err(other),
            },
        }
    }

    /// Sets the API's expiration rule for `rule.prefix`, replacing its own rule
    /// with that prefix or id. Every other rule is written back as it was read.
    pub async fn set_expiration(&self, rule: ExpirationRule) -> Result<Vec<ExpirationRule>, S3Error> {
        let mut rules = self.lifecycle_rules().await?;
        rules
            .retain(|r| !(is_managed(r) && (rule_prefix(r) == Some(rule.prefix.as_str()) || r.id() == Some(&rule.id))));
        let status = match rule.enabled {
            true => ExpirationStatus::Enabled,
            false => ExpirationStatus::Disabled,
        };
        rules.push(
            LifecycleRule::builder()
                .id(&rule.id)
                .filter(LifecycleRuleFilter::builder().prefix(&rule.prefix).build())
                .status(status)
                .expiration(LifecycleExpiration::builder().days(rule.days).build())
                .build()
                .map_err(|e| S3Error::BadRequest { detail: e.to_string() })?,
        );
        self.write_lifecycle(rules.clone()).await?;
        Ok(summaries(&rules))
    }

    /// Removes the API's expiration rules for `prefix`; returns how many there
    /// were. The owner's rules stay.
    pub async fn delete_expiration(&self, prefix: &str) -> Result<usize, S3Error> {
        let mut rules = self.lifecycle_rules().await?;
        let before = rules.len();
        rules.retain(|r| !(is_managed(r) && rule_prefix(r) == Some(prefix)));
        let removed = before - rules.len();
        if removed > 0 {
            self.write_lifecycle(rules).await?;
        }
        Ok(removed)
    }

    async fn write_lifecycle(&self, rules: Vec<LifecycleRule>) -> Result<(), S3Error> {
        if rules.is_empty() {
            self.sent("", self.client.delete_bucket_lifecycle().bucket(&self.bucket).send())
                .await?;
            return Ok(());
        }
        let configuration = BucketLifecycleConfiguration::builder()
            .set_rules(Some(rules))
            .build()
            .map_err(|e| S3Error::BadRequest { detail: e.to_string() })?;
        let request = self.client.put_bucket_lifecycle_configuration().bucket(&self.bucket);
        self.sent("", request.lifecycle_configuration(configuration).send())
            .await?;
        Ok(())
    }
}
