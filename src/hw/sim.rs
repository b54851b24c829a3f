//! The simulated GPIO chip: a faithful stand-in for the board's gpiochip, served on a Unix
//! socket so that it can outlive the daemon exactly as real lines do (a SIGKILLed daemon leaves
//! its relay line where it was; the next start must put it in the safe state).
//!
//! Two kinds of client speak JSON lines to it:
//! - the daemon ([`SimGpio`]) claims lines, sets outputs and receives input edges stamped on
//!   CLOCK_MONOTONIC at the instant the simulated line changed;
//! - the outside world (`menshen sim ...`, tests, the demo script) swipes cards, sends raw
//!   Wiegand bits, opens doors, presses the exit button, raises the fire input, forces a line,
//!   and reads the state of every line with the history of each output.
//!
//! The Wiegand transmitter uses real timing: ~50 µs low pulses, ~2 ms between bits with random
//! jitter, run on a dedicated thread that sleeps and then spins to each edge. Door contacts and
//! buttons bounce (several flips 0.2–1.5 ms apart) before they settle.

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Edge, Gpio, HwError, InputLine, OutputLine};
use crate::clock::MonoTime;
use crate::config::{Config, LineRef};
use crate::keypad;
use crate::wiegand::{self, Bits, Format};

/// Output transitions kept per line for `state`.
const HISTORY: usize = 64;

/// One recorded output change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// When the daemon issued the command (its CLOCK_MONOTONIC).
    pub cmd_ns: u64,
    /// When the chip applied it.
    pub at_ns: u64,
    pub high: bool,
}

#[derive(Debug, Clone, Default)]
struct Line {
    level: bool,
    output: bool,
    owner: Option<u64>,
    history: VecDeque<Transition>,
    /// Counts every output command, including ones that did not change the level.
    writes: u64,
    /// The kernel model (claims from the fake gpiochip, `tests/support/fake_gpiochip.c`): the
    /// line was requested through the character device and is released as the kernel does.
    kernel: bool,
    /// The pull set with the request (`true`: up); it stays after release, as a pin
    /// controller's pull register does.
    bias: Option<bool>,
    /// Kernel debounce: edges are reported once the level has held this long.
    debounce: Option<Duration>,
    /// The level last reported to the owner (debounced lines).
    reported: bool,
    /// Bumped by every raw change of a debounced line.
    debounce_gen: u64,
}

/// The connection id of the in-process client (socket connections count from 1).
const LOCAL: u64 = 0;

/// A simulated reader, like a real one, leaves at least this much silence between frames.
pub const READER_REARM: Duration = Duration::from_millis(60);

#[derive(Debug, Default)]
struct Chip {
    lines: HashMap<u8, Line>,
    /// When each reader (by its D0 pin) may start its next frame.
    reader_free_at: HashMap<u8, MonoTime>,
    /// Edge channels of the in-process client (connection id [`LOCAL`]).
    local_edges: HashMap<u8, mpsc::UnboundedSender<Edge>>,
    conns: HashMap<u64, mpsc::UnboundedSender<String>>,
    /// Cancelling one closes that connection (the chip went away under it).
    kills: HashMap<u64, CancellationToken>,
    next_conn: u64,
    /// The chip has gone away (`menshen sim unplug`): character-device clients are cut off.
    unplugged: bool,
    /// Released character-device outputs keep their level (Raspberry Pi OS's default,
    /// `persist_gpio_outputs`) instead of turning into inputs.
    keep_released: bool,
    /// Debounce timers: (deadline, pin, generation).
    debounce_tx: Option<std::sync::mpsc::Sender<(MonoTime, u8, u64)>>,
}

fn lock(chip: &Mutex<Chip>) -> MutexGuard<'_, Chip> {
    // A panic while holding the lock would be a bug in this module; keep serving regardless.
    chip.lock().unwrap_or_else(|p| p.into_inner())
}

impl Chip {
    fn line(&mut self, pin: u8) -> &mut Line {
        self.lines.entry(pin).or_insert_with(|| Line { level: true, ..Line::default() })
    }

    /// The world drives an input line at time `at`. Returns the edge time if the level changed.
    ///
    /// `at` is when the edge happens in the simulated world (its scheduled time): a reader is
    /// timed by its own hardware and the kernel stamps the true edge time, so when this process
    /// is descheduled the edge is delivered late but never mis-stamped.
    fn drive(&mut self, pin: u8, high: bool, at: MonoTime) -> Option<MonoTime> {
        let line = self.line(pin);
        if line.output || line.level == high {
            return None;
        }
        line.level = high;
        if let (Some(period), Some(_)) = (line.debounce, line.owner) {
            // The kernel restarts the line's debounce timer on every raw edge and reports the
            // level when it fires, if it differs from the last one reported.
            line.debounce_gen += 1;
            let gen = line.debounce_gen;
            if let Some(tx) = &self.debounce_tx {
                let _ = tx.send((at + period, pin, gen));
            }
            return Some(at);
        }
        self.deliver(pin, high, at);
        Some(at)
    }

    /// A debounce timer fired: report the settled level if it changed.
    fn debounce_fired(&mut self, pin: u8, gen: u64) {
        let line = self.line(pin);
        if line.debounce_gen != gen || line.reported == line.level || line.owner.is_none() {
            return;
        }
        line.reported = line.level;
        let high = line.level;
        self.deliver(pin, high, MonoTime::now());
    }

