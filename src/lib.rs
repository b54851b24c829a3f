//! Menshen (门神, the door guardian): a gate access controller for residential compounds.
//!
//! Cards on Wiegand readers open the door; face recognition is an opt-in extra that no resident
//! is ever forced to use (SPC 2021 face-recognition provisions, Art. 10). Decisions are made on
//! the gate, durable events reach the building management system over MQTT.
//!
//! Start with `ARCHITECTURE.md`. The pure cores are [`wiegand`], [`policy`], [`gate`] and [`door`]; the
//! shells are the stages in [`daemon::stages`], wired in one place, [`daemon::topology`];
//! [`bus`] holds the messages between them; hardware sits behind the traits in [`hw`].
#![forbid(unsafe_code)]

pub mod bus;
pub mod cli;
pub mod clock;
pub mod command;
pub mod config;
pub mod daemon;
pub mod digest;
pub mod doctor;
pub mod door;
pub mod durable;
pub mod events;
pub mod face;
pub mod feedback;
pub mod gate;
pub mod hw;
pub mod keypad;
pub mod model;
pub mod mqtt;
pub mod osdp;
pub mod policy;
pub mod privacy;
pub mod resident_ops;
pub mod runtime;
pub mod secrets;
pub mod stats;
pub mod store;
pub mod wiegand;
pub mod wiring;
