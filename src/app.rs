//! The one place that wires the stages. Reading this file top to bottom shows the whole path:
//!
//! ```text
//! GPIO edges ─▶ reader_stage (wiegand::Decoder) ─▶ gate_stage (store lookup + policy::decide)
//!                                                    │ grant            │ access event
//!                                                    ▼                  ▼
//! contact/REX/fire edges ─▶ door_stage (door::DoorCore) ─▶ relay    outbox_stage (store, fdatasync)
//!                                   │ door/alarm events ───────────────▲        │ wake
//!                                                                               ▼
//!                                                          mqtt::run (QoS 1, removed after PUBACK)
//! ```
//!
//! Every stage has the same shape: a `run`-style async fn with its inputs, outputs and the one
//! shutdown token. [`App::build`] claims hardware and opens the store (relays go to their safe
//! state at once); [`App::spawn`] starts the tasks; [`Running::shutdown`] drains them within the
//! grace period. Only `door_stage` touches a relay.

use anyhow::Context;
use chrono::{Datelike, Timelike};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::{wall_ms, MonoTime};
use crate::config::{ActiveLevel, Config, DoorConfig, ReaderConfig};
use crate::door::{Action, DoorCore, DoorEvent, Input};
use crate::events::Method;
use crate::events::NewEvent;
use crate::face::stage::FaceVerdict;
use crate::face::track::{score_bucket, Verdict};
use crate::hw::{self, Edge, Gpio, Relay};
use crate::model::Day;
use crate::policy::{self, Attempt, CardPart, Decision, FacePart, Now, Reason};
use crate::privacy::shred::Privacy;
use crate::stats::{GrantTrace, Stats};
use crate::store::Store;
use crate::wiegand::{Decoder, Line, Outcome, Rejection, WEdge};

/// What a reader stage hands the gate stage.
#[derive(Debug, Clone)]
pub struct ReaderOutput {
    pub reader: String,
    pub door: String,
    pub outcome: Outcome,
    /// Kernel timestamp of the edge that completed the frame (or of the deadline).
    pub at: MonoTime,
    /// When the reader stage had that edge.
    pub received: MonoTime,
}

/// Commands to a door stage.
#[derive(Debug, Clone, Copy)]
pub enum DoorCmd {
    Grant(GrantTrace),
    /// A remote unlock (BMS command), already bounded and checked for replay.
    Unlock(Duration),
}

/// Claimed hardware and shared state, before any task runs.
pub struct App {
    cfg: Arc<Config>,
    store: Arc<Store>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    doors: Vec<DoorParts>,
    readers: Vec<ReaderParts>,
    // The embedded simulated chip's thread, if any.
    sim_task: Option<std::thread::JoinHandle<()>>,
    // Keeps the GPIO chip handle alive as long as its lines.
    _gpio: Arc<dyn Gpio>,
}

struct DoorParts {
    cfg: DoorConfig,
    relay: Relay,
    contact: Option<tokio::sync::mpsc::UnboundedReceiver<Edge>>,
    rex: Option<tokio::sync::mpsc::UnboundedReceiver<Edge>>,
    fire: Option<tokio::sync::mpsc::UnboundedReceiver<Edge>>,
    core: DoorCore,
    // The input lines must live as long as their edge streams.
    _lines: Vec<Box<dyn hw::InputLine>>,
}

struct ReaderParts {
    cfg: ReaderConfig,
    d0: tokio::sync::mpsc::UnboundedReceiver<Edge>,
    d1: tokio::sync::mpsc::UnboundedReceiver<Edge>,
    _lines: Vec<Box<dyn hw::InputLine>>,
}

/// The running daemon.
pub struct Running {
    pub stats: Arc<Stats>,
    pub store: Arc<Store>,
    shutdown: CancellationToken,
    tasks: Vec<(String, JoinHandle<()>)>,
    sim_task: Option<std::thread::JoinHandle<()>>,
    grace: Duration,
}

fn claim_input(
    gpio: &dyn Gpio,
    pin: u8,
) -> anyhow::Result<(Box<dyn hw::InputLine>, bool, mpsc::UnboundedReceiver<Edge>)> {
    let mut line = gpio.input(pin)?;
    let level = line.level()?;
    let rx = line.edges()?;
    Ok((line, level, rx))
}

