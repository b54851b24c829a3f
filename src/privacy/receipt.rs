//! Deletion receipts (REQUIREMENTS P7), signed with the gate's Ed25519 key so that a resident or
//! their property manager can check, with the gate's published key alone, that the gate says it
//! destroyed a template, when and why.
//!
//! Signing uses `ring` (already in the build through rustls); the key is a 32-byte seed in a
//! 0600 file or a systemd credential. The public key is published on the retained `identity`
//! topic and printed by `menshen identity`.
//!
//! The signed message is `menshen-receipt-v1\n` followed by the receipt as compact JSON (no
//! whitespace), fields in the order of [`Receipt`] (serde keeps struct order), with `signature`
//! present and empty (`"signature":""`), so the bytes are the same wherever they are rebuilt.
//! docs/privacy.md states this byte for byte, and docs/receipt-vectors.json carries test
//! vectors that an independent implementation checks (`scripts/verify_receipt.py`, PyNaCl).

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use std::path::Path;

use super::{hex, unhex};

const DOMAIN: &[u8] = b"menshen-receipt-v1\n";
/// The systemd credential name of the signing key.
pub const CREDENTIAL_NAME: &str = "menshen-signing-key";

/// A signed deletion receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// ULID; the same deletion always has the same receipt id.
    pub receipt_id: String,
    pub site: String,
    pub gate: String,
    /// The resident's opaque reference (never a name).
    pub resident: String,
    /// What was deleted: `face_template` (with its data key).
    pub what: String,
    /// The id of the destroyed data key.
    pub key_id: String,
    /// `face_turned_off`, `consent_withdrawn`, `resident_removed` or `retention_expired`.
    pub why: String,
    /// When the template left the store (Unix ms).
    pub deleted_at_ms: i64,
    /// When its key was destroyed and the receipt signed (Unix ms).
    pub signed_at_ms: i64,
    /// The signing key, `ed25519:<hex>`.
    pub key: String,
    /// Ed25519 signature, hex.
    #[serde(default)]
    pub signature: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptError {
    #[error("not a receipt: {0}")]
    Malformed(String),
    #[error("signed with another key ({0}), not the gate's published key")]
    OtherKey(String),
    #[error("the signature does not match: the receipt was altered or not signed by this gate")]
    BadSignature,
}

impl Receipt {
    /// The signed bytes (docs/privacy.md, "The signed bytes").
    pub fn message(&self) -> Vec<u8> {
        let mut body = self.clone();
        body.signature.clear();
        let json = serde_json::to_vec(&body).unwrap_or_default();
        [DOMAIN, json.as_slice()].concat()
    }

    /// Check the signature against `public_key` (32 bytes): the published key, never the one the
    /// receipt names.
    pub fn verify(&self, public_key: &[u8]) -> Result<(), ReceiptError> {
        let named = self.key.strip_prefix("ed25519:").and_then(unhex);
        if named.as_deref() != Some(public_key) {
            return Err(ReceiptError::OtherKey(self.key.clone()));
        }
        let sig = unhex(&self.signature).ok_or_else(|| ReceiptError::Malformed("signature is not hex".into()))?;
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&self.message(), &sig)
            .map_err(|_| ReceiptError::BadSignature)
    }

    /// A receipt from a file's text: the bare receipt, or an `event/privacy` message carrying one
    /// under `receipt`.
    pub fn from_json(text: &str) -> Result<Receipt, ReceiptError> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        let r = if v.get("receipt").is_some() { v["receipt"].clone() } else { v };
        serde_json::from_value(r).map_err(|e| ReceiptError::Malformed(e.to_string()))
    }
}

/// The gate's signing key.
pub struct Signer {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.public_key_text())
    }
}

impl Signer {
    /// The systemd credential if present, else the seed file, created (0600) on first use.
    pub fn load(file: &Path) -> Result<Signer, super::SealError> {
        let err = |why: String| super::SealError::Key { path: file.display().to_string(), why };
        let (seed, _) = crate::secrets::load_or_create_key(file, CREDENTIAL_NAME).map_err(err)?;
        Signer::from_seed(&seed).ok_or_else(|| err("not an Ed25519 seed".into()))
    }

