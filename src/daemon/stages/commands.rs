//! The commands stage: carries out validated BMS commands (REQUIREMENTS M1–M3, P1, P2, P4).
//!
//! The MQTT link hands every publish on a command topic to [`run`]. [`command::parse`] checks
//! shape, replay rules and limits without touching anything; this stage then does what needs the
//! store or a door. Every roster change records its request id in the same durable transaction
//! (so it happens once or not at all), and an unlock's request id is on disk before the door
//! moves. Every command is answered (`ok`, or an error `code` and `message`) when it names a
//! reply topic; every refusal is counted by code.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

use super::StageCtx;
use crate::bus::{DoorCmd, EnrolFailure, EnrolJob, EnrolQueue, NotQueued, Outgoing};
use crate::clock::wall_ms;
use crate::command::{self, CmdError, Command, ErrorCode, Inbound, Request, ResidentSpec, Verb};
use crate::config::Config;
use crate::daemon::status;
use crate::events::NewEvent;
use crate::model::{Credential, CredentialKind, PinHash, ResidentId};
use crate::stats::Stats;
use crate::store::{Claim, OpOutcome, RosterOp, StoreError, SyncPage, Timeout};

/// The commands stage's channels.
pub struct CommandsIo {
    /// Command publishes, from the link.
    pub inbound: mpsc::Receiver<Inbound>,
    pub doors: HashMap<String, mpsc::Sender<DoorCmd>>,
    pub events: mpsc::Sender<NewEvent>,
    /// Replies and re-sent events, published by the link.
    pub out: mpsc::Sender<Outgoing>,
    /// The face stage's enrolment queue (none without a face path and camera).
    pub enrol: Option<EnrolQueue>,
    /// The key a PIN is hashed with before it is stored (none: PINs are refused).
    pub pin_key: Option<std::sync::Arc<crate::keypad::PinKey>>,
}

/// What a command runs with.
struct Cmd<'a> {
    ctx: &'a StageCtx,
    io: &'a CommandsIo,
}

/// Run until shutdown.
pub async fn run(ctx: StageCtx, mut io: CommandsIo) {
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let mut beats = 0u64;
    loop {
        let inb = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            m = io.inbound.recv() => match m { Some(m) => m, None => { ctx.shutdown.cancelled().await; break } },
            _ = beat.tick() => {
                ctx.beat();
                beats += 1;
                if beats % 10 == 0 {
                    expire_sync(&ctx, &io.events).await;
                }
                continue;
            }
        };
        handle(&Cmd { ctx: &ctx, io: &io }, inb).await;
    }
}

/// Parse, execute and answer one command.
async fn handle(ctx: &Cmd<'_>, inb: Inbound) {
    let cfg = &ctx.ctx.cfg;
    let (site, gate) = (&cfg.gate.site, &cfg.gate.gate);
    let now = wall_ms();
    let (verb, request_id, reply, outcome) = match command::parse(&inb, site, gate, &cfg.limits(), now) {
        Err(refusal) => (refusal.verb, refusal.request_id, refusal.reply, Err(refusal.error)),
        Ok(req) if req.site_wide && !cfg.mqtt.site_commands => {
            let e = CmdError::new(
                ErrorCode::UnknownCommand,
                "this gate does not take site-wide commands (mqtt.site_commands)",
            );
            (Some(req.verb), Some(req.request_id), req.reply, Err(e))
        }
        Ok(req) => {
            if let Command::FaceEnrol { .. } = &req.command {
                // Minutes of other commands must not wait for a resident at the camera: the
                // reply comes from a task of its own when the face stage is done.
                match start_enrolment(ctx, &req, now).await {
                    Ok(wait) => {
                        let out = ctx.responder();
                        let events = ctx.io.events.clone();
                        let (verb, rid, reply) = (req.verb, req.request_id.clone(), req.reply.clone());
                        tokio::spawn(async move {
                            let outcome = wait.await;
                            if let Ok(r) = &outcome {
                                let resident = r["resident"].as_str().unwrap_or_default();
                                let _ = events
                                    .send(NewEvent::consent(wall_ms(), "template_enrolled", resident, Some(&rid)))
                                    .await;
                            }
                            out.respond(Some(verb), Some(rid), reply, outcome).await;
                        });
                        return;
                    }
                    Err(e) => (Some(req.verb), Some(req.request_id), req.reply, Err(e)),
                }
            } else {
                let outcome = execute(ctx, &req, now).await;
                if outcome.is_ok() && changes_state(req.verb) {
                    publish_summary(ctx).await;
                }
                (Some(req.verb), Some(req.request_id), req.reply, outcome)
            }
        }
    };
    ctx.responder().respond(verb, request_id, reply, outcome).await;
}

