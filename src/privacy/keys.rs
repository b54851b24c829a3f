//! Template protection at rest (REQUIREMENTS P5, P6, P7).
//!
//! Two levels of keys:
//! - The **device key**: 32 random bytes kept outside the database, either a systemd credential
//!   (`LoadCredential=menshen-device-key:…`, read from `$CREDENTIALS_DIRECTORY`) or a file
//!   (`privacy.device_key_file`, created 0600 on first use). It never leaves the gate, is never
//!   logged and never sent.
//! - One **data key** per template: 32 random bytes, wrapped (XChaCha20-Poly1305) by the device key
//!   into its own small file `keys/<key id>.key` beside the store. The template is sealed with its
//!   data key (XChaCha20-Poly1305, the resident id and key id as associated data), and only the
//!   sealed blob goes into the database.
//!
//! Deleting a template destroys its data key file: overwritten with zeros, fsynced, unlinked, the
//! directory fsynced. The database is copy-on-write, so an old copy of the sealed blob may linger
//! in free pages until they are reused; without its data key it cannot be decrypted, and the data
//! key existed in no other file (see `docs/privacy.md` for what flash media may still hold).

use crate::durable::sync_parent as sync_dir;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Sealed template: magic, 16-byte key id, 24-byte nonce, ciphertext + tag.
const TEMPLATE_MAGIC: &[u8; 4] = b"MTv2";
/// Wrapped data key file: magic, 24-byte nonce, wrapped key + tag.
const KEY_MAGIC: &[u8; 4] = b"MKv1";
const KEY_FILE_LEN: usize = 4 + 24 + 32 + 16;

/// The systemd credential name the device key is read from (`LoadCredential=`).
pub const CREDENTIAL_NAME: &str = "menshen-device-key";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("device key {path}: {why}")]
    Key { path: String, why: String },
    #[error("keyring {path}: {why}")]
    Keyring { path: String, why: String },
    #[error("the data key of this template does not exist (it was destroyed: the template is deleted)")]
    KeyGone,
    #[error("sealed template is malformed or was altered, or belongs to another resident")]
    Open,
}

/// A key id: 16 random bytes, as 32 hex digits (also the key file's name).
pub type KeyId = String;

/// The device key.
pub struct DeviceKey {
    aead: XChaCha20Poly1305,
    /// Where it came from, for messages (never the key).
    pub source: String,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKey({})", self.source)
    }
}

pub(crate) use crate::secrets::write_new_0600;

impl DeviceKey {
    /// The systemd credential if the service has one, else the key file, created (0600,
    /// fsynced) on first use.
    pub fn load(file: &Path) -> Result<DeviceKey, SealError> {
        let (key, source) = crate::secrets::load_or_create_key(file, CREDENTIAL_NAME)
            .map_err(|why| SealError::Key { path: file.display().to_string(), why })?;
        Ok(DeviceKey { aead: XChaCha20Poly1305::new((&key).into()), source })
    }

    /// A device key from raw bytes (tests and the key-search tools).
    pub fn from_bytes(key: &[u8; 32]) -> DeviceKey {
        DeviceKey { aead: XChaCha20Poly1305::new(key.into()), source: "bytes".into() }
    }
}

/// Associated data binding a wrapped data key to its id and resident.
fn key_aad(kid: &str, resident: &str) -> Vec<u8> {
    [b"menshen-dek\0".as_slice(), kid.as_bytes(), b"\0", resident.as_bytes()].concat()
}

fn template_aad(kid: &[u8], resident: &str) -> Vec<u8> {
    [b"menshen-template\0".as_slice(), kid, b"\0", resident.as_bytes()].concat()
}

/// Unwrap a key file's bytes with a device key.
pub fn unwrap_key(device: &DeviceKey, kid: &str, resident: &str, file: &[u8]) -> Option<[u8; 32]> {
    if file.len() != KEY_FILE_LEN || &file[..4] != KEY_MAGIC {
        return None;
    }
    let dek = device
        .aead
        .decrypt(XNonce::from_slice(&file[4..28]), Payload { msg: &file[28..], aad: &key_aad(kid, resident) })
        .ok()?;
    dek.try_into().ok()
}