    /// Hand an edge to the line's owner.
    fn deliver(&mut self, pin: u8, high: bool, at: MonoTime) {
        let line = self.line(pin);
        if line.owner == Some(LOCAL) {
            if let Some(tx) = self.local_edges.get(&pin) {
                let _ = tx.send(Edge { high, at });
            }
        } else if let Some(owner) = line.owner {
            let msg = json!({"edge": {"pin": pin, "high": high, "t_ns": at.as_nanos()}}).to_string();
            if let Some(tx) = self.conns.get(&owner) {
                // A closed connection is cleaned up by its handler.
                let _ = tx.send(msg);
            }
        }
    }

    /// The owner `conn` is gone: release its lines. Lines claimed through the simulated chip's
    /// own protocol keep their level, as registers do; lines requested through the character
    /// device are released as the kernel releases them: an output goes back to being an input
    /// (what mainline's bcm2835 pin controller does on free, and Raspberry Pi OS with
    /// `dtparam=strict_gpiod`) and rests where its pull holds it, or where it was if it has none
    /// (floating); or, modelling Raspberry Pi OS's default (`keep_released`), it keeps its level.
    fn release(&mut self, conn: u64) {
        let now = MonoTime::now().as_nanos();
        let keep = self.keep_released;
        for l in self.lines.values_mut() {
            if l.owner != Some(conn) {
                continue;
            }
            l.owner = None;
            l.debounce = None;
            if l.kernel && l.output && !keep {
                l.output = false;
                let level = l.bias.unwrap_or(l.level);
                if level != l.level {
                    if l.history.len() >= HISTORY {
                        l.history.pop_front();
                    }
                    l.history.push_back(Transition { cmd_ns: now, at_ns: now, high: level });
                    l.level = level;
                }
            }
        }
    }
}

/// The debounce timers of a chip: one thread, the earliest deadline first.
fn debounce_thread(chip: std::sync::Weak<Mutex<Chip>>, rx: std::sync::mpsc::Receiver<(MonoTime, u8, u64)>) {
    use std::cmp::Reverse;
    let mut heap: std::collections::BinaryHeap<Reverse<(MonoTime, u8, u64)>> = Default::default();
    loop {
        let next = heap.peek().map(|Reverse((t, _, _))| *t);
        let got = match next {
            None => rx.recv().map_err(|_| true),
            Some(t) => rx
                .recv_timeout(t.saturating_sub(MonoTime::now()))
                .map_err(|e| matches!(e, std::sync::mpsc::RecvTimeoutError::Disconnected)),
        };
        match got {
            Ok(item) => heap.push(Reverse(item)),
            Err(true) => return,
            Err(false) => {}
        }
        let now = MonoTime::now();
        while let Some(Reverse((t, pin, gen))) = heap.peek().copied() {
            if t > now {
                break;
            }
            heap.pop();
            let Some(chip) = chip.upgrade() else { return };
            lock(&chip).debounce_fired(pin, gen);
        }
    }
}

/// The pins of the configured hardware, for name-based world commands.
#[derive(Debug, Clone)]
struct Wiring {
    readers: HashMap<String, (u8, u8, Vec<Format>)>,
    doors: HashMap<String, DoorWiring>,
}

#[derive(Debug, Clone, Serialize)]
struct DoorWiring {
    relay: u8,
    relay_active_high: bool,
    contact: Option<(u8, bool)>,
    rex: Option<(u8, bool)>,
    fire: Option<(u8, bool)>,
}

impl Wiring {
    fn from_config(cfg: &Config) -> Wiring {
        // The lines as the simulated chip numbers them (validated for the sim backend; under the
        // fake gpiochip a config may use names the simulated chip cannot resolve: those are
        // left out of the world's wiring, with a warning).
        let pin = |l: &LineRef| match l.sim_pin() {
            Ok(p) => Some(p),
            Err(error) => {
                tracing::warn!(%error, "line not on the simulated chip");
                None
            }
        };
        let readers = cfg
            .readers
            .iter()
            .filter_map(|r| Some((r.name.clone(), (pin(&r.d0_pin)?, pin(&r.d1_pin)?, r.parsed_formats()))))
            .collect();
        let active_high = |l: crate::config::ActiveLevel| l == crate::config::ActiveLevel::High;
        let doors = cfg
            .doors
            .iter()
            .filter_map(|d| {
                Some((
                    d.name.clone(),
                    DoorWiring {
                        relay: pin(&d.relay_pin)?,
                        relay_active_high: d.relay_active_high,
                        contact: d.contact_pin.as_ref().and_then(pin).map(|p| (p, active_high(d.contact_open_level))),
                        rex: d.rex_pin.as_ref().and_then(pin).map(|p| (p, active_high(d.rex_active_level))),
                        fire: d.fire_pin.as_ref().and_then(pin).map(|p| (p, active_high(d.fire_active_level))),
                    },
                ))
            })
            .collect();
        Wiring { readers, doors }
    }
}

