//! The V4L2 camera (USB and CSI cameras on Linux) through the `v4l` crate: MJPEG or YUYV at the
//! configured size, memory-mapped buffers, a poll timeout on every read. Any error other than a
//! timeout means the device is gone (unplugged, driver reset): the face stage reopens it by path
//! until it is back, with no restart of the daemon.
//!
//! No video device exists on the development and CI machines. `tests/v4l2_camera.rs` runs this
//! source in the whole daemon against a device simulated at the system-call boundary
//! (`tests/support/fake_v4l2.c`, loaded with LD_PRELOAD): negotiation, MJPEG and YUYV, stall,
//! corrupt frames, unplug and replug. It has not read a frame from real hardware.

use std::path::{Path, PathBuf};
use std::time::Duration;

use v4l::buffer::Type;
use v4l::io::mmap::Stream;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture;
use v4l::{Device, FourCC};

use super::source::{FrameSource, RawFrame, SourceError};

pub use crate::config::PixelFormat;

/// Check what the driver agreed to: it may change the size or the format silently.
pub fn check_negotiated(want: (u32, u32, PixelFormat), got: (u32, u32, [u8; 4])) -> Result<(), String> {
    if got.2 != want.2.fourcc() {
        return Err(format!(
            "the camera does not offer {} (it chose {})",
            String::from_utf8_lossy(&want.2.fourcc()),
            String::from_utf8_lossy(&got.2)
        ));
    }
    if (got.0, got.1) != (want.0, want.1) {
        return Err(format!("the camera does not offer {}x{} (it chose {}x{})", want.0, want.1, got.0, got.1));
    }
    Ok(())
}

pub struct V4l2Source {
    path: PathBuf,
    width: u32,
    height: u32,
    format: PixelFormat,
    // The stream's buffers are mmapped from the device's handle (an Arc inside both).
    stream: Option<Stream<'static>>,
    _dev: Option<Device>,
}

impl std::fmt::Debug for V4l2Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl V4l2Source {
    pub fn open(path: &Path, width: u32, height: u32, format: PixelFormat) -> Result<V4l2Source, SourceError> {
        let mut s = V4l2Source { path: path.to_path_buf(), width, height, format, stream: None, _dev: None };
        s.reopen()?;
        Ok(s)
    }
}

impl FrameSource for V4l2Source {
    fn next(&mut self, timeout: Duration) -> Result<RawFrame, SourceError> {
        let stream = self.stream.as_mut().ok_or_else(|| SourceError::Gone("not open".into()))?;
        stream.set_timeout(timeout);
        match CaptureStream::next(stream) {
            Ok((buf, meta)) => {
                let used = (meta.bytesused as usize).min(buf.len());
                let data = buf[..used].to_vec();
                Ok(match self.format {
                    PixelFormat::Mjpeg => RawFrame::Jpeg(data),
                    PixelFormat::Yuyv => RawFrame::Yuyv { width: self.width, height: self.height, data },
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(SourceError::Stalled(timeout)),
            Err(e) => Err(SourceError::Gone(format!("{}: {e}", self.path.display()))),
        }
    }

    fn reopen(&mut self) -> Result<(), SourceError> {
        self.stream = None;
        self._dev = None;
        let gone = |e: std::io::Error| SourceError::Gone(format!("{}: {e}", self.path.display()));
        let dev = Device::with_path(&self.path).map_err(gone)?;
        let mut fmt = dev.format().map_err(gone)?;
        fmt.width = self.width;
        fmt.height = self.height;
        fmt.fourcc = FourCC::new(&self.format.fourcc());
        let got = dev.set_format(&fmt).map_err(gone)?;
        check_negotiated((self.width, self.height, self.format), (got.width, got.height, got.fourcc.repr))
            .map_err(|why| SourceError::Gone(format!("{}: {why}", self.path.display())))?;
        let stream = Stream::with_buffers(&dev, Type::VideoCapture, 4).map_err(gone)?;
        self.stream = Some(stream);
        self._dev = Some(dev);
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "V4L2 {} {}x{} {}",
            self.path.display(),
            self.width,
            self.height,
            String::from_utf8_lossy(&self.format.fourcc())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_negotiated_format_must_be_what_was_asked() {
        assert!(check_negotiated((640, 480, PixelFormat::Mjpeg), (640, 480, *b"MJPG")).is_ok());
        let e = check_negotiated((640, 480, PixelFormat::Mjpeg), (640, 480, *b"YUYV")).unwrap_err();
        assert!(e.contains("does not offer MJPG"), "{e}");
        let e = check_negotiated((1280, 720, PixelFormat::Yuyv), (640, 480, *b"YUYV")).unwrap_err();
        assert!(e.contains("1280x720"), "{e}");
    }

    #[test]
    fn a_missing_device_is_gone_not_a_panic() {
        let e = V4l2Source::open(Path::new("/dev/video-none"), 640, 480, PixelFormat::Mjpeg).unwrap_err();
        assert!(matches!(e, SourceError::Gone(ref m) if m.contains("/dev/video-none")), "{e}");
    }
}
