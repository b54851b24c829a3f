//! The OSDP reader stage: one reader's control panel (`osdp::cp`, libosdp on its own thread)
//! turned into the same `ReaderOutput`s as a Wiegand reader's — card reads through the Wiegand
//! format decoder, key presses through PIN entry — so the gate stage decides them the same
//! way. Cues become LED and beeper commands. A reader that is not usable (offline, no Secure
//! Channel) gives nothing to decide: libosdp takes no read from it, and this stage drops any
//! that arrives while the link is not usable. `LinkWatch` (pure) raises the alarms.

use std::time::Duration;
use tokio::sync::mpsc;

use super::reader::Keys;
use super::{sleep_until_mono, StageCtx};
use crate::bus::{ReaderInput, ReaderOutput};
use crate::clock::{wall_ms, MonoTime};
use crate::config::OsdpReaderConfig;
use crate::events::{GateAlarm, NewEvent};
use crate::feedback::Cue;
use crate::keypad::{self, KeyError, PinEntry};
use crate::osdp::cp::{self, CpParams, FromReader, ToReader};
use crate::osdp::{self, LinkChange, LinkFault, LinkWatch};
use crate::wiegand::{self, Bits, Outcome, Rejection};

/// What an OSDP reader stage needs: its config, its key, its cues.
pub struct OsdpParts {
    pub cfg: OsdpReaderConfig,
    /// The reader's key (`Ok(None)`: none installed; `Err`: the key file is unusable).
    pub key: Result<Option<[u8; 16]>, String>,
    pub cues: mpsc::Receiver<Cue>,
}

