//! The face settings: plain configuration types that the face path reads (the config knows
//! nothing of the face path).

use serde::Deserialize;
use std::path::PathBuf;

use super::default_true;

/// The face runtime (ONNX Runtime and the models). The face path itself is not built yet; with
/// `enabled`, the daemon checks the runtime at start and refuses to start on a bad install.
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaceConfig {
    #[serde(default)]
    pub enabled: bool,
    /// `libonnxruntime.so.1.31.1` as installed by `scripts/setup-runtime.sh --dest DIR` (DIR/lib).
    #[serde(default = "default_ort_lib")]
    pub onnxruntime_library: PathBuf,
    /// The model files (DIR/models), checked against the manifest's sha256.
    #[serde(default = "default_models_dir")]
    pub models_dir: PathBuf,
    /// Inference threads per session.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// The camera; without it no frame is read (the runtime is still checked).
    #[serde(default)]
    pub camera: Option<CameraConfig>,
    /// The door the camera watches (default: the first door).
    #[serde(default)]
    pub door: Option<String>,
    /// The detector's input: the frame's long side is scaled to this.
    #[serde(default = "default_long_side")]
    pub detector_long_side: u32,
    /// Cosine similarity a match needs (0.53: FAR 1e-4 on LFW).
    #[serde(default = "default_match_threshold")]
    pub match_threshold: f32,
    /// How far the best resident must be ahead of the best other resident.
    #[serde(default = "default_match_margin")]
    pub match_margin: f32,
    /// Run the anti-spoofing ensemble; a face below `liveness_threshold` is `spoof_suspected`.
    #[serde(default = "default_true")]
    pub liveness: bool,
    #[serde(default = "default_liveness_threshold")]
    pub liveness_threshold: f32,
    /// For `face_and_card`: how long a face verdict waits for the card (and the card for the face).
    #[serde(default = "default_pair_window")]
    pub pair_window_ms: u64,
    #[serde(default)]
    pub agreement: Agreement,
    #[serde(default)]
    pub quality: QualityGate,
}

/// Where frames come from.
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CameraConfig {
    /// JPEG/PNG files of a directory, in name order, looping (the demo and tests; the list is
    /// read again at each loop).
    Files {
        dir: PathBuf,
        #[serde(default = "default_fps")]
        fps: f32,
    },
    /// An OpenCV `VideoCapture` URL or file: RTSP IP cameras, video files (needs a build with the
    /// `opencv` feature; without it the daemon reports the camera as `error`).
    Opencv { url: String },
    /// A V4L2 device (USB/CSI camera), reopened by path after an unplug.
    V4l2 {
        #[serde(default = "default_video_device")]
        device: PathBuf,
        #[serde(default = "default_cam_width")]
        width: u32,
        #[serde(default = "default_cam_height")]
        height: u32,
        #[serde(default = "default_pixel_format")]
        format: PixelFormat,
    },
}

impl CameraConfig {
    /// For messages: the source, with any credentials in a URL hidden.
    pub fn describe(&self) -> String {
        match self {
            CameraConfig::Files { dir, fps } => format!("files in {} at {fps} fps", dir.display()),
            CameraConfig::Opencv { url } => format!("OpenCV {}", redact_url(url)),
            CameraConfig::V4l2 { device, width, height, format } => {
                format!("V4L2 {} {width}x{height} {format:?}", device.display())
            }
        }
    }
}

/// `rtsp://user:pass@host/…` → `rtsp://***@host/…`: credentials never reach a log or a message.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(a), Some(b)) if b > a => format!("{}://***@{}", &url[..a], &url[b + 1..]),
        _ => url.to_string(),
    }
}

fn default_video_device() -> PathBuf {
    "/dev/video0".into()
}
fn default_cam_width() -> u32 {
    640
}
fn default_cam_height() -> u32 {
    480
}
fn default_pixel_format() -> PixelFormat {
    PixelFormat::Mjpeg
}

fn default_fps() -> f32 {
    5.0
}
fn default_long_side() -> u32 {
    640
}
fn default_match_threshold() -> f32 {
    0.53
}
fn default_match_margin() -> f32 {
    0.05
}
fn default_liveness_threshold() -> f32 {
    0.5
}
fn default_pair_window() -> u64 {
    10_000
}

impl Default for FaceConfig {
    fn default() -> Self {
        FaceConfig {
            enabled: false,
            onnxruntime_library: default_ort_lib(),
            models_dir: default_models_dir(),
            threads: default_threads(),
            camera: None,
            door: None,
            detector_long_side: default_long_side(),
            match_threshold: default_match_threshold(),
            match_margin: default_match_margin(),
            liveness: true,
            liveness_threshold: default_liveness_threshold(),
            pair_window_ms: default_pair_window(),
            agreement: Default::default(),
            quality: Default::default(),
        }
    }
}

fn default_ort_lib() -> PathBuf {
    "/opt/menshen/runtime/lib/libonnxruntime.so.1.31.1".into()
}
fn default_models_dir() -> PathBuf {
    "/opt/menshen/runtime/models".into()
}
fn default_threads() -> usize {
    1
}

/// The pixel formats the face path decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    Mjpeg,
    Yuyv,
}

impl PixelFormat {
    pub fn fourcc(self) -> [u8; 4] {
        match self {
            PixelFormat::Mjpeg => *b"MJPG",
            PixelFormat::Yuyv => *b"YUYV",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityGate {
    /// Smallest face box width, in frame pixels.
    #[serde(default = "d_min_face")]
    pub min_face_px: f32,
    /// Largest nose offset from the eye midline, as a fraction of the eye distance (yaw proxy).
    #[serde(default = "d_yaw")]
    pub max_yaw: f32,
    /// Largest eye-line tilt, in degrees.
    #[serde(default = "d_roll")]
    pub max_roll_deg: f32,
    /// Smallest variance of the Laplacian of the aligned 112×112 face (lower is blurred).
    #[serde(default = "d_sharp")]
    pub min_sharpness: f32,
}

fn d_min_face() -> f32 {
    60.0
}
fn d_yaw() -> f32 {
    0.35
}
fn d_roll() -> f32 {
    25.0
}
fn d_sharp() -> f32 {
    20.0
}

impl Default for QualityGate {
    fn default() -> Self {
        QualityGate { min_face_px: d_min_face(), max_yaw: d_yaw(), max_roll_deg: d_roll(), min_sharpness: d_sharp() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agreement {
    /// Consecutive face frames that must agree.
    #[serde(default = "d_frames")]
    pub frames: usize,
    /// All of them within this many milliseconds.
    #[serde(default = "d_window")]
    pub window_ms: u64,
    /// After a verdict, no other for this long (the person walks through).
    #[serde(default = "d_cooldown")]
    pub cooldown_ms: u64,
}

fn d_frames() -> usize {
    3
}
fn d_window() -> u64 {
    1500
}
fn d_cooldown() -> u64 {
    3000
}

impl Default for Agreement {
    fn default() -> Self {
        Agreement { frames: d_frames(), window_ms: d_window(), cooldown_ms: d_cooldown() }
    }
}
