//! The face stage: one blocking thread that reads frames, runs the engine, and hands verdicts to
//! the gate stage. It never touches the relay or the card path: a stalled or broken camera, or a
//! slow model, cannot delay a card decision (REQUIREMENTS D3).
//!
//! Per frame: decode → detect → primary face → quality (size, pose) → liveness (if on) → align →
//! sharpness → embed → 1:N → outcome; `face::track::Tracker` turns outcomes into verdicts. The
//! gallery is (re)loaded from the store's sealed templates whenever their generation changes, so a
//! resident who turns face off stops being recognised within a second (and the policy, reading
//! the current mode, would refuse them anyway).
//!
//! `face.enrol` ([`EnrolJob`]): while a job runs, frames go to enrolment instead of recognition;
//! 3 × the asked number are collected, the good ones make the template (`face::enrol`), which is
//! sealed and stored. The frames are held in memory only and dropped when the job ends.
//!
//! The engine is built from the runtime the daemon loaded once, from the configured paths.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use super::StageCtx;
use crate::bus::{EnrolFailure, EnrolJob, Enrolled, FaceVerdict};
use crate::clock::MonoTime;
use crate::config::{CameraConfig, Config};
use crate::face::camera::{open_source, STALL};
use crate::face::detect::primary;
use crate::face::engine::{DetectorOptions, Engine, FaceError};
use crate::face::image::Rgb;
use crate::face::matcher::{Gallery, Identity, SHORTLIST};
use crate::face::source::{Action, CameraState, FrameSource, ReadResult, SourceError, Supervisor};
use crate::face::track::{FrameOutcome, Tracker};
use crate::privacy::shred::Privacy;
use crate::runtime::Runtime;

/// The face stage's parts.
pub struct FaceIo {
    pub verdicts: mpsc::Sender<FaceVerdict>,
    /// The privacy keys (templates are sealed); without them the face path does not start.
    pub privacy: Option<Arc<Privacy>>,
    pub enrol: mpsc::Receiver<EnrolJob>,
    /// The face runtime, loaded once at start from `face.onnxruntime_library` and `face.models_dir`.
    pub runtime: Runtime,
}

/// How much lower than the rest of the daemon the face thread runs (a nice value): on two cores
/// the face path runs flat out on one, and the card path must not queue behind it.
pub const FACE_NICE: i32 = 10;

/// Lower this thread's scheduling priority (Linux: the nice value is per thread).
fn lower_priority() {
    let tid = rustix::thread::gettid();
    match rustix::process::getpriority_process(Some(tid)) {
        Ok(now) => {
            if let Err(error) = rustix::process::setpriority_process(Some(tid), (now + FACE_NICE).min(19)) {
                tracing::warn!(%error, "face thread priority not lowered");
            }
        }
        Err(error) => tracing::warn!(%error, "face thread priority not read"),
    }
}

/// The face thread's state.
struct FaceLoop {
    ctx: StageCtx,
    engine: Engine,
    privacy: Arc<Privacy>,
    gallery: Gallery,
    generation: u64,
    last_check: Instant,
    tracker: Tracker,
    door: String,
    job: Option<(EnrolJob, Vec<Rgb>)>,
}

/// Run until shutdown (blocking: call from its own thread). Returns early, with the camera state
/// `error`, when the face path cannot start; cards keep working.
pub fn run(ctx: StageCtx, io: FaceIo) {
    let FaceIo { verdicts, privacy, mut enrol, runtime } = io;
    let Some(cam) = ctx.cfg.face.camera.clone() else { return };
    lower_priority();
    let fail = |why: String| {
        tracing::error!(error = %why, "face path not started: cards keep working");
        ctx.stats.set_camera("error");
    };
    let Some(privacy) = privacy else {
        return fail("the privacy keys could not be loaded (see the log above)".into());
    };
    let options = DetectorOptions { long_side: ctx.cfg.face.detector_long_side, ..Default::default() };
    let engine = match Engine::new(runtime, options) {
        Ok(e) => e,
        Err(e) => return fail(format!("{e} ({})", e.hint())),
    };
    let door = ctx.cfg.face.door.clone().or_else(|| ctx.cfg.doors.first().map(|d| d.name.clone())).unwrap_or_default();
    let mut f = FaceLoop {
        tracker: Tracker::new(ctx.cfg.face.agreement),
        gallery: Gallery::new(engine.dim()),
        generation: u64::MAX,
        last_check: Instant::now(),
        ctx,
        engine,
        privacy,
        door,
        job: None,
    };
    f.reload(true);
    tracing::info!(templates = f.gallery.len(), door = %f.door, "face path running");
    f.ctx.stats.set_camera("starting");
    let mut sup = Supervisor::new(5);
    let mut source: Option<Box<dyn FrameSource>> = None;
    let epoch = Instant::now();
    while !f.ctx.shutdown.is_cancelled() {
        f.ctx.beat();
        f.reload(false);
        f.next_job(&mut enrol);
        let Some(frame) = read_frame(&f.ctx, &cam, &mut source, &mut sup) else { continue };
        f.ctx.stats.face_frames.fetch_add(1, Ordering::Relaxed);
        if f.enrolling(frame.clone()) {
            continue;
        }
        let outcome = match analyse(&mut f.engine, &f.ctx.cfg, &f.gallery, &frame) {
            Ok(o) => o,
            Err(error) => {
                tracing::error!(%error, "face inference failed on a frame");
                continue;
            }
        };
        if let Some(verdict) = f.tracker.observe(epoch.elapsed().as_millis() as u64, outcome) {
            let v = FaceVerdict { door: f.door.clone(), verdict, at: MonoTime::now() };
            if verdicts.blocking_send(v).is_err() {
                break;
            }
        }
    }
}