/// A world request, as sent by `menshen sim ...`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorldOp {
    /// Present a card to a reader (encoded in the reader's first fixed format unless given).
    Swipe {
        reader: String,
        facility: u64,
        card: u64,
        #[serde(default)]
        format: Option<String>,
    },
    /// Send raw bits, optionally with off-standard timing.
    Raw {
        reader: String,
        bits: String,
        #[serde(default)]
        pulse_us: Option<u64>,
        #[serde(default)]
        interval_us: Option<u64>,
    },
    /// Type on a keypad: `keys` of `0`-`9`, `*`, `#`, each key a burst of `bits` (4, the
    /// default, or 8), with `star_key` (10, the default, or 11) for `*`; with `bits = 26`, the
    /// digits go as one 26-bit PIN frame (a trailing `#` is dropped). `gap_ms` waits between
    /// keys (an inter-key timeout test).
    Keys {
        reader: String,
        keys: String,
        #[serde(default)]
        bits: Option<u8>,
        #[serde(default)]
        star_key: Option<u8>,
        #[serde(default)]
        gap_ms: Option<u64>,
    },
    /// Open or close a door (the contact bounces).
    Door { door: String, open: bool },
    /// Press and release the exit button.
    Rex {
        door: String,
        #[serde(default)]
        hold_ms: Option<u64>,
    },
    /// Raise or clear the fire input.
    Fire { door: String, active: bool },
    /// Force an input line to a level (a stuck line, a cut wire).
    Line { pin: u8, high: bool },
    /// Every line, and each door's relay with its history.
    State,
    /// The chip goes away (a board fault): character-device clients are cut off and new
    /// requests fail until `plug`.
    Unplug,
    /// The chip is back.
    Plug,
}

/// Serve a simulated chip for `cfg` on `socket` until `shutdown` (`menshen sim serve`).
pub async fn serve(cfg: &Config, socket: &Path, shutdown: CancellationToken) -> anyhow::Result<()> {
    SimChip::new(cfg).serve(socket, shutdown).await
}

/// A simulated chip: its lines and the configured wiring.
#[derive(Clone)]
pub struct SimChip {
    chip: Arc<Mutex<Chip>>,
    wiring: Arc<Wiring>,
}

impl SimChip {
    /// A chip with every line idle: Wiegand lines high, doors closed, buttons released.
    pub fn new(cfg: &Config) -> SimChip {
        let wiring = Arc::new(Wiring::from_config(cfg));
        let (dtx, drx) = std::sync::mpsc::channel();
        let chip = Arc::new(Mutex::new(Chip { next_conn: LOCAL, debounce_tx: Some(dtx), ..Chip::default() }));
        let weak = Arc::downgrade(&chip);
        // Without the thread, debounced lines would report nothing; a chip that cannot start
        // one cannot start the simulator either.
        if let Err(error) =
            std::thread::Builder::new().name("sim-debounce".into()).spawn(move || debounce_thread(weak, drx))
        {
            tracing::error!(%error, "simulated chip: no debounce thread");
        }
        {
            // Idle levels: Wiegand lines high, doors closed, buttons released, fire inactive.
            let mut c = lock(&chip);
            for (d0, d1, _) in wiring.readers.values() {
                c.line(*d0).level = true;
                c.line(*d1).level = true;
            }
            for d in wiring.doors.values() {
                for (pin, active_high) in [d.contact, d.rex, d.fire].into_iter().flatten() {
                    c.line(pin).level = !active_high;
                }
                // An unclaimed relay line reads as not energized.
                c.line(d.relay).level = !d.relay_active_high;
            }
        }
        SimChip { chip, wiring }
    }

    /// Model a kernel whose released outputs keep their level (see `menshen sim serve
    /// --on-release`).
    pub fn keep_released_outputs(self, keep: bool) -> SimChip {
        lock(&self.chip).keep_released = keep;
        self
    }

    /// An in-process client: edges go straight from the chip into the reader's channel, one
    /// hop, as the kernel hands a GPIO event to rppal's thread (the socket adds two more).
    pub fn local_gpio(&self) -> LocalSimGpio {
        LocalSimGpio { chip: self.chip.clone() }
    }

    /// Serve the chip on `socket` until `shutdown`.
    pub async fn serve(&self, socket: &Path, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (chip, wiring) = (self.chip.clone(), self.wiring.clone());
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        tracing::info!(socket = %socket.display(), "simulated GPIO chip serving");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                acc = listener.accept() => {
                    let (stream, _) = match acc {
                        Ok(s) => s,
                        Err(error) => { tracing::warn!(%error, "sim accept failed"); continue; }
                    };
                    let (chip, wiring) = (chip.clone(), wiring.clone());
                    tokio::spawn(async move { handle_conn(stream, chip, wiring).await });
                }
            }
        }
        let _ = std::fs::remove_file(socket);
        Ok(())
    }
}

/// The daemon's in-process handle on an embedded [`SimChip`].
#[derive(Clone)]
pub struct LocalSimGpio {
    chip: Arc<Mutex<Chip>>,
}

fn refused(pin: u8, reply: &Value) -> HwError {
    HwError::Line { line: pin.to_string(), message: reply["error"].as_str().unwrap_or("refused").to_string() }
}

/// The simulated chip's number for a configured line.
fn sim_pin(line: &LineRef) -> Result<u8, HwError> {
    line.sim_pin().map_err(|message| HwError::Line { line: line.to_string(), message })
}

fn local_claim(chip: &Arc<Mutex<Chip>>, v: Value, pin: u8) -> Result<Value, HwError> {
    let reply = chip_op(&v, LOCAL, chip);
    if reply["ok"] == json!(true) {
        Ok(reply)
    } else {
        Err(refused(pin, &reply))
    }
}

struct LocalOutput {
    chip: Arc<Mutex<Chip>>,
    pin: u8,
}

impl OutputLine for LocalOutput {
    fn set(&mut self, high: bool) -> Result<(), HwError> {
        let t = MonoTime::now().as_nanos();
        local_claim(&self.chip, json!({"op": "set", "pin": self.pin, "high": high, "t_ns": t}), self.pin).map(|_| ())
    }
}

