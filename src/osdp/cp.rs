//! The control panel shell: libosdp's CP for one reader on a serial port (an RS-485 adapter, or
//! a pty in the tests), on a thread of its own (libosdp wants `refresh` at least every 50 ms and
//! does not block). Every byte in both directions also goes through [`wire::Scanner`], so bad
//! frames and replies out of sequence are counted and a card read's reply frame is timed.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libosdp::{
    Channel, ChannelError, ControlPanel, ControlPanelBuilder, OsdpCommand, OsdpCommandBuzzer, OsdpCommandKeyset,
    OsdpCommandLed, OsdpEvent, OsdpFlag, OsdpLedColor, OsdpLedParams, OsdpStatusReportType, PdInfoBuilder,
};
use tokio::sync::mpsc::UnboundedSender;

use super::wire::{self, Bad, Scanner, Seen, Sequence};
use super::{Led, LinkStatus, Show};
use crate::clock::MonoTime;

/// How often the CP thread runs libosdp (OSDP asks for at least every 50 ms).
pub const REFRESH: Duration = Duration::from_millis(5);
/// A reader that sent no good frame for this long is not `answering` (libosdp polls about ten
/// times a second, and itself keeps a silent reader online for 8 s of probes).
const ANSWER_WINDOW: Duration = Duration::from_millis(500);
/// A reader that answered within this long is `heard`: it is there, whatever fails. A reader
/// whose handshake fails answers once per restart ([`RESTART_AFTER`]).
const HEARD_WINDOW: Duration = Duration::from_millis(1500);
/// A frame half read when the line has been quiet this long is truncated.
const QUIET: Duration = Duration::from_millis(100);

/// One reader's port and keys.
#[derive(Debug, Clone)]
pub struct CpParams {
    pub name: String,
    pub device: PathBuf,
    pub baud: u32,
    pub address: u8,
    /// The reader's Secure Channel base key; `None` only for an `insecure` reader or install.
    pub key: Option<[u8; 16]>,
    /// Plain mode allowed (`insecure = true`): no key, Secure Channel not enforced.
    pub insecure: bool,
    /// Install mode: the public default key (SCBK-D) for one session, to set a key.
    pub install: bool,
}

/// What the reader gave, for the stage.
#[derive(Debug, Clone)]
pub enum FromReader {
    /// A card read (Wiegand bits, MSB first), timed at its reply frame.
    Card {
        nr_bits: usize,
        data: Vec<u8>,
        at: MonoTime,
    },
    /// Key presses (one byte each), timed at their reply frame.
    Keys {
        keys: Vec<u8>,
        at: MonoTime,
    },
    /// The reader's tamper switch (local status report).
    Tamper(bool),
    Link(LinkStatus),
    /// Bytes on the bus that were no frame, or a frame with a bad check.
    Bad(Bad),
    /// A reply that answers no command sent (out of sequence, or a replay).
    OutOfSequence,
}

/// What the stage asks of the reader.
#[derive(Debug, Clone)]
pub enum ToReader {
    Show(Show),
    /// Set a new Secure Channel base key (install).
    KeySet([u8; 16]),
}

#[derive(Default)]
struct Tap {
    rx: Scanner,
    tx: Scanner,
    seq: Sequence,
    seen: Vec<FromReader>,
    last_reply: Option<MonoTime>,
    last_read_reply: Option<MonoTime>,
    last_byte: Option<MonoTime>,
    claims_secure: Option<bool>,
}

