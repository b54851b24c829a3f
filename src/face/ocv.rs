//! OpenCV `VideoCapture` frames (cargo feature `opencv`): RTSP IP cameras, video files, and any
//! camera OpenCV can open. A read that fails or ends is "gone": the face stage reopens the URL.
//! Reads block inside OpenCV (an RTSP stall can take its own timeout), so the source is always
//! run behind [`super::source::Threaded`], which turns a hung read into a stall report.

use std::time::Duration;

use opencv::core::Mat;
use opencv::prelude::*;
use opencv::videoio::{VideoCapture, CAP_ANY};

use super::source::{FrameSource, RawFrame, SourceError};

pub struct OpenCvSource {
    url: String,
    cap: Option<VideoCapture>,
}

impl std::fmt::Debug for OpenCvSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl OpenCvSource {
    pub fn open(url: &str) -> Result<OpenCvSource, SourceError> {
        let mut s = OpenCvSource { url: url.to_string(), cap: None };
        s.reopen()?;
        Ok(s)
    }
}

/// Credentials in an RTSP URL are never shown.
use crate::config::redact_url as redact;

impl FrameSource for OpenCvSource {
    fn next(&mut self, _timeout: Duration) -> Result<RawFrame, SourceError> {
        let gone = |why: String| SourceError::Gone(format!("{}: {why}", redact(&self.url)));
        let cap = self.cap.as_mut().ok_or_else(|| gone("not open".into()))?;
        let mut m = Mat::default();
        match cap.read(&mut m) {
            Ok(true) if !m.empty() => {}
            Ok(_) => return Err(gone("no more frames".into())),
            Err(e) => return Err(gone(e.to_string())),
        }
        if m.channels() != 3 || m.depth() != opencv::core::CV_8U {
            return Err(gone(format!("unsupported frame type {}", m.typ())));
        }
        let (width, height) = (m.cols() as u32, m.rows() as u32);
        let m = if m.is_continuous() { m } else { m.try_clone().map_err(|e| gone(e.to_string()))? };
        let data = m.data_bytes().map_err(|e| gone(e.to_string()))?.to_vec();
        Ok(RawFrame::Bgr { width, height, data })
    }

    fn reopen(&mut self) -> Result<(), SourceError> {
        self.cap = None;
        let gone = |why: String| SourceError::Gone(format!("{}: {why}", redact(&self.url)));
        let cap = VideoCapture::from_file(&self.url, CAP_ANY).map_err(|e| gone(e.to_string()))?;
        if !cap.is_opened().map_err(|e| gone(e.to_string()))? {
            return Err(gone("cannot be opened".into()));
        }
        self.cap = Some(cap);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("OpenCV {}", redact(&self.url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtsp_credentials_are_redacted_and_a_missing_file_is_gone() {
        assert_eq!(redact("rtsp://admin:secret@10.0.0.5:554/s1"), "rtsp://***@10.0.0.5:554/s1");
        assert_eq!(redact("/tmp/v.avi"), "/tmp/v.avi");
        let e = OpenCvSource::open("/nonexistent/video.avi").unwrap_err();
        assert!(matches!(e, SourceError::Gone(_)), "{e}");
    }
}