impl App {
    /// Open the store and claim every line. Relays are claimed in their safe state, so a start
    /// after a crash puts the door in its fail mode before anything else happens.
    pub async fn build(cfg: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<App> {
        let stats = Arc::new(Stats::default());
        let (gpio, sim_task) = hw::open_gpio(&cfg, &shutdown).await?;
        // Relays first: the safe state must not wait for anything else.
        let mut doors = Vec::new();
        for d in &cfg.doors {
            let relay = Relay::open(gpio.as_ref(), d.relay_pin, d.relay_active_high)
                .with_context(|| format!("door {}: relay", d.name))?;
            doors.push((d.clone(), relay));
        }
        let store_path = cfg.store_path();
        let (min_age, keep, journal) = (
            // Request ids live at least a day, and never less than an unlock may live.
            (24 * 3600 * 1000).max(cfg.mqtt.max_command_lifetime_ms as i64 * 2),
            cfg.mqtt.request_keep,
            cfg.mqtt.journal_keep,
        );
        let store = tokio::task::spawn_blocking(move || {
            Store::open(&store_path).map(|mut s| {
                s.set_retention(min_age, keep, journal);
                // Release free pages (where deleted, encrypted templates may linger) as far as
                // redb allows; only possible while nothing else uses the store.
                if let Err(error) = s.compact() {
                    tracing::warn!(%error, "store not compacted");
                }
                s
            })
        })
        .await?
        .with_context(|| format!("opening the store {}", cfg.store_path().display()))?;
        // Configuration changes are audited (P9): a hash of the effective configuration.
        let fingerprint = {
            use sha2::Digest;
            let h = sha2::Sha256::digest(format!("{cfg:?}").as_bytes());
            u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
        };
        if let Err(error) = store.note_config(fingerprint, wall_ms()) {
            tracing::error!(%error, "configuration change not audited");
        }
        let store = Arc::new(store);
        let now = MonoTime::now();
        let mut door_parts = Vec::new();
        for (d, relay) in doors {
            let mut lines = Vec::new();
            let mut input = |pin: Option<u8>,
                             level: ActiveLevel|
             -> anyhow::Result<(Option<bool>, Option<mpsc::UnboundedReceiver<Edge>>)> {
                match pin {
                    None => Ok((None, None)),
                    Some(p) => {
                        let (line, high, rx) =
                            claim_input(gpio.as_ref(), p).with_context(|| format!("door {}: GPIO {p}", d.name))?;
                        lines.push(line);
                        Ok((Some(level.is_active(high)), Some(rx)))
                    }
                }
            };
            let (contact_l, contact) = input(d.contact_pin, d.contact_open_level)?;
            let (rex_l, rex) = input(d.rex_pin, d.rex_active_level)?;
            let (fire_l, fire) = input(d.fire_pin, d.fire_active_level)?;
            let core = DoorCore::new(d.params(), contact_l, rex_l, fire_l, now);
            door_parts.push(DoorParts { cfg: d, relay, contact, rex, fire, core, _lines: lines });
        }
        let mut readers = Vec::new();
        for r in &cfg.readers {
            let (l0, _, d0) = claim_input(gpio.as_ref(), r.d0_pin).with_context(|| format!("reader {}: D0", r.name))?;
            let (l1, _, d1) = claim_input(gpio.as_ref(), r.d1_pin).with_context(|| format!("reader {}: D1", r.name))?;
            readers.push(ReaderParts { cfg: r.clone(), d0, d1, _lines: vec![l0, l1] });
        }
        Ok(App { cfg, store, stats, shutdown, doors: door_parts, readers, sim_task, _gpio: gpio })
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Start every stage.
    pub fn spawn(self) -> Running {
        let App { cfg, store, stats, shutdown, doors, readers, sim_task, _gpio } = self;
        let mut tasks: Vec<(String, JoinHandle<()>)> = Vec::new();
        let (ev_tx, ev_rx) = mpsc::channel::<NewEvent>(4096);
        let (rd_tx, rd_rx) = mpsc::channel::<ReaderOutput>(256);
        let wake = Arc::new(Notify::new());
        let board = Arc::new(crate::mqtt::StateBoard::default());
        let started = MonoTime::now();
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

        let mut door_cmds = HashMap::new();
        for d in doors {
            let (tx, rx) = mpsc::channel(64);
            door_cmds.insert(d.cfg.name.clone(), tx);
            let name = format!("door:{}", d.cfg.name);
            let ctx = StageCtx { stats: stats.clone(), shutdown: shutdown.clone(), name: name.clone() };
            let (ev, gpio, board) = (ev_tx.clone(), _gpio.clone(), board.clone());
            tasks.push((
                name,
                tokio::spawn(async move {
                    door_stage(ctx, d, rx, ev, board).await;
                    drop(gpio);
                }),
            ));
        }
        for r in readers {
            let name = format!("reader:{}", r.cfg.name);
            let ctx = StageCtx { stats: stats.clone(), shutdown: shutdown.clone(), name: name.clone() };
            let tx = rd_tx.clone();
            tasks.push((name, tokio::spawn(reader_stage(ctx, r, tx))));
        }
        drop(rd_tx);
        let mut enrol_tx = None;
        {
            let ctx = StageCtx { stats: stats.clone(), shutdown: shutdown.clone(), name: "gate".into() };
            let (store, cfg, ev) = (store.clone(), cfg.clone(), ev_tx.clone());
            let doors = door_cmds.clone();
            let face_rx = if cfg.face.enabled && cfg.face.camera.is_some() {
                let (tx, rx) = mpsc::channel::<FaceVerdict>(16);
                // One enrolment at a time: a second `face.enrol` meanwhile is answered `busy`.
                let (etx, erx) = crate::face::stage::EnrolQueue::new();
                enrol_tx = Some(etx);
                let (cfg, store, stats, tok) = (cfg.clone(), store.clone(), stats.clone(), shutdown.clone());
                let privacy = privacy.clone();
                tasks.push((
                    "face".into(),
                    tokio::task::spawn_blocking(move || {
                        crate::face::stage::run(cfg, store, stats.clone(), tok.clone(), tx, privacy, Some(erx));
                        // A face path that ends on its own (no runtime, no key) leaves the card
                        // path running: wait for shutdown instead of failing the daemon.
                        while !tok.is_cancelled() {
                            stats.beat("face");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }),
                ));
                Some(rx)
            } else {
                None
            };
            tasks.push(("gate".into(), tokio::spawn(gate_stage(ctx, cfg, store, rd_rx, face_rx, doors, ev))));
        }
        let mut link_parts = None;
        if cfg.mqtt.enabled {
            let (cmd_tx, cmd_rx) = mpsc::channel(256);
            let (out_tx, out_rx) = mpsc::channel(1024);
            let api = crate::api::ApiCtx {
                cfg: cfg.clone(),
                store: store.clone(),
                stats: stats.clone(),
                doors: door_cmds,
                events: ev_tx.clone(),
                out: out_tx,
                started,
                shutdown: shutdown.clone(),
                enrol: enrol_tx,
            };
            tasks.push(("api".into(), tokio::spawn(crate::api::run(api, cmd_rx))));
            link_parts = Some((cmd_tx, out_rx));
        }
        drop(ev_tx);
        {
            let ctx = StageCtx { stats: stats.clone(), shutdown: shutdown.clone(), name: "outbox".into() };
            let (store, cfg, wake) = (store.clone(), cfg.clone(), wake.clone());
            tasks.push(("outbox".into(), tokio::spawn(outbox_stage(ctx, cfg, store, ev_rx, wake))));
        }
        if let Some(privacy) = privacy {
            let ctx = StageCtx { stats: stats.clone(), shutdown: shutdown.clone(), name: "privacy".into() };
            let (store, cfg, wake) = (store.clone(), cfg.clone(), wake.clone());
            tasks.push(("privacy".into(), tokio::spawn(privacy_stage(ctx, cfg, store, privacy, wake))));
        }
        if let Some((commands, outgoing)) = link_parts {
            let link = crate::mqtt::LinkCtx {
                cfg: cfg.clone(),
                store: store.clone(),
                stats: stats.clone(),
                wake,
                board,
                commands,
                outgoing,
                started,
                shutdown: shutdown.clone(),
            };
            tasks.push(("mqtt".into(), tokio::spawn(crate::mqtt::run(link))));
        }
        {
            let (cfg, store, stats, tok) = (cfg.clone(), store.clone(), stats.clone(), shutdown.clone());
            tasks.push(("admin".into(), tokio::spawn(admin_stage(cfg, store, stats, tok))));
        }
        tasks.push(("watchdog".into(), tokio::spawn(watchdog_stage(stats.clone(), shutdown.clone()))));
        let grace = Duration::from_millis(cfg.gate.shutdown_grace_ms);
        tracing::info!(
            site = %cfg.gate.site, gate = %cfg.gate.gate, doors = cfg.doors.len(), readers = cfg.readers.len(),
            mqtt = cfg.mqtt.enabled, "menshen running"
        );
        Running { stats, store, shutdown, tasks, sim_task, grace }
    }
}

impl Running {
    /// Tell systemd we are ready (no-op outside systemd).
    pub fn notify_ready(&self) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    }

    /// Cancel and wait for every stage, at most the grace period; relays end in their safe state.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut late = Vec::new();
        for (name, mut task) in self.tasks {
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(stage = %name, error = %e, "stage failed"),
                Err(_) => {
                    task.abort();
                    late.push(name);
                }
            }
        }
        if let Some(t) = self.sim_task {
            // The chip's token is a child of ours: it is stopping too.
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.sync()).await??;
        if !late.is_empty() {
            anyhow::bail!("stages did not stop within the grace period: {}", late.join(", "));
        }
        tracing::info!("menshen stopped");
        Ok(())
    }

