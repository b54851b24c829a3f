//! Frame sources behind one trait, and the supervisor rule that turns their failures into a
//! camera state within a bounded time (REQUIREMENTS D3: a stalled, corrupt or unplugged camera is
//! detected within 5 s and recovered without a restart, while cards keep working: the face path
//! runs on its own thread and never blocks the card path).
//!
//! Sources here: a directory of JPEG/PNG files played at a configured rate (the demo and the
//! tests). V4L2 (`v4l`) and OpenCV `VideoCapture` sources are not built yet (see CHANGELOG).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::image::{DecodeError, Rgb};

/// A frame as a source delivers it, before decoding.
#[derive(Debug, Clone)]
pub enum RawFrame {
    Jpeg(Vec<u8>),
    Yuyv {
        width: u32,
        height: u32,
        data: Vec<u8>,
    },
    /// Packed BGR (as OpenCV delivers it).
    Bgr {
        width: u32,
        height: u32,
        data: Vec<u8>,
    },
}

impl RawFrame {
    pub fn decode(&self) -> Result<Rgb, DecodeError> {
        match self {
            RawFrame::Jpeg(b) => Rgb::decode(b),
            RawFrame::Yuyv { width, height, data } => Rgb::from_yuyv(*width, *height, data),
            RawFrame::Bgr { width, height, data } => {
                let n = *width as usize * *height as usize * 3;
                if data.len() < n || *width < 16 || *height < 16 {
                    return Err(DecodeError::Corrupt(format!(
                        "BGR frame of {} bytes does not fill {width}x{height}",
                        data.len()
                    )));
                }
                let rgb = data[..n].chunks_exact(3).flat_map(|p| [p[2], p[1], p[0]]).collect();
                Ok(Rgb { width: *width, height: *height, data: rgb })
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// No frame within the timeout.
    #[error("no frame for {0:?}")]
    Stalled(Duration),
    /// The device or file went away (unplugged, deleted).
    #[error("source gone: {0}")]
    Gone(String),
}

/// A camera. `next` blocks for at most `timeout`; `reopen` tries to get the source back.
pub trait FrameSource: Send {
    fn next(&mut self, timeout: Duration) -> Result<RawFrame, SourceError>;
    fn reopen(&mut self) -> Result<(), SourceError>;
    fn describe(&self) -> String;
}

/// JPEG/PNG files of a directory, in name order, at `fps`, looping.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    files: Vec<PathBuf>,
    next_index: usize,
    period: Duration,
    last: Option<Instant>,
}

impl DirSource {
    pub fn open(dir: &Path, fps: f32) -> Result<DirSource, SourceError> {
        let mut s = DirSource {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            next_index: 0,
            period: Duration::from_secs_f32(1.0 / fps.clamp(0.1, 120.0)),
            last: None,
        };
        s.reopen()?;
        Ok(s)
    }
}

impl FrameSource for DirSource {
    fn next(&mut self, timeout: Duration) -> Result<RawFrame, SourceError> {
        if self.files.is_empty() {
            return Err(SourceError::Gone(format!("{}: no frames", self.dir.display())));
        }
        if let Some(last) = self.last {
            let due = last + self.period;
            let now = Instant::now();
            if due > now {
                if due - now > timeout {
                    std::thread::sleep(timeout);
                    return Err(SourceError::Stalled(timeout));
                }
                std::thread::sleep(due - now);
            }
        }
        self.last = Some(Instant::now());
        if self.next_index >= self.files.len() {
            // Each loop reads the directory again, so its frames can be changed while playing;
            // an empty or vanished directory keeps the old list until it is back.
            let old = (std::mem::take(&mut self.files), self.next_index);
            if self.reopen().is_err() {
                (self.files, self.next_index) = (old.0, 0);
            }
        }
        let path = self.files[self.next_index].clone();
        self.next_index += 1;
        std::fs::read(&path).map(RawFrame::Jpeg).map_err(|e| SourceError::Gone(format!("{}: {e}", path.display())))
    }

    fn reopen(&mut self) -> Result<(), SourceError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| SourceError::Gone(format!("{}: {e}", self.dir.display())))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref(),
                    Some("jpg" | "jpeg" | "png")
                )
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(SourceError::Gone(format!("{}: no JPEG or PNG files", self.dir.display())));
        }
        self.files = files;
        self.next_index = 0;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("files in {} ({} frames)", self.dir.display(), self.files.len())
    }
}

/// Reader threads whose read is still blocked (a hung device); a new one is started only while
/// there are fewer than [`MAX_BLOCKED_READERS`], so a camera that hangs every read cannot leak
/// threads.
static BLOCKED_READERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
pub const MAX_BLOCKED_READERS: usize = 3;

type Opener = Box<dyn Fn() -> Result<Box<dyn FrameSource>, SourceError> + Send>;

/// Any source, read on its own thread so that a read that never returns (a hung device, a file
/// that blocks) is a stall reported within the timeout instead of a hung face thread.
pub struct Threaded {
    open: Opener,
    name: String,
    rx: Option<std::sync::mpsc::Receiver<Result<RawFrame, SourceError>>>,
}

impl std::fmt::Debug for Threaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Threaded({})", self.name)
    }
}

impl Threaded {
    pub fn open(open: Opener) -> Result<Threaded, SourceError> {
        let mut t = Threaded { open, name: String::new(), rx: None };
        t.reopen()?;
        Ok(t)
    }
}

