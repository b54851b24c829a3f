//! The one place that creates the channels and spawns the stages. Reading [`Topology::spawn`]
//! top to bottom shows the whole path:
//!
//! ```text
//! GPIO edges ─▶ reader (wiegand::Decoder) ─▶ gate (gate::GateCore, reads) ─▶ door (door::DoorCore) ─▶ relay
//! camera ─▶ face (thread) ─▶ gate               gate, door, commands ─▶ outbox (store, fdatasync)
//! outbox ─wake─▶ link (MQTT, QoS 1, removed after PUBACK) ─▶ commands ─▶ store, door, replies
//! ```
//!
//! [`Topology::build`] claims hardware and opens the store (relays go to their safe state at
//! once); [`Topology::spawn`] starts every stage into one `JoinSet`.

use anyhow::Context;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::stages::{self, StageCtx};
use crate::bus::{EnrolQueue, FaceUse, FaceVerdict, ReaderOutput, StateBoard};
use crate::clock::{wall_ms, MonoTime};
use crate::config::{ActiveLevel, Config, LineRef};
use crate::door::DoorCore;
use crate::events::NewEvent;
use crate::hw::{self, Edge, Gpio, Relay};
use crate::keypad::{PinKey, PIN_KEY_CREDENTIAL};
use crate::privacy::audit::AuditLog;
use crate::privacy::shred::Privacy;
use crate::runtime::Runtime;
use crate::stats::Stats;
use crate::store::Store;

/// Claimed hardware and shared state, before any task runs.
pub struct Topology {
    ctx: StageCtx,
    audit: Arc<AuditLog>,
    doors: Vec<stages::door::DoorParts>,
    readers: Vec<stages::reader::ReaderParts>,
    feedback: Vec<stages::feedback::FeedbackParts>,
    /// The embedded simulated chip's thread, if any.
    pub sim_task: Option<std::thread::JoinHandle<()>>,
    /// Keeps the GPIO chip handle alive as long as its lines.
    gpio: Arc<dyn Gpio>,
}

/// The running stages: their tasks, named.
pub struct Stages {
    pub set: JoinSet<()>,
    pub names: HashMap<tokio::task::Id, String>,
}

impl Stages {
    fn spawn<F>(&mut self, name: impl Into<String>, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let h = self.set.spawn(f);
        self.names.insert(h.id(), name.into());
    }

    fn spawn_blocking<F>(&mut self, name: impl Into<String>, f: F)
    where
        F: FnOnce() + Send + 'static,
    {
        let h = self.set.spawn_blocking(f);
        self.names.insert(h.id(), name.into());
    }

    pub fn name(&self, id: tokio::task::Id) -> String {
        self.names.get(&id).cloned().unwrap_or_else(|| "?".into())
    }
}

type Input = (Box<dyn hw::InputLine>, bool, mpsc::UnboundedReceiver<Edge>);

fn claim_input(gpio: &dyn Gpio, pin: &LineRef, debounce: Option<Duration>) -> anyhow::Result<Input> {
    let mut line = gpio.input(pin, debounce)?;
    let level = line.level()?;
    let rx = line.edges()?;
    Ok((line, level, rx))
}

/// Open the store with its audit file attached; compact it while nothing else uses it.
async fn open_store(cfg: &Config) -> anyhow::Result<(Store, Arc<AuditLog>)> {
    let path = cfg.store_path();
    // Request ids live at least a day, and never less than an unlock may live.
    let min_age = (24 * 3600 * 1000).max(cfg.mqtt.max_command_lifetime_ms as i64 * 2);
    let (keep, journal) = (cfg.mqtt.request_keep, cfg.mqtt.journal_keep);
    let p = path.clone();
    tokio::task::spawn_blocking(move || {
        AuditLog::open_store_shared(&p).map(|(mut s, log)| {
            s.set_retention(min_age, keep, journal);
            // Release free pages (where deleted, encrypted templates may linger) as far as
            // redb allows; only possible while nothing else uses the store.
            if let Err(error) = s.compact() {
                tracing::warn!(%error, "store not compacted");
            }
            (s, log)
        })
    })
    .await?
    .with_context(|| format!("opening the store {}", path.display()))
}