    /// A stage that ended on its own (a failure while not shutting down).
    pub fn failed_stage(&self) -> Option<String> {
        self.tasks.iter().find(|(_, t)| t.is_finished()).map(|(n, _)| n.clone())
    }
}

/// What every stage gets.
pub struct StageCtx {
    pub stats: Arc<Stats>,
    pub shutdown: CancellationToken,
    pub name: String,
}

async fn recv_opt(rx: &mut Option<mpsc::UnboundedReceiver<Edge>>) -> Option<Edge> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_mono(t: Option<MonoTime>) {
    match t {
        Some(t) => tokio::time::sleep(t.until(MonoTime::now())).await,
        None => std::future::pending().await,
    }
}

/// Decode one reader's edges into frames.
async fn reader_stage(ctx: StageCtx, mut r: ReaderParts, out: mpsc::Sender<ReaderOutput>) {
    let formats = r.cfg.parsed_formats();
    let mut dec = Decoder::new(&formats, r.cfg.timing(), r.cfg.early_complete);
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let emit = |outcome: Outcome, at: MonoTime| ReaderOutput {
        reader: r.cfg.name.clone(),
        door: r.cfg.door.clone(),
        outcome,
        at,
        received: MonoTime::now(),
    };
    let mut batch: Vec<WEdge> = Vec::new();
    loop {
        let mut results = Vec::new();
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            Some(e) = r.d0.recv() => batch.push(WEdge { line: Line::D0, high: e.high, at: e.at }),
            Some(e) = r.d1.recv() => batch.push(WEdge { line: Line::D1, high: e.high, at: e.at }),
            _ = sleep_until_mono(dec.deadline()) => {
                let now = MonoTime::now();
                results.extend(dec.on_deadline(now).map(|o| emit(o, now)));
            }
            _ = beat.tick() => ctx.stats.beat(&ctx.name),
        }
        if !batch.is_empty() {
            // The two lines arrive on two channels: take everything already delivered on both and
            // feed it in timestamp order, so an earlier D1 edge is never decoded after a later D0.
            while let Ok(e) = r.d0.try_recv() {
                batch.push(WEdge { line: Line::D0, high: e.high, at: e.at });
            }
            while let Ok(e) = r.d1.try_recv() {
                batch.push(WEdge { line: Line::D1, high: e.high, at: e.at });
            }
            batch.sort_by_key(|e| e.at);
            ctx.stats.wiegand_edges.fetch_add(batch.len() as u64, Ordering::Relaxed);
            for e in batch.drain(..) {
                results.extend(dec.on_edge(e).map(|o| emit(o, e.at)));
            }
        }
        ctx.stats.wiegand_frames.fetch_add(results.len() as u64, Ordering::Relaxed);
        for o in results {
            if out.send(o).await.is_err() {
                return;
            }
        }
    }
}

