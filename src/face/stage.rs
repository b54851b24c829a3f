//! The face stage: one blocking thread that reads frames, runs the engine, and hands verdicts to
//! the gate stage. It never touches the relay or the card path: a stalled or broken camera, or a
//! slow model, cannot delay a card decision (REQUIREMENTS D3).
//!
//! Per frame: decode → detect → primary face → quality (size, pose) → liveness (if on) → align →
//! sharpness → embed → 1:N → outcome; [`Tracker`] turns outcomes into verdicts. The gallery is
//! (re)loaded from the store's sealed templates whenever their generation changes, so a resident
//! who turns face off stops being recognised within a second (and the policy, reading the current
//! mode, would refuse them anyway).
//!
//! `face.enrol` ([`EnrolJob`]): while a job runs, frames go to enrolment instead of recognition;
//! 3 × the asked number are collected, the good ones make the template ([`super::enrol`]), which
//! is sealed and stored. The frames are held in memory only and dropped when the job ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::detect::primary;
use super::engine::{DetectorOptions, Engine};
use super::matcher::{Gallery, Identity};
use super::source::{Action, DirSource, FrameSource, ReadResult, SourceError, Supervisor, Threaded};
use super::track::{FrameOutcome, Tracker, Verdict};
use crate::clock::MonoTime;
use crate::config::{CameraConfig, Config};
use crate::privacy::Keyring;
use crate::stats::Stats;
use crate::store::Store;

/// A `face.enrol` job: the resident stands in front of this gate's camera.
pub struct EnrolJob {
    pub resident: String,
    /// Good frames needed.
    pub frames: usize,
    pub deadline: Instant,
    pub reply: tokio::sync::oneshot::Sender<Result<Enrolled, EnrolFailure>>,
}

/// Where `face.enrol` hands jobs to the face stage: one at a time.
#[derive(Clone)]
pub struct EnrolQueue {
    tx: mpsc::Sender<EnrolJob>,
    one: Arc<tokio::sync::Semaphore>,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotQueued {
    /// Another enrolment is running.
    Busy,
    /// The face stage is not running.
    Stopped,
}

impl EnrolQueue {
    pub fn new() -> (EnrolQueue, mpsc::Receiver<EnrolJob>) {
        let (tx, rx) = mpsc::channel(1);
        (EnrolQueue { tx, one: Arc::new(tokio::sync::Semaphore::new(1)) }, rx)
    }

    /// Queue a job; the permit must be held until its reply has come (or given up on).
    pub fn submit(&self, job: EnrolJob) -> Result<tokio::sync::OwnedSemaphorePermit, NotQueued> {
        let permit = self.one.clone().try_acquire_owned().map_err(|_| NotQueued::Busy)?;
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => NotQueued::Busy,
            mpsc::error::TrySendError::Closed(_) => NotQueued::Stopped,
        })?;
        Ok(permit)
    }
}

/// A template made from live frames, sealed and stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Enrolled {
    pub key_id: String,
    pub frames_seen: usize,
}

/// Why an enrolment did not happen.
#[derive(Debug, Clone, PartialEq)]
pub enum EnrolFailure {
    /// Not enough good frames before the deadline (no face, too small, turned, blurred), or no
    /// frames at all (the camera's state is in the message).
    NoGoodFrames(String),
    /// Refused: the face matches another resident, the frames show more than one person, or the
    /// store refused the template (consent withdrawn or face turned off meanwhile).
    Refused(String),
    Internal(String),
}

/// A verdict for the gate stage.
#[derive(Debug, Clone)]
pub struct FaceVerdict {
    pub door: String,
    pub verdict: Verdict,
    pub at: MonoTime,
}

/// How long one read may take before the camera counts as stalled (≤ 5 s, REQUIREMENTS D3).
pub const STALL: Duration = Duration::from_secs(2);

/// Open the configured camera, read on its own thread ([`Threaded`]).
pub fn open_source(cam: &CameraConfig) -> Result<Box<dyn FrameSource>, SourceError> {
    let cam = cam.clone();
    let opener = Box::new(move || -> Result<Box<dyn FrameSource>, SourceError> {
        match &cam {
            CameraConfig::Files { dir, fps } => Ok(Box::new(DirSource::open(dir, *fps)?)),
            CameraConfig::V4l2 { device, width, height, format } => {
                Ok(Box::new(super::v4l2::V4l2Source::open(device, *width, *height, *format)?))
            }
            #[cfg(feature = "opencv")]
            CameraConfig::Opencv { url } => Ok(Box::new(super::ocv::OpenCvSource::open(url)?)),
            #[cfg(not(feature = "opencv"))]
            CameraConfig::Opencv { .. } => {
                Err(SourceError::Gone("this build has no OpenCV support (cargo feature `opencv`)".into()))
            }
        }
    });
    Ok(Box::new(Threaded::open(opener)?))
}

