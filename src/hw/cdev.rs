//! The kernel's GPIO character device (`/dev/gpiochipN`, uAPI v2) through gpiocdev, on every
//! Linux board (every Raspberry Pi including the Pi 5's RP1, Orange Pi, Rock, Radxa, ...).
//!
//! - Input edges carry the kernel's CLOCK_MONOTONIC timestamps: the Wiegand decoder measures
//!   pulse widths and gaps on those, not on when this process happened to wake up.
//! - Contacts and buttons are debounced by the kernel (`debounce_period`), so a bouncing contact
//!   wakes the daemon once, when it has settled.
//! - Outputs are requested with a pull toward their safe level. While the request is held the
//!   line is driven; when it is released (the process exits or is SIGKILLed) the kernel promises
//!   nothing about the line (Documentation/userspace-api/gpio/chardev.rst: it "may revert to its
//!   default state"). Drivers that turn a freed line back into an input (the Pi's bcm2835/bcm2711
//!   pin controller does) leave the pull in place, so the line rests at its safe level. See
//!   docs/install.md for relay boards where that is not enough.
//!
//! Each request gets a thread that blocks in `read(2)` on it and forwards edges to the daemon's
//! channels; the file descriptor is the kernel's own, so nothing here polls. A reader's D0 and
//! D1 are one request: the kernel queues their edges in one buffer, in the order they happened,
//! so a late-scheduled thread can never hand the decoder a D0 edge before an earlier D1 edge.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gpiocdev::line::{Bias, EdgeDetection, EdgeKind, Value};
use gpiocdev::Request;
use tokio::sync::mpsc;

use super::{Edge, Gpio, HwError, InputLine, OutputLine};
use crate::clock::MonoTime;
use crate::config::{LineRef, LineSpec};

/// What the kernel shows as the consumer of every line the daemon holds (`gpioinfo`).
const CONSUMER: &str = "menshen";

pub struct CdevGpio {
    /// The chip that bare offsets are on.
    chip: PathBuf,
}

fn chip_path(chip: &str) -> PathBuf {
    if chip.starts_with('/') {
        PathBuf::from(chip)
    } else {
        PathBuf::from("/dev").join(chip)
    }
}

fn line_err(line: &LineRef, e: impl std::fmt::Display) -> HwError {
    HwError::Line { line: line.to_string(), message: e.to_string() }
}

impl CdevGpio {
    /// Open (and check) the default chip.
    pub fn new(chip: &str) -> Result<CdevGpio, HwError> {
        let path = chip_path(chip);
        let c = gpiocdev::Chip::from_path(&path).map_err(|e| HwError::Chip(format!("{}: {e}", path.display())))?;
        let info = c.info().map_err(|e| HwError::Chip(format!("{}: {e}", path.display())))?;
        tracing::info!(chip = %path.display(), label = %info.label, lines = info.num_lines, "GPIO chip");
        Ok(CdevGpio { chip: path })
    }

    /// Inputs in one request where they share a chip (one kernel event queue, one reader thread,
    /// their edges in the order they happened), else one request each.
    fn request_inputs(
        &self,
        lines: &[&LineRef],
        debounce: Option<Duration>,
    ) -> Result<Vec<Box<dyn InputLine>>, HwError> {
        let located = lines.iter().map(|l| self.locate(l)).collect::<Result<Vec<_>, _>>()?;
        let Some(first) = lines.first() else { return Ok(Vec::new()) };
        if located.iter().any(|(chip, _)| *chip != located[0].0) {
            // Lines on different chips cannot share a request.
            let mut out = Vec::new();
            for l in lines {
                out.extend(self.request_inputs(&[l], debounce)?);
            }
            return Ok(out);
        }
        let mut b = Request::builder();
        b.on_chip(&located[0].0).with_consumer(CONSUMER);
        for (_, offset) in &located {
            b.with_line(*offset).as_input().with_bias(Bias::PullUp).with_edge_detection(EdgeDetection::BothEdges);
            if let Some(d) = debounce {
                b.with_debounce_period(d);
            }
        }
        let req = Arc::new(b.request().map_err(|e| line_err(first, e))?);
        let mut feeds = Vec::new();
        let mut out: Vec<Box<dyn InputLine>> = Vec::new();
        for (l, (_, offset)) in lines.iter().zip(&located) {
            let (tx, rx) = mpsc::unbounded_channel();
            feeds.push((*offset, (*l).clone(), tx));
            out.push(Box::new(CdevInput {
                req: req.clone(),
                offset: *offset,
                line: (*l).clone(),
                debounced: debounce.is_some(),
                rx: Some(rx),
            }));
        }
        spawn_reader(req, feeds).map_err(|e| line_err(first, e))?;
        Ok(out)
    }

