//! The admin stage: a local socket for `menshen status` (counters, outbox depth, liveness) and for
//! `menshen resident …` while the daemon runs, and its client.
//!
//! The socket is 0660, owned by the daemon's user and `gate.admin_group` where that group exists.
//! Each connection's peer is checked with `SO_PEERCRED`: root, the daemon's own user and members of
//! the admin group are served; anyone else (a socket made reachable by a wrong mode or directory)
//! is refused and counted in `admin_refused`. A resident command runs the same guarded store
//! transaction as with the daemon stopped ([`crate::resident_ops`]), audited as `cli uid=N` with
//! the peer's uid, and its events go to the outbox like those of the MQTT command.

use anyhow::Context;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use super::StageCtx;
use crate::clock::wall_ms;
use crate::config::Config;
use crate::daemon::status;
use crate::events::NewEvent;
use crate::resident_ops::{self, ResidentOp};

/// A connection reads at most this much (a client that streams more is cut off).
const MAX_READ: u64 = 4 << 20;

/// Serve the admin socket until shutdown.
pub async fn run(ctx: StageCtx, events: mpsc::Sender<NewEvent>) {
    let path = ctx.cfg.admin_socket();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "admin socket unavailable");
            ctx.shutdown.cancelled().await;
            return;
        }
    };
    let group = group_id(&ctx.cfg.gate.admin_group);
    {
        use std::os::unix::fs::PermissionsExt;
        if let Some(gid) = group {
            if let Err(error) = rustix::fs::chown(&path, None, Some(rustix::fs::Gid::from_raw(gid))) {
                tracing::warn!(%error, group = %ctx.cfg.gate.admin_group, "admin socket not given to its group");
            }
        }
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660));
    }
    loop {
        let stream = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
        };
        let ctx = ctx.clone();
        let events = events.clone();
        tokio::spawn(async move {
            let peer = stream.peer_cred().ok();
            let uid = peer.map(|p| p.uid());
            let (rd, mut wr) = stream.into_split();
            if !peer.is_some_and(|p| allowed(p.uid(), p.gid(), &ctx.cfg.gate.admin_group)) {
                ctx.stats.admin_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(uid = ?uid, group = %ctx.cfg.gate.admin_group, "admin socket: peer refused");
                let msg = format!(
                    "refused: uid {} is not root, the daemon's user or in group `{}`",
                    uid.map_or_else(|| "?".into(), |u| u.to_string()),
                    ctx.cfg.gate.admin_group
                );
                let _ =
                    wr.write_all(format!("{}\n", json!({"ok": false, "refused": true, "error": msg})).as_bytes()).await;
                return;
            }
            let uid = uid.unwrap_or(u32::MAX);
            let mut lines = BufReader::new(rd.take(MAX_READ)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = answer(&ctx, &events, uid, &line).await;
                if wr.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// One request: `{"op":"resident","cmd":{…}}`, else the status.
async fn answer(ctx: &StageCtx, events: &mpsc::Sender<NewEvent>, uid: u32, line: &str) -> Value {
    let req: Value = serde_json::from_str(line).unwrap_or(Value::Null);
    if req["op"] != "resident" {
        let facts = status::gather(&ctx.store, true).await;
        return status::status(&facts, &ctx.stats, ctx.started);
    }
    let op: ResidentOp = match serde_json::from_value(req["cmd"].clone()) {
        Ok(op) => op,
        Err(e) => return json!({"ok": false, "error": format!("bad resident command: {e}")}),
    };
    let (store, cfg) = (ctx.store.clone(), ctx.cfg.clone());
    let by = resident_ops::cli_actor(uid);
    let done = tokio::task::spawn_blocking(move || {
        resident_ops::execute(&store, &cfg, &op, &by, wall_ms()).map_err(|e| format!("{e:#}"))
    })
    .await
    .unwrap_or_else(|e| Err(format!("the command's task failed: {e}")));
    match done {
        Ok(d) => {
            ctx.stats.admin_commands.fetch_add(1, Ordering::Relaxed);
            for ev in d.events {
                // The outbox stores it durably (it only closes once every producer is gone).
                let _ = events.send(ev).await;
            }
            json!({"ok": true, "text": d.text})
        }
        Err(error) => json!({"ok": false, "error": error}),
    }
}

/// Root, the daemon's own user, or a member of `group` (primary or listed in /etc/group).
fn allowed(uid: u32, gid: u32, group: &str) -> bool {
    if uid == 0 || uid == rustix::process::geteuid().as_raw() {
        return true;
    }
    let Ok(text) = std::fs::read_to_string("/etc/group") else { return false };
    let Some((g_gid, members)) = group_entry(&text, group) else { return false };
    if g_gid == gid {
        return true;
    }
    let Some(name) = user_name(uid) else { return false };
    members.iter().any(|m| *m == name)
}

fn group_id(group: &str) -> Option<u32> {
    group_entry(&std::fs::read_to_string("/etc/group").ok()?, group).map(|(g, _)| g)
}

/// `name:x:gid:a,b,c` → (gid, members).
fn group_entry<'a>(text: &'a str, group: &str) -> Option<(u32, Vec<&'a str>)> {
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == group).then_some(())?;
        let gid = f.nth(1)?.parse().ok()?;
        let members = f.next().unwrap_or("").split(',').filter(|m| !m.is_empty()).collect();
        Some((gid, members))
    })
}

fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_string())
    })
}

/// Query a running daemon's admin socket.
pub fn query(cfg: &Config) -> anyhow::Result<serde_json::Value> {
    let path = cfg.admin_socket();
    let s = std::os::unix::net::UnixStream::connect(&path)
        .with_context(|| format!("connecting to {} (is the daemon running?)", path.display()))?;
    let v = exchange(s, &json!({"op": "status"}))?;
    if v["refused"] == true {
        anyhow::bail!("{}", v["error"].as_str().unwrap_or("refused"));
    }
    Ok(v)
}

/// How a resident command went through the daemon.
pub enum Routed {
    /// No daemon listens (no socket, or a stale one): use the store directly.
    NoDaemon,
    Done(String),
    Failed(String),
}

/// Send a resident command to the running daemon, if there is one.
pub fn resident(cfg: &Config, op: &ResidentOp) -> anyhow::Result<Routed> {
    let path = cfg.admin_socket();
    let s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Ok(Routed::NoDaemon)
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => anyhow::bail!(
            "the daemon is running, and its admin socket {} is for root, its user and group `{}` only ({e})",
            path.display(),
            cfg.gate.admin_group
        ),
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    let v = exchange(s, &json!({"op": "resident", "cmd": op}))?;
    Ok(match v["ok"].as_bool() {
        Some(true) => Routed::Done(v["text"].as_str().unwrap_or_default().to_string()),
        _ => Routed::Failed(v["error"].as_str().unwrap_or("the daemon gave no reason").to_string()),
    })
}

fn exchange(mut s: std::os::unix::net::UnixStream, req: &Value) -> anyhow::Result<Value> {
    use std::io::{BufRead, Write};
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    // A refused peer is answered at once and the connection closed: the answer may be waiting
    // even when the request could not be written.
    let sent = s.write_all(format!("{req}\n").as_bytes());
    let mut line = String::new();
    let read = std::io::BufReader::new(&s).read_line(&mut line);
    if line.is_empty() {
        sent?;
        read?;
        anyhow::bail!("the daemon closed the admin connection without an answer");
    }
    serde_json::from_str(&line).with_context(|| format!("the daemon's answer is not JSON: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_entries_are_read_with_their_members() {
        let text = "root:x:0:\nmenshen:x:998:alice,bob\ngpio:x:997:\n";
        assert_eq!(group_entry(text, "menshen"), Some((998, vec!["alice", "bob"])));
        assert_eq!(group_entry(text, "gpio"), Some((997, vec![])));
        assert_eq!(group_entry(text, "mensh"), None);
        assert_eq!(group_entry("broken", "broken"), None);
    }
}