fn load_gallery(store: &Store, key: &Keyring, dim: usize) -> Gallery {
    let mut g = Gallery::new(dim);
    match store.templates() {
        Ok(ts) => {
            for (owner, blob) in ts {
                match key
                    .open_template(&owner, &blob)
                    .map_err(|e| e.to_string())
                    .and_then(|t| g.add(&owner, &t).map_err(|e| e.to_string()))
                {
                    Ok(()) => {}
                    Err(error) => tracing::error!(resident = %owner, %error, "face template unusable: not loaded"),
                }
            }
        }
        Err(error) => tracing::error!(%error, "face templates could not be read"),
    }
    g
}

/// One frame → one outcome.
fn analyse(
    engine: &mut Engine,
    cfg: &Config,
    gallery: &Gallery,
    frame: &super::image::Rgb,
) -> Result<FrameOutcome, super::engine::FaceError> {
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
    Ok(match gallery.identify(&emb, cfg.face.match_threshold, cfg.face.match_margin, super::matcher::SHORTLIST) {
        Identity::Match(h) => FrameOutcome::Match { resident: h.owner, score: h.score },
        Identity::Unknown { .. } => FrameOutcome::Unknown,
    })
}

/// Run until shutdown. Returns at once (camera `disabled`) without a camera.
pub fn run(
    cfg: Arc<Config>,
    store: Arc<Store>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    out: mpsc::Sender<FaceVerdict>,
    privacy: Option<Arc<crate::privacy::shred::Privacy>>,
    mut enrol_rx: Option<mpsc::Receiver<EnrolJob>>,
) {
    let name = "face";
    let Some(cam) = cfg.face.camera.clone() else { return };
    let door = cfg.face.door.clone().or_else(|| cfg.doors.first().map(|d| d.name.clone())).unwrap_or_default();
    let fail = |why: String| {
        tracing::error!(error = %why, "face path not started: cards keep working");
        stats.set_camera("error");
    };
    let Some(privacy) = privacy else {
        return fail("the privacy keys could not be loaded (see the log above)".into());
    };
    let key = &privacy.keyring;
    let face_cfg = crate::face::tools::locate(&cfg.face);
    let options = DetectorOptions { long_side: cfg.face.detector_long_side, ..Default::default() };
    let mut engine = match crate::face::tools::engine(&face_cfg, options) {
        Ok(e) => e,
        Err(e) => return fail(format!("{e:#}")),
    };
    let mut generation = store.templates_generation().unwrap_or(0);
    let mut gallery = load_gallery(&store, key, engine.dim());
    tracing::info!(templates = gallery.len(), door = %door, "face path running");
    stats.set_camera("starting");
    let mut tracker = Tracker::new(cfg.face.agreement);
    let mut sup = Supervisor::new(5);
    let mut source: Option<Box<dyn FrameSource>> = None;
    let mut last_check = Instant::now();
    let epoch = Instant::now();
    let mut job: Option<(EnrolJob, Vec<super::image::Rgb>)> = None;
    let report = |state: super::source::CameraState| {
        let s = match state {
            super::source::CameraState::Starting => "starting",
            super::source::CameraState::Ok => "ok",
            super::source::CameraState::Stalled => "stalled",
            super::source::CameraState::Corrupt => "corrupt",
            super::source::CameraState::Gone => "gone",
        };
        stats.set_camera(s);
        if s == "ok" || s == "starting" {
            tracing::info!(camera = s, "camera frames arriving");
        } else {
            tracing::warn!(camera = s, "camera fault: recovering (cards keep working)");
        }
    };
    while !shutdown.is_cancelled() {
        stats.beat(name);
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            if let Ok(g) = store.templates_generation() {
                if g != generation {
                    generation = g;
                    gallery = load_gallery(&store, key, engine.dim());
                    tracing::info!(templates = gallery.len(), "face templates reloaded");
                }
            }
        }
        if job.is_none() {
            if let Some(j) = enrol_rx.as_mut().and_then(|rx| rx.try_recv().ok()) {
                tracing::info!(resident = %j.resident, frames = j.frames, "face enrolment from the camera started");
                job = Some((j, Vec::new()));
            }
        }
        if job.as_ref().is_some_and(|(j, _)| Instant::now() >= j.deadline) {
            if let Some((j, frames)) = job.take() {
                let r = if frames.is_empty() {
                    Err(EnrolFailure::NoGoodFrames(format!(
                        "no camera frame before the timeout (camera {})",
                        stats.camera()
                    )))
                } else {
                    enrol_from(&mut engine, &cfg, &store, key, &gallery, &j, &frames)
                };
                finish_enrolment(j, r);
            }
        }
        let src = match source.as_mut() {
            Some(s) => s,
            None => match open_source(&cam) {
                Ok(s) => {
                    tracing::info!(source = %s.describe(), "camera opened");
                    source.insert(s)
                }
                Err(e) => {
                    if let (Some(state), _) = sup.on_read(ReadResult::Gone) {
                        report(state);
                    }
                    tracing::debug!(error = %e, "camera not available; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            },
        };
        let read = src.next(STALL);
        let (result, frame) = match read {
            Ok(raw) => match raw.decode() {
                Ok(f) => (ReadResult::Decoded, Some(f)),
                Err(e) => {
                    tracing::debug!(error = %e, "corrupt frame skipped");
                    stats.frames_rejected.fetch_add(1, Ordering::Relaxed);
                    (ReadResult::Corrupt, None)
                }
            },
            Err(SourceError::Stalled(_)) => (ReadResult::Stalled, None),
            Err(SourceError::Gone(_)) => (ReadResult::Gone, None),
        };
        let (changed, action) = sup.on_read(result);
        if let Some(state) = changed {
            report(state);
        }
        match action {
            Action::Reopen => {
                if let Some(s) = source.as_mut() {
                    if s.reopen().is_err() {
                        source = None;
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
                continue;
            }
            Action::Skip => continue,
            Action::Process => {}
        }
        let Some(frame) = frame else { continue };
        stats.face_frames.fetch_add(1, Ordering::Relaxed);
        if let Some((j, frames)) = job.as_mut() {
            // Enrolling: this frame is for the template, not an access decision.
            frames.push(frame);
            if frames.len() >= 3 * j.frames {
                let r = enrol_from(&mut engine, &cfg, &store, key, &gallery, j, frames);
                if matches!(r, Err(EnrolFailure::NoGoodFrames(_))) && Instant::now() < j.deadline {
                    frames.clear(); // not yet: try again with fresh frames
                } else if let Some((j, _)) = job.take() {
                    finish_enrolment(j, r);
                }
            }
            continue;
        }
        let outcome = match analyse(&mut engine, &cfg, &gallery, &frame) {
            Ok(o) => o,
            Err(error) => {
                tracing::error!(%error, "face inference failed on a frame");
                continue;
            }
        };
        let now_ms = epoch.elapsed().as_millis() as u64;
        if let Some(verdict) = tracker.observe(now_ms, outcome) {
            let v = FaceVerdict { door: door.clone(), verdict, at: MonoTime::now() };
            if out.blocking_send(v).is_err() {
                break;
            }
        }
    }
}

/// Make, seal and store a template from `frames` for the job's resident.
fn enrol_from(
    engine: &mut Engine,
    cfg: &Config,
    store: &Store,
    key: &Keyring,
    gallery: &Gallery,
    job: &EnrolJob,
    frames: &[super::image::Rgb],
) -> Result<Enrolled, EnrolFailure> {
    use super::enrol::{enrol, EnrolError, EnrolRules};
    let rules = EnrolRules {
        min_good: job.frames,
        min_agreement: 0.4,
        quality: cfg.face.quality,
        match_threshold: cfg.face.match_threshold,
    };
    let template = match enrol(engine, frames, &job.resident, gallery, &rules) {
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
    let (key_id, sealed) = key.seal(&job.resident, &template).map_err(|e| EnrolFailure::Internal(e.to_string()))?;
    if let Err(e) = store.put_template(&rid, &key_id, &sealed, crate::clock::wall_ms()) {
        // The data key was written first: it goes with the refused template.
        let _ = key.destroy(&key_id);
        return Err(EnrolFailure::Refused(e.to_string()));
    }
    Ok(Enrolled { key_id: key_id.to_string(), frames_seen: frames.len() })
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
