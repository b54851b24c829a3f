//! The admin stage: a local socket for `menshen status` (counters, outbox depth, liveness),
//! and its client.

use anyhow::Context;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::StageCtx;
use crate::config::Config;
use crate::daemon::status;

/// Serve the admin socket until shutdown.
pub async fn run(ctx: StageCtx) {
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
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    loop {
        let stream = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(_line)) = lines.next_line().await {
                let facts = status::gather(&ctx.store, true).await;
                let reply = status::status(&facts, &ctx.stats, ctx.started);
                if wr.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Query a running daemon's admin socket.
pub fn query(cfg: &Config) -> anyhow::Result<serde_json::Value> {
    use std::io::{BufRead, Write};
    let path = cfg.admin_socket();
    let mut s = std::os::unix::net::UnixStream::connect(&path)
        .with_context(|| format!("connecting to {} (is the daemon running?)", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"{\"op\":\"status\"}\n")?;
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line)?;
    Ok(serde_json::from_str(&line)?)
}