/// The local time facts the policy needs.
pub fn now_for(cfg: &Config, wall: i64) -> Now {
    let local = wall + i64::from(cfg.utc_offset_secs()) * 1000;
    let dt = chrono::DateTime::from_timestamp_millis(local).unwrap_or_default();
    Now {
        wall_ms: wall,
        day: Day::from_monday0(dt.weekday().num_days_from_monday()),
        minute: (dt.hour() * 60 + dt.minute()) as u16,
    }
}

/// Decide every frame: look up, apply the policy, open the door, record the event.
async fn recv_face(rx: &mut Option<mpsc::Receiver<FaceVerdict>>) -> Option<FaceVerdict> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// A face verdict waiting at a door for the card of a `face_and_card` attempt.
struct PendingFace {
    verdict: Verdict,
    at: MonoTime,
}

/// The resident of a face match, for the policy.
fn face_resident(store: &Store, id: &str) -> Result<Option<crate::model::Resident>, String> {
    let rid = crate::model::ResidentId::new(id).map_err(|e| e.to_string())?;
    store.resident(&rid).map_err(|e| e.to_string())
}

/// A face verdict on its own: grant (`face_or_card`), refuse, or wait for the card
/// (`face_and_card`, and any verdict a card may complete within the pair window).
fn face_decision(
    ctx: &StageCtx,
    cfg: &Config,
    store: &Store,
    v: FaceVerdict,
    pending: &mut HashMap<String, PendingFace>,
    wall: i64,
) -> Option<(Decision, Option<String>, Option<&'static str>)> {
    let now = now_for(cfg, wall);
    if let Verdict::Matched { resident, .. } = &v.verdict {
        // A face use restarts the retention clock (P7); a lost record only makes the template
        // expire sooner.
        if let Err(error) = store.touch_template(resident, wall) {
            tracing::warn!(%error, "face use not recorded");
        }
    }
    let (decision, resident, bucket) = match &v.verdict {
        Verdict::Matched { resident, score } => match face_resident(store, resident) {
            Ok(Some(r)) if r.mode == crate::model::AccessMode::FaceAndCard => {
                tracing::info!(door = %v.door, resident = %r.id, "face matched: waiting for the card (face_and_card)");
                pending.insert(v.door.clone(), PendingFace { verdict: v.verdict.clone(), at: v.at });
                return None;
            }
            Ok(Some(r)) => {
                let a = Attempt { card: None, face: Some(FacePart::Matched { resident: &r }) };
                (policy::decide(&a, &now), Some(r.id.to_string()), Some(score_bucket(*score)))
            }
            Ok(None) => (Decision { granted: false, reason: Reason::FaceNotRecognized }, None, None),
            Err(error) => {
                tracing::error!(%error, "store lookup failed");
                ctx.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                (Decision { granted: false, reason: Reason::SystemError }, None, None)
            }
        },
        Verdict::NotRecognized => {
            pending.insert(v.door.clone(), PendingFace { verdict: v.verdict.clone(), at: v.at });
            (policy::decide(&Attempt { card: None, face: Some(FacePart::NotRecognized) }, &now), None, None)
        }
        Verdict::Spoof => {
            pending.insert(v.door.clone(), PendingFace { verdict: v.verdict.clone(), at: v.at });
            (policy::decide(&Attempt { card: None, face: Some(FacePart::Spoof) }, &now), None, None)
        }
    };
    Some((decision, resident, bucket))
}