impl Gpio for LocalSimGpio {
    /// The simulated chip does not debounce (the door core does, in software).
    fn input(&self, line: &LineRef, _debounce: Option<Duration>) -> Result<Box<dyn InputLine>, HwError> {
        let pin = sim_pin(line)?;
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.chip).local_edges.insert(pin, tx);
        local_claim(&self.chip, json!({"op": "claim_input", "pin": pin}), pin)?;
        Ok(Box::new(SimInput { level: LevelSource::Chip(self.chip.clone()), rx: Some(rx), pin }))
    }

    fn output(&self, line: &LineRef, initial_high: bool) -> Result<Box<dyn OutputLine>, HwError> {
        let pin = sim_pin(line)?;
        local_claim(&self.chip, json!({"op": "claim_output", "pin": pin, "high": initial_high}), pin)?;
        Ok(Box::new(LocalOutput { chip: self.chip.clone(), pin }))
    }
}

async fn handle_conn(stream: tokio::net::UnixStream, chip: Arc<Mutex<Chip>>, wiring: Arc<Wiring>) {
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let kill = CancellationToken::new();
    let id = {
        let mut c = lock(&chip);
        c.next_conn += 1;
        let id = c.next_conn;
        c.conns.insert(id, tx.clone());
        c.kills.insert(id, kill.clone());
        id
    };
    let writer = tokio::spawn(async move {
        while let Some(mut line) = rx.recv().await {
            line.push('\n');
            if wr.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let mut lines = TokioBufReader::new(rd).lines();
    loop {
        let line = tokio::select! {
            _ = kill.cancelled() => break,
            l = lines.next_line() => match l { Ok(Some(l)) => l, _ => break },
        };
        let reply = handle_request(&line, id, &chip, &wiring).await;
        if let Some(r) = reply {
            if tx.send(r.to_string()).is_err() {
                break;
            }
        }
    }
    // The claimant is gone: release its lines (see `Chip::release`).
    {
        let mut c = lock(&chip);
        c.conns.remove(&id);
        c.kills.remove(&id);
        c.release(id);
    }
    drop(tx);
    if kill.is_cancelled() {
        // Cut off: the client's reads see the connection end at once.
        writer.abort();
    } else {
        let _ = writer.await;
    }
}

/// A line's pull as the protocol writes it (`true`: up).
fn bias_word(up: bool) -> &'static str {
    if up {
        "pull-up"
    } else {
        "pull-down"
    }
}

fn err(msg: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": msg.to_string()})
}

async fn handle_request(line: &str, conn: u64, chip: &Arc<Mutex<Chip>>, wiring: &Arc<Wiring>) -> Option<Value> {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return Some(err(format!("bad request: {e}"))),
    };
    // Chip operations from the daemon.
    match v.get("op").and_then(Value::as_str) {
        Some("claim_input") | Some("claim_output") | Some("set") | Some("get") | Some("line_info") => {
            return Some(chip_op(&v, conn, chip))
        }
        Some("chip") => {
            let present = !lock(chip).unplugged;
            return Some(json!({"ok": true, "present": present}));
        }
        _ => {}
    }
    let op: WorldOp = match serde_json::from_value(v) {
        Ok(op) => op,
        Err(e) => return Some(err(format!("bad request: {e}"))),
    };
    Some(world_op(op, chip, wiring).await.unwrap_or_else(err))
}

fn chip_op(v: &Value, conn: u64, chip: &Arc<Mutex<Chip>>) -> Value {
    let Some(pin) = v.get("pin").and_then(Value::as_u64).and_then(|p| u8::try_from(p).ok()) else {
        return err("missing pin");
    };
    let high = v.get("high").and_then(Value::as_bool);
    let kernel = v.get("kernel").and_then(Value::as_bool).unwrap_or(false);
    let bias = v.get("bias").and_then(Value::as_str).and_then(|w| match w {
        "pull-up" => Some(true),
        "pull-down" => Some(false),
        _ => None,
    });
    let mut c = lock(chip);
    if kernel && c.unplugged {
        return err("no such device (the chip is gone)");
    }
    let line = c.line(pin);
    match v["op"].as_str() {
        Some("line_info") => {
            json!({"ok": true, "used": line.owner.is_some(), "output": line.output, "high": line.level,
                   "bias": line.bias.map(bias_word),
                   "debounce_us": line.debounce.map(|d| d.as_micros() as u64)})
        }
        Some("get") => {
            if line.owner != Some(conn) {
                return err(format!("GPIO {pin} is not claimed by this process"));
            }
            json!({"ok": true, "high": line.level})
        }
        Some("claim_input") => {
            if line.owner.is_some() {
                return err(format!("GPIO {pin} is claimed by another process"));
            }
            line.owner = Some(conn);
            line.output = false;
            line.kernel = kernel;
            if kernel {
                line.bias = bias;
                line.debounce =
                    v.get("debounce_us").and_then(Value::as_u64).filter(|us| *us > 0).map(Duration::from_micros);
                line.reported = line.level;
            }
            json!({"ok": true, "high": line.level})
        }
        Some("claim_output") => {
            if line.owner.is_some() {
                return err(format!("GPIO {pin} is claimed by another process"));
            }
            let high = high.unwrap_or(false);
            line.owner = Some(conn);
            line.output = true;
            line.kernel = kernel;
            if kernel {
                line.bias = bias;
            }
            let now = MonoTime::now().as_nanos();
            line.writes += 1;
            if line.level != high || line.history.is_empty() {
                line.level = high;
                line.history.push_back(Transition { cmd_ns: now, at_ns: now, high });
            }
            json!({"ok": true})
        }
        _ => {
            if line.owner != Some(conn) || !line.output {
                return err(format!("GPIO {pin} is not an output claimed by this process"));
            }
            let Some(high) = high else { return err("missing high") };
            let now = MonoTime::now().as_nanos();
            let cmd_ns = v.get("t_ns").and_then(Value::as_u64).unwrap_or(now);
            line.writes += 1;
            if line.level != high {
                line.level = high;
                if line.history.len() >= HISTORY {
                    line.history.pop_front();
                }
                line.history.push_back(Transition { cmd_ns, at_ns: now, high });
            }
            json!({"ok": true})
        }
    }
}

/// How a timing thread played its steps: the time of the last edge, and how late the most
/// delayed edge was driven after its scheduled time. A real reader is never late; a simulator
/// thread preempted on a loaded machine can be, and an edge late by more than the gap between
/// bits can make the daemon end a frame early.
#[derive(Debug, Clone, Copy)]
struct Played {
    last: MonoTime,
    late: Duration,
}

impl Played {
    /// The reply fields every frame-playing world command carries.
    fn fields(self, bits: Bits) -> Value {
        json!({"ok": true, "bits": bits.to_string(), "len": bits.len, "last_edge_ns": self.last.as_nanos(),
               "late_us": self.late.as_micros() as u64})
    }
}

/// Run `steps` (pin, level, delay before this step) on a timing thread; returns the time of the
/// last edge.
async fn play(chip: &Arc<Mutex<Chip>>, steps: Vec<(u8, bool, Duration)>) -> Result<Played, String> {
    play_from(chip, steps, MonoTime::now()).await
}

/// Play a Wiegand frame on a reader, after the reader's previous frame and its re-arm time.
async fn play_frame(chip: &Arc<Mutex<Chip>>, d0: u8, steps: Vec<(u8, bool, Duration)>) -> Result<Played, String> {
    let length: Duration = steps.iter().map(|s| s.2).sum();
    let start = {
        let mut c = lock(chip);
        let now = MonoTime::now();
        let start = c.reader_free_at.get(&d0).copied().filter(|t| *t > now).unwrap_or(now);
        c.reader_free_at.insert(d0, start + length + READER_REARM);
        start
    };
    play_from(chip, steps, start).await
}

/// How much higher than the rest of the simulator a timing thread asks to run (a nice value).
/// Raising priority needs CAP_SYS_NICE (root, as the test script runs); without it the thread
/// runs at the normal priority and a late edge is reported in `late_us`.
const TIMING_NICE: i32 = -10;

async fn play_from(
    chip: &Arc<Mutex<Chip>>,
    steps: Vec<(u8, bool, Duration)>,
    start: MonoTime,
) -> Result<Played, String> {
    let chip = chip.clone();
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        // Best effort: a refusal (no CAP_SYS_NICE) leaves the normal priority.
        let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), TIMING_NICE);
        let mut at = start;
        let mut played = Played { last: at, late: Duration::ZERO };
        for (pin, high, delay) in steps {
            at = at + delay;
            wait_until(at);
            played.late = played.late.max(MonoTime::now().saturating_sub(at));
            if let Some(t) = lock(&chip).drive(pin, high, at) {
                played.last = t;
            }
        }
        let _ = tx.send(played);
    });
    rx.await.map_err(|_| "timing thread failed".to_string())
}

