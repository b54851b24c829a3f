//! One stage a file, in the order of the data flow:
//!
//! 1. [`reader`]: GPIO edges → Wiegand frames (`wiegand::Decoder`).
//! 2. [`face`]: camera frames → face verdicts (its own OS thread; never on the card path).
//! 3. [`gate`]: frames and verdicts → decisions (`gate::GateCore`, reads only).
//!    [`feedback`]: decisions → each reader's LEDs and beeper.
//! 4. [`door`]: grants, unlocks and door inputs → the relay (`door::DoorCore`); the only stage
//!    that moves a relay.
//! 5. [`outbox`]: events → the store (group commit, fdatasync); held in memory while the store
//!    cannot be written.
//! 6. [`privacy`]: deletions → destroyed keys and signed receipts; face uses; retention.
//! 7. [`commands`]: BMS commands → store changes, unlocks, replies.
//! 8. [`link`]: the MQTT session: the outbox out, commands in.
//! 9. [`admin`] (`menshen status`) and [`watchdog`] (systemd).
//!
//! Every stage has the same shape: `run(ctx, io)`, where [`StageCtx`] is what every stage gets
//! and `io` the stage's own channels and parts. A stage ends only on shutdown.

use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::MonoTime;
use crate::config::Config;
use crate::hw::Edge;
use crate::stats::Stats;
use crate::store::Store;

pub mod admin;
pub mod commands;
pub mod door;
pub mod face;
pub mod feedback;
pub mod gate;
pub mod link;
#[cfg(feature = "osdp")]
pub mod osdp;
pub mod outbox;
pub mod privacy;
pub mod reader;
pub mod watchdog;

/// What every stage gets: its name (for heartbeats and logs), the configuration, the store, the
/// counters, the one shutdown token and when the daemon started.
#[derive(Clone)]
pub struct StageCtx {
    pub name: String,
    pub cfg: Arc<Config>,
    pub store: Arc<Store>,
    pub stats: Arc<Stats>,
    pub shutdown: CancellationToken,
    pub started: MonoTime,
}

impl StageCtx {
    /// The same context under another stage's name.
    pub fn named(&self, name: impl Into<String>) -> StageCtx {
        StageCtx { name: name.into(), ..self.clone() }
    }

    pub fn beat(&self) {
        self.stats.beat(&self.name);
    }
}

/// Receive from an optional channel; pending for ever when there is none.
pub(crate) async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// As [`recv_opt`], for an input line's edge stream.
/// A stream that ends (the driver lost the line) is logged once and then stays pending: the
/// door keeps its relay and other inputs; the reader stage stops the daemon for a lost chip.
pub(crate) async fn recv_edge(rx: &mut Option<mpsc::UnboundedReceiver<Edge>>) -> Option<Edge> {
    match rx {
        Some(r) => match r.recv().await {
            Some(e) => Some(e),
            None => {
                tracing::error!("GPIO input line lost (board or chip fault)");
                *rx = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// Sleep until a monotonic deadline; pending for ever without one.
pub(crate) async fn sleep_until_mono(t: Option<MonoTime>) {
    match t {
        Some(t) => tokio::time::sleep(t.until(MonoTime::now())).await,
        None => std::future::pending().await,
    }
}
