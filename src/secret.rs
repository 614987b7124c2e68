//! Secrets given inline, in a file or in an environment variable: where a
//! secret comes from, how it is read, and how it is shown (never).
//!
//! Owned by no component: the configuration file names a [`SecretSource`],
//! and the AMI client, the SIP agent, the sinks and the API each resolve
//! theirs when they start. This module must never log or print a value.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// A secret given inline (`secret`), in a file (`secret_file`, trailing
/// newline removed) or in an environment variable (`secret_env`). Exactly
/// one must be set.
///
/// `Debug` and `Serialize` never show an inline secret's value.
#[derive(Clone, Deserialize, Default)]
pub struct SecretSource {
    pub secret: Option<String>,
    pub secret_file: Option<String>,
    pub secret_env: Option<String>,
}

const REDACTED: &str = "<redacted>";

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSource")
            .field("secret", &self.secret.as_ref().map(|_| REDACTED))
            .field("secret_file", &self.secret_file)
            .field("secret_env", &self.secret_env)
            .finish()
    }
}

/// Serializes the inline secret as `"<redacted>"` (empty stays empty, so
/// that validation of a serialized config still sees it).
impl Serialize for SecretSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        if let Some(secret) = &self.secret {
            m.serialize_entry("secret", if secret.is_empty() { "" } else { REDACTED })?;
        }
        if let Some(file) = &self.secret_file {
            m.serialize_entry("secret_file", file)?;
        }
        if let Some(env) = &self.secret_env {
            m.serialize_entry("secret_env", env)?;
        }
        m.end()
    }
}

/// Why a secret could not be obtained. Names the source, never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("no secret: set one of secret, secret_file, secret_env")]
    Missing,
    #[error("set only one of secret, secret_file, secret_env")]
    Ambiguous,
    #[error("cannot read secret_file {path:?}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("environment variable {0:?} (secret_env) is not set")]
    EnvNotSet(String),
    #[error("environment variable {0:?} (secret_env) is not valid UTF-8")]
    EnvNotUnicode(String),
    #[error("the secret is empty")]
    Empty,
}

impl SecretSource {
    /// Resolves the secret (reads the file or the environment variable);
    /// the error is [`SecretError`]'s message. Prefer [`SecretSource::read`]
    /// for a typed error.
    pub fn resolve(&self) -> Result<String, String> {
        self.read().map_err(|e| e.to_string())
    }

    /// Resolves the secret (reads the file or the environment variable).
    pub fn read(&self) -> Result<String, SecretError> {
        let value = match (&self.secret, &self.secret_file, &self.secret_env) {
            (Some(s), None, None) => s.clone(),
            (None, Some(path), None) => std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|source| SecretError::File { path: path.clone(), source })?,
            (None, None, Some(var)) => std::env::var(var).map_err(|e| match e {
                std::env::VarError::NotPresent => SecretError::EnvNotSet(var.clone()),
                std::env::VarError::NotUnicode(_) => SecretError::EnvNotUnicode(var.clone()),
            })?,
            (None, None, None) => return Err(SecretError::Missing),
            _ => return Err(SecretError::Ambiguous),
        };
        if value.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(value)
    }

    pub fn is_set(&self) -> bool {
        self.secret.is_some() || self.secret_file.is_some() || self.secret_env.is_some()
    }

    /// Where the secret comes from, for humans: `inline`, `file "/run/…"`,
    /// `environment variable "AMI_SECRET"`. Never the value.
    pub fn describe(&self) -> String {
        match (&self.secret, &self.secret_file, &self.secret_env) {
            (Some(_), None, None) => "inline (not shown)".to_string(),
            (None, Some(path), None) => format!("from file {path:?}"),
            (None, None, Some(var)) => format!("from environment variable {var:?}"),
            (None, None, None) => "none".to_string(),
            _ => "ambiguous".to_string(),
        }
    }
}