/// Sleep most of the way, then spin the last stretch: std sleep alone overshoots by ~60 µs, more
/// than a pulse. The spin is kept short so the simulator does not steal a core from the daemon.
fn wait_until(t: MonoTime) {
    loop {
        let now = MonoTime::now();
        if now >= t {
            return;
        }
        let left = t.saturating_sub(now);
        if left > Duration::from_micros(150) {
            std::thread::sleep(left - Duration::from_micros(100));
        } else {
            std::hint::spin_loop();
        }
    }
}

fn wiegand_steps(d0: u8, d1: u8, bits: Bits, pulse: Duration, interval: Duration) -> Vec<(u8, bool, Duration)> {
    let mut rng = rand::thread_rng();
    let edges = wiegand::edges_for(bits, MonoTime::from_nanos(0), pulse, interval, |_| {
        // ±10 % jitter around the nominal interval, as real readers show.
        let j = interval.as_micros() as i64 / 10;
        Duration::from_micros(rng.gen_range(0..=(2 * j).max(0)) as u64).saturating_sub(Duration::from_micros(j as u64))
    });
    let mut prev = MonoTime::from_nanos(0);
    edges
        .into_iter()
        .map(|e| {
            let pin = if e.line == wiegand::Line::D1 { d1 } else { d0 };
            let delay = e.at.saturating_sub(prev);
            prev = e.at;
            (pin, e.high, delay)
        })
        .collect()
}

/// Contact bounce: a few flips 0.2–1.5 ms apart, ending at `final_high`.
fn bounce_steps(pin: u8, final_high: bool) -> Vec<(u8, bool, Duration)> {
    let mut rng = rand::thread_rng();
    let flips = rng.gen_range(2..=4) * 2 + 1;
    (0..flips)
        .map(|i| {
            let level = if i % 2 == 0 { final_high } else { !final_high };
            let delay = if i == 0 { Duration::ZERO } else { Duration::from_micros(rng.gen_range(200..1500)) };
            (pin, level, delay)
        })
        .collect()
}