impl Tap {
    fn took(&mut self, found: Vec<Seen>, reply_side: bool, now: MonoTime) {
        for s in found {
            match s {
                Seen::Bad(b) => self.seen.push(FromReader::Bad(b)),
                Seen::Packet(p) if reply_side => {
                    if !p.reply {
                        // A command on the replies' side: another CP, or an echo. Not from the reader.
                        self.seen.push(FromReader::OutOfSequence);
                        continue;
                    }
                    if !self.seq.reply_in_sequence(&p) {
                        self.seen.push(FromReader::OutOfSequence);
                    }
                    self.last_reply = Some(now);
                    if p.code == wire::REPLY_RAW || p.code == wire::REPLY_KEYPAD {
                        self.last_read_reply = Some(now);
                    }
                    if let Some(c) = p.claims_secure_channel() {
                        self.claims_secure = Some(c);
                    }
                }
                Seen::Packet(p) => self.seq.command(&p),
            }
        }
    }
}

/// The serial port as a libosdp channel: non-blocking reads and writes, tapped.
struct Port {
    fd: OwnedFd,
    id: i32,
    tap: Arc<Mutex<Tap>>,
}

impl Channel for Port {
    fn get_id(&self) -> i32 {
        self.id
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        match rustix::io::read(&self.fd, &mut *buf) {
            Ok(n) => {
                if n > 0 {
                    let now = MonoTime::now();
                    let mut found = Vec::new();
                    let mut tap = self.tap.lock().unwrap_or_else(|p| p.into_inner());
                    tap.rx.push(&buf[..n], &mut found);
                    tap.last_byte = Some(now);
                    tap.took(found, true, now);
                }
                Ok(n)
            }
            Err(rustix::io::Errno::AGAIN) => Ok(0),
            // A pty whose other side is closed reads EIO: the reader is gone, like a cable out.
            Err(rustix::io::Errno::IO) => Ok(0),
            Err(_) => Err(ChannelError::TransportError),
        }
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, ChannelError> {
        match rustix::io::write(&self.fd, buf) {
            Ok(n) => {
                let mut found = Vec::new();
                let mut tap = self.tap.lock().unwrap_or_else(|p| p.into_inner());
                tap.tx.push(&buf[..n], &mut found);
                tap.took(found, false, MonoTime::now());
                Ok(n)
            }
            Err(rustix::io::Errno::AGAIN) => Err(ChannelError::WouldBlock),
            Err(rustix::io::Errno::IO) => Ok(buf.len()),
            Err(_) => Err(ChannelError::TransportError),
        }
    }

    fn flush(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }

    fn close(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
}

/// Open a serial port raw (8N1, no flow control) at `baud`, non-blocking.
pub fn open_port(device: &Path, baud: u32) -> anyhow::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};
    let fd =
        rustix::fs::open(device, OFlags::RDWR | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| anyhow::anyhow!("{}: {e}", device.display()))?;
    let mut t = tcgetattr(&fd).map_err(|e| anyhow::anyhow!("{}: not a serial port ({e})", device.display()))?;
    t.make_raw();
    t.set_speed(baud).map_err(|e| anyhow::anyhow!("{}: baud rate {baud}: {e}", device.display()))?;
    tcsetattr(&fd, OptionalActions::Now, &t).map_err(|e| anyhow::anyhow!("{}: {e}", device.display()))?;
    Ok(fd)
}

fn led_command(s: Show) -> OsdpCommand {
    let color = match s.led {
        Led::Green => OsdpLedColor::Green,
        Led::Red => OsdpLedColor::Red,
        Led::Amber => OsdpLedColor::Amber,
    };
    // Temporary state (control code 2): on for the whole timer, then back to the permanent one.
    let temporary = OsdpLedParams {
        control_code: 2,
        on_count: s.led_tenths,
        off_count: 0,
        on_color: color,
        off_color: OsdpLedColor::None,
        timer_count: s.led_tenths as u16,
    };
    OsdpCommand::Led(OsdpCommandLed { reader: 0, led_number: 0, temporary, permanent: OsdpLedParams::default() })
}

fn buzzer_command(s: Show) -> OsdpCommand {
    OsdpCommand::Buzzer(OsdpCommandBuzzer {
        reader: 0,
        control_code: 2,
        on_count: s.beep_tenths,
        off_count: s.beep_tenths,
        rep_count: s.beeps,
    })
}

