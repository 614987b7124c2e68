//! Standard Webhooks signatures: `webhook-signature: v1,<base64 HMAC-SHA256
//! over "<webhook-id>.<webhook-timestamp>.<body>">`.
//!
//! The secret is either `whsec_<base64>` (the convention's format: the key is
//! the decoded bytes) or any other text (the key is its UTF-8 bytes). This
//! module must never log, print or `Debug` the secret or the key.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::fmt;

/// Why a secret is unusable (never contains the secret).
pub use crate::secret::SigningKeyError as SignatureError;

/// Signs webhook requests with one secret.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signer(<redacted>)")
    }
}

impl Signer {
    pub fn new(secret: &str) -> Result<Signer, SignatureError> {
        Ok(Signer { key: crate::secret::signing_key(secret)? })
    }

    /// The `webhook-signature` header value for one request.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC accepts keys of any length; this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let s = Signer::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            s.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn rejects_unusable_secrets_without_echoing_them() {
        assert_eq!(Signer::new("").unwrap_err(), SignatureError::Empty);
        let e = Signer::new("whsec_!!!notbase64").unwrap_err();
        assert!(!e.to_string().contains("notbase64"));
        assert!(!format!("{:?}", Signer::new("hunter2").unwrap()).contains("hunter2"));
    }
}
