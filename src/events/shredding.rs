//! Crypto-shredding: personal data in events (and so in every copy of them
//! — Kafka topics, backups, read models fed from them) is encrypted with a
//! key per *subject* (a customer, a person). Forgetting the subject deletes
//! its key (`kurier.forget_subject`), and every copy becomes unreadable, where
//! deleting the copies themselves is not possible.
//!
//! The envelope, so that other languages can decrypt (JSON, in place of the
//! field's value):
//!
//! ```text
//! {"kurier:shredded": 1, "alg": "A256GCM", "subject": "<subject>",
//!  "nonce": "<base64, 12 bytes>", "ciphertext": "<base64: ciphertext + 16-byte tag>"}
//! ```
//!
//! AES-256-GCM (RustCrypto `aes-gcm`), the key from `kurier.subject_keys`
//! (32 bytes), a fresh random nonce per value, the subject's UTF-8 bytes as
//! associated data, and as plaintext the JSON text of the original value.
//!
//! The key table is a database table: keep it out of the backups that must
//! forget (or with a shorter retention), or the key comes back with them.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sqlx::PgPool;

use super::store;
use crate::error::Error;
use crate::schema::SchemaName;

/// The envelope's marker key and version.
pub const MARKER: &str = "kurier:shredded";
pub const ALG: &str = "A256GCM";

/// A value read back from an envelope.
#[derive(Debug, Clone, PartialEq)]
pub enum Revealed {
    Value(serde_json::Value),
    /// The subject was forgotten: the value is gone for good.
    Forgotten {
        subject: String,
    },
}

/// Encrypts and decrypts values with per-subject keys stored in one schema.
#[derive(Debug, Clone)]
pub struct Shredder {
    pool: PgPool,
    schema: SchemaName,
}

impl Shredder {
    pub fn new(pool: PgPool, schema: SchemaName) -> Self {
        Shredder { pool, schema }
    }

    /// `value` in an envelope under `subject`'s key (created on first use).
    /// A forgotten subject gets no new key: the error says so.
    pub async fn encrypt(
        &self,
        subject: &str,
        value: &serde_json::Value,
    ) -> Result<serde_json::Value, Error> {
        let fresh = Aes256Gcm::generate_key(OsRng);
        let key = store::subject_key(&self.pool, &self.schema, subject, fresh.as_slice()).await?;
        seal(&key, subject, value)
    }

    /// The value of an envelope, or [`Revealed::Forgotten`] when its key is gone.
    /// A value that is not an envelope is returned as it is.
    pub async fn decrypt(&self, value: &serde_json::Value) -> Result<Revealed, Error> {
        let Some(subject) = envelope_subject(value) else {
            return Ok(Revealed::Value(value.clone()));
        };
        match store::key_of(&self.pool, &self.schema, subject).await? {
            None => Ok(Revealed::Forgotten {
                subject: subject.to_owned(),
            }),
            Some(key) => open(&key, value).map(Revealed::Value),
        }
    }

    /// Deletes `subject`'s key for good; `true` if there was one.
    pub async fn forget(&self, subject: &str) -> Result<bool, Error> {
        store::forget_subject(&self.pool, &self.schema, subject).await
    }
}

/// The subject of an envelope; `None` for any other value.
pub fn envelope_subject(value: &serde_json::Value) -> Option<&str> {
    (value[MARKER] == 1 && value["alg"] == ALG)
        .then(|| value["subject"].as_str())
        .flatten()
}

/// `value` encrypted with `key` (32 bytes) for `subject`.
pub fn seal(
    key: &[u8],
    subject: &str,
    value: &serde_json::Value,
) -> Result<serde_json::Value, Error> {
    let cipher = cipher(key)?;
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let plaintext = serde_json::to_vec(value).expect("a JSON value serializes");
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: &plaintext,
                aad: subject.as_bytes(),
            },
        )
        .map_err(|_| Error::InvalidMessage("encryption failed".into()))?;
    Ok(serde_json::json!({
        MARKER: 1,
        "alg": ALG,
        "subject": subject,
        "nonce": B64.encode(nonce),
        "ciphertext": B64.encode(ciphertext),
    }))
}

/// The value inside an envelope, with `key`; an error when the envelope was
/// not made with that key for its subject (or was changed).
pub fn open(key: &[u8], envelope: &serde_json::Value) -> Result<serde_json::Value, Error> {
    let bad = |what: &str| Error::InvalidMessage(format!("not a valid {MARKER} envelope: {what}"));
    let subject = envelope_subject(envelope).ok_or_else(|| bad("marker, alg or subject"))?;
    let field = |name: &str| {
        envelope[name]
            .as_str()
            .and_then(|s| B64.decode(s).ok())
            .ok_or_else(|| bad(name))
    };
    let nonce = field("nonce")?;
    if nonce.len() != 12 {
        return Err(bad("nonce length"));
    }
    let plaintext = cipher(key)?
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &field("ciphertext")?,
                aad: subject.as_bytes(),
            },
        )
        .map_err(|_| bad("it does not decrypt with this subject's key"))?;
    serde_json::from_slice(&plaintext).map_err(|_| bad("the plaintext is not JSON"))
}

fn cipher(key: &[u8]) -> Result<Aes256Gcm, Error> {
    if key.len() != 32 {
        return Err(Error::InvalidMessage(format!(
            "a subject key is 32 bytes, not {}",
            key.len()
        )));
    }
    Ok(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_opens_with_its_key_and_subject_only() {
        let (key, other) = ([7u8; 32], [8u8; 32]);
        let value = serde_json::json!({"email": "ada@example.com"});
        let env = seal(&key, "customer-1", &value).unwrap();
        assert_eq!(envelope_subject(&env), Some("customer-1"));
        assert!(!env.to_string().contains("ada@example.com"));
        assert_eq!(open(&key, &env).unwrap(), value);
        assert!(open(&other, &env).is_err(), "another key");
        let mut moved = env.clone();
        moved["subject"] = "customer-2".into();
        assert!(open(&key, &moved).is_err(), "the subject is authenticated");
        // Two seals of one value differ (fresh nonces).
        assert_ne!(seal(&key, "customer-1", &value).unwrap(), env);
    }
}