async fn world_op(op: WorldOp, chip: &Arc<Mutex<Chip>>, wiring: &Arc<Wiring>) -> Result<Value, String> {
    let door = |name: &str| wiring.doors.get(name).cloned().ok_or_else(|| format!("no door `{name}`"));
    let reader = |name: &str| wiring.readers.get(name).cloned().ok_or_else(|| format!("no reader `{name}`"));
    match op {
        WorldOp::Swipe { reader: r, facility, card, format } => {
            let (d0, d1, formats) = reader(&r)?;
            let format = match format {
                Some(f) => f.parse::<Format>()?,
                None => formats
                    .iter()
                    .copied()
                    .find(|f| f.bits().is_some())
                    .ok_or("this reader has only the raw format; use `sim raw`")?,
            };
            let bits = wiegand::encode(format, facility, card).map_err(|e| e.to_string())?;
            let steps = wiegand_steps(d0, d1, bits, Duration::from_micros(50), Duration::from_millis(2));
            Ok(play_frame(chip, d0, steps).await?.fields(bits))
        }
        WorldOp::Raw { reader: r, bits, pulse_us, interval_us } => {
            let (d0, d1, _) = reader(&r)?;
            let bits = Bits::parse(&bits)?;
            let pulse = Duration::from_micros(pulse_us.unwrap_or(50));
            let interval = Duration::from_micros(interval_us.unwrap_or(2_000));
            if pulse >= interval || interval > Duration::from_secs(1) {
                return Err("pulse_us must be below interval_us, and interval_us at most 1 s".into());
            }
            Ok(play_frame(chip, d0, wiegand_steps(d0, d1, bits, pulse, interval)).await?.fields(bits))
        }
        WorldOp::Keys { reader: r, keys, bits, star_key, gap_ms } => {
            let (d0, d1, _) = reader(&r)?;
            let map = if star_key == Some(11) { keypad::StarHash::HashTen } else { keypad::StarHash::StarTen };
            let frames: Vec<Bits> = match bits.unwrap_or(4) {
                26 => {
                    let digits = keys.trim_end_matches('#');
                    let n: u64 = digits.parse().map_err(|_| "a 26-bit PIN frame carries digits only")?;
                    vec![wiegand::encode(Format::H10301, 0, n).map_err(|_| "a 26-bit PIN frame holds at most 65535")?]
                }
                len => keys
                    .chars()
                    .map(|c| keypad::key_of(c).and_then(|k| keypad::encode_key(map, k, len)))
                    .collect::<Option<_>>()
                    .ok_or("keys are 0-9, * and #, in bursts of 4, 8 or 26 bits")?,
            };
            let mut last = None;
            for (i, b) in frames.iter().enumerate() {
                if i > 0 {
                    if let Some(ms) = gap_ms {
                        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
                    }
                }
                let steps = wiegand_steps(d0, d1, *b, Duration::from_micros(50), Duration::from_millis(2));
                last = Some(play_frame(chip, d0, steps).await?.fields(*b));
            }
            last.ok_or_else(|| "no keys".to_string())
        }
        WorldOp::Door { door: d, open } => {
            let (pin, open_high) = door(&d)?.contact.ok_or("this door has no contact")?;
            play(chip, bounce_steps(pin, open == open_high)).await?;
            Ok(json!({"ok": true}))
        }
        WorldOp::Rex { door: d, hold_ms } => {
            let (pin, active_high) = door(&d)?.rex.ok_or("this door has no exit button")?;
            let mut steps = bounce_steps(pin, active_high);
            let mut release = bounce_steps(pin, !active_high);
            release[0].2 = Duration::from_millis(hold_ms.unwrap_or(300).min(10_000));
            steps.extend(release);
            play(chip, steps).await?;
            Ok(json!({"ok": true}))
        }
        WorldOp::Fire { door: d, active } => {
            let (pin, active_high) = door(&d)?.fire.ok_or("this door has no fire input")?;
            play(chip, bounce_steps(pin, active == active_high)).await?;
            Ok(json!({"ok": true}))
        }
        WorldOp::Line { pin, high } => {
            let changed = lock(chip).drive(pin, high, MonoTime::now()).is_some();
            Ok(json!({"ok": true, "changed": changed}))
        }
        WorldOp::Unplug => {
            let mut c = lock(chip);
            c.unplugged = true;
            let kernel_conns: std::collections::HashSet<u64> =
                c.lines.values().filter(|l| l.kernel).filter_map(|l| l.owner).collect();
            for id in &kernel_conns {
                if let Some(k) = c.kills.get(id) {
                    k.cancel();
                }
            }
            Ok(json!({"ok": true, "cut": kernel_conns.len()}))
        }
        WorldOp::Plug => {
            lock(chip).unplugged = false;
            Ok(json!({"ok": true}))
        }
        WorldOp::State => {
            let c = lock(chip);
            let mut lines = serde_json::Map::new();
            let mut pins: Vec<_> = c.lines.keys().copied().collect();
            pins.sort_unstable();
            for p in pins {
                let l = &c.lines[&p];
                let mut entry = json!({"high": l.level, "output": l.output, "claimed": l.owner.is_some()});
                if l.kernel {
                    entry["bias"] = json!(l.bias.map(bias_word));
                    entry["debounce_us"] = json!(l.debounce.map(|d| d.as_micros() as u64));
                }
                if !l.history.is_empty() {
                    entry["transitions"] =
                        l.history.iter().map(|t| json!({"at_ns": t.at_ns, "high": t.high})).collect::<Vec<_>>().into();
                }
                lines.insert(p.to_string(), entry);
            }
            let mut doors = serde_json::Map::new();
            for (name, d) in wiring.doors.iter() {
                let l = c.lines.get(&d.relay).cloned().unwrap_or_default();
                doors.insert(
                    name.clone(),
                    json!({
                        "relay_pin": d.relay,
                        "relay_energized": l.level == d.relay_active_high,
                        "relay_claimed": l.owner.is_some(),
                        "relay_writes": l.writes,
                        "transitions": l.history.iter().map(|t| json!({
                            "cmd_ns": t.cmd_ns, "at_ns": t.at_ns, "energized": t.high == d.relay_active_high
                        })).collect::<Vec<_>>(),
                    }),
                );
            }
            Ok(json!({"ok": true, "now_ns": MonoTime::now().as_nanos(), "lines": lines, "doors": doors}))
        }
    }
}

