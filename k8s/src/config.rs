//! The flags of a service whose store is in the Kubernetes API (ipam-svc,
//! identity-svc with `--store kubernetes`), each with an environment
//! fallback.

use std::time::Duration;

use weft_common::config::parse_duration;

use crate::retry::RetryPolicy;

#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// How long one store call retries transient Kubernetes API trouble
    /// (unreachable, 429, 5xx) before it fails: seconds, or a value like
    /// `90s`, `1m`, `500ms`. A write that fails is refused to its caller;
    /// reads keep being answered from memory.
    #[arg(long, env = "WEFT_API_RETRY_BUDGET", default_value = "60s", value_parser = parse_duration)]
    pub api_retry_budget: Duration,

    /// How long the Kubernetes API may go unanswered before the gRPC health
    /// of the service turns NOT_SERVING (same syntax); SERVING again as
    /// soon as it answers.
    #[arg(long, env = "WEFT_API_UNREADY_AFTER", default_value = "10s", value_parser = parse_duration)]
    pub api_unready_after: Duration,
}

impl ApiArgs {
    /// The flags, validated.
    pub fn validate(&self) -> Result<ApiConfig, ApiArgsError> {
        if self.api_retry_budget.is_zero() {
            return Err(ApiArgsError::ZeroBudget);
        }
        Ok(ApiConfig {
            retry: RetryPolicy {
                budget: self.api_retry_budget,
            },
            unready_after: self.api_unready_after,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiArgsError {
    #[error("--api-retry-budget: must be longer than zero")]
    ZeroBudget,
}

/// How a store uses the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiConfig {
    pub retry: RetryPolicy,
    pub unready_after: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            unready_after: Duration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        api: ApiArgs,
    }

    #[test]
    fn defaults_and_a_zero_budget() {
        let f = Flags::try_parse_from(["x"]).expect("defaults");
        assert_eq!(f.api.validate(), Ok(ApiConfig::default()));
        let f = Flags::try_parse_from(["x", "--api-retry-budget", "0"]).expect("parses");
        assert_eq!(f.api.validate(), Err(ApiArgsError::ZeroBudget));
        let f = Flags::try_parse_from(["x", "--api-unready-after", "2s"]).expect("parses");
        assert_eq!(
            f.api.validate().map(|c| c.unready_after),
            Ok(Duration::from_secs(2))
        );
    }
}
