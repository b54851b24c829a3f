//! Raspberry Pi GPIO through rppal. rppal's async interrupts read the gpiochip v2 character
//! device, whose events carry kernel CLOCK_MONOTONIC timestamps: the Wiegand decoder measures
//! pulse widths and gaps on those, not on when userspace happened to wake up.

use rppal::gpio::{Gpio as RGpio, InputPin, Level, OutputPin, Trigger};
use tokio::sync::mpsc;

use super::{Edge, Gpio, HwError, InputLine, OutputLine};
use crate::clock::MonoTime;

pub struct RpiGpio {
    gpio: RGpio,
}

impl RpiGpio {
    pub fn new() -> Result<RpiGpio, HwError> {
        RGpio::new().map(|gpio| RpiGpio { gpio }).map_err(|e| HwError::Chip(e.to_string()))
    }
}

fn line_err(pin: u8, e: rppal::gpio::Error) -> HwError {
    HwError::Line { pin, message: e.to_string() }
}

struct RpiInput {
    pin: InputPin,
    num: u8,
}

impl InputLine for RpiInput {
    fn level(&self) -> Result<bool, HwError> {
        Ok(self.pin.read() == Level::High)
    }

    fn edges(&mut self) -> Result<mpsc::UnboundedReceiver<Edge>, HwError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.pin
            .set_async_interrupt(Trigger::Both, None, move |ev| {
                let high = ev.trigger == Trigger::RisingEdge;
                // The receiver is gone only during shutdown; nothing to do then.
                let _ = tx.send(Edge { high, at: MonoTime::from_duration(ev.timestamp) });
            })
            .map_err(|e| line_err(self.num, e))?;
        Ok(rx)
    }
}

struct RpiOutput {
    pin: OutputPin,
}

impl OutputLine for RpiOutput {
    fn set(&mut self, high: bool) -> Result<(), HwError> {
        self.pin.write(if high { Level::High } else { Level::Low });
        Ok(())
    }
}

impl Gpio for RpiGpio {
    fn input(&self, pin: u8) -> Result<Box<dyn InputLine>, HwError> {
        let p = self.gpio.get(pin).map_err(|e| line_err(pin, e))?.into_input_pullup();
        Ok(Box::new(RpiInput { pin: p, num: pin }))
    }

    fn output(&self, pin: u8, initial_high: bool) -> Result<Box<dyn OutputLine>, HwError> {
        let p = self.gpio.get(pin).map_err(|e| line_err(pin, e))?;
        let mut out = if initial_high { p.into_output_high() } else { p.into_output_low() };
        // Keep the level we set last when the process exits: the daemon sets the safe state
        // itself, and a reset to input would leave an active-low relay board floating.
        out.set_reset_on_drop(false);
        Ok(Box::new(RpiOutput { pin: out }))
    }
}