/// Run one OSDP reader until shutdown.
pub async fn run(ctx: StageCtx, parts: OsdpParts, out: mpsc::Sender<ReaderOutput>, events: mpsc::Sender<NewEvent>) {
    let OsdpParts { cfg, key, mut cues } = parts;
    let name = cfg.name.clone();
    let insecure = cfg.insecure;
    ctx.stats.osdp_update(&name, |h| {
        h.state = "starting";
        h.insecure = insecure;
    });
    let key = match key {
        Ok(k) if k.is_some() || insecure => k,
        other => {
            let why = match other {
                Err(e) => format!("the reader's Secure Channel key is unusable ({e})"),
                _ => format!(
                    "no Secure Channel key: run `menshen osdp install --reader {name}` (or set insecure = true)"
                ),
            };
            tracing::error!(reader = %name, %why, "OSDP reader refused");
            let _ =
                events.send(NewEvent::alarm(wall_ms(), GateAlarm::SecureChannelRefused, Some(&name), Some(why))).await;
            ctx.stats.osdp_update(&name, |h| h.state = "not_installed");
            return idle(&ctx).await;
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let params = CpParams {
        name: name.clone(),
        device: cfg.device.clone(),
        baud: cfg.baud,
        address: cfg.address,
        key,
        insecure,
        install: false,
    };
    let handle = match cp::start(params, tx) {
        Ok(h) => h,
        Err(error) => {
            // The port is missing or not a serial port: the reader is offline until a restart.
            tracing::error!(reader = %name, %error, "OSDP reader: cannot open its port");
            let detail = format!("cannot open the reader's port: {error}");
            let _ = events.send(NewEvent::alarm(wall_ms(), GateAlarm::ReaderOffline, Some(&name), Some(detail))).await;
            ctx.stats.osdp_update(&name, |h| h.state = "offline");
            return idle(&ctx).await;
        }
    };
    let formats = cfg.parsed_formats();
    let mut keys =
        Keys { role: keypad::Role::Both, map: keypad::StarHash::StarTen, entry: PinEntry::new(ctx.cfg.keypad.entry()) };
    let mut watch = LinkWatch::new(Duration::from_millis(cfg.offline_alarm_ms), insecure, MonoTime::now());
    let mut status = osdp::LinkStatus::default();
    let mut beat = tokio::time::interval(Duration::from_millis(200));
    let mut cues_open = true;
    let mut tamper = false;
    let mut shown = ("starting", false);
    let emit = |input: ReaderInput, at: MonoTime| ReaderOutput {
        reader: name.clone(),
        door: cfg.door.clone(),
        input,
        at,
        received: MonoTime::now(),
    };
    let alarm = |a: GateAlarm, detail: &str| NewEvent::alarm(wall_ms(), a, Some(&name), Some(detail.to_string()));
    loop {
        let mut results = Vec::new();
        let mut raised = Vec::new();
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            m = rx.recv() => {
                let Some(m) = m else { break };
                match m {
                    FromReader::Card { nr_bits, data, at } if watch.usable() => {
                        ctx.stats.osdp_update(&name, |h| h.cards += 1);
                        let o = match osdp::card_bits(nr_bits, &data) {
                            Some(bits) => match wiegand::decode(&formats, bits) {
                                Ok(read) => Outcome::Card(read),
                                Err(why) => Outcome::Rejected { why, bits },
                            },
                            None => {
                                let bits = Bits { value: 0, len: nr_bits.min(255) as u8 };
                                Outcome::Rejected { why: Rejection::WrongLength, bits }
                            }
                        };
                        if matches!(o, Outcome::Rejected { .. }) {
                            ctx.stats.osdp_update(&name, |h| h.reads_refused += 1);
                        }
                        results.push(emit(ReaderInput::Frame(o), at));
                    }
                    FromReader::Keys { keys: bytes, at } if watch.usable() => {
                        ctx.stats.osdp_update(&name, |h| h.keys += bytes.len() as u64);
                        for b in bytes {
                            let input = match osdp::key(b) {
                                Some(k) => keys.key(k, at),
                                None => {
                                    keys.entry.clear();
                                    Some(ReaderInput::KeyRejected { why: KeyError::NoSuchKey(b), bits: Bits { value: b as u64, len: 8 } })
                                }
                            };
                            results.extend(input.map(|i| emit(i, at)));
                        }
                    }
                    FromReader::Card { .. } | FromReader::Keys { .. } => {
                        // Never from a reader whose link is not usable (libosdp refuses such a
                        // reader; this is the second lock).
                        ctx.stats.osdp_update(&name, |h| h.reads_refused += 1);
                    }
                    FromReader::Tamper(on) => {
                        if on != tamper {
                            tamper = on;
                            ctx.stats.osdp_update(&name, |h| h.tamper = on);
                            raised.push(if on {
                                alarm(GateAlarm::ReaderTamper, "the OSDP reader's tamper switch opened")
                            } else {
                                alarm(GateAlarm::ReaderTamperCleared, "the OSDP reader's tamper switch closed")
                            });
                        }
                    }
                    FromReader::Link(s) => status = s,
                    FromReader::Bad(b) => ctx.stats.osdp_update(&name, |h| *h.bad_frames.entry(b.code()).or_default() += 1),
                    FromReader::OutOfSequence => ctx.stats.osdp_update(&name, |h| h.out_of_sequence += 1),
                }
            }
            c = cues.recv(), if cues_open => match c {
                Some(c) => { let _ = handle.commands.send(ToReader::Show(osdp::show(c))); }
                None => cues_open = false,
            },
            _ = sleep_until_mono(keys.entry.deadline()) => {
                let now = MonoTime::now();
                results.extend(keys.entry.tick(now).map(|e| emit(Keys::ended(e), now)));
            }
            _ = beat.tick() => ctx.beat(),
        }
        match watch.observe(status, MonoTime::now()) {
            Some(LinkChange::Fault(f)) => {
                tracing::warn!(reader = %name, fault = f.code(), "OSDP reader not usable");
                keys.entry.clear();
                let a =
                    if f == LinkFault::Offline { GateAlarm::ReaderOffline } else { GateAlarm::SecureChannelRefused };
                raised.push(alarm(a, f.detail()));
            }
            Some(LinkChange::Restored) => {
                tracing::info!(reader = %name, "OSDP reader usable again");
                raised.push(alarm(GateAlarm::ReaderRestored, "the OSDP reader is usable again"));
            }
            None => {}
        }
        let state = if watch.usable() { "ok" } else { watch.fault().map(LinkFault::code).unwrap_or("starting") };
        if (state, status.secure) != shown {
            shown = (state, status.secure);
            ctx.stats.osdp_update(&name, |h| (h.state, h.secure_channel) = shown);
        }
        for e in raised {
            let _ = events.send(e).await;
        }
        for o in results {
            if out.send(o).await.is_err() {
                handle.stop();
                return;
            }
        }
    }
    handle.stop();
}

/// A reader that cannot run: stay alive (its alarm is raised; cards on other readers work).
async fn idle(ctx: &StageCtx) {
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => ctx.beat(),
        }
    }
}
