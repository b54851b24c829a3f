//! The door stage: one door's relay, contact, exit button and fire input, driven by
//! `door::DoorCore` (pure). The only stage that moves a relay; it leaves it de-energized (its
//! safe state) on shutdown.

use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

use super::{recv_edge, sleep_until_mono, StageCtx};
use crate::bus::{DoorCmd, StateBoard};
use crate::clock::{wall_ms, MonoTime};
use crate::config::DoorConfig;
use crate::door::{Action, DoorCore, DoorEvent, Input};
use crate::events::NewEvent;
use crate::hw::{self, Edge, Relay};

/// One door's claimed hardware and its core.
pub struct DoorParts {
    pub cfg: DoorConfig,
    pub relay: Relay,
    pub contact: Option<mpsc::UnboundedReceiver<Edge>>,
    pub rex: Option<mpsc::UnboundedReceiver<Edge>>,
    pub fire: Option<mpsc::UnboundedReceiver<Edge>>,
    pub core: DoorCore,
    /// The input lines must live as long as their edge streams.
    pub lines: Vec<Box<dyn hw::InputLine>>,
}

/// The door stage's channels.
pub struct DoorIo {
    pub cmds: mpsc::Receiver<DoorCmd>,
    pub events: mpsc::Sender<NewEvent>,
    pub board: Arc<StateBoard>,
}

/// Run one door until shutdown, then leave its relay in the safe state.
pub async fn run(ctx: StageCtx, mut d: DoorParts, mut io: DoorIo) {
    let name = d.cfg.name.clone();
    let (contact_lvl, rex_lvl, fire_lvl) = (d.cfg.contact_open_level, d.cfg.rex_active_level, d.cfg.fire_active_level);
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let start = d.core.start(MonoTime::now());
    apply(&name, &mut d.relay, start, &io.events).await;
    // The door's real state, as an event: after a crash mid-pulse the last event may be an
    // `unlocked` with no `locked` behind it, while the relay is now in its safe state.
    let _ = io.events.send(NewEvent::door_at_start(wall_ms(), &name, d.core.is_unlocked())).await;
    publish_state(&io.board, &name, &d.core, d.cfg.contact_pin.is_some());
    loop {
        let actions = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            Some(cmd) = io.cmds.recv() => match cmd {
                DoorCmd::Grant(trace) => {
                    let actions = d.core.grant(MonoTime::now());
                    let moves = actions.iter().any(|a| matches!(a, Action::Relay { .. }));
                    apply(&name, &mut d.relay, actions, &io.events).await;
                    if moves {
                        // Measured after the relay command went out (events are queued after it).
                        ctx.stats.record_grant(trace, d.relay.last_command());
                    }
                    Vec::new()
                }
                DoorCmd::Unlock(dur) => d.core.unlock_for(MonoTime::now(), dur),
            },
            Some(e) = recv_edge(&mut d.contact) => d.core.input(Input::Contact(contact_lvl.is_active(e.high)), e.at),
            Some(e) = recv_edge(&mut d.rex) => d.core.input(Input::Rex(rex_lvl.is_active(e.high)), e.at),
            Some(e) = recv_edge(&mut d.fire) => d.core.input(Input::Fire(fire_lvl.is_active(e.high)), e.at),
            _ = sleep_until_mono(d.core.deadline()) => d.core.tick(MonoTime::now()),
            _ = beat.tick() => { ctx.beat(); Vec::new() }
        };
        apply(&name, &mut d.relay, actions, &io.events).await;
        publish_state(&io.board, &name, &d.core, d.cfg.contact_pin.is_some());
    }
    let off = d.core.shutdown();
    apply(&name, &mut d.relay, off, &io.events).await;
    tracing::info!(door = %name, energized = d.relay.energized(), "door in its safe state");
    drop(d.lines);
}

/// The retained `state/lock/{door}`, `state/door/{door}` (only when there is a contact) and
/// `state/alarm/{door}` (the standing alarms, which clear: Home Assistant's problem sensor).
fn publish_state(board: &StateBoard, door: &str, core: &DoorCore, has_contact: bool) {
    let lock = json!({"door": door, "state": if core.is_unlocked() { "UNLOCKED" } else { "LOCKED" }});
    board.set(&format!("state/lock/{door}"), lock.to_string().into_bytes());
    if has_contact {
        let open = json!({"door": door, "open": core.is_open()});
        board.set(&format!("state/door/{door}"), open.to_string().into_bytes());
    }
    let a = core.alarms();
    let alarm = json!({
        "door": door,
        "problem": a.any(),
        "forced": a.forced,
        "held_open": a.held_open,
        "fire_release": a.fire_release,
    });
    board.set(&format!("state/alarm/{door}"), alarm.to_string().into_bytes());
}

async fn apply(door: &str, relay: &mut Relay, actions: Vec<Action>, events: &mpsc::Sender<NewEvent>) {
    for a in actions {
        match a {
            Action::Relay { energized } => {
                if let Err(error) = relay.set(energized) {
                    tracing::error!(%door, %error, "relay command failed");
                }
            }
            Action::Event(e) => {
                let wall = wall_ms();
                let ev = if e == DoorEvent::ExitRequest {
                    tracing::info!(%door, decision = "granted", reason = "exit_request", "access");
                    NewEvent::exit_request(wall, door)
                } else {
                    if e.is_alarm() {
                        tracing::warn!(%door, alarm = e.code(), "alarm");
                    } else {
                        tracing::info!(%door, event = e.code(), "door");
                    }
                    NewEvent::door(wall, door, e)
                };
                // The outbox stage only closes after every producer is gone.
                let _ = events.send(ev).await;
            }
        }
    }
}
