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

/// What a secret is used for: decides what "well-formed" means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretUse {
    /// Any non-empty text (AMI, SIP, the API's bearer token).
    Password,
    /// A Standard Webhooks signing secret: `whsec_<base64>` or raw text.
    SigningKey,
    /// A token that becomes a URL path segment (Zammad's CTI token).
    PathToken,
}

/// Why a signing secret is unusable (never contains the secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningKeyError {
    #[error("the signing secret is empty")]
    Empty,
    #[error("the signing secret starts with whsec_ but the rest is not valid base64")]
    BadBase64,
}

/// The HMAC key of a Standard Webhooks signing secret: the decoded bytes of
/// `whsec_<base64>`, or the UTF-8 bytes of any other text.
pub fn signing_key(secret: &str) -> Result<Vec<u8>, SigningKeyError> {
    use base64::Engine;
    let key = match secret.strip_prefix("whsec_") {
        Some(b64) => {
            base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|_| SigningKeyError::BadBase64)?
        }
        None => secret.as_bytes().to_vec(),
    };
    if key.is_empty() {
        return Err(SigningKeyError::Empty);
    }
    Ok(key)
}

/// Checks a token that is sent as one URL path segment.
pub fn check_path_token(token: &str) -> Result<(), &'static str> {
    if token.is_empty() || token.contains('/') {
        return Err("token must be non-empty and contain no '/'");
    }
    Ok(())
}

/// The outcome of [`SecretSource::check`]: a problem (the secret cannot be
/// used) and warnings (it can, but is exposed). Messages start with the
/// field path and never contain the value.
#[derive(Debug, Default)]
pub struct SecretCheck {
    pub problem: Option<String>,
    pub warnings: Vec<String>,
}

impl SecretSource {
    /// The field the secret is given in: `secret`, `secret_file` or
    /// `secret_env` (`secret` when none or several are set).
    pub fn field(&self) -> &'static str {
        match (&self.secret, &self.secret_file, &self.secret_env) {
            (None, Some(_), None) => "secret_file",
            (None, None, Some(_)) => "secret_env",
            _ => "secret",
        }
    }

    /// Obtains the secret and checks it is usable for `purpose`, naming the
    /// field as `{at}.secret_file` etc. Warns when a secret file is readable
    /// by other users.
    pub fn check(&self, at: &str, purpose: SecretUse) -> SecretCheck {
        let field = format!("{at}.{}", self.field());
        let mut check = SecretCheck::default();
        if let Some(path) = &self.secret_file {
            check.warnings.extend(world_readable(path).map(|mode| {
                format!("{field}: {path:?} is readable by other users (mode {mode:04o}); run chmod o-r on it")
            }));
        }
        let value = match self.read() {
            Ok(v) => v,
            Err(e) => {
                check.problem = Some(format!("{field}: {}", self.read_problem(&e)));
                return check;
            }
        };
        let malformed = match purpose {
            SecretUse::Password => None,
            SecretUse::SigningKey => signing_key(&value).err().map(|e| e.to_string()),
            SecretUse::PathToken => check_path_token(&value).err().map(str::to_string),
        };
        check.problem = malformed.map(|m| format!("{field}: {m}"));
        check
    }

    /// A [`SecretError`] phrased for a message that already names the field.
    fn read_problem(&self, e: &SecretError) -> String {
        match e {
            SecretError::File { path, source } => format!("cannot read {path:?}: {}", io_message(source)),
            SecretError::EnvNotSet(var) => format!("environment variable {var:?} is not set"),
            SecretError::EnvNotUnicode(var) => format!("environment variable {var:?} is not valid UTF-8"),
            SecretError::Empty => match (&self.secret_file, &self.secret_env) {
                (Some(path), _) => format!("{path:?} is empty"),
                (_, Some(var)) => format!("environment variable {var:?} is empty"),
                _ => "the secret is empty".to_string(),
            },
            SecretError::Missing | SecretError::Ambiguous => e.to_string(),
        }
    }
}

/// The mode of a file others may read, if it is one.
fn world_readable(path: &str) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    (mode & 0o004 != 0).then_some(mode)
}

/// An I/O error's message without the trailing ` (os error N)`.
fn io_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