/// Does a successful `verb` change what the retained `summary` shows?
fn changes_state(verb: Verb) -> bool {
    !matches!(verb, Verb::Unlock | Verb::RulesGet | Verb::HealthGet | Verb::EventsBackfill)
}

/// Re-publish the retained `summary` now (a site tool sees the new roster version at once).
async fn publish_summary(ctx: &Cmd<'_>) {
    let facts = status::gather(&ctx.ctx.store, false).await;
    let v = status::summary(&ctx.ctx.cfg, &facts, &ctx.ctx.stats);
    let topic = format!("{}summary", ctx.ctx.cfg.topic_root());
    let msg = Outgoing { topic, payload: v.to_string().into_bytes(), correlation: None, retain: true, reply: false };
    send_out(&ctx.io.out, msg).await;
}

impl Cmd<'_> {
    fn responder(&self) -> Responder {
        Responder { out: self.io.out.clone(), stats: self.ctx.stats.clone(), cfg: self.ctx.cfg.clone() }
    }
}

/// Counts, logs and answers a command's outcome.
struct Responder {
    out: mpsc::Sender<Outgoing>,
    stats: Arc<Stats>,
    cfg: Arc<Config>,
}

impl Responder {
    async fn respond(
        &self,
        verb: Option<Verb>,
        request_id: Option<String>,
        reply: Option<command::ReplyTo>,
        outcome: Result<Value, CmdError>,
    ) {
        let (site, gate) = (&self.cfg.gate.site, &self.cfg.gate.gate);
        let ctx = self;
        match &outcome {
            Ok(_) => {
                ctx.stats.commands_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    command = verb.map_or("-", Verb::name),
                    request_id = request_id.as_deref().unwrap_or("-"),
                    "command done"
                );
            }
            Err(e) => {
                ctx.stats.reject_command(e.code.code());
                tracing::warn!(
                    command = verb.map_or("-", Verb::name), request_id = request_id.as_deref().unwrap_or("-"),
                    code = e.code.code(), message = %e.message, "command refused"
                );
            }
        }
        let Some(reply) = reply else { return };
        let payload = command::reply_json(site, gate, verb, request_id.as_deref(), &outcome);
        let msg = Outgoing { topic: reply.topic, payload, correlation: reply.correlation, retain: false, reply: true };
        if !send_out(&ctx.out, msg).await {
            tracing::warn!(request_id = request_id.as_deref().unwrap_or("-"), "reply dropped: the broker link is down");
        }
    }
}

