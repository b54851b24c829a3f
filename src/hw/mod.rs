//! Hardware behind small traits: GPIO input lines that deliver timestamped edges, and output
//! lines. Two implementations sit side by side, chosen by `hardware.backend`:
//! [`rpi::RpiGpio`] (rppal on the gpiochip character device, kernel edge timestamps) and
//! [`sim::SimGpio`] (a client of the simulated chip served by [`sim::serve`]).

pub mod rpi;
pub mod sim;

use tokio::sync::mpsc;

use crate::clock::MonoTime;

/// One edge on an input line: the level after it and when it happened (CLOCK_MONOTONIC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    pub high: bool,
    pub at: MonoTime,
}

#[derive(Debug, thiserror::Error)]
pub enum HwError {
    #[error("GPIO {pin}: {message}")]
    Line { pin: u8, message: String },
    #[error("GPIO chip unavailable: {0}")]
    Chip(String),
}

/// An input line, claimed for this process.
pub trait InputLine: Send {
    /// The current level (`true` = high).
    fn level(&self) -> Result<bool, HwError>;
    /// Start edge delivery (both edges). Call once.
    fn edges(&mut self) -> Result<mpsc::UnboundedReceiver<Edge>, HwError>;
}

/// An output line, claimed for this process.
pub trait OutputLine: Send {
    fn set(&mut self, high: bool) -> Result<(), HwError>;
}

/// A GPIO chip.
pub trait Gpio: Send + Sync {
    /// Claim an input line (pull-up enabled where the hardware has one).
    fn input(&self, pin: u8) -> Result<Box<dyn InputLine>, HwError>;
    /// Claim an output line, driving `initial_high` from the first instant.
    fn output(&self, pin: u8, initial_high: bool) -> Result<Box<dyn OutputLine>, HwError>;
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
    pub fn open(gpio: &dyn Gpio, pin: u8, active_high: bool) -> Result<Relay, HwError> {
        let line = gpio.output(pin, !active_high)?;
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
