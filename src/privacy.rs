//! Template protection at rest: a face template is sealed with XChaCha20-Poly1305 under the gate's
//! template key, with the resident id as associated data, so a template cannot be read without
//! the key, altered without detection, or moved to another resident's row.
//!
//! The key is 32 random bytes in `privacy.template_key_file` (created 0600 on first use, never
//! logged, never sent). Consent records and deletion receipts are the privacy issue's (issue 5);
//! this module is the part the face path needs to store anything at all.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use std::path::Path;

const MAGIC: &[u8; 4] = b"MTv1";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("template key {path}: {why}")]
    Key { path: String, why: String },
    #[error("sealed template is malformed or was altered, or belongs to another resident")]
    Open,
}

/// The template key.
pub struct TemplateKey(XChaCha20Poly1305);

impl std::fmt::Debug for TemplateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TemplateKey(..)")
    }
}

impl TemplateKey {
    /// Read the key file, or create it (0600, fsynced) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<TemplateKey, SealError> {
        let err = |why: String| SealError::Key { path: path.display().to_string(), why };
        match std::fs::read(path) {
            Ok(bytes) if bytes.len() == 32 => Ok(TemplateKey(XChaCha20Poly1305::new(bytes.as_slice().into()))),
            Ok(bytes) => Err(err(format!("{} bytes, expected 32", bytes.len()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                }
                let mut key = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut key);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| err(e.to_string()))?;
                f.write_all(&key).and_then(|_| f.sync_all()).map_err(|e| err(e.to_string()))?;
                Ok(TemplateKey(XChaCha20Poly1305::new((&key).into())))
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Seal a template for `resident`: magic, random 24-byte nonce, ciphertext + tag.
    pub fn seal(&self, resident: &str, template: &[f32]) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let plain: Vec<u8> = template.iter().flat_map(|v| v.to_le_bytes()).collect();
        // Encryption with a valid key and nonce cannot fail for in-memory buffers.
        let ct = self
            .0
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: &plain, aad: resident.as_bytes() })
            .unwrap_or_default();
        let mut out = Vec::with_capacity(4 + 24 + ct.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Open a sealed template of `resident`.
    pub fn open(&self, resident: &str, sealed: &[u8]) -> Result<Vec<f32>, SealError> {
        if sealed.len() < 4 + 24 + 16 || &sealed[..4] != MAGIC {
            return Err(SealError::Open);
        }
        let plain = self
            .0
            .decrypt(XNonce::from_slice(&sealed[4..28]), Payload { msg: &sealed[28..], aad: resident.as_bytes() })
            .map_err(|_| SealError::Open)?;
        if plain.len() % 4 != 0 {
            return Err(SealError::Open);
        }
        Ok(plain.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_templates_open_only_with_the_key_for_the_same_resident() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/template.key");
        let key = TemplateKey::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let t = vec![0.25f32, -0.5, 0.125];
        let sealed = key.seal("alice", &t);
        assert!(!sealed.windows(4).any(|w| w == 0.25f32.to_le_bytes()), "no plaintext in the blob");
        assert_eq!(key.open("alice", &sealed).unwrap(), t);
        assert!(key.open("bob", &sealed).is_err(), "moved to another resident");
        let mut altered = sealed.clone();
        altered[40] ^= 1;
        assert!(key.open("alice", &altered).is_err(), "altered");
        // The same file gives the same key; another key cannot open it.
        let again = TemplateKey::load_or_create(&path).unwrap();
        assert_eq!(again.open("alice", &sealed).unwrap(), t);
        let other = TemplateKey::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.open("alice", &sealed).is_err());
        std::fs::write(dir.path().join("short.key"), b"short").unwrap();
        assert!(TemplateKey::load_or_create(&dir.path().join("short.key")).is_err());
    }
}