/// Check a `face.enrol` and hand it to the face stage; the returned future is its outcome.
async fn start_enrolment(
    ctx: &Cmd<'_>,
    req: &Request,
    now: i64,
) -> Result<impl std::future::Future<Output = Result<Value, CmdError>>, CmdError> {
    let Command::FaceEnrol { resident, frames, timeout_ms } = &req.command else {
        return Err(CmdError::new(ErrorCode::InternalError, "not a face.enrol"));
    };
    if req.site_wide {
        return Err(CmdError::new(ErrorCode::InvalidValue, "face.enrol is per gate: send it to the gate's own topic"));
    }
    let Some(queue) = ctx.io.enrol.clone() else {
        return Err(CmdError::new(
            ErrorCode::FaceUnavailable,
            "this gate has no face path (face.enabled and a camera)",
        ));
    };
    // The same checks the store makes when the template is written, first, before any frame.
    let (store, id) = (ctx.ctx.store.clone(), resident.clone());
    let (found, consent) = tokio::task::spawn_blocking(move || (store.resident(&id), store.face_consent(&id)))
        .await
        .map_err(|e| CmdError::new(ErrorCode::InternalError, e.to_string()))?;
    let r = found
        .map_err(store_error)?
        .ok_or_else(|| CmdError::new(ErrorCode::UnknownResident, format!("no resident `{resident}`")))?;
    if !r.mode.admits_face() {
        return Err(store_error(StoreError::FaceOff(resident.to_string())));
    }
    if consent.map_err(store_error)?.is_none() {
        return Err(store_error(StoreError::NoConsent(resident.to_string())));
    }
    // The request id is claimed before the camera is used: a replayed command is refused.
    apply(ctx, RosterOp::Nothing, &req.request_id, now).await?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = EnrolJob {
        resident: resident.to_string(),
        frames: *frames,
        deadline: std::time::Instant::now() + Duration::from_millis(*timeout_ms),
        reply: tx,
    };
    let permit = queue.submit(job).map_err(|e| match e {
        NotQueued::Busy => CmdError::new(ErrorCode::Busy, "another face enrolment is running at this gate"),
        NotQueued::Stopped => CmdError::new(ErrorCode::FaceUnavailable, "the face path is not running"),
    })?;
    let (resident, timeout) = (resident.to_string(), Duration::from_millis(*timeout_ms + 5_000));
    Ok(async move {
        let _one_at_a_time = permit;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(e))) => Ok(json!({"resident": resident, "key_id": e.key_id, "frames_seen": e.frames_seen})),
            Ok(Ok(Err(EnrolFailure::NoGoodFrames(m)))) => Err(CmdError::new(ErrorCode::EnrolmentFailed, m)),
            Ok(Ok(Err(EnrolFailure::Refused(m)))) => Err(CmdError::new(ErrorCode::EnrolmentFailed, m)),
            Ok(Ok(Err(EnrolFailure::Internal(m)))) => Err(CmdError::new(ErrorCode::InternalError, m)),
            Ok(Err(_)) | Err(_) => {
                Err(CmdError::new(ErrorCode::FaceUnavailable, "the face path stopped during enrolment"))
            }
        }
    })
}

/// Hand a message to the link, waiting at most 2 s: if the broker went away meanwhile, the stage
/// must not hang (its heartbeat feeds the watchdog). The reply is lost, the command's effect is not.
async fn send_out(out: &mpsc::Sender<Outgoing>, msg: Outgoing) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(2), out.send(msg)).await, Ok(Ok(())))
}

fn store_error(e: StoreError) -> CmdError {
    CmdError::new(store_error_code(&e), e.to_string())
}

fn store_error_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::DuplicateRequest(_) => ErrorCode::DuplicateRequest,
        StoreError::Guard(_) => ErrorCode::FaceOnlyRefused,
        StoreError::NoResident(_) => ErrorCode::UnknownResident,
        StoreError::NoCredential(_) | StoreError::NoPin(..) => ErrorCode::UnknownCredential,
        StoreError::CredentialTaken(_) | StoreError::PinTaken => ErrorCode::CredentialTaken,
        StoreError::DuressSameAsPin => ErrorCode::InvalidValue,
        StoreError::StaleVersion { .. } => ErrorCode::StaleVersion,
        StoreError::VersionConflict(_) => ErrorCode::VersionConflict,
        StoreError::PageOutOfOrder { .. } => ErrorCode::PageOutOfOrder,
        StoreError::DuplicatePage { .. } => ErrorCode::DuplicatePage,
        StoreError::UnknownSync(_) => ErrorCode::UnknownSync,
        // A batch is refused with the code of the entry that failed; the message names it.
        StoreError::InBatch { source, .. } => store_error_code(source),
        StoreError::InvalidResident(_)
        | StoreError::ResidentExists(_)
        | StoreError::NoConsent(_)
        | StoreError::InvalidConsent(_)
        | StoreError::FaceOff(_) => ErrorCode::InvalidValue,
        StoreError::Locked | StoreError::NewerSchema { .. } | StoreError::Db(_) | StoreError::Corrupt { .. } => {
            ErrorCode::InternalError
        }
    }
}

/// Run a store call off the async workers; a storage failure is counted.
async fn in_store<T: Send + 'static>(
    ctx: &Cmd<'_>,
    f: impl FnOnce(&crate::store::Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, CmdError> {
    let store = ctx.ctx.store.clone();
    let res = tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| CmdError::new(ErrorCode::InternalError, e.to_string()))?;
    if let Err(StoreError::Db(_) | StoreError::Corrupt { .. }) = &res {
        ctx.ctx.stats.store_errors.fetch_add(1, Ordering::Relaxed);
    }
    res.map_err(store_error)
}

