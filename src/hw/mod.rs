//! Hardware behind small traits: GPIO input lines that deliver timestamped edges, and output
//! lines. Two implementations sit side by side, chosen by `hardware.backend`:
//! [`cdev::CdevGpio`] (the kernel's GPIO character device through gpiocdev: kernel edge
//! timestamps, kernel debounce, bias) and [`sim::SimGpio`] (a client of the simulated chip
//! served by [`sim::serve`]).

pub mod cdev;
pub mod sim;

use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::MonoTime;
use crate::config::{Backend, Config, LineRef};

/// One edge on an input line: the level after it and when it happened (CLOCK_MONOTONIC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    pub high: bool,
    pub at: MonoTime,
}

#[derive(Debug, thiserror::Error)]
pub enum HwError {
    #[error("GPIO line {line}: {message}")]
    Line { line: String, message: String },
    #[error("GPIO chip unavailable: {0}")]
    Chip(String),
}

/// An input line, claimed for this process.
pub trait InputLine: Send {
    /// The current level (`true` = high).
    fn level(&self) -> Result<bool, HwError>;
    /// Start edge delivery (both edges). Call once. The stream ends if the line is lost (the
    /// chip went away): the daemon then stops, for systemd to restart it.
    fn edges(&mut self) -> Result<mpsc::UnboundedReceiver<Edge>, HwError>;
    /// Whether the driver debounces this line itself (the kernel's debounce), so that every
    /// edge delivered is already a settled level.
    fn debounced(&self) -> bool {
        false
    }
}

/// An output line, claimed for this process.
pub trait OutputLine: Send {
    fn set(&mut self, high: bool) -> Result<(), HwError>;
}

/// A GPIO chip.
pub trait Gpio: Send + Sync {
    /// Claim an input line (pull-up enabled where the hardware has one), debounced by the
    /// driver for `debounce` where it can (contacts and buttons; never the Wiegand data lines).
    fn input(&self, line: &LineRef, debounce: Option<Duration>) -> Result<Box<dyn InputLine>, HwError>;
    /// Claim several inputs whose edges must keep their order across lines (a reader's D0 and
    /// D1): where the driver can, one request, so the kernel delivers their edges in the order
    /// they happened, and each line's channel has every earlier edge of the other line already.
    fn inputs(&self, lines: &[&LineRef]) -> Result<Vec<Box<dyn InputLine>>, HwError> {
        lines.iter().map(|l| self.input(l, None)).collect()
    }
    /// Claim an output line, driving `initial_high` from the first instant. `initial_high` is
    /// the line's safe level: where the hardware has a pull, it is set toward that level, so a
    /// line the kernel releases (the process died) and turns back into an input stays there.
    fn output(&self, line: &LineRef, initial_high: bool) -> Result<Box<dyn OutputLine>, HwError>;
}

/// A relay on an output line: energized/de-energized mapped to the line level by its polarity.
/// Dropping it puts the relay in its safe state (de-energized), whatever happened before.
pub struct Relay {
    line: Box<dyn OutputLine>,
    active_high: bool,
    energized: bool,
    last_command: MonoTime,
}

impl Relay {
    /// Claim the line already in the safe (de-energized) state.
    pub fn open(gpio: &dyn Gpio, line: &LineRef, active_high: bool) -> Result<Relay, HwError> {
        let line = gpio.output(line, !active_high)?;
        Ok(Relay { line, active_high, energized: false, last_command: MonoTime::now() })
    }

    pub fn set(&mut self, energized: bool) -> Result<(), HwError> {
        self.last_command = MonoTime::now();
        self.line.set(energized == self.active_high)?;
        self.energized = energized;
        Ok(())
    }

    /// When the last command was issued.
    pub fn last_command(&self) -> MonoTime {
        self.last_command
    }

    pub fn energized(&self) -> bool {
        self.energized
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.energized {
            // Best effort on the way out: the line may already be gone with the chip.
            let _ = self.line.set(!self.active_high);
        }
    }
}

/// Open the configured GPIO chip. For an embedded simulated chip this also starts it, on its own
/// thread and runtime, served on its socket for `menshen sim ...`; the thread is returned.
pub async fn open_gpio(
    cfg: &Arc<Config>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Arc<dyn Gpio>, Option<std::thread::JoinHandle<()>>)> {
    match cfg.hardware.backend {
        Backend::Gpiochip => {
            let gpio = cdev::CdevGpio::new(&cfg.hardware.chip)
                .with_context(|| format!("opening the GPIO chip {}", cfg.hardware.chip))?;
            Ok((Arc::new(gpio), None))
        }
        Backend::Sim => {
            let socket = cfg.hardware.sim.socket.clone();
            if cfg.hardware.sim.embedded {
                // The daemon uses the chip directly (one hop per edge, as with the kernel).
                let chip = sim::SimChip::new(cfg);
                let (c, s, tok) = (chip.clone(), socket.clone(), shutdown.child_token());
                let thread = std::thread::Builder::new().name("sim-chip".into()).spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(error) => {
                            tracing::error!(%error, "simulated chip: no runtime");
                            return;
                        }
                    };
                    if let Err(error) = rt.block_on(c.serve(&s, tok)) {
                        tracing::error!(%error, "simulated chip stopped");
                    }
                })?;
                Ok((Arc::new(chip.local_gpio()), Some(thread)))
            } else {
                let sock = socket.clone();
                let g = tokio::task::spawn_blocking(move || sim::SimGpio::connect(&sock, Duration::from_secs(5)))
                    .await?
                    .with_context(|| format!("connecting to the simulated GPIO chip at {}", socket.display()))?;
                Ok((Arc::new(sim::SharedSimGpio(Arc::new(g))), None))
            }
        }
    }
}
