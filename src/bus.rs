//! The messages between stages, at the bottom of the house: every stage and the MQTT link use
//! them without depending on the daemon or on each other.
//!
//! ```text
//! reader ─ReaderOutput─▶ gate ─DoorCmd─▶ door          face ─FaceVerdict─▶ gate
//! gate, door, commands, privacy ─NewEvent─▶ outbox ─(store, wake)─▶ link
//! commands ─Outgoing─▶ link ─Inbound─▶ commands        door ─StateBoard─▶ link
//! commands ─EnrolJob (EnrolQueue)─▶ face               gate ─FaceUse─▶ privacy
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

use crate::clock::MonoTime;
use crate::keypad::{KeyError, Pin};
use crate::policy::Reason;
use crate::stats::GrantTrace;
use crate::wiegand::{Bits, Outcome};

/// What a reader gave: a card frame (or a refused one), or keypad input.
#[derive(Debug, Clone)]
pub enum ReaderInput {
    Frame(Outcome),
    /// A key that did not end PIN entry (for the key click; never the digit).
    Key,
    /// A PIN to decide (ended by `#`, the configured length, or sent whole in 26 bits).
    Pin(Pin),
    /// PIN entry failed: `pin_timeout`, `pin_too_long` or `pin_too_short`.
    PinFailed(Reason),
    /// A keypad frame that is no key (noise, a bad complement, a 26-bit card on a keys reader).
    KeyRejected {
        why: KeyError,
        bits: Bits,
    },
}

/// What a reader stage hands the gate stage.
#[derive(Debug, Clone)]
pub struct ReaderOutput {
    pub reader: String,
    pub door: String,
    pub input: ReaderInput,
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

/// A decision the face path hands to the gate (after agreement over frames).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Matched { resident: String, score: f32 },
    NotRecognized,
    Spoof,
}

/// A verdict for the gate stage.
#[derive(Debug, Clone)]
pub struct FaceVerdict {
    pub door: String,
    pub verdict: Verdict,
    pub at: MonoTime,
}

/// A face use, recorded off the card path: it restarts the template's retention clock (P7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaceUse {
    pub resident: String,
    pub wall_ms: i64,
}

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

/// A message for the link to publish at QoS 1 (command replies, re-sent events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 correlation data of the request being answered.
    pub correlation: Option<Vec<u8>>,
    pub retain: bool,
    /// A command reply (a refused one is counted as `replies_refused`).
    pub reply: bool,
}

/// The retained state topics (`state/door/{door}`, `state/lock/{door}`): the door stages write,
/// the link publishes what changed, and everything again after each reconnect.
#[derive(Debug, Default)]
pub struct StateBoard {
    entries: Mutex<BTreeMap<String, (u64, Vec<u8>)>>,
    version: AtomicU64,
    pub changed: Notify,
}

impl StateBoard {
    /// Set `suffix` (under the gate's topic root) to `payload`; a no-op if unchanged.
    pub fn set(&self, suffix: &str, payload: Vec<u8>) {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if e.get(suffix).is_some_and(|(_, p)| *p == payload) {
            return;
        }
        let v = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        e.insert(suffix.to_string(), (v, payload));
        drop(e);
        self.changed.notify_one();
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Entries changed after version `after`.
    pub fn since(&self, after: u64) -> Vec<(String, Vec<u8>)> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.iter().filter(|(_, (v, _))| *v > after).map(|(k, (_, p))| (k.clone(), p.clone())).collect()
    }
}

/// What `menshen status` (admin socket) and `health` (MQTT) both report: one gathering, two views.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreFacts {
    pub outbox_depth: u64,
    pub next_seq: u64,
    pub store_bytes: u64,
    pub roster_version: u64,
    /// Template deletions decided whose key is not yet destroyed and receipted.
    pub deletions_pending: u64,
    /// The last store write failed (a full disk, an I/O error); events wait in memory.
    pub store_write_failed: bool,
    /// The roster's fingerprint (only when asked for: it reads the whole roster).
    pub roster_fingerprint: Option<String>,
    pub residents: u64,
    pub credentials: u64,
    pub templates: u64,
    /// A paged `roster.sync` in progress.
    pub roster_sync: Option<crate::store::SyncProgress>,
    /// The wall time of the newest stored event.
    pub last_event_ms: Option<i64>,
}
