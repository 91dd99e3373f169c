//! The CNI error object and the codes this plugin uses.
//!
//! Codes below 100 are the spec's well-known codes; 100 and up are weft's
//! own. Every failure the plugin can report is one of these, so a runtime
//! (and an operator reading kubelet's events) can tell a bad config from a
//! node that is merely not ready yet.

pub use weft_cni_contract::code;

/// A CNI error: what the plugin prints (as JSON) instead of a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}")]
pub struct CniError {
    pub code: u32,
    /// Short, human-readable.
    pub msg: String,
    /// Longer context; empty when there is none.
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub(crate) fn env(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_ENV, msg)
    }

    pub(crate) fn config(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_CONFIG, msg)
    }
}
