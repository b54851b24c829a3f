//! Making names durable, not just contents (found with the power-cut filesystem, `tools/cutfs`):
//! an fsync of a file makes its data durable, but the directory entry that names a new file, or
//! a new directory, is only durable once its parent directory is fsynced. Without this, a power
//! cut can lose a whole store file or key file whose contents had been fsynced.

use std::path::Path;

/// fsync a directory.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// fsync the directory that holds `path` (after creating, renaming or removing `path`).
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => Ok(()),
    }
}

/// `create_dir_all`, then fsync every directory it created and the parent of the first one, so
/// the new directories survive a power cut.
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.exists() {
        missing.push(d.to_path_buf());
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => d = p,
            _ => break,
        }
    }
    std::fs::create_dir_all(dir)?;
    for m in missing.iter().rev() {
        sync_parent(m)?;
        sync_dir(m)?;
    }
    Ok(())
}
