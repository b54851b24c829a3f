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
