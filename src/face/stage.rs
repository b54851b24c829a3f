//! The face stage: one blocking thread that reads frames, runs the engine, and hands verdicts to
//! the gate stage. It never touches the relay or the card path: a stalled or broken camera, or a
//! slow model, cannot delay a card decision (REQUIREMENTS D3).
//!
//! Per frame: decode → detect → primary face → quality (size, pose) → liveness (if on) → align →
//! sharpness → embed → 1:N → outcome; [`Tracker`] turns outcomes into verdicts. The gallery is
//! (re)loaded from the store's sealed templates whenever their generation changes, so a resident
//! who turns face off stops being recognised within a second (and the policy, reading the current
//! mode, would refuse them anyway).

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
    Ok(match gallery.identify(&emb, cfg.face.match_threshold, cfg.face.match_margin, 16) {
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
