//! The privacy stage (REQUIREMENTS P7, P9): within a second of a change that deleted a template,
//! its data key is destroyed and the signed receipt stored as `event/privacy`; the retention
//! sweep runs every minute and the audit file is pruned to its retention daily. At start it also
//! destroys data keys that no template refers to (an enrolment cut short). It records the face
//! uses the gate stage hands it (the retention clock), in batches, so no store write runs on the
//! card path.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

use super::StageCtx;
use crate::bus::FaceUse;
use crate::clock::{wall_ms, MonoTime};
use crate::privacy::audit::AuditLog;
use crate::privacy::shred::Privacy;

/// The privacy stage's parts.
pub struct PrivacyIo {
    pub privacy: Arc<Privacy>,
    /// Signalled when receipts are stored (they are events).
    pub wake: Arc<Notify>,
    pub face_uses: mpsc::Receiver<FaceUse>,
    /// The audit file, shared with the store's sink.
    pub audit: Arc<AuditLog>,
}

/// Face uses waiting at most this long before they are written.
const TOUCH_EVERY: Duration = Duration::from_millis(500);

/// Run until shutdown.
pub async fn run(ctx: StageCtx, mut io: PrivacyIo) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_sweep: Option<MonoTime> = None;
    let mut last_prune: Option<MonoTime> = None;
    let mut uses: Vec<(String, i64)> = Vec::new();
    destroy_orphans(&ctx, &io.privacy).await;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            Some(u) = io.face_uses.recv() => {
                uses.push((u.resident, u.wall_ms));
                if uses.len() < 256 {
                    // Gather the uses of a moment into one commit.
                    tokio::select! {
                        _ = tokio::time::sleep(TOUCH_EVERY) => {}
                        _ = ctx.shutdown.cancelled() => {}
                    }
                    while let Ok(u) = io.face_uses.try_recv() {
                        uses.push((u.resident, u.wall_ms));
                    }
                }
                record_uses(&ctx, std::mem::take(&mut uses)).await;
                continue;
            }
            _ = tick.tick() => {}
        }
        ctx.beat();
        let now = MonoTime::now();
        let sweep = last_sweep.is_none_or(|t| now.saturating_sub(t) >= Duration::from_secs(60));
        let prune = last_prune.is_none_or(|t| now.saturating_sub(t) >= Duration::from_secs(86_400));
        settle(&ctx, &io, sweep, prune).await;
        if sweep {
            last_sweep = Some(now);
        }
        if prune {
            last_prune = Some(now);
        }
    }
}

async fn destroy_orphans(ctx: &StageCtx, privacy: &Arc<Privacy>) {
    let (st, p) = (ctx.store.clone(), privacy.clone());
    match tokio::task::spawn_blocking(move || p.destroy_orphans(&st)).await {
        Ok(Ok(n)) if n > 0 => tracing::info!(n, "data keys without a template destroyed"),
        Ok(Err(error)) => tracing::error!(%error, "orphan data keys not checked"),
        _ => {}
    }
}

async fn record_uses(ctx: &StageCtx, uses: Vec<(String, i64)>) {
    let st = ctx.store.clone();
    match tokio::task::spawn_blocking(move || st.touch_templates(&uses)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "face use not recorded"),
        Err(error) => tracing::warn!(%error, "face use not recorded"),
    }
}

/// Settle pending deletions (and with `sweep`, expire templates first; with `prune`, prune the
/// audit file).
async fn settle(ctx: &StageCtx, io: &PrivacyIo, sweep: bool, prune: bool) {
    let backfill = !ctx.stats.mqtt_online.load(Ordering::Relaxed);
    let audit_keep_ms = i64::from(ctx.cfg.privacy.audit_retention_days) * 86_400_000;
    let audit = io.audit.clone();
    let (st, p) = (ctx.store.clone(), io.privacy.clone());
    let res = tokio::task::spawn_blocking(move || {
        let wall = wall_ms();
        if prune {
            match audit.prune(wall - audit_keep_ms) {
                Ok(n) if n > 0 => tracing::info!(n, "audit records past their retention pruned"),
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "audit file not pruned"),
            }
        }
        if sweep {
            p.sweep(&st, wall, backfill)
        } else {
            p.settle(&st, wall, backfill)
        }
    })
    .await;
    match res {
        Ok(Ok(receipts)) if !receipts.is_empty() => {
            ctx.stats.events_stored.fetch_add(receipts.len() as u64, Ordering::Relaxed);
            io.wake.notify_one();
        }
        Ok(Err(error)) => {
            ctx.stats.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "deletion not completed yet (retried every second)");
        }
        _ => {}
    }
}