/// Apply a roster op with the request's id claimed in the same transaction.
async fn apply(ctx: &Cmd<'_>, op: RosterOp, request_id: &str, now: i64) -> Result<OpOutcome, CmdError> {
    let rid = request_id.to_string();
    in_store(ctx, move |store| store.apply(op, Some(Claim { request_id: &rid, now_ms: now, by: "mqtt" }), now)).await
}

async fn emit(ctx: &Cmd<'_>, ev: NewEvent) {
    // The outbox stage stores it durably; it only closes once every producer is gone.
    let _ = ctx.io.events.send(ev).await;
}

/// A snapshot's digest: the first 8 bytes of SHA-256 over its canonical JSON (sorted by id).
pub fn roster_digest(residents: &[ResidentSpec]) -> u64 {
    let mut sorted: Vec<&ResidentSpec> = residents.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    crate::digest::sha256_u64(&serde_json::to_vec(&sorted).unwrap_or_default())
}

async fn execute(ctx: &Cmd<'_>, req: &Request, now: i64) -> Result<Value, CmdError> {
    let rid = req.request_id.as_str();
    match &req.command {
        Command::Unlock { door, duration_ms } => unlock(ctx, req, door, *duration_ms, now).await,
        Command::ResidentUpsert(_)
        | Command::ResidentRemove(_)
        | Command::SetMode { .. }
        | Command::CredentialAdd { .. }
        | Command::CredentialRemove(_)
        | Command::PinSet { .. }
        | Command::PinRemove { .. }
        | Command::RosterSync { .. }
        | Command::RosterBatch { .. } => roster(ctx, &req.command, rid, now).await,
        Command::RulesGet => {
            let (version, text) = ctx.ctx.cfg.rules().map_err(|e| CmdError::new(ErrorCode::InternalError, e))?;
            Ok(json!({"version": version, "sha256": crate::privacy::rules_sha256(&text), "text": text}))
        }
        Command::HealthGet => {
            let facts = status::gather(&ctx.ctx.store, false).await;
            Ok(status::health(&ctx.ctx.cfg, &facts, &ctx.ctx.stats, ctx.ctx.started))
        }
        // Answered by its own task (see `handle`): it waits for a resident at the camera.
        Command::FaceEnrol { .. } => Err(CmdError::new(ErrorCode::InternalError, "face.enrol is not run inline")),
        Command::ConsentRecord(a) => consent_record(ctx, a, rid, now).await,
        Command::ConsentWithdraw(id) => consent_withdraw(ctx, id, rid, now).await,
        Command::EventsBackfill { from_seq, limit } => backfill(ctx, *from_seq, *limit).await,
    }
}

/// A remote unlock: its request id is on disk before the door moves, so a replay after a crash
/// is refused; while the store cannot be written, it is refused.
async fn unlock(
    ctx: &Cmd<'_>,
    req: &Request,
    door: &str,
    duration_ms: Option<u64>,
    now: i64,
) -> Result<Value, CmdError> {
    let (cfg, rid) = (&ctx.ctx.cfg, req.request_id.as_str());
    if req.site_wide {
        return Err(CmdError::new(ErrorCode::InvalidValue, "unlock is per gate: send it to the gate's own topic"));
    }
    let Some(tx) = ctx.io.doors.get(door) else {
        return Err(CmdError::new(ErrorCode::UnknownDoor, format!("no door `{door}` at this gate")));
    };
    let dur = duration_ms.unwrap_or_else(|| cfg.door(door).map_or(3_000, |d| d.pulse_ms).min(cfg.mqtt.unlock_max_ms));
    apply(ctx, RosterOp::Nothing, rid, now).await?;
    tx.send(DoorCmd::Unlock(Duration::from_millis(dur)))
        .await
        .map_err(|_| CmdError::new(ErrorCode::InternalError, "door stage not running"))?;
    ctx.ctx.stats.granted.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%door, request_id = rid, duration_ms = dur, decision = "granted", reason = "remote_unlock", "access");
    emit(ctx, NewEvent::remote_unlock(now, door, rid, dur)).await;
    Ok(json!({"door": door, "duration_ms": dur}))
}