impl FaceLoop {
    /// Reload the gallery when the store's templates changed (checked every second).
    fn reload(&mut self, now: bool) {
        if !now && self.last_check.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_check = Instant::now();
        let Ok(g) = self.ctx.store.templates_generation() else { return };
        if g == self.generation {
            return;
        }
        match crate::privacy::open_gallery(&self.ctx.store, &self.privacy.keyring, self.engine.dim()) {
            Ok((gallery, unusable)) => {
                for (resident, error) in unusable {
                    tracing::error!(%resident, %error, "face template unusable: not loaded");
                }
                self.gallery = gallery;
                self.generation = g;
                if !now {
                    tracing::info!(templates = self.gallery.len(), "face templates reloaded");
                }
            }
            Err(error) => tracing::error!(%error, "face templates could not be read"),
        }
    }

    /// Take a queued `face.enrol` job; end one whose deadline passed.
    fn next_job(&mut self, rx: &mut mpsc::Receiver<EnrolJob>) {
        if self.job.is_none() {
            if let Ok(j) = rx.try_recv() {
                tracing::info!(resident = %j.resident, frames = j.frames, "face enrolment from the camera started");
                self.job = Some((j, Vec::new()));
            }
        }
        if self.job.as_ref().is_some_and(|(j, _)| Instant::now() >= j.deadline) {
            if let Some((j, frames)) = self.job.take() {
                let r = if frames.is_empty() {
                    let camera = self.ctx.stats.camera();
                    Err(EnrolFailure::NoGoodFrames(format!("no camera frame before the timeout (camera {camera})")))
                } else {
                    self.enrol_from(&j, &frames)
                };
                finish_enrolment(j, r);
            }
        }
    }

    /// While enrolling, a frame is for the template, not an access decision: true if taken.
    fn enrolling(&mut self, frame: Rgb) -> bool {
        let Some((j, mut frames)) = self.job.take() else { return false };
        frames.push(frame);
        if frames.len() < 3 * j.frames {
            self.job = Some((j, frames));
            return true;
        }
        let r = self.enrol_from(&j, &frames);
        if matches!(r, Err(EnrolFailure::NoGoodFrames(_))) && Instant::now() < j.deadline {
            frames.clear(); // not yet: try again with fresh frames
            self.job = Some((j, frames));
        } else {
            finish_enrolment(j, r);
        }
        true
    }

    /// Make, seal and store a template from `frames` for the job's resident.
    fn enrol_from(&mut self, job: &EnrolJob, frames: &[Rgb]) -> Result<Enrolled, EnrolFailure> {
        use crate::face::enrol::{enrol, EnrolError, EnrolRules};
        let cfg = &self.ctx.cfg;
        let rules = EnrolRules {
            min_good: job.frames,
            min_agreement: 0.4,
            quality: cfg.face.quality,
            match_threshold: cfg.face.match_threshold,
        };
        let template = match enrol(&mut self.engine, frames, &job.resident, &self.gallery, &rules) {
            Ok(t) => t,
            Err(e @ EnrolError::TooFewGoodFrames { .. }) => return Err(EnrolFailure::NoGoodFrames(e.to_string())),
            Err(EnrolError::MatchesOther(other, _)) => {
                // Named in the gate's own log only: which residents look alike is biometric inference.
                tracing::warn!(resident = %job.resident, matches = %other, "enrolment refused: the face matches another resident");
                return Err(EnrolFailure::Refused("this face already matches another enrolled resident".into()));
            }
            Err(EnrolError::Inconsistent(_)) => {
                return Err(EnrolFailure::Refused(
                    "the frames show more than one person: try again with only the resident in view".into(),
                ))
            }
            Err(e) => return Err(EnrolFailure::Internal(e.to_string())),
        };
        let rid = crate::model::ResidentId::new(&job.resident).map_err(EnrolFailure::Refused)?;
        let now = crate::clock::wall_ms();
        match crate::privacy::store_template(&self.ctx.store, &self.privacy.keyring, &rid, &template, now) {
            Ok(key_id) => Ok(Enrolled { key_id: key_id.to_string(), frames_seen: frames.len() }),
            Err(crate::privacy::TemplateError::Seal(e)) => Err(EnrolFailure::Internal(e.to_string())),
            Err(crate::privacy::TemplateError::Store(e)) => Err(EnrolFailure::Refused(e.to_string())),
        }
    }
}

