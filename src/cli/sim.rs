//! `menshen sim …`: drive the simulated chip (swipes, raw frames, door, exit button, state).

use std::path::{Path, PathBuf};

use super::DEMO_DIR;
use super::{SimCmd, SimTarget};
use crate::config;
use crate::hw::sim::{self, WorldOp};

fn sim_socket(t: &SimTarget) -> anyhow::Result<PathBuf> {
    if let Some(s) = &t.socket {
        return Ok(s.clone());
    }
    if let Some(c) = &t.config {
        return Ok(config::load(c)?.hardware.sim.socket);
    }
    let demo = Path::new(DEMO_DIR).join("sim.sock");
    if demo.exists() {
        return Ok(demo);
    }
    Ok(config::parse(config::DEFAULT_CONFIG)?.hardware.sim.socket)
}

pub fn sim_request(t: &SimTarget, op: WorldOp) -> anyhow::Result<serde_json::Value> {
    let socket = sim_socket(t)?;
    sim::request(&socket, &op).map_err(anyhow::Error::msg)
}

pub fn sim_cmd(cmd: SimCmd) -> anyhow::Result<serde_json::Value> {
    let (t, op) = match cmd {
        SimCmd::Serve { .. } => unreachable!("handled by the runtime"),
        SimCmd::Swipe { target, reader, card, facility, format } => {
            (target, WorldOp::Swipe { reader, facility, card, format })
        }
        SimCmd::Raw { target, reader, bits, pulse_us, interval_us } => {
            (target, WorldOp::Raw { reader, bits, pulse_us, interval_us })
        }
        SimCmd::Keys { target, reader, keys, bits, star_key, gap_ms } => {
            let bits = bits.parse().ok();
            (target, WorldOp::Keys { reader, keys, bits, star_key: Some(star_key), gap_ms })
        }
        SimCmd::Door { target, door, action } => (target, WorldOp::Door { door, open: action == "open" }),
        SimCmd::Rex { target, door } => (target, WorldOp::Rex { door, hold_ms: None }),
        SimCmd::Fire { target, door, action } => (target, WorldOp::Fire { door, active: action == "on" }),
        SimCmd::Line { target, pin, level } => (target, WorldOp::Line { pin, high: level == "high" }),
        SimCmd::State { target } => (target, WorldOp::State),
        SimCmd::Unplug { target } => (target, WorldOp::Unplug),
        SimCmd::Plug { target } => (target, WorldOp::Plug),
    };
    sim_request(&t, op)
}
