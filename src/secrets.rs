//! Reading secrets an installer provides (the MQTT password file, the device key, the receipt
//! signing seed): a file other users can read is refused, as ssh refuses such a private key.
//! Group read is allowed, for the packaged `root:menshen 0640` layout.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Read a secret file, refusing one that is readable (or writable) by other users.
pub fn read_private(path: &Path) -> std::io::Result<Vec<u8>> {
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    check_mode(mode).map_err(|why| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why))?;
    std::fs::read(path)
}

/// Create `path` (0600, failing if it exists), write, fsync it and its directory.
pub(crate) fn write_new_0600(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    crate::durable::sync_parent(path)
}

/// A 32-byte key the gate makes for itself: the systemd credential `credential` if the service
/// has one (`LoadCredential=`, in `$CREDENTIALS_DIRECTORY`), else `file`, created (0600,
/// fsynced, from the OS's random source) on first use. Returns the bytes and where they came
/// from (for messages; never the key).
pub fn load_or_create_key(file: &Path, credential: &str) -> Result<([u8; 32], String), String> {
    use rand::RngCore;
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let p = Path::new(&dir).join(credential);
        if p.exists() {
            return read_key(&p).map(|k| (k, format!("systemd credential {credential}")));
        }
    }
    if file.exists() {
        return read_key(file).map(|k| (k, file.display().to_string()));
    }
    if let Some(dir) = file.parent() {
        crate::durable::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    write_new_0600(file, &key).map_err(|e| e.to_string())?;
    Ok((key, file.display().to_string()))
}

fn read_key(path: &Path) -> Result<[u8; 32], String> {
    let bytes = read_private(path).map_err(|e| e.to_string())?;
    let n = bytes.len();
    bytes.try_into().map_err(|_| format!("{n} bytes, expected 32"))
}

/// An OSDP reader's Secure Channel base key (16 raw bytes, 0600), if it was installed.
/// `Ok(None)`: no key file (the reader was never installed: `menshen osdp install`).
pub fn read_osdp_key(path: &Path) -> Result<Option<[u8; 16]>, String> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = read_private(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let n = bytes.len();
    bytes.try_into().map(Some).map_err(|_| format!("{}: {n} bytes, expected 16", path.display()))
}

/// The rule on a file's permission bits.
pub fn check_mode(mode: u32) -> Result<(), String> {
    if mode & 0o007 != 0 {
        return Err(format!(
            "other users can access it (mode {:04o}): run `chmod o-rwx` on it (0600, or 0640 with group menshen)",
            mode & 0o777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_private_once_and_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/k.key");
        let (k1, src) = load_or_create_key(&p, "menshen-test-key").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(src.ends_with("k.key"), "{src}");
        assert_eq!(load_or_create_key(&p, "menshen-test-key").unwrap().0, k1, "the same key on the next start");
        std::fs::write(&p, b"short").unwrap();
        let e = load_or_create_key(&p, "menshen-test-key").unwrap_err();
        assert!(e.contains("5 bytes"), "{e}");
    }

    #[test]
    fn a_secret_others_can_read_is_refused_and_a_private_one_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, b"s3cret").unwrap();
        for (mode, ok) in [(0o644, false), (0o604, false), (0o602, false), (0o600, true), (0o640, true), (0o400, true)]
        {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = read_private(&p);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains(&format!("{mode:04o}")), "{e}");
            } else {
                assert_eq!(r.unwrap(), b"s3cret");
            }
        }
    }
}