/// A running control panel: send it commands, stop it.
pub struct CpHandle {
    pub commands: std::sync::mpsc::Sender<ToReader>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CpHandle {
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CpHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// libosdp's control panel for one reader, over `fd`.
fn build(
    p: &CpParams,
    fd: &OwnedFd,
    tap: &Arc<Mutex<Tap>>,
    events: &Arc<Mutex<Vec<OsdpEvent>>>,
) -> anyhow::Result<ControlPanel> {
    let port = Port { fd: fd.try_clone()?, id: 0, tap: tap.clone() };
    let mut flags = OsdpFlag::empty();
    if p.install {
        flags |= OsdpFlag::InstallMode;
    } else if !p.insecure {
        flags |= OsdpFlag::EnforceSecure;
    }
    let mut info = PdInfoBuilder::new()
        .name(&p.name)
        .and_then(|b| b.address(p.address as i32))
        .and_then(|b| b.baud_rate(p.baud as i32))
        .map_err(|e| anyhow::anyhow!("reader {}: {e:?}", p.name))?
        .flag(flags);
    if let Some(k) = p.key {
        info = info.secure_channel_key(k);
    }
    let mut cp = ControlPanelBuilder::new()
        .add_channel(Box::new(port), vec![info])
        .build()
        .map_err(|e| anyhow::anyhow!("reader {}: libosdp control panel: {e:?}", p.name))?;
    let sink = events.clone();
    cp.set_event_callback(move |_pd, e| {
        sink.lock().unwrap_or_else(|p| p.into_inner()).push(e);
        0
    });
    Ok(cp)
}

/// Start libosdp's control panel for one reader on its own thread. What the reader gives goes
/// to `out`; the thread ends when `out` closes or the handle is stopped.
pub fn start(p: CpParams, out: UnboundedSender<FromReader>) -> anyhow::Result<CpHandle> {
    let fd = open_port(&p.device, p.baud)?;
    let tap = Arc::new(Mutex::new(Tap::default()));
    let events: Arc<Mutex<Vec<OsdpEvent>>> = Arc::default();
    let cp = build(&p, &fd, &tap, &events)?;
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<ToReader>();
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("osdp:{}", p.name))
        .spawn(move || run(Session { p, fd, cp, tap, events }, cmd_rx, out, stopping))?;
    Ok(CpHandle { commands: cmd_tx, stop, thread: Some(thread) })
}

struct Session {
    p: CpParams,
    fd: OwnedFd,
    cp: ControlPanel,
    tap: Arc<Mutex<Tap>>,
    events: Arc<Mutex<Vec<OsdpEvent>>>,
}

/// libosdp takes a reader offline for 300 s after one bad frame or one unanswered poll; a gate
/// must not lose its reader for five minutes to a noise burst or a loose plug. A reader not
/// usable for this long gets a new control panel (a new handshake) instead.
const RESTART_AFTER: Duration = Duration::from_millis(1000);

fn run(
    mut s: Session,
    commands: std::sync::mpsc::Receiver<ToReader>,
    out: UnboundedSender<FromReader>,
    stop: Arc<AtomicBool>,
) {
    let mut last = LinkStatus::default();
    let mut sent_first = false;
    let mut down_since: Option<MonoTime> = Some(MonoTime::now());
    while !stop.load(Ordering::Relaxed) && !out.is_closed() {
        while let Ok(c) = commands.try_recv() {
            let cmds = match c {
                ToReader::Show(s) if s.beeps > 0 => vec![led_command(s), buzzer_command(s)],
                ToReader::Show(s) => vec![led_command(s)],
                ToReader::KeySet(k) => vec![OsdpCommand::KeySet(OsdpCommandKeyset::new_scbk(k))],
            };
            for c in cmds {
                // Refused while the reader is offline: feedback then has nowhere to go.
                let _ = s.cp.send_command(0, c);
            }
        }
        s.cp.refresh();
        let now = MonoTime::now();
        let (seen, read_at, status) = {
            let mut t = s.tap.lock().unwrap_or_else(|p| p.into_inner());
            if t.rx.pending() && t.last_byte.is_some_and(|b| now.saturating_sub(b) >= QUIET) {
                let mut found = Vec::new();
                t.rx.flush(&mut found);
                t.took(found, true, now);
            }
            let status = LinkStatus {
                online: s.cp.is_online(0),
                secure: s.cp.is_sc_active(0),
                answering: t.last_reply.is_some_and(|r| now.saturating_sub(r) < ANSWER_WINDOW),
                heard: t.last_reply.is_some_and(|r| now.saturating_sub(r) < HEARD_WINDOW),
                claims_secure: t.claims_secure,
            };
            (std::mem::take(&mut t.seen), t.last_read_reply.unwrap_or(now), status)
        };
        for m in seen {
            let _ = out.send(m);
        }
        let evs = std::mem::take(&mut *s.events.lock().unwrap_or_else(|p| p.into_inner()));
        for e in evs {
            let msg = match e {
                OsdpEvent::CardRead(c) => FromReader::Card { nr_bits: c.nr_bits, data: c.data, at: read_at },
                OsdpEvent::KeyPress(k) => FromReader::Keys { keys: k.data, at: read_at },
                OsdpEvent::Status(st) if st.type_ == OsdpStatusReportType::Local => {
                    FromReader::Tamper(st.nr_entries > 0 && st.report[0] != 0)
                }
                _ => continue,
            };
            let _ = out.send(msg);
        }
        if status != last || !sent_first {
            let _ = out.send(FromReader::Link(status));
            last = status;
            sent_first = true;
        }
        let usable = status.online && status.answering && (status.secure || s.p.insecure);
        match (usable, down_since) {
            (true, _) => down_since = None,
            (false, None) => down_since = Some(now),
            (false, Some(t)) if now.saturating_sub(t) >= RESTART_AFTER => {
                // The port afresh too: a USB adapter pulled out and put back is a new device.
                if let Ok(fd) = open_port(&s.p.device, s.p.baud) {
                    s.fd = fd;
                }
                // A reply still on its way to the old session would be out of sequence for the
                // new one (which would then go offline in turn): let it land, and drop it.
                std::thread::sleep(QUIET);
                let _ = rustix::termios::tcflush(&s.fd, rustix::termios::QueueSelector::IFlush);
                s.tap.lock().unwrap_or_else(|p| p.into_inner()).rx = Scanner::new();
                match build(&s.p, &s.fd, &s.tap, &s.events) {
                    Ok(cp) => s.cp = cp,
                    Err(error) => tracing::warn!(reader = %s.p.name, %error, "OSDP control panel restart"),
                }
                down_since = Some(now);
            }
            _ => {}
        }
        wait_for_bytes(&s.fd);
    }
}

/// Sleep until the reader's bytes arrive or [`REFRESH`] has passed, whichever is first: a reply
/// is handed to libosdp as soon as it is on the port, not at the next tick. After a wake for
/// bytes the next wait is at least a little one, so bytes libosdp leaves unread cannot spin it.
/// (A USB adapter pulled out: the reader is `reader_offline`; each restart opens the port again,
/// so the adapter plugged back in is taken within a second.)
fn wait_for_bytes(fd: &OwnedFd) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let timeout = Timespec { tv_sec: 0, tv_nsec: REFRESH.as_nanos() as i64 };
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    match poll(&mut fds, Some(&timeout)) {
        Ok(0) => {}
        // Bytes to read.
        Ok(_) if fds[0].revents() == PollFlags::IN => std::thread::sleep(Duration::from_micros(100)),
        // A port that hangs up or errs (an adapter pulled out) stays "ready": wait the tick.
        _ => std::thread::sleep(REFRESH),
    }
}
