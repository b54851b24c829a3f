//! The daemon: build → spawn → wait for a signal or a stage that ends → drain.
//!
//! [`topology`] is the one place that wires the stages; [`stages`] holds one stage a file, in
//! the order of the data flow; [`status`] is what the daemon reports about itself.

use anyhow::bail;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

pub mod stages;
pub mod status;
pub mod topology;

pub use stages::admin::query as status_query;
pub use stages::admin::{resident as admin_resident, Routed as AdminRouted};
pub use topology::{Stages, Topology};

/// Load the face runtime once, from the configured paths (`face.onnxruntime_library`,
/// `face.models_dir`); `None` with face off. A bad runtime stops the start, loudly.
async fn face_runtime(cfg: &Config) -> anyhow::Result<Option<crate::runtime::Runtime>> {
    if !cfg.face.enabled {
        return Ok(None);
    }
    let face = cfg.face.clone();
    match tokio::task::spawn_blocking(move || crate::runtime::load(&face)).await? {
        Ok(rt) => {
            tracing::info!(models = ?rt, "face runtime checked and loaded");
            Ok(Some(rt))
        }
        Err(e) => {
            tracing::error!(error = %e, fix = e.hint(), "face runtime unusable");
            Err(e.into())
        }
    }
}

/// Run the daemon until SIGTERM/SIGINT, `stop` (the demo's way), or a stage that ends on its own.
pub async fn run(
    cfg: Arc<Config>,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
    stop: Option<CancellationToken>,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let topology = Topology::build(cfg.clone(), shutdown.clone()).await?;
    // Relays are in their safe state now.
    let runtime = face_runtime(&cfg).await?;
    let store = topology.store();
    let (mut stages, sim_task) = topology.spawn(runtime);
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    if let Some(r) = ready {
        let _ = r.send(());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = stop.unwrap_or_default();
    let failed = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); None }
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: shutting down"); None }
        _ = stop.cancelled() => { tracing::info!("stop requested: shutting down"); None }
        // A stage ends only on shutdown: one that ends now has failed.
        ended = stages.set.join_next_with_id() => ended.map(|r| {
            let id = match r {
                Ok((id, ())) => id,
                Err(e) => e.id(),
            };
            stages.names.remove(&id).unwrap_or_else(|| "?".into())
        }),
    };
    drain(&cfg, shutdown, &mut stages, sim_task, store).await?;
    if let Some(stage) = failed {
        bail!("stage `{stage}` stopped unexpectedly");
    }
    Ok(())
}

/// Cancel and wait for every stage, at most the grace period; relays end in their safe state.
async fn drain(
    cfg: &Config,
    shutdown: CancellationToken,
    stages: &mut Stages,
    sim_task: Option<std::thread::JoinHandle<()>>,
    store: Arc<crate::store::Store>,
) -> anyhow::Result<()> {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(cfg.gate.shutdown_grace_ms);
    let mut done = std::collections::HashSet::new();
    loop {
        match tokio::time::timeout_at(deadline, stages.set.join_next_with_id()).await {
            Ok(None) | Err(_) => break,
            Ok(Some(Ok((id, ())))) => {
                done.insert(id);
            }
            Ok(Some(Err(e))) => {
                if e.is_panic() {
                    tracing::error!(stage = %stages.name(e.id()), "stage panicked");
                }
                done.insert(e.id());
            }
        }
    }
    let mut late: Vec<String> =
        stages.names.iter().filter(|(id, _)| !done.contains(id)).map(|(_, n)| n.clone()).collect();
    // Those still running are abandoned (a blocking thread cannot be aborted; it ends with us).
    stages.set.abort_all();
    stages.set.detach_all();
    if let Some(t) = sim_task {
        // The chip's token is a child of ours: it is stopping too.
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    tokio::task::spawn_blocking(move || store.sync()).await??;
    if !late.is_empty() {
        late.sort();
        bail!("stages did not stop within the grace period: {}", late.join(", "));
    }
    tracing::info!("menshen stopped");
    Ok(())
}