/// Send one world request and wait for its reply (used by `menshen sim ...` and tests).
pub fn request(socket: &Path, op: &WorldOp) -> Result<Value, String> {
    let mut s = StdUnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the simulated chip at {}: {e} (is the daemon or `menshen sim serve` running?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_string(op).map_err(|e| e.to_string())?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&reply).map_err(|e| format!("bad reply: {e}"))?;
    if v["ok"] == json!(true) {
        Ok(v)
    } else {
        Err(v["error"].as_str().unwrap_or("unknown error").to_string())
    }
}

// ---- the daemon's side -----------------------------------------------------------------------

type Waiters = Arc<Mutex<VecDeque<std::sync::mpsc::Sender<Value>>>>;
/// Where the socket client delivers a claimed input's edges, and the level it keeps for it.
type EdgeSlot = (mpsc::UnboundedSender<Edge>, Arc<Mutex<bool>>);

/// The daemon's handle on the simulated chip.
pub struct SimGpio {
    writer: Mutex<StdUnixStream>,
    waiters: Waiters,
    edge_txs: Arc<Mutex<HashMap<u8, EdgeSlot>>>,
    socket: PathBuf,
}

impl SimGpio {
    /// Connect, retrying for up to `wait` (the chip may be starting).
    pub fn connect(socket: &Path, wait: Duration) -> Result<SimGpio, HwError> {
        let deadline = MonoTime::now() + wait;
        let stream = loop {
            match StdUnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if MonoTime::now() >= deadline => {
                    return Err(HwError::Chip(format!("simulated chip at {}: {e}", socket.display())))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let reader = stream.try_clone().map_err(|e| HwError::Chip(e.to_string()))?;
        let waiters: Waiters = Arc::default();
        let edge_txs: Arc<Mutex<HashMap<u8, EdgeSlot>>> = Arc::default();
        let (w, e) = (waiters.clone(), edge_txs.clone());
        std::thread::Builder::new()
            .name("sim-gpio-rx".into())
            .spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                    if let Some(edge) = v.get("edge") {
                        let pin = edge["pin"].as_u64().and_then(|p| u8::try_from(p).ok());
                        let high = edge["high"].as_bool();
                        let t = edge["t_ns"].as_u64();
                        if let (Some(pin), Some(high), Some(t)) = (pin, high, t) {
                            if let Some((tx, level)) = e.lock().unwrap_or_else(|p| p.into_inner()).get(&pin) {
                                *level.lock().unwrap_or_else(|p| p.into_inner()) = high;
                                let _ = tx.send(Edge { high, at: MonoTime::from_nanos(t) });
                            }
                        }
                    } else if let Some(waiter) = w.lock().unwrap_or_else(|p| p.into_inner()).pop_front() {
                        let _ = waiter.send(v);
                    }
                }
            })
            .map_err(|e| HwError::Chip(e.to_string()))?;
        Ok(SimGpio { writer: Mutex::new(stream), waiters, edge_txs, socket: socket.to_path_buf() })
    }

    fn send(&self, v: Value, want_reply: bool) -> Result<Option<Value>, HwError> {
        let mut line = v.to_string();
        line.push('\n');
        let (tx, rx) = std::sync::mpsc::channel();
        {
            // Queue the waiter and write under one lock so replies pair up in order.
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            self.waiters.lock().unwrap_or_else(|p| p.into_inner()).push_back(tx);
            w.write_all(line.as_bytes())
                .map_err(|e| HwError::Chip(format!("simulated chip at {}: {e}", self.socket.display())))?;
        }
        if !want_reply {
            return Ok(None);
        }
        rx.recv_timeout(Duration::from_secs(5))
            .map(Some)
            .map_err(|_| HwError::Chip("simulated chip did not answer".into()))
    }

    fn claim(&self, v: Value, pin: u8) -> Result<Value, HwError> {
        let reply = self.send(v, true)?.unwrap_or_default();
        if reply["ok"] == json!(true) {
            Ok(reply)
        } else {
            Err(refused(pin, &reply))
        }
    }
}

/// Where an input line's current level comes from.
enum LevelSource {
    /// Kept up to date from the edges the socket client receives.
    Tracked(Arc<Mutex<bool>>),
    /// Read from the in-process chip itself.
    Chip(Arc<Mutex<Chip>>),
}

struct SimInput {
    level: LevelSource,
    rx: Option<mpsc::UnboundedReceiver<Edge>>,
    pin: u8,
}