/// The next decoded frame, through the camera supervisor (open, reopen, stall and corrupt-frame
/// handling); `None` when there is none to process this turn.
fn read_frame(
    ctx: &StageCtx,
    cam: &CameraConfig,
    source: &mut Option<Box<dyn FrameSource>>,
    sup: &mut Supervisor,
) -> Option<Rgb> {
    let src = match source.as_mut() {
        Some(s) => s,
        None => match open_source(cam) {
            Ok(s) => {
                tracing::info!(source = %s.describe(), "camera opened");
                source.insert(s)
            }
            Err(e) => {
                if let (Some(state), _) = sup.on_read(ReadResult::Gone) {
                    report(ctx, state);
                }
                tracing::debug!(error = %e, "camera not available; retrying");
                std::thread::sleep(Duration::from_millis(500));
                return None;
            }
        },
    };
    let (result, frame) = match src.next(STALL) {
        Ok(raw) => match raw.decode() {
            Ok(f) => (ReadResult::Decoded, Some(f)),
            Err(e) => {
                tracing::debug!(error = %e, "corrupt frame skipped");
                ctx.stats.frames_rejected.fetch_add(1, Ordering::Relaxed);
                (ReadResult::Corrupt, None)
            }
        },
        Err(SourceError::Stalled(_)) => (ReadResult::Stalled, None),
        Err(SourceError::Gone(_)) => (ReadResult::Gone, None),
    };
    let (changed, action) = sup.on_read(result);
    if let Some(state) = changed {
        report(ctx, state);
    }
    match action {
        Action::Reopen => {
            if source.as_mut().is_some_and(|s| s.reopen().is_err()) {
                *source = None;
                std::thread::sleep(Duration::from_millis(500));
            }
            None
        }
        Action::Skip => None,
        Action::Process => frame,
    }
}

fn report(ctx: &StageCtx, state: CameraState) {
    let s = match state {
        CameraState::Starting => "starting",
        CameraState::Ok => "ok",
        CameraState::Stalled => "stalled",
        CameraState::Corrupt => "corrupt",
        CameraState::Gone => "gone",
    };
    ctx.stats.set_camera(s);
    if s == "ok" || s == "starting" {
        tracing::info!(camera = s, "camera frames arriving");
    } else {
        tracing::warn!(camera = s, "camera fault: recovering (cards keep working)");
    }
}

/// One frame → one outcome.
fn analyse(engine: &mut Engine, cfg: &Config, gallery: &Gallery, frame: &Rgb) -> Result<FrameOutcome, FaceError> {
    let faces = engine.detect(frame)?;
    let Some(face) = primary(&faces, frame.width, frame.height) else { return Ok(FrameOutcome::Nothing) };
    if cfg.face.quality.check_geometry(&face).is_err() {
        return Ok(FrameOutcome::Nothing);
    }
    if cfg.face.liveness {
        if let Some(p) = engine.liveness(frame, &face)? {
            if p < cfg.face.liveness_threshold {
                return Ok(FrameOutcome::Spoof);
            }
        }
    }
    let aligned = engine.align(frame, &face);
    if cfg.face.quality.check_sharpness(&aligned).is_err() {
        return Ok(FrameOutcome::Nothing);
    }
    let emb = engine.embed_aligned(&aligned)?;
    Ok(match gallery.identify(&emb, cfg.face.match_threshold, cfg.face.match_margin, SHORTLIST) {
        Identity::Match(h) => FrameOutcome::Match { resident: h.owner, score: h.score },
        Identity::Unknown { .. } => FrameOutcome::Unknown,
    })
}

fn finish_enrolment(job: EnrolJob, r: Result<Enrolled, EnrolFailure>) {
    match &r {
        Ok(e) => {
            tracing::info!(resident = %job.resident, key_id = %e.key_id, "face enrolled from the camera (no image kept)")
        }
        Err(why) => tracing::warn!(resident = %job.resident, ?why, "face enrolment from the camera failed"),
    }
    let _ = job.reply.send(r);
}