    pub fn from_seed(seed: &[u8]) -> Option<Signer> {
        Ed25519KeyPair::from_seed_unchecked(seed).ok().map(|pair| Signer { pair })
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// `ed25519:<hex>`, as published and as receipts name it.
    pub fn public_key_text(&self) -> String {
        format!("ed25519:{}", hex(self.pair.public_key().as_ref()))
    }

    /// The identity message (retained `identity` topic, `menshen identity`).
    pub fn identity(&self, site: &str, gate: &str) -> serde_json::Value {
        serde_json::json!({
            "site": site,
            "gate": gate,
            "receipt_key": self.public_key_text(),
            "algorithm": "Ed25519",
            "receipt_format": "menshen-receipt-v1",
        })
    }

    /// Fill in `key` and `signature`.
    pub fn sign(&self, mut r: Receipt) -> Receipt {
        r.key = self.public_key_text();
        r.signature.clear();
        r.signature = hex(self.pair.sign(&r.message()).as_ref());
        r
    }
}

/// Parse a published key: `ed25519:<hex>` or bare hex.
pub fn parse_public_key(s: &str) -> Option<Vec<u8>> {
    unhex(s.trim().strip_prefix("ed25519:").unwrap_or(s.trim())).filter(|k| k.len() == 32)
}

impl crate::events::DeletionReceipt for Receipt {
    fn resident(&self) -> &str {
        &self.resident
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> Receipt {
        Receipt {
            receipt_id: "01JD0000000000000000000000".into(),
            site: "s".into(),
            gate: "g".into(),
            resident: "r-1".into(),
            what: "face_template".into(),
            key_id: "00".repeat(16),
            why: "face_turned_off".into(),
            deleted_at_ms: 1,
            signed_at_ms: 2,
            key: String::new(),
            signature: String::new(),
        }
    }

    /// docs/receipt-vectors.json, made by the code from a published test seed (never a real key).
    fn vectors() -> serde_json::Value {
        let seed = [0x4du8; 32];
        let s = Signer::from_seed(&seed).unwrap();
        let r = s.sign(Receipt {
            receipt_id: "01JF6Y7C3Q4W8X2N5M9K0R1T2V".into(),
            site: "site1".into(),
            gate: "gate1".into(),
            resident: "r-1004".into(),
            what: "face_template".into(),
            key_id: "5f1c0e2a9b7d4c3e8a6f1b2d3c4e5f60".into(),
            why: "consent_withdrawn".into(),
            deleted_at_ms: 1_796_000_000_000,
            signed_at_ms: 1_796_000_000_412,
            key: String::new(),
            signature: String::new(),
        });
        serde_json::json!({
            "about": "Test vectors for menshen-receipt-v1 (docs/privacy.md, \"The signed bytes\"). The seed is a \
                      published test key: never use it to sign anything. Regenerate with \
                      MENSHEN_WRITE_VECTORS=1 cargo test --lib receipt_vectors.",
            "vectors": [{
                "name": "consent_withdrawn",
                "seed_hex": hex(&seed),
                "public_key": s.public_key_text(),
                "receipt": r,
                "signed_bytes_hex": hex(&r.message()),
            }],
        })
    }

    #[test]
    fn receipt_vectors_in_the_docs_are_what_the_code_makes() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/receipt-vectors.json");
        let made = vectors();
        if std::env::var_os("MENSHEN_WRITE_VECTORS").is_some() {
            std::fs::write(&path, serde_json::to_string_pretty(&made).unwrap() + "\n").unwrap();
        }
        let shipped: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(shipped, made, "docs/receipt-vectors.json is stale: regenerate it (see its `about`)");
        // And the shipped receipt verifies here too.
        let v = &shipped["vectors"][0];
        let r: Receipt = serde_json::from_value(v["receipt"].clone()).unwrap();
        let key = parse_public_key(v["public_key"].as_str().unwrap()).unwrap();
        assert_eq!(r.verify(&key), Ok(()));
        let text = String::from_utf8(r.message()).unwrap();
        assert!(
            text.starts_with("menshen-receipt-v1\n{\"receipt_id\":") && text.ends_with(",\"signature\":\"\"}"),
            "{text}"
        );
    }

    #[test]
    fn a_signed_receipt_verifies_and_any_change_breaks_it() {
        let s = Signer::from_seed(&[9; 32]).unwrap();
        let r = s.sign(receipt());
        assert!(r.key.starts_with("ed25519:"));
        assert_eq!(r.verify(&s.public_key()), Ok(()));
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(Receipt::from_json(&text).unwrap().verify(&s.public_key()), Ok(()));
        // Every field is covered by the signature.
        let mut bad = r.clone();
        bad.why = "retention_expired".into();
        assert_eq!(bad.verify(&s.public_key()), Err(ReceiptError::BadSignature));
        let mut bad = r.clone();
        bad.deleted_at_ms += 1;
        assert_eq!(bad.verify(&s.public_key()), Err(ReceiptError::BadSignature));
        let mut bad = r.clone();
        bad.resident = "r-2".into();
        assert_eq!(bad.verify(&s.public_key()), Err(ReceiptError::BadSignature));
        // Another gate's key, even named in the receipt, is not the published key.
        let other = Signer::from_seed(&[8; 32]).unwrap();
        let forged = other.sign(receipt());
        assert!(matches!(forged.verify(&s.public_key()), Err(ReceiptError::OtherKey(_))));
        let mut forged = forged;
        forged.key = s.public_key_text();
        assert_eq!(forged.verify(&s.public_key()), Err(ReceiptError::BadSignature));
        assert_eq!(parse_public_key(&s.public_key_text()), Some(s.public_key()));
        assert!(Receipt::from_json("{\"receipt_id\": 1}").is_err());
    }

    #[test]
    fn the_seed_file_is_made_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sign.key");
        let a = Signer::load(&p).unwrap();
        let b = Signer::load(&p).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