impl InputLine for SimInput {
    fn level(&self) -> Result<bool, HwError> {
        Ok(match &self.level {
            LevelSource::Tracked(l) => *l.lock().unwrap_or_else(|p| p.into_inner()),
            LevelSource::Chip(c) => lock(c).lines.get(&self.pin).is_none_or(|l| l.level),
        })
    }

    fn edges(&mut self) -> Result<mpsc::UnboundedReceiver<Edge>, HwError> {
        self.rx.take().ok_or(HwError::Line { line: self.pin.to_string(), message: "edges already taken".into() })
    }
}

struct SimOutput {
    gpio: Arc<SimGpio>,
    pin: u8,
}

impl OutputLine for SimOutput {
    fn set(&mut self, high: bool) -> Result<(), HwError> {
        let t = MonoTime::now().as_nanos();
        self.gpio.send(json!({"op": "set", "pin": self.pin, "high": high, "t_ns": t}), false)?;
        Ok(())
    }
}

/// [`SimGpio`] shared by the lines it hands out.
#[derive(Clone)]
pub struct SharedSimGpio(pub Arc<SimGpio>);

impl Gpio for SharedSimGpio {
    fn input(&self, line: &LineRef, _debounce: Option<Duration>) -> Result<Box<dyn InputLine>, HwError> {
        let pin = sim_pin(line)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let level = Arc::new(Mutex::new(true));
        self.0.edge_txs.lock().unwrap_or_else(|p| p.into_inner()).insert(pin, (tx, level.clone()));
        let reply = self.0.claim(json!({"op": "claim_input", "pin": pin}), pin)?;
        *level.lock().unwrap_or_else(|p| p.into_inner()) = reply["high"].as_bool().unwrap_or(true);
        Ok(Box::new(SimInput { level: LevelSource::Tracked(level), rx: Some(rx), pin }))
    }

    fn output(&self, line: &LineRef, initial_high: bool) -> Result<Box<dyn OutputLine>, HwError> {
        let pin = sim_pin(line)?;
        self.0.claim(json!({"op": "claim_output", "pin": pin, "high": initial_high}), pin)?;
        Ok(Box::new(SimOutput { gpio: self.0.clone(), pin }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_reports_its_current_level_and_delivers_stamped_edges() {
        let cfg = crate::config::parse(crate::config::DEFAULT_CONFIG).unwrap();
        let chip = SimChip::new(&cfg);
        let gpio = chip.local_gpio();
        let mut d0 = gpio.input(&17.into(), None).unwrap();
        let mut edges = d0.edges().unwrap();
        assert!(d0.level().unwrap(), "Wiegand lines idle high");
        let at = MonoTime::from_nanos(42);
        assert_eq!(lock(&chip.chip).drive(17, false, at), Some(at));
        assert!(!d0.level().unwrap(), "the level follows the line");
        assert_eq!(edges.try_recv().unwrap(), Edge { high: false, at });
        // A second claim of a claimed line is refused, as the kernel refuses it.
        assert!(gpio.input(&"GPIO17".to_string().into(), None).is_err());
        // An output records its transitions and refuses claims by others.
        let mut relay = gpio.output(&22.into(), false).unwrap();
        relay.set(true).unwrap();
        let c = lock(&chip.chip);
        let line = &c.lines[&22];
        assert!(line.level && line.output);
        assert_eq!(line.history.back().map(|t| t.high), Some(true));
    }

    /// The kernel model (claims from the fake gpiochip): debounce reports a bouncing line once,
    /// after it settles, stamped when the timer fired; a released output becomes an input that
    /// rests at its pull.
    #[test]
    fn kernel_claims_debounce_and_are_released_as_the_kernel_releases_them() {
        let cfg = crate::config::parse(crate::config::DEFAULT_CONFIG).unwrap();
        let chip = SimChip::new(&cfg);
        let (tx, mut rx) = mpsc::unbounded_channel();
        {
            let mut c = lock(&chip.chip);
            c.next_conn = 1;
            c.conns.insert(1, tx);
        }
        let claim = json!({"op": "claim_input", "pin": 23, "kernel": true, "bias": "pull-up", "debounce_us": 20_000});
        assert_eq!(chip_op(&claim, 1, &chip.chip)["ok"], true);
        let start = MonoTime::now();
        let idle = lock(&chip.chip).lines[&23].level;
        for i in 0..5u64 {
            // Five flips 1 ms apart, ending away from the idle level.
            let high = if i % 2 == 0 { !idle } else { idle };
            assert!(lock(&chip.chip).drive(23, high, start + Duration::from_millis(i)).is_some());
        }
        std::thread::sleep(Duration::from_millis(80));
        let mut edges = Vec::new();
        while let Ok(m) = rx.try_recv() {
            edges.push(serde_json::from_str::<Value>(&m).unwrap());
        }
        assert_eq!(edges.len(), 1, "one settled edge for a bounce: {edges:?}");
        assert_eq!(edges[0]["edge"]["high"], !idle);
        let t = edges[0]["edge"]["t_ns"].as_u64().unwrap();
        assert!(t >= (start + Duration::from_millis(24)).as_nanos(), "stamped when the debounce timer fired");

        let out = json!({"op": "claim_output", "pin": 22, "high": true, "kernel": true, "bias": "pull-down"});
        assert_eq!(chip_op(&out, 1, &chip.chip)["ok"], true);
        let mut c = lock(&chip.chip);
        c.release(1);
        let relay = &c.lines[&22];
        assert!(!relay.output && !relay.level && relay.owner.is_none(), "an input, held low by its pull");
        assert!(c.lines[&23].owner.is_none());
    }
}
