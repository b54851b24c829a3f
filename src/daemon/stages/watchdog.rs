//! The watchdog stage: pings systemd while every stage beats; a hung stage stops the pings and
//! systemd restarts the daemon (REQUIREMENTS D4).

use std::time::Duration;

use super::StageCtx;

/// Run until shutdown.
pub async fn run(ctx: StageCtx) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        // Not under a systemd watchdog: nothing to ping, but a stage only ends on shutdown.
        ctx.shutdown.cancelled().await;
        return;
    }
    let period = Duration::from_micros(usec / 2);
    let max_age = (usec * 1_000).max(3_000_000_000);
    // The first ping comes one period after start, so READY=1 (sent once every stage is spawned)
    // always comes first.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = tick.tick() => {
                let stale = ctx.stats.stale_stages(max_age);
                if stale.is_empty() {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!(stages = ?stale, "stages stalled: withholding the watchdog ping");
                }
            }
        }
    }
}
