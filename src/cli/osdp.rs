//! `menshen osdp install`: give an OSDP reader its own Secure Channel key. The only place the
//! gate ever uses the public install key (SCBK-D), for one session; the daemon never does.

use anyhow::{bail, Context};
use rand::RngCore;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::config::{Config, OsdpReaderConfig};
use crate::osdp::cp::{self, CpHandle, CpParams, FromReader, ToReader};

/// Start a control panel for `r` with `key` (or the install key) and wait for its Secure Channel.
/// With `install`, libosdp tries `key`, then the install key (SCBK-D), and over that session sets
/// `key` in the reader and starts again with it: online with Secure Channel means `key` works.
fn connect(
    r: &OsdpReaderConfig,
    key: [u8; 16],
    install: bool,
    timeout: Duration,
) -> anyhow::Result<Option<(CpHandle, UnboundedReceiver<FromReader>)>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let params = CpParams {
        name: r.name.clone(),
        device: r.device.clone(),
        baud: r.baud,
        address: r.address,
        key: Some(key),
        insecure: false,
        install,
    };
    let handle = cp::start(params, tx)?;
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        match rx.try_recv() {
            Ok(FromReader::Link(s)) if s.online && s.secure => return Ok(Some((handle, rx))),
            Ok(_) => {}
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break,
        }
    }
    handle.stop();
    Ok(None)
}

fn pending_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".new");
    PathBuf::from(p)
}

/// Move the pending key into place, durably.
fn commit(pending: &Path, path: &Path) -> anyhow::Result<()> {
    std::fs::rename(pending, path).with_context(|| format!("{} → {}", pending.display(), path.display()))?;
    crate::durable::sync_parent(path)?;
    Ok(())
}

/// Install (or rotate) reader `name`'s key. Returns what was done, for the installer.
pub fn install(cfg: &Config, name: &str, timeout: Duration) -> anyhow::Result<String> {
    let r = cfg.osdp_reader(name).with_context(|| format!("no OSDP reader named `{name}` in [[osdp_readers]]"))?;
    if r.insecure {
        bail!("reader `{name}` is configured insecure = true (plain mode, no key): remove that line first");
    }
    let path = cfg.osdp_key_path(r);
    let pending = pending_path(&path);
    if let Some(dir) = path.parent() {
        crate::durable::create_dir_all(dir)?;
    }
    // An install cut off after the reader took its new key: the pending key is the reader's.
    if pending.exists() {
        let k = crate::secrets::read_osdp_key(&pending).map_err(anyhow::Error::msg)?;
        if let Some((h, _)) = k.map(|k| connect(r, k, false, timeout)).transpose()?.flatten() {
            h.stop();
            commit(&pending, &path)?;
            return Ok(format!(
                "reader {name}: an interrupted install had set its key; the key is now in {}",
                path.display()
            ));
        }
        std::fs::remove_file(&pending)?;
    }
    let current = crate::secrets::read_osdp_key(&path).map_err(anyhow::Error::msg)?;
    let how = if current.is_some() { "its current key" } else { "the install key (SCBK-D)" };
    let unreachable = || {
        anyhow::anyhow!(
            "reader {name}: no Secure Channel with {how} within {}s on {} (address {}, {} baud): {}",
            timeout.as_secs(),
            r.device.display(),
            r.address,
            r.baud,
            if current.is_some() {
                "is the reader powered and wired? A reader reset to factory settings needs its key file removed"
            } else {
                "is the reader powered, wired and in install mode?"
            }
        )
    };
    let mut key = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut key);
    // Written before the reader is told: a cut after this leaves the key the reader may hold.
    crate::secrets::write_new_0600(&pending, &key)?;
    match current {
        None => match connect(r, key, true, timeout)? {
            Some((h, _)) => h.stop(),
            // The pending key stays: the reader may have taken it before the session was seen.
            None => return Err(unreachable()),
        },
        Some(old) => {
            let Some((handle, _rx)) = connect(r, old, false, timeout)? else { return Err(unreachable()) };
            handle
                .commands
                .send(ToReader::KeySet(key))
                .map_err(|_| anyhow::anyhow!("reader {name}: the control panel stopped"))?;
            // The reader takes the key with its reply to the command.
            std::thread::sleep(Duration::from_millis(500));
            handle.stop();
        }
    }
    match connect(r, key, false, timeout)? {
        Some((h, _)) => {
            h.stop();
            commit(&pending, &path)?;
            Ok(format!(
                "reader {name}: Secure Channel key set with {how} and checked; written to {} (0600). Install mode is not used again.",
                path.display()
            ))
        }
        None => bail!(
            "reader {name}: the new key was sent but no Secure Channel works with it; it is kept in {} (run the install again: it is tried first)",
            pending.display()
        ),
    }
}