/// A door's relay (already claimed) and its inputs.
fn door_parts(gpio: &dyn Gpio, d: crate::config::DoorConfig, relay: Relay) -> anyhow::Result<stages::door::DoorParts> {
    let mut lines: Vec<Box<dyn hw::InputLine>> = Vec::new();
    // Contacts and buttons are debounced by the driver where it can (the kernel's debounce).
    let debounce = Some(Duration::from_millis(d.debounce_ms));
    let mut input = |pin: &Option<LineRef>, level: ActiveLevel| -> anyhow::Result<(Option<bool>, Option<_>)> {
        match pin {
            None => Ok((None, None)),
            Some(p) => {
                let (line, high, rx) =
                    claim_input(gpio, p, debounce).with_context(|| format!("door {}: GPIO line {p}", d.name))?;
                lines.push(line);
                Ok((Some(level.is_active(high)), Some(rx)))
            }
        }
    };
    let (contact_l, contact) = input(&d.contact_pin, d.contact_open_level)?;
    let (rex_l, rex) = input(&d.rex_pin, d.rex_active_level)?;
    let (fire_l, fire) = input(&d.fire_pin, d.fire_active_level)?;
    let mut params = d.params();
    if !lines.is_empty() && lines.iter().all(|l| l.debounced()) {
        // Every edge already is a settled level: debouncing again would only add latency.
        params.debounce = Duration::ZERO;
    }
    let core = DoorCore::new(params, contact_l, rex_l, fire_l, MonoTime::now());
    Ok(stages::door::DoorParts { cfg: d, relay, contact, rex, fire, core, lines })
}

