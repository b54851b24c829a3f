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
//! Each input line gets a thread that blocks in `read(2)` on its request and forwards edges to
//! the daemon's channel; the line's file descriptor is the kernel's own, so nothing here polls.

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
}

impl InputLine for CdevInput {
    fn level(&self) -> Result<bool, HwError> {
        self.req.value(self.offset).map(|v| v == Value::Active).map_err(|e| line_err(&self.line, e))
    }

    fn edges(&mut self) -> Result<mpsc::UnboundedReceiver<Edge>, HwError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (req, line) = (self.req.clone(), self.line.clone());
        std::thread::Builder::new()
            .name(format!("gpio-{line}"))
            .spawn(move || {
                let mut buf = req.new_edge_event_buffer(16);
                loop {
                    match buf.read_event() {
                        Ok(ev) => {
                            let high = ev.kind == EdgeKind::Rising;
                            let at = MonoTime::from_nanos(ev.timestamp_ns);
                            if tx.send(Edge { high, at }).is_err() {
                                return; // shutting down
                            }
                        }
                        Err(error) => {
                            // The chip went away (ENODEV) or the request broke: the stream ends,
                            // and the stage that reads it stops the daemon.
                            tracing::error!(%line, %error, "GPIO line lost");
                            return;
                        }
                    }
                }
            })
            .map_err(|e| line_err(&self.line, e))?;
        Ok(rx)
    }

    fn debounced(&self) -> bool {
        self.debounced
    }
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
        let (chip, offset) = self.locate(line)?;
        let mut b = Request::builder();
        b.on_chip(&chip)
            .with_consumer(CONSUMER)
            .with_line(offset)
            .as_input()
            .with_bias(Bias::PullUp)
            .with_edge_detection(EdgeDetection::BothEdges);
        if let Some(d) = debounce {
            b.with_debounce_period(d);
        }
        let req = b.request().map_err(|e| line_err(line, e))?;
        Ok(Box::new(CdevInput { req: Arc::new(req), offset, line: line.clone(), debounced: debounce.is_some() }))
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
