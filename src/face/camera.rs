//! Opening the configured camera: the one place that knows every kind of source.

use std::time::Duration;

use super::source::{DirSource, FrameSource, SourceError, Threaded};
use crate::config::CameraConfig;

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