impl Topology {
    /// Open the store and claim every line. Relays are claimed in their safe state, so a start
    /// after a crash puts the door in its fail mode before anything else happens.
    pub async fn build(cfg: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<Topology> {
        let (gpio, sim_task) = hw::open_gpio(&cfg, &shutdown).await?;
        // Relays first: the safe state must not wait for anything else.
        let mut relays = Vec::new();
        for d in &cfg.doors {
            let relay = Relay::open(gpio.as_ref(), &d.relay_pin, d.relay_active_high)
                .with_context(|| format!("door {}: relay", d.name))?;
            relays.push((d.clone(), relay));
        }
        let (store, audit) = open_store(&cfg).await?;
        // Configuration changes are audited (P9): a hash of the effective configuration.
        if let Err(error) = store.note_config(cfg.fingerprint(), wall_ms()) {
            tracing::error!(%error, "configuration change not audited");
        }
        let mut doors = Vec::new();
        for (d, relay) in relays {
            doors.push(door_parts(gpio.as_ref(), d, relay)?);
        }
        let mut readers = Vec::new();
        let mut feedback = Vec::new();
        for r in &cfg.readers {
            // One request for both data lines: their edges come in the kernel's order.
            let mut pair = gpio.inputs(&[&r.d0_pin, &r.d1_pin]).with_context(|| format!("reader {}: D0/D1", r.name))?;
            let (mut l1, mut l0) = match (pair.pop(), pair.pop()) {
                (Some(l1), Some(l0)) => (l1, l0),
                _ => anyhow::bail!("reader {}: the driver returned no lines", r.name),
            };
            let (d0, d1) = (l0.edges()?, l1.edges()?);
            readers.push(stages::reader::ReaderParts { cfg: r.clone(), d0, d1, lines: vec![l0, l1] });
            if !r.feedback.lines().is_empty() {
                // Off from the first instant (the off level is also where a pull holds them).
                let off = !r.feedback.active_high();
                let claim = |l: &Option<LineRef>, k: &str| -> anyhow::Result<Option<Box<dyn hw::OutputLine>>> {
                    l.as_ref()
                        .map(|l| gpio.output(l, off).with_context(|| format!("reader {}: {k} line {l}", r.name)))
                        .transpose()
                };
                feedback.push(stages::feedback::FeedbackParts {
                    cfg: r.clone(),
                    green: claim(&r.feedback.green_pin, "green LED")?,
                    red: claim(&r.feedback.red_pin, "red LED")?,
                    beeper: claim(&r.feedback.beeper_pin, "beeper")?,
                });
            }
        }
        let ctx = StageCtx {
            name: "daemon".into(),
            cfg,
            store: Arc::new(store),
            stats: Arc::new(Stats::default()),
            shutdown,
            started: MonoTime::now(),
        };
        Ok(Topology { ctx, audit, doors, readers, feedback, sim_task, gpio })
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.ctx.stats.clone()
    }

    pub fn store(&self) -> Arc<Store> {
        self.ctx.store.clone()
    }

    /// Start every stage. `runtime` is the face runtime, loaded once (with `face.enabled`).
    pub fn spawn(self, runtime: Option<Runtime>) -> (Stages, Option<std::thread::JoinHandle<()>>) {
        let Topology { ctx, audit, doors, readers, feedback, sim_task, gpio } = self;
        let cfg = ctx.cfg.clone();
        let mut st = Stages { set: JoinSet::new(), names: HashMap::new() };
        let (ev_tx, ev_rx) = mpsc::channel::<NewEvent>(4096);
        let (rd_tx, rd_rx) = mpsc::channel::<ReaderOutput>(256);
        let wake = Arc::new(Notify::new());
        let admin_events = ev_tx.clone();
        let board = Arc::new(StateBoard::default());
        // The privacy keys: loaded once, shared by the face path (opening templates) and the
        // privacy stage (destroying keys, signing receipts). Without them, cards still work.
        let privacy = match Privacy::open(&cfg) {
            Ok(p) => {
                board.set("identity", p.identity().to_string().into_bytes());
                Some(Arc::new(p))
            }
            Err(error) => {
                tracing::error!(%error, "privacy keys unusable: no face path, deletions wait for the keys");
                None
            }
        };
        // The PIN key: without it, PINs are refused (`system_error`) and cards still work.
        let pin_key = match crate::secrets::load_or_create_key(&cfg.pin_key_path(), PIN_KEY_CREDENTIAL) {
            Ok((k, _)) => Some(Arc::new(PinKey::from_bytes(&k))),
            Err(error) => {
                tracing::error!(%error, path = %cfg.pin_key_path().display(), "PIN key unusable: PINs are refused");
                None
            }
        };
        let mut door_cmds = HashMap::new();
        for d in doors {
            let (tx, rx) = mpsc::channel(64);
            door_cmds.insert(d.cfg.name.clone(), tx);
            let name = format!("door:{}", d.cfg.name);
            let io = stages::door::DoorIo { cmds: rx, events: ev_tx.clone(), board: board.clone() };
            let (c, g) = (ctx.named(&name), gpio.clone());
            st.spawn(name, async move {
                stages::door::run(c, d, io).await;
                drop(g);
            });
        }
        for r in readers {
            let name = format!("reader:{}", r.cfg.name);
            st.spawn(name.clone(), stages::reader::run(ctx.named(name), r, rd_tx.clone(), ev_tx.clone()));
        }
        let mut cues = HashMap::new();
        for f in feedback {
            let (tx, rx) = mpsc::channel(8);
            cues.insert(f.cfg.name.clone(), tx);
            let name = format!("feedback:{}", f.cfg.name);
            st.spawn(name.clone(), stages::feedback::run(ctx.named(name), f, rx));
        }
        #[cfg(feature = "osdp")]
        for r in &cfg.osdp_readers {
            let (tx, rx) = mpsc::channel(8);
            cues.insert(r.name.clone(), tx);
            let key = if r.insecure { Ok(None) } else { crate::secrets::read_osdp_key(&cfg.osdp_key_path(r)) };
            let name = format!("osdp:{}", r.name);
            let parts = stages::osdp::OsdpParts { cfg: r.clone(), key, cues: rx };
            st.spawn(name.clone(), stages::osdp::run(ctx.named(name), parts, rd_tx.clone(), ev_tx.clone()));
        }
        drop(rd_tx);
        let (use_tx, use_rx) = mpsc::channel::<FaceUse>(1024);
        let (faces, enrol) = spawn_face(&mut st, &ctx, runtime, privacy.clone());
        let gate_io = stages::gate::GateIo {
            frames: rd_rx,
            faces,
            doors: door_cmds.clone(),
            events: ev_tx.clone(),
            face_uses: privacy.is_some().then_some(use_tx),
            cues,
            pin_key: pin_key.clone(),
        };
        st.spawn("gate", stages::gate::run(ctx.named("gate"), gate_io));
        let mut link_parts = None;
        if cfg.mqtt.enabled {
            let (cmd_tx, cmd_rx) = mpsc::channel(256);
            let (out_tx, out_rx) = mpsc::channel(1024);
            let io = stages::commands::CommandsIo {
                inbound: cmd_rx,
                doors: door_cmds,
                events: ev_tx.clone(),
                out: out_tx,
                enrol,
                pin_key: pin_key.clone(),
            };
            st.spawn("api", stages::commands::run(ctx.named("api"), io));
            link_parts = Some((cmd_tx, out_rx, ev_tx.clone()));
        }
        drop(ev_tx);
        let io = stages::outbox::OutboxIo { events: ev_rx, wake: wake.clone() };
        st.spawn("outbox", stages::outbox::run(ctx.named("outbox"), io));
        if let Some(privacy) = privacy {
            let io = stages::privacy::PrivacyIo { privacy, wake: wake.clone(), face_uses: use_rx, audit };
            st.spawn("privacy", stages::privacy::run(ctx.named("privacy"), io));
        }
        if let Some((commands, outgoing, events)) = link_parts {
            let io = stages::link::LinkIo { wake, board, commands, outgoing, events };
            st.spawn("mqtt", stages::link::run(ctx.named("mqtt"), io));
        }
        st.spawn("admin", stages::admin::run(ctx.named("admin"), admin_events));
        st.spawn("watchdog", stages::watchdog::run(ctx.named("watchdog")));
        tracing::info!(
            site = %cfg.gate.site, gate = %cfg.gate.gate, doors = cfg.doors.len(), readers = cfg.readers.len(),
            mqtt = cfg.mqtt.enabled, "menshen running"
        );
        (st, sim_task)
    }
}

/// The face thread, when the face path is on and has a camera: its verdicts and its enrolment
/// queue (one `face.enrol` at a time; a second meanwhile is answered `busy`).
fn spawn_face(
    st: &mut Stages,
    ctx: &StageCtx,
    runtime: Option<Runtime>,
    privacy: Option<Arc<Privacy>>,
) -> (Option<mpsc::Receiver<FaceVerdict>>, Option<EnrolQueue>) {
    let cfg = &ctx.cfg;
    let Some(runtime) = runtime.filter(|_| cfg.face.enabled && cfg.face.camera.is_some()) else {
        return (None, None);
    };
    let (tx, rx) = mpsc::channel::<FaceVerdict>(16);
    let (queue, jobs) = EnrolQueue::new();
    let c = ctx.named("face");
    st.spawn_blocking("face", move || {
        let io = stages::face::FaceIo { verdicts: tx, privacy, enrol: jobs, runtime };
        stages::face::run(c.clone(), io);
        // A face path that ends on its own (no runtime, no key) leaves the card path running:
        // wait for shutdown instead of failing the daemon.
        while !c.shutdown.is_cancelled() {
            c.beat();
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    });
    (Some(rx), Some(queue))
}