/// The roster commands: one guarded store transaction each, with the request id claimed in it.
async fn roster(ctx: &Cmd<'_>, command: &Command, rid: &str, now: i64) -> Result<Value, CmdError> {
    match command {
        Command::ResidentUpsert(spec) => {
            let before = ctx.ctx.store.resident(&spec.id).ok().flatten().map(|r| r.mode);
            let op = RosterOp::Upsert { resident: spec.resident(), credentials: spec.credentials() };
            apply(ctx, op, rid, now).await?;
            emit(ctx, NewEvent::roster_changed(now, &format!("resident.upsert {}", spec.id), rid)).await;
            if let Some(b) = before.filter(|b| *b != spec.mode) {
                emit(ctx, NewEvent::mode_changed(now, spec.id.as_str(), b.name(), spec.mode.name(), Some(rid))).await;
            }
            Ok(json!({"resident": spec.id, "mode": spec.mode, "created": before.is_none()}))
        }
        Command::ResidentRemove(id) => {
            let out = apply(ctx, RosterOp::RemoveResident(id.clone()), rid, now).await?;
            let n = match out {
                OpOutcome::ResidentRemoved { credentials } => credentials,
                _ => 0,
            };
            emit(ctx, NewEvent::roster_changed(now, &format!("resident.remove {id}"), rid)).await;
            Ok(json!({"resident": id, "credentials_removed": n}))
        }
        Command::SetMode { resident, mode } => {
            let out = apply(ctx, RosterOp::SetMode { id: resident.clone(), mode: *mode }, rid, now).await?;
            let OpOutcome::ModeChanged { before } = out else {
                // Already in that mode: ok, and no event (the store wrote no audit record).
                return Ok(json!({"resident": resident, "mode": mode, "previous_mode": mode, "changed": false}));
            };
            tracing::info!(%resident, from = before.name(), to = mode.name(), request_id = rid, "mode changed");
            emit(ctx, NewEvent::mode_changed(now, resident.as_str(), before.name(), mode.name(), Some(rid))).await;
            Ok(json!({"resident": resident, "mode": mode, "previous_mode": before, "changed": true}))
        }
        Command::CredentialAdd { resident, card } => {
            apply(ctx, RosterOp::AddCredential(card.credential(resident)), rid, now).await?;
            emit(
                ctx,
                NewEvent::roster_changed(now, &format!("credential.add {resident} {}", card.card().masked()), rid),
            )
            .await;
            Ok(json!({"resident": resident, "card": card.card()}))
        }
        Command::CredentialRemove(card) => {
            let key = CredentialKind::Card(*card).key();
            let holder = match apply(ctx, RosterOp::RemoveCredential(key), rid, now).await? {
                OpOutcome::CredentialRemoved(c) => c.resident.to_string(),
                _ => String::new(),
            };
            emit(ctx, NewEvent::roster_changed(now, &format!("credential.remove {holder} {}", card.masked()), rid))
                .await;
            Ok(json!({"resident": holder, "card": card}))
        }
        Command::PinSet { resident, pin } => {
            let key = ctx.io.pin_key.as_ref().ok_or_else(|| {
                CmdError::new(ErrorCode::InternalError, "the PIN key could not be loaded: see the gate's log")
            })?;
            let hash = PinHash { hash: key.hash(&pin.pin.0), duress: pin.duress };
            let c = Credential {
                credential: CredentialKind::Pin(hash),
                resident: resident.clone(),
                validity: pin.validity,
            };
            let what = c.credential.masked();
            apply(ctx, RosterOp::SetPin(c), rid, now).await?;
            emit(ctx, NewEvent::roster_changed(now, &format!("credential.add {resident} {what}"), rid)).await;
            // Never the PIN, nor its hash.
            Ok(json!({"resident": resident, "pin": if pin.duress { "duress" } else { "pin" }, "set": true}))
        }
        Command::PinRemove { resident, duress } => {
            apply(ctx, RosterOp::RemovePin { resident: resident.clone(), duress: *duress }, rid, now).await?;
            let what = if *duress { "duress pin" } else { "pin" };
            emit(ctx, NewEvent::roster_changed(now, &format!("credential.remove {resident} {what}"), rid)).await;
            Ok(json!({"resident": resident, "pin": if *duress { "duress" } else { "pin" }, "removed": true}))
        }
        Command::RosterSync { version, residents, paging: Some(p) } => {
            sync_page(ctx, *version, residents, p, rid, now).await
        }
        Command::RosterSync { version, residents, paging: None } => {
            let digest = roster_digest(residents);
            let entries =
                residents.iter().map(|r| (r.resident(), r.credentials().unwrap_or_default())).collect::<Vec<_>>();
            let out = apply(ctx, RosterOp::Sync { version: *version, digest, residents: entries }, rid, now).await?;
            let OpOutcome::Synced { residents: n, credentials, removed } = out else {
                return Err(CmdError::new(ErrorCode::InternalError, "unexpected store outcome"));
            };
            emit(ctx, NewEvent::roster_changed(now, &format!("roster.sync version {version}: {n} residents"), rid))
                .await;
            Ok(json!({"version": version, "residents": n, "credentials": credentials, "removed": removed}))
        }
        Command::RosterBatch { upserts, removes } => {
            let mut ops: Vec<RosterOp> = upserts
                .iter()
                .map(|spec| RosterOp::Upsert { resident: spec.resident(), credentials: spec.credentials() })
                .collect();
            ops.extend(removes.iter().map(|id| RosterOp::RemoveResident(id.clone())));
            apply(ctx, RosterOp::Batch(ops), rid, now).await?;
            let what = format!("roster.batch: {} upserts, {} removals", upserts.len(), removes.len());
            emit(ctx, NewEvent::roster_changed(now, &what, rid)).await;
            Ok(json!({"upserts": upserts.len(), "removes": removes.len()}))
        }
        _ => Err(CmdError::new(ErrorCode::InternalError, "not a roster command")),
    }
}