impl FrameSource for Threaded {
    fn next(&mut self, timeout: Duration) -> Result<RawFrame, SourceError> {
        use std::sync::mpsc::RecvTimeoutError;
        let rx = self.rx.as_ref().ok_or_else(|| SourceError::Gone("not open".into()))?;
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(SourceError::Stalled(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(SourceError::Gone("the reader ended".into())),
        }
    }

    fn reopen(&mut self) -> Result<(), SourceError> {
        use std::sync::atomic::Ordering;
        // Drop the old reader's channel first: it ends at its next frame.
        self.rx = None;
        if BLOCKED_READERS.load(Ordering::SeqCst) >= MAX_BLOCKED_READERS {
            return Err(SourceError::Gone("camera reads are hanging".into()));
        }
        let mut src = (self.open)()?;
        self.name = src.describe();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        BLOCKED_READERS.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new().name("camera".into()).spawn(move || {
            loop {
                let r = src.next(Duration::from_secs(30));
                let gone = matches!(r, Err(SourceError::Gone(_)));
                if tx.send(r).is_err() || gone {
                    break;
                }
            }
            BLOCKED_READERS.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            BLOCKED_READERS.fetch_sub(1, Ordering::SeqCst);
            return Err(SourceError::Gone(format!("no reader thread: {e}")));
        }
        self.rx = Some(rx);
        Ok(())
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// The camera's state as `health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CameraState {
    /// Opened, no frame yet.
    Starting,
    Ok,
    /// No frame within the stall timeout.
    Stalled,
    /// Frames arrive but do not decode.
    Corrupt,
    /// The device is gone; reopening.
    Gone,
}

/// The supervisor rule (pure): from each read's result to the camera state, and whether to
/// reopen. Corrupt frames are tolerated one at a time; `corrupt_limit` in a row is a fault.
#[derive(Debug, Clone)]
pub struct Supervisor {
    pub corrupt_limit: u32,
    corrupt_run: u32,
    pub state: CameraState,
}

/// What the face thread should do after a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Process,
    Skip,
    Reopen,
}

/// One read's result, as the supervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadResult {
    Decoded,
    Corrupt,
    Stalled,
    Gone,
}

impl Supervisor {
    pub fn new(corrupt_limit: u32) -> Supervisor {
        Supervisor { corrupt_limit: corrupt_limit.max(1), corrupt_run: 0, state: CameraState::Starting }
    }

    /// The new state (returned if it changed, for one report per change) and the action.
    pub fn on_read(&mut self, r: ReadResult) -> (Option<CameraState>, Action) {
        let before = self.state;
        let action = match r {
            ReadResult::Decoded => {
                self.corrupt_run = 0;
                self.state = CameraState::Ok;
                Action::Process
            }
            ReadResult::Corrupt => {
                self.corrupt_run += 1;
                if self.corrupt_run >= self.corrupt_limit {
                    self.state = CameraState::Corrupt;
                    self.corrupt_run = 0;
                    Action::Reopen
                } else {
                    Action::Skip
                }
            }
            ReadResult::Stalled => {
                self.state = CameraState::Stalled;
                Action::Reopen
            }
            ReadResult::Gone => {
                self.state = CameraState::Gone;
                Action::Reopen
            }
        };
        ((self.state != before).then_some(self.state), action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supervisor_reports_each_change_once_and_recovers() {
        let mut s = Supervisor::new(3);
        assert_eq!(s.state, CameraState::Starting);
        assert_eq!(s.on_read(ReadResult::Decoded), (Some(CameraState::Ok), Action::Process), "the first frame");
        assert_eq!(s.on_read(ReadResult::Decoded), (None, Action::Process));
        assert_eq!(s.on_read(ReadResult::Corrupt), (None, Action::Skip), "one corrupt frame is skipped");
        assert_eq!(s.on_read(ReadResult::Corrupt), (None, Action::Skip));
        assert_eq!(s.on_read(ReadResult::Corrupt), (Some(CameraState::Corrupt), Action::Reopen));
        assert_eq!(s.on_read(ReadResult::Stalled), (Some(CameraState::Stalled), Action::Reopen));
        assert_eq!(s.on_read(ReadResult::Stalled), (None, Action::Reopen), "no second report");
        assert_eq!(s.on_read(ReadResult::Decoded), (Some(CameraState::Ok), Action::Process));
        assert_eq!(s.on_read(ReadResult::Gone), (Some(CameraState::Gone), Action::Reopen));
    }

    #[test]
    fn dir_source_plays_in_order_loops_and_reports_a_vanished_directory() {
        let dir = tempfile::tempdir().unwrap();
        for (n, b) in [("b.jpg", b"second".as_slice()), ("a.png", b"first"), ("notes.txt", b"skip")] {
            std::fs::write(dir.path().join(n), b).unwrap();
        }
        let mut s = DirSource::open(dir.path(), 100.0).unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            match s.next(Duration::from_secs(1)).unwrap() {
                RawFrame::Jpeg(b) => got.push(b),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, vec![b"first".to_vec(), b"second".to_vec(), b"first".to_vec()]);
        // The payloads are not images: decoding says so instead of panicking.
        assert!(RawFrame::Jpeg(got[0].clone()).decode().is_err());
        // A slow source against a short timeout is a stall, reported within the timeout.
        let mut slow = DirSource::open(dir.path(), 0.5).unwrap();
        slow.next(Duration::from_millis(10)).unwrap();
        let t = Instant::now();
        assert!(matches!(slow.next(Duration::from_millis(50)), Err(SourceError::Stalled(_))));
        assert!(t.elapsed() < Duration::from_secs(1));
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(matches!(s.reopen(), Err(SourceError::Gone(_))), "{}", path.display());
    }
}
