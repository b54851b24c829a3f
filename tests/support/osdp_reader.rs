//! A real OSDP reader for the tests and the bench: libosdp in peripheral-device mode on its own
//! thread, on the master side of a pty pair whose slave the daemon opens as its serial port.
//! It can read cards and keys, be unplugged, put raw bytes on the bus, and (as a man in the
//! middle would) rewrite its capability reply to claim no Secure Channel.
#![allow(dead_code)] // each user takes what it needs

use libosdp::{
    Channel, ChannelError, OsdpCommand, OsdpEvent, OsdpEventCardRead, OsdpEventKeyPress, OsdpFlag, PdCapEntity,
    PdCapability, PdInfoBuilder, PeripheralDevice,
};
use menshen::osdp::wire::{self, Scanner, Seen};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The test reader's OSDP address.
pub const ADDRESS: u8 = 3;

/// A pty pair: the daemon opens `path` (the slave), the reader talks on `master`.
pub struct Pty {
    pub master: OwnedFd,
    pub path: String,
    /// Held open so the line keeps its raw settings and the master never reads EIO.
    _slave: OwnedFd,
}

pub fn pty() -> Pty {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let path = ptsname(&master, Vec::new()).unwrap().into_string().unwrap();
    let slave = rustix::fs::open(
        path.as_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let mut t = rustix::termios::tcgetattr(&slave).unwrap();
    t.make_raw();
    rustix::termios::tcsetattr(&slave, rustix::termios::OptionalActions::Now, &t).unwrap();
    rustix::fs::fcntl_setfl(&master, rustix::fs::OFlags::NONBLOCK).unwrap();
    Pty { master, path, _slave: slave }
}

/// How the test reader behaves.
#[derive(Clone, Copy)]
pub struct PdOpts {
    /// Its Secure Channel key; `None`: a new reader in install mode (the install key, SCBK-D).
    pub key: Option<[u8; 16]>,
    /// A man in the middle rewrites its capability reply to claim no Secure Channel.
    pub downgrade: bool,
}

pub enum Ctl {
    Event(OsdpEvent),
    /// Stop answering (the cable pulled) or answer again.
    Unplug(bool),
    /// Write these bytes onto the bus.
    Raw(Vec<u8>),
}

/// The reader's side of the bus.
struct Bus {
    fd: Arc<OwnedFd>,
    unplugged: Arc<Mutex<bool>>,
    downgrade: bool,
    /// Every reply the reader sent, for the replay test.
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    last_read_ns: Arc<std::sync::atomic::AtomicU64>,
}

impl Channel for Bus {
    fn get_id(&self) -> i32 {
        1
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        match rustix::io::read(self.fd.as_fd(), &mut *buf) {
            Ok(n) if *self.unplugged.lock().unwrap() => {
                let _ = n; // a pulled cable: the bytes never reach the reader
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(rustix::io::Errno::AGAIN) => Ok(0),
            Err(_) => Err(ChannelError::TransportError),
        }
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, ChannelError> {
        if *self.unplugged.lock().unwrap() {
            return Ok(buf.len());
        }
        let mut out = buf.to_vec();
        if self.downgrade {
            out = downgrade(buf);
        }
        rustix::io::write(self.fd.as_fd(), &out).map_err(|_| ChannelError::TransportError)?;
        if is_read(&out) {
            self.last_read_ns.store(menshen::clock::MonoTime::now().as_nanos(), std::sync::atomic::Ordering::SeqCst);
        }
        self.sent.lock().unwrap().push(out);
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
    fn close(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
}

/// A reply frame carrying a card read (osdp_RAW, plain or under Secure Channel).
pub fn is_read(frame: &[u8]) -> bool {
    let mut s = Scanner::new();
    let mut seen = Vec::new();
    s.push(frame, &mut seen);
    matches!(seen.as_slice(), [Seen::Packet(p)] if p.reply && p.code == wire::REPLY_RAW)
}

/// The DEF CON 31 downgrade: the capability reply rewritten to say "no Secure Channel", with a
/// fresh CRC so that it passes as genuine.
fn downgrade(buf: &[u8]) -> Vec<u8> {
    let mut s = Scanner::new();
    let mut seen = Vec::new();
    s.push(buf, &mut seen);
    match seen.as_slice() {
        [Seen::Packet(p)] if p.reply && p.code == wire::REPLY_PDCAP => {
            let mut data = p.data.clone().unwrap();
            for c in data.chunks_exact_mut(3) {
                if c[0] == wire::CAP_COMMUNICATION_SECURITY {
                    c[1] = 0;
                }
            }
            wire::packet(p.address, true, p.sqn, p.code, &data)
        }
        _ => buf.to_vec(),
    }
}

/// A real OSDP reader (libosdp PD) on its own thread.
pub struct Reader {
    pub ctl: mpsc::Sender<Ctl>,
    commands: mpsc::Receiver<OsdpCommand>,
    seen: Vec<OsdpCommand>,
    _pty: Arc<Pty>,
    stop: Arc<Mutex<bool>>,
    pub sent: Arc<Mutex<Vec<Vec<u8>>>>,
    /// When the last reply carrying a card read was written onto the bus (CLOCK_MONOTONIC ns).
    pub last_read_ns: Arc<std::sync::atomic::AtomicU64>,
}

impl Reader {
    pub fn start(pty: Pty, o: PdOpts) -> Reader {
        let pty = Arc::new(pty);
        let fd = Arc::new(pty.master.try_clone().unwrap());
        let unplugged = Arc::new(Mutex::new(false));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let last_read_ns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let bus = Bus {
            fd: fd.clone(),
            unplugged: unplugged.clone(),
            downgrade: o.downgrade,
            sent: sent.clone(),
            last_read_ns: last_read_ns.clone(),
        };
        let (ctl_tx, ctl_rx) = mpsc::channel::<Ctl>();
        let (cmd_tx, cmd_rx) = mpsc::channel::<OsdpCommand>();
        let stop = Arc::new(Mutex::new(false));
        let stopping = stop.clone();
        std::thread::spawn(move || {
            let mut info = PdInfoBuilder::new()
                .name("test-reader")
                .unwrap()
                .address(ADDRESS as i32)
                .unwrap()
                .baud_rate(9600)
                .unwrap()
                .capability(PdCapability::CommunicationSecurity(PdCapEntity::new(1, 1)))
                .capability(PdCapability::AudibleOutput(PdCapEntity::new(1, 1)))
                .capability(PdCapability::LedControl(PdCapEntity::new(1, 1)))
                .capability(PdCapability::CardDataFormat(PdCapEntity::new(1, 1)))
                .capability(PdCapability::ContactStatusMonitoring(PdCapEntity::new(1, 1)));
            info = match o.key {
                Some(k) => info.secure_channel_key(k),
                None => info.flag(OsdpFlag::InstallMode),
            };
            let mut pd = PeripheralDevice::new(info, Box::new(bus)).unwrap();
            pd.set_command_callback(move |c| {
                let _ = cmd_tx.send(c.clone());
                0
            });
            // Events wait here while libosdp's small event pool is full (a real reader buffers too).
            let mut waiting: std::collections::VecDeque<OsdpEvent> = Default::default();
            while !*stopping.lock().unwrap() {
                while let Some(e) = waiting.pop_front() {
                    if pd.notify_event(e.clone()).is_err() {
                        waiting.push_front(e);
                        break;
                    }
                }
                while let Ok(c) = ctl_rx.try_recv() {
                    match c {
                        Ctl::Event(e) => waiting.push_back(e),
                        Ctl::Unplug(u) => *unplugged.lock().unwrap() = u,
                        Ctl::Raw(b) => {
                            rustix::io::write(fd.as_fd(), &b).unwrap();
                        }
                    }
                }
                if !*unplugged.lock().unwrap() {
                    pd.refresh();
                } else {
                    let mut sink = [0u8; 256];
                    let _ = rustix::io::read(fd.as_fd(), &mut sink);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Reader { ctl: ctl_tx, commands: cmd_rx, seen: Vec::new(), _pty: pty, stop, sent, last_read_ns }
    }

    pub fn card(&self, facility: u64, number: u64) {
        let fields = (facility << 16) | number;
        let even = (fields >> 12).count_ones() % 2 == 1;
        let odd = (fields & 0xFFF).count_ones() % 2 == 0;
        let frame = ((even as u64) << 25) | (fields << 1) | odd as u64;
        let packed = (frame << 6).to_be_bytes()[4..8].to_vec();
        let read = OsdpEventCardRead::new_wiegand(26, packed).unwrap();
        self.ctl.send(Ctl::Event(OsdpEvent::CardRead(read))).unwrap();
    }

    pub fn keys(&self, keys: &[u8]) {
        self.ctl.send(Ctl::Event(OsdpEvent::KeyPress(OsdpEventKeyPress::new(keys.to_vec())))).unwrap();
    }

    /// Commands the gate sent this reader so far.
    pub fn commands(&mut self) -> &[OsdpCommand] {
        while let Ok(c) = self.commands.try_recv() {
            self.seen.push(c);
        }
        &self.seen
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        *self.stop.lock().unwrap() = true;
    }
}