/// Open a sealed template with a data key (no files involved).
pub fn open_with(dek: &[u8; 32], resident: &str, sealed: &[u8]) -> Result<Vec<f32>, SealError> {
    if sealed.len() < 4 + 16 + 24 + 16 || &sealed[..4] != TEMPLATE_MAGIC {
        return Err(SealError::Open);
    }
    let aead = XChaCha20Poly1305::new(dek.into());
    let plain = aead
        .decrypt(
            XNonce::from_slice(&sealed[20..44]),
            Payload { msg: &sealed[44..], aad: &template_aad(&sealed[4..20], resident) },
        )
        .map_err(|_| SealError::Open)?;
    if plain.len() % 4 != 0 {
        return Err(SealError::Open);
    }
    Ok(plain.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// The key id a sealed template names.
pub fn key_id_of(sealed: &[u8]) -> Option<KeyId> {
    (sealed.len() >= 20 && &sealed[..4] == TEMPLATE_MAGIC).then(|| super::hex(&sealed[4..20]))
}

/// The data keys, one file each, wrapped by the device key.
#[derive(Debug)]
pub struct Keyring {
    dir: PathBuf,
    device: DeviceKey,
}

impl Keyring {
    /// Open (or create, 0700) the key directory.
    pub fn open(dir: &Path, device: DeviceKey) -> Result<Keyring, SealError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |why: String| SealError::Keyring { path: dir.display().to_string(), why };
        crate::durable::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| err(e.to_string()))?;
        Ok(Keyring { dir: dir.to_path_buf(), device })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, kid: &str) -> PathBuf {
        self.dir.join(format!("{kid}.key"))
    }

    /// Seal a template for `resident` under a new data key, whose wrapped file is on disk
    /// (fsynced) before this returns. Returns the key id and the sealed blob for the store.
    pub fn seal(&self, resident: &str, template: &[f32]) -> Result<(KeyId, Vec<u8>), SealError> {
        let mut raw_id = [0u8; 16];
        let mut dek = [0u8; 32];
        let mut wrap_nonce = [0u8; 24];
        let mut nonce = [0u8; 24];
        for b in [&mut raw_id[..], &mut dek[..], &mut wrap_nonce[..], &mut nonce[..]] {
            rand::rngs::OsRng.fill_bytes(b);
        }
        let kid = super::hex(&raw_id);
        let wrapped = self
            .device
            .aead
            .encrypt(XNonce::from_slice(&wrap_nonce), Payload { msg: &dek, aad: &key_aad(&kid, resident) })
            .map_err(|_| SealError::Open)?;
        let file = [KEY_MAGIC.as_slice(), &wrap_nonce, &wrapped].concat();
        write_new_0600(&self.path(&kid), &file)
            .map_err(|e| SealError::Keyring { path: self.path(&kid).display().to_string(), why: e.to_string() })?;
        let plain: Vec<u8> = template.iter().flat_map(|v| v.to_le_bytes()).collect();
        let ct = XChaCha20Poly1305::new((&dek).into())
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: &plain, aad: &template_aad(&raw_id, resident) })
            .map_err(|_| SealError::Open)?;
        dek.fill(0);
        Ok((kid, [TEMPLATE_MAGIC.as_slice(), &raw_id, &nonce, &ct].concat()))
    }

    /// Open a sealed template of `resident`.
    pub fn open_template(&self, resident: &str, sealed: &[u8]) -> Result<Vec<f32>, SealError> {
        let kid = key_id_of(sealed).ok_or(SealError::Open)?;
        let file = match std::fs::read(self.path(&kid)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SealError::KeyGone),
            Err(e) => {
                return Err(SealError::Keyring { path: self.path(&kid).display().to_string(), why: e.to_string() })
            }
        };
        let mut dek = unwrap_key(&self.device, &kid, resident, &file).ok_or(SealError::Open)?;
        let out = open_with(&dek, resident, sealed);
        dek.fill(0);
        out
    }

    /// Destroy a data key: overwrite its file with zeros, fsync, unlink, fsync the directory.
    /// Returns whether it existed (destroying twice is harmless).
    pub fn destroy(&self, kid: &str) -> Result<bool, SealError> {
        let p = self.path(kid);
        let err = |e: std::io::Error| SealError::Keyring { path: p.display().to_string(), why: e.to_string() };
        let mut f = match std::fs::OpenOptions::new().write(true).open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(err(e)),
        };
        let len = f.metadata().map_err(err)?.len() as usize;
        f.write_all(&vec![0u8; len]).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        std::fs::remove_file(&p).map_err(err)?;
        sync_dir(&p).map_err(err)?;
        Ok(true)
    }

    /// The key ids on disk.
    pub fn key_ids(&self) -> Vec<KeyId> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                if let Some(kid) = e.file_name().to_str().and_then(|n| n.strip_suffix(".key")) {
                    out.push(kid.to_string());
                }
            }
        }
        out
    }

    /// Destroy every key not in `keep` (a key written for an enrolment that never committed).
    pub fn destroy_orphans(&self, keep: &HashSet<KeyId>) -> Result<usize, SealError> {
        let mut n = 0;
        for kid in self.key_ids() {
            if !keep.contains(&kid) && self.destroy(&kid)? {
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_template_has_its_own_key_and_is_gone_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let dev = DeviceKey::load(&dir.path().join("k/device.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("k/device.key")), 0o600);
        let ring = Keyring::open(&dir.path().join("keys"), dev).unwrap();
        assert_eq!(mode(&dir.path().join("keys")), 0o700);
        let t = vec![0.25f32, -0.5, 0.125];
        let (kid, sealed) = ring.seal("alice", &t).unwrap();
        let (kid2, sealed2) = ring.seal("alice", &t).unwrap();
        assert_ne!(kid, kid2, "a new data key per template");
        assert_eq!(key_id_of(&sealed).as_deref(), Some(kid.as_str()));
        assert!(!sealed.windows(4).any(|w| w == 0.25f32.to_le_bytes()), "no plaintext in the blob");
        assert_eq!(ring.open_template("alice", &sealed).unwrap(), t);
        assert!(ring.open_template("bob", &sealed).is_err(), "moved to another resident");
        let mut altered = sealed.clone();
        altered[50] ^= 1;
        assert!(ring.open_template("alice", &altered).is_err(), "altered");
        // The same device key file gives the same key; another cannot unwrap.
        let again = Keyring::open(ring.dir(), DeviceKey::load(&dir.path().join("k/device.key")).unwrap()).unwrap();
        assert_eq!(again.open_template("alice", &sealed).unwrap(), t);
        let other = Keyring::open(ring.dir(), DeviceKey::from_bytes(&[7; 32])).unwrap();
        assert!(other.open_template("alice", &sealed).is_err());
        // Destroying one key leaves the other template readable.
        assert!(ring.destroy(&kid).unwrap());
        assert!(!ring.destroy(&kid).unwrap(), "twice is harmless");
        assert!(matches!(ring.open_template("alice", &sealed), Err(SealError::KeyGone)));
        assert_eq!(ring.open_template("alice", &sealed2).unwrap(), t);
        assert_eq!(ring.key_ids(), vec![kid2.clone()]);
        assert_eq!(ring.destroy_orphans(&HashSet::new()).unwrap(), 1);
        assert!(ring.key_ids().is_empty());
        std::fs::write(dir.path().join("short.key"), b"short").unwrap();
        assert!(DeviceKey::load(&dir.path().join("short.key")).is_err());
    }
}