    /// The chip and offset a configured line is.
    fn locate(&self, line: &LineRef) -> Result<(PathBuf, u32), HwError> {
        match line.spec().map_err(|e| line_err(line, e))? {
            LineSpec::At { chip: None, offset } => Ok((self.chip.clone(), offset)),
            LineSpec::At { chip: Some(chip), offset } => Ok((chip_path(chip), offset)),
            LineSpec::Name(name) => gpiocdev::find_named_line(name)
                .map(|found| (found.chip, found.info.offset))
                .ok_or_else(|| line_err(line, "no chip has a line of that name (see `gpioinfo`)")),
        }
    }
}

struct CdevInput {
    req: Arc<Request>,
    offset: u32,
    line: LineRef,
    debounced: bool,
    /// The line's edges, fed by its request's reader thread (taken by `edges`).
    rx: Option<mpsc::UnboundedReceiver<Edge>>,
}

impl InputLine for CdevInput {
    fn level(&self) -> Result<bool, HwError> {
        self.req.value(self.offset).map(|v| v == Value::Active).map_err(|e| line_err(&self.line, e))
    }

    fn edges(&mut self) -> Result<mpsc::UnboundedReceiver<Edge>, HwError> {
        self.rx.take().ok_or_else(|| line_err(&self.line, "edges already taken"))
    }

    fn debounced(&self) -> bool {
        self.debounced
    }
}

/// One thread per request: it reads the request's events in the kernel's order and hands each
/// to its line's channel. The channels exist from the start, so no edge is lost before the
/// stage takes them; a line whose receiver is gone (shutdown) is skipped.
fn spawn_reader(req: Arc<Request>, lines: Vec<(u32, LineRef, mpsc::UnboundedSender<Edge>)>) -> std::io::Result<()> {
    let name = lines.iter().map(|(_, l, _)| l.to_string()).collect::<Vec<_>>().join(",");
    std::thread::Builder::new().name(format!("gpio-{name}")).spawn(move || {
        let mut buf = req.new_edge_event_buffer(16);
        loop {
            match buf.read_event() {
                Ok(ev) => {
                    let high = ev.kind == EdgeKind::Rising;
                    let at = MonoTime::from_nanos(ev.timestamp_ns);
                    if let Some((_, _, tx)) = lines.iter().find(|(o, _, _)| *o == ev.offset) {
                        let _ = tx.send(Edge { high, at });
                    }
                    if lines.iter().all(|(_, _, tx)| tx.is_closed()) {
                        return; // shutting down
                    }
                }
                Err(error) => {
                    // The chip went away (ENODEV) or the request broke: the streams end, and
                    // the stage that reads them stops the daemon.
                    tracing::error!(line = %name, %error, "GPIO line lost");
                    return;
                }
            }
        }
    })?;
    Ok(())
}

struct CdevOutput {
    req: Request,
    offset: u32,
    line: LineRef,
}

impl OutputLine for CdevOutput {
    fn set(&mut self, high: bool) -> Result<(), HwError> {
        let v = if high { Value::Active } else { Value::Inactive };
        self.req.set_value(self.offset, v).map(|_| ()).map_err(|e| line_err(&self.line, e))
    }
}

impl Gpio for CdevGpio {
    fn input(&self, line: &LineRef, debounce: Option<Duration>) -> Result<Box<dyn InputLine>, HwError> {
        let mut one = self.request_inputs(&[line], debounce)?;
        one.pop().ok_or_else(|| line_err(line, "the request returned no line"))
    }

    fn inputs(&self, lines: &[&LineRef]) -> Result<Vec<Box<dyn InputLine>>, HwError> {
        self.request_inputs(lines, None)
    }

    fn output(&self, line: &LineRef, initial_high: bool) -> Result<Box<dyn OutputLine>, HwError> {
        let (chip, offset) = self.locate(line)?;
        let (value, bias) =
            if initial_high { (Value::Active, Bias::PullUp) } else { (Value::Inactive, Bias::PullDown) };
        let req = Request::builder()
            .on_chip(&chip)
            .with_consumer(CONSUMER)
            .with_line(offset)
            .as_output(value)
            .with_bias(bias)
            .request()
            .map_err(|e| line_err(line, e))?;
        Ok(Box::new(CdevOutput { req, offset, line: line.clone() }))
    }
}