async fn gate_stage(
    ctx: StageCtx,
    cfg: Arc<Config>,
    store: Arc<Store>,
    mut rx: mpsc::Receiver<ReaderOutput>,
    mut face_rx: Option<mpsc::Receiver<FaceVerdict>>,
    doors: HashMap<String, mpsc::Sender<DoorCmd>>,
    events: mpsc::Sender<NewEvent>,
) {
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let mut pending: HashMap<String, PendingFace> = HashMap::new();
    let pair_window = Duration::from_millis(cfg.face.pair_window_ms);
    loop {
        let msg = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            m = rx.recv() => match m { Some(m) => m, None => break },
            v = recv_face(&mut face_rx) => {
                let Some(v) = v else { face_rx = None; continue };
                let wall = wall_ms();
                let door = v.door.clone();
                let at = v.at;
                let Some((decision, resident, bucket)) = face_decision(&ctx, &cfg, &store, v, &mut pending, wall) else { continue };
                if decision.granted {
                    let trace = GrantTrace { edge: at, received: at, decided: MonoTime::now() };
                    match doors.get(&door).map(|d| d.try_send(DoorCmd::Grant(trace))) {
                        Some(Ok(())) => {}
                        _ => tracing::error!(door = %door, "door stage not accepting grants"),
                    }
                    ctx.stats.granted.fetch_add(1, Ordering::Relaxed);
                } else {
                    ctx.stats.denied.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(
                    door = %door, method = "face", resident = resident.as_deref().unwrap_or("-"),
                    decision = if decision.granted { "granted" } else { "denied" },
                    reason = decision.reason.code(), "access"
                );
                let ev = NewEvent::access_face(wall, decision, Method::Face, &door, resident.as_deref(), None, bucket);
                if events.send(ev).await.is_err() {
                    break;
                }
                continue;
            }
            _ = beat.tick() => { ctx.stats.beat(&ctx.name); continue; }
        };
        let wall = wall_ms();
        let ev = match msg.outcome {
            Outcome::Card(read) => {
                // A face verdict at this door within the pair window takes part (face_and_card).
                let face = pending.remove(&msg.door).filter(|p| MonoTime::now().saturating_sub(p.at) <= pair_window);
                let face_res = match face.as_ref().map(|p| &p.verdict) {
                    Some(Verdict::Matched { resident, .. }) => face_resident(&store, resident).ok().flatten(),
                    _ => None,
                };
                let face_part = match face.as_ref().map(|p| &p.verdict) {
                    Some(Verdict::Matched { .. }) => face_res.as_ref().map(|r| FacePart::Matched { resident: r }),
                    Some(Verdict::NotRecognized) => Some(FacePart::NotRecognized),
                    Some(Verdict::Spoof) => Some(FacePart::Spoof),
                    None => None,
                };
                // Reads are MVCC snapshots: microseconds, never blocked by a commit.
                let lookup = store.lookup_card(&read.card);
                let (decision, resident) = match &lookup {
                    Ok(Some((cred, res))) => {
                        let a = Attempt {
                            card: Some(CardPart::Known { credential: cred, resident: res }),
                            face: face_part,
                        };
                        (policy::decide(&a, &now_for(&cfg, wall)), Some(res.id.to_string()))
                    }
                    Ok(None) => (
                        policy::decide(&Attempt { card: Some(CardPart::Unknown), face: None }, &now_for(&cfg, wall)),
                        None,
                    ),
                    Err(error) => {
                        // Fail secure: a store we cannot read grants nothing.
                        tracing::error!(%error, "store lookup failed");
                        ctx.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                        (Decision { granted: false, reason: Reason::SystemError }, None)
                    }
                };
                if decision.granted {
                    let trace = GrantTrace { edge: msg.at, received: msg.received, decided: MonoTime::now() };
                    match doors.get(&msg.door).map(|d| d.try_send(DoorCmd::Grant(trace))) {
                        Some(Ok(())) => {}
                        _ => tracing::error!(door = %msg.door, "door stage not accepting grants"),
                    }
                    ctx.stats.granted.fetch_add(1, Ordering::Relaxed);
                } else {
                    ctx.stats.denied.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(
                    door = %msg.door, reader = %msg.reader, card = %read.card.masked(),
                    resident = resident.as_deref().unwrap_or("-"),
                    decision = if decision.granted { "granted" } else { "denied" },
                    reason = decision.reason.code(), "access"
                );
                let with_face = face_part.is_some()
                    && matches!(&lookup, Ok(Some((_, r))) if r.mode == crate::model::AccessMode::FaceAndCard);
                if with_face {
                    let bucket = match face.as_ref().map(|p| &p.verdict) {
                        Some(Verdict::Matched { score, .. }) => Some(score_bucket(*score)),
                        _ => None,
                    };
                    let mut ev = NewEvent::access_face(
                        wall,
                        decision,
                        Method::FaceAndCard,
                        &msg.door,
                        resident.as_deref(),
                        Some(read.card),
                        bucket,
                    );
                    if let crate::events::Body::Access { reader, frame, .. } = &mut ev.body {
                        *reader = Some(msg.reader.clone());
                        *frame = Some(read.bits.into());
                    }
                    ev
                } else {
                    NewEvent::access_card(
                        wall,
                        decision,
                        &msg.door,
                        &msg.reader,
                        resident.as_deref(),
                        Some(read.card),
                        read.bits,
                        None,
                    )
                }
            }
            Outcome::Rejected { why: Rejection::LineStuckLow, .. } => {
                ctx.stats.reject(Rejection::LineStuckLow);
                tracing::warn!(reader = %msg.reader, "Wiegand line stuck low (wiring or reader fault)");
                NewEvent::alarm(wall, "reader_line_stuck", Some(&msg.reader), None)
            }
            Outcome::Rejected { why, bits } => {
                ctx.stats.reject(why);
                ctx.stats.denied.fetch_add(1, Ordering::Relaxed);
                let reason = if why == Rejection::ParityError { Reason::ParityError } else { Reason::BadFrame };
                tracing::info!(
                    door = %msg.door, reader = %msg.reader, bits = bits.len, detail = why.code(),
                    decision = "denied", reason = reason.code(), "access"
                );
                let d = Decision { granted: false, reason };
                NewEvent::access_card(wall, d, &msg.door, &msg.reader, None, None, bits, Some(why))
            }
        };
        if events.send(ev).await.is_err() {
            break;
        }
    }
}

/// One door: its relay, contact, exit button and fire input, driven by [`DoorCore`].
async fn door_stage(
    ctx: StageCtx,
    mut d: DoorParts,
    mut cmds: mpsc::Receiver<DoorCmd>,
    events: mpsc::Sender<NewEvent>,
    board: Arc<crate::mqtt::StateBoard>,
) {
    let name = d.cfg.name.clone();
    let (contact_lvl, rex_lvl, fire_lvl) = (d.cfg.contact_open_level, d.cfg.rex_active_level, d.cfg.fire_active_level);
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let start = d.core.start(MonoTime::now());
    apply(&name, &mut d.relay, start, &events).await;
    publish_state(&board, &name, &d.core, d.cfg.contact_pin.is_some());
    loop {
        let actions = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            Some(cmd) = cmds.recv() => match cmd {
                DoorCmd::Grant(trace) => {
                    let actions = d.core.grant(MonoTime::now());
                    let moves = actions.iter().any(|a| matches!(a, Action::Relay { .. }));
                    apply(&name, &mut d.relay, actions, &events).await;
                    if moves {
                        // Measured after the relay command went out (events are queued after it).
                        ctx.stats.record_grant(trace, d.relay.last_command());
                    }
                    Vec::new()
                }
                DoorCmd::Unlock(dur) => d.core.unlock_for(MonoTime::now(), dur),
            },
            Some(e) = recv_opt(&mut d.contact) => d.core.input(Input::Contact(contact_lvl.is_active(e.high)), e.at),
            Some(e) = recv_opt(&mut d.rex) => d.core.input(Input::Rex(rex_lvl.is_active(e.high)), e.at),
            Some(e) = recv_opt(&mut d.fire) => d.core.input(Input::Fire(fire_lvl.is_active(e.high)), e.at),
            _ = sleep_until_mono(d.core.deadline()) => d.core.tick(MonoTime::now()),
            _ = beat.tick() => { ctx.stats.beat(&ctx.name); Vec::new() }
        };
        apply(&name, &mut d.relay, actions, &events).await;
        publish_state(&board, &name, &d.core, d.cfg.contact_pin.is_some());
    }
    let off = d.core.shutdown();
    apply(&name, &mut d.relay, off, &events).await;
    tracing::info!(door = %name, energized = d.relay.energized(), "door in its safe state");
}