/// One page of a paged `roster.sync`: staged with its request id; the last one switches.
async fn sync_page(
    ctx: &Cmd<'_>,
    version: u64,
    residents: &[ResidentSpec],
    p: &command::Paging,
    rid: &str,
    now: i64,
) -> Result<Value, CmdError> {
    let page = SyncPage {
        sync_id: p.sync_id.clone(),
        version,
        page: p.page,
        pages: p.pages,
        residents: residents.iter().map(|r| (r.resident(), r.credentials().unwrap_or_default())).collect(),
    };
    let (r, timeout) = (rid.to_string(), sync_timeout(ctx.ctx));
    let out = in_store(ctx, move |store| {
        store.stage_page(page, Some(Claim { request_id: &r, now_ms: now, by: "mqtt" }), now, timeout)
    })
    .await?;
    if let Some(old) = &out.replaced {
        let what = format!("roster.sync {} discarded: replaced by sync {}", old.describe(), p.sync_id);
        emit(ctx, NewEvent::system(now, "roster_sync_discarded", Some(what))).await;
    }
    let prog = &out.progress;
    match out.switched {
        None => Ok(json!({"version": version, "sync_id": p.sync_id, "page": p.page, "pages": p.pages,
                          "next_page": prog.next_page, "staged_residents": prog.residents, "complete": false})),
        Some(OpOutcome::Synced { residents: n, credentials, removed }) => {
            let what = format!("roster.sync version {version} ({} pages, sync {}): {n} residents", p.pages, p.sync_id);
            emit(ctx, NewEvent::roster_changed(now, &what, rid)).await;
            Ok(json!({"version": version, "sync_id": p.sync_id, "page": p.page, "pages": p.pages,
                      "next_page": prog.next_page, "complete": true,
                      "residents": n, "credentials": credentials, "removed": removed}))
        }
        Some(_) => Err(CmdError::new(ErrorCode::InternalError, "unexpected store outcome")),
    }
}

/// When a half-received paged sync is given up (see [`Timeout`]).
fn sync_timeout(ctx: &StageCtx) -> Timeout {
    Timeout {
        ms: ctx.cfg.mqtt.roster_sync_timeout_secs as i64 * 1000,
        online_since_ms: ctx.stats.mqtt_connected_ms.load(Ordering::Relaxed),
    }
}