/// The retained `state/lock/{door}` and `state/door/{door}` (only when there is a contact).
fn publish_state(board: &crate::mqtt::StateBoard, door: &str, core: &DoorCore, has_contact: bool) {
    let lock = json!({"door": door, "state": if core.is_unlocked() { "UNLOCKED" } else { "LOCKED" }});
    board.set(&format!("state/lock/{door}"), lock.to_string().into_bytes());
    if has_contact {
        let open = json!({"door": door, "open": core.is_open()});
        board.set(&format!("state/door/{door}"), open.to_string().into_bytes());
    }
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

/// The privacy stage (REQUIREMENTS P7, P9): within a second of a change that deleted a template,
/// its data key is destroyed and the signed receipt stored as `event/privacy`; the retention
/// sweep runs every minute and the audit file is pruned to its retention daily. At start it also
/// destroys data keys that no template refers to (an enrolment cut short).
async fn privacy_stage(ctx: StageCtx, cfg: Arc<Config>, store: Arc<Store>, privacy: Arc<Privacy>, wake: Arc<Notify>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_sweep: Option<MonoTime> = None;
    let mut last_prune: Option<MonoTime> = None;
    {
        let (st, p) = (store.clone(), privacy.clone());
        match tokio::task::spawn_blocking(move || p.destroy_orphans(&st)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(n, "data keys without a template destroyed"),
            Ok(Err(error)) => tracing::error!(%error, "orphan data keys not checked"),
            _ => {}
        }
    }
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        ctx.stats.beat(&ctx.name);
        let now = MonoTime::now();
        let sweep = last_sweep.is_none_or(|t| now.saturating_sub(t) >= Duration::from_secs(60));
        let prune = last_prune.is_none_or(|t| now.saturating_sub(t) >= Duration::from_secs(86_400));
        let backfill = !ctx.stats.mqtt_online.load(Ordering::Relaxed);
        let audit_keep_ms = i64::from(cfg.privacy.audit_retention_days) * 86_400_000;
        let (st, p) = (store.clone(), privacy.clone());
        let res = tokio::task::spawn_blocking(move || {
            let wall = wall_ms();
            if prune {
                match st.prune_audit(wall - audit_keep_ms) {
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
        if sweep {
            last_sweep = Some(now);
        }
        if prune {
            last_prune = Some(now);
        }
        match res {
            Ok(Ok(receipts)) if !receipts.is_empty() => {
                ctx.stats.events_stored.fetch_add(receipts.len() as u64, Ordering::Relaxed);
                wake.notify_one();
            }
            Ok(Err(error)) => {
                ctx.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "deletion not completed yet (retried every second)");
            }
            _ => {}
        }
    }
}

/// Store events durably (group commit), then wake the MQTT link.
async fn outbox_stage(
    ctx: StageCtx,
    cfg: Arc<Config>,
    store: Arc<Store>,
    mut rx: mpsc::Receiver<NewEvent>,
    wake: Arc<Notify>,
) {
    let mut alarmed = false;
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    // Runs until every producer has stopped (channel closed), so shutdown loses nothing. It beats
    // while idle too: a quiet gate is not a hung one.
    loop {
        let first = tokio::select! {
            m = rx.recv() => match m { Some(e) => e, None => break },
            _ = beat.tick() => { ctx.stats.beat(&ctx.name); continue; }
        };
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let backfill = !ctx.stats.mqtt_online.load(Ordering::Relaxed);
        let n = batch.len() as u64;
        let (site, gate) = (cfg.gate.site.clone(), cfg.gate.gate.clone());
        let builders: Vec<_> = batch
            .into_iter()
            .map(|e| {
                let (site, gate) = (site.clone(), gate.clone());
                move |seq: u64| e.to_json(seq, &site, &gate, backfill)
            })
            .collect();
        let st = store.clone();
        match tokio::task::spawn_blocking(move || st.append_events(builders)).await {
            Ok(Ok(_)) => {
                ctx.stats.events_stored.fetch_add(n, Ordering::Relaxed);
                wake.notify_one();
            }
            Ok(Err(error)) => {
                ctx.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, lost = n, "could not store events");
            }
            Err(error) => tracing::error!(%error, "outbox task failed"),
        }
        ctx.stats.beat(&ctx.name);
        let depth = store.outbox_depth().unwrap_or(0);
        if depth >= cfg.gate.outbox_alarm_depth && !alarmed {
            // D2: the backlog is bounded by disk; past the configured depth, raise an alarm that
            // itself waits in the outbox and reaches the BMS first thing after the outage.
            alarmed = true;
            tracing::error!(depth, "outbox over its alarm depth: the broker has been unreachable for long");
            let alarm =
                NewEvent::alarm(wall_ms(), "outbox_over_capacity", None, Some(format!("{depth} undelivered events")));
            let (site, gate) = (cfg.gate.site.clone(), cfg.gate.gate.clone());
            let st = store.clone();
            let b = vec![move |seq: u64| alarm.to_json(seq, &site, &gate, backfill)];
            if let Ok(Ok(_)) = tokio::task::spawn_blocking(move || st.append_events(b)).await {
                ctx.stats.events_stored.fetch_add(1, Ordering::Relaxed);
                wake.notify_one();
            }
        } else if depth < cfg.gate.outbox_alarm_depth / 2 {
            alarmed = false;
        }
    }
}

/// A local socket for `menshen status`: counters, outbox depth, liveness.
async fn admin_stage(cfg: Arc<Config>, store: Arc<Store>, stats: Arc<Stats>, shutdown: CancellationToken) {
    let path = cfg.admin_socket();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "admin socket unavailable");
            shutdown.cancelled().await;
            return;
        }
    };
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    let started = MonoTime::now();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
        };
        let (store, stats) = (store.clone(), stats.clone());
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(_line)) = lines.next_line().await {
                let st = store.clone();
                let (depth, next, fp, roster, deleting) = tokio::task::spawn_blocking(move || {
                    let deleting = st.pending_deletions().map(|p| p.len());
                    (st.outbox_depth(), st.next_seq(), st.fingerprint(), st.roster_version(), deleting)
                })
                .await
                .unwrap_or((Ok(0), Ok(0), Ok(String::new()), Ok(0), Ok(0)));
                let reply = json!({
                    "ok": true,
                    "uptime_s": MonoTime::now().saturating_sub(started).as_secs(),
                    "outbox_depth": depth.unwrap_or(0),
                    "next_seq": next.unwrap_or(0),
                    "roster_version": roster.unwrap_or(0),
                    "roster_fingerprint": fp.unwrap_or_default(),
                    // Template deletions decided but whose key is not yet destroyed and receipted.
                    "deletions_pending": deleting.unwrap_or(0),
                    "stats": stats.snapshot(),
                    "camera": stats.camera(),
                    "face_frames": stats.face_frames.load(Ordering::Relaxed),
                    "frames_rejected": stats.frames_rejected.load(Ordering::Relaxed),
                    "stale_stages": stats.stale_stages(5_000_000_000),
                });
                if wr.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Ping the systemd watchdog while every stage beats; a hung stage stops the pings and systemd
/// restarts the daemon (D4).
async fn watchdog_stage(stats: Arc<Stats>, shutdown: CancellationToken) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        // Not under a systemd watchdog: nothing to ping, but a stage only ends on shutdown.
        shutdown.cancelled().await;
        return;
    }
    let period = Duration::from_micros(usec / 2);
    let max_age = (usec * 1_000).max(3_000_000_000);
    // The first ping comes one period after start, so READY=1 (sent once every stage is spawned)
    // always comes first.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                let stale = stats.stale_stages(max_age);
                if stale.is_empty() {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!(stages = ?stale, "stages stalled: withholding the watchdog ping");
                }
            }
        }
    }
}

/// Query a running daemon's admin socket.
pub fn status(cfg: &Config) -> anyhow::Result<serde_json::Value> {
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