/// Discard a half-received paged sync that has waited too long for its next page.
async fn expire_sync(ctx: &StageCtx, events: &mpsc::Sender<NewEvent>) {
    if !ctx.stats.mqtt_online.load(Ordering::Relaxed) {
        return; // offline, no page can come: the timeout counts from the reconnection
    }
    let (store, timeout) = (ctx.store.clone(), sync_timeout(ctx));
    let now = wall_ms();
    let res = tokio::task::spawn_blocking(move || store.discard_stale_sync(now, timeout)).await;
    if let Ok(Ok(Some(p))) = res {
        let what = format!("roster.sync {} discarded: no page for {} s", p.describe(), timeout.ms / 1000);
        tracing::warn!(sync_id = %p.sync_id, "{what}");
        let _ = events.send(NewEvent::system(now, "roster_sync_discarded", Some(what))).await;
    }
}

async fn consent_record(ctx: &Cmd<'_>, a: &command::ConsentArgs, rid: &str, now: i64) -> Result<Value, CmdError> {
    let req = crate::privacy::ConsentRequest {
        channel: a.channel.clone(),
        retention_days: a.retention_days,
        minor: a.minor,
        guardian: a.guardian.as_ref().map(|g| g.to_string()),
        shown_rules: Some((a.rules_version.clone(), a.rules_sha256.clone())),
    };
    let consent =
        crate::privacy::consent_for(&ctx.ctx.cfg, &req, now).map_err(|e| CmdError::new(ErrorCode::InvalidValue, e))?;
    // The request id is claimed in the consent's own transaction: a replay is refused.
    let (store, id, c, r) = (ctx.ctx.store.clone(), a.resident.clone(), consent.clone(), rid.to_string());
    tokio::task::spawn_blocking(move || {
        store.record_face_consent(&id, &c, Some(Claim { request_id: &r, now_ms: now, by: "mqtt" }), now)
    })
    .await
    .map_err(|e| CmdError::new(ErrorCode::InternalError, e.to_string()))?
    .map_err(store_error)?;
    emit(ctx, NewEvent::consent(now, "consent_recorded", a.resident.as_str(), Some(rid))).await;
    Ok(json!({"resident": a.resident, "consent": consent}))
}

async fn consent_withdraw(ctx: &Cmd<'_>, id: &ResidentId, rid: &str, now: i64) -> Result<Value, CmdError> {
    let (store, rid2, r) = (ctx.ctx.store.clone(), id.clone(), rid.to_string());
    let w = tokio::task::spawn_blocking(move || {
        store.withdraw_face_consent(&rid2, Some(Claim { request_id: &r, now_ms: now, by: "mqtt" }), now)
    })
    .await
    .map_err(|e| CmdError::new(ErrorCode::InternalError, e.to_string()))?
    .map_err(store_error)?;
    if w.withdrawn {
        emit(ctx, NewEvent::consent(now, "consent_withdrawn", id.as_str(), Some(rid))).await;
    }
    // The receipt follows on event/privacy within a second (the privacy stage).
    Ok(json!({"resident": id, "template_deleted": w.template_deleted, "changed": w.withdrawn}))
}

/// `events.backfill`: re-send stored events (delivered or not), marked `backfill`.
async fn backfill(ctx: &Cmd<'_>, from_seq: u64, limit: usize) -> Result<Value, CmdError> {
    let store = ctx.ctx.store.clone();
    let (events, oldest) =
        tokio::task::spawn_blocking(move || (store.events_from(from_seq, limit), store.oldest_kept_seq()))
            .await
            .map_err(|e| CmdError::new(ErrorCode::InternalError, e.to_string()))?;
    let events = events.map_err(store_error)?;
    let root = ctx.ctx.cfg.topic_root();
    let (first, last) = (events.first().map(|e| e.seq), events.last().map(|e| e.seq));
    let n = events.len();
    for e in events {
        let Ok(mut v) = serde_json::from_slice::<Value>(&e.json) else { continue };
        v["backfill"] = Value::Bool(true);
        let kind = v["type"].as_str().unwrap_or("system").to_string();
        let payload = serde_json::to_vec(&v).unwrap_or_default();
        let msg =
            Outgoing { topic: format!("{root}event/{kind}"), payload, correlation: None, retain: false, reply: false };
        if !send_out(&ctx.io.out, msg).await {
            return Err(CmdError::new(ErrorCode::Busy, "the broker link went down while re-sending"));
        }
    }
    Ok(json!({"from_seq": from_seq, "count": n, "first_seq": first, "last_seq": last,
              "oldest_kept_seq": oldest.ok().flatten()}))
}
