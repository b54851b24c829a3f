//! The door: a pure state machine for one door's relay, contact, exit button and fire input
//! (REQUIREMENTS A3).
//!
//! The shell (`app::door_stage`) feeds it debounced-or-raw input levels and `now`, and carries out
//! the [`Action`]s it returns; it is the only code that moves a relay. The relay's **safe state**
//! is de-energized: that is what the relay does when the board loses power, so the daemon leaves
//! it there on shutdown and puts it there first thing on start. The installer wires each door so
//! that de-energized means the door's fail mode: locked for fail-secure (strike on the NO
//! contact), released for fail-safe (maglock held by the energized relay).

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::clock::MonoTime;

/// What the door does when the controller stops or loses power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Stays locked (electric strike): the relay is energized only to unlock.
    Secure,
    /// Releases (maglock, life safety): the relay is energized to hold the door locked.
    Safe,
}

impl FailMode {
    /// The relay state (energized?) for a lock state.
    pub fn relay_energized(self, unlocked: bool) -> bool {
        match self {
            FailMode::Secure => unlocked,
            FailMode::Safe => !unlocked,
        }
    }
}

/// The relay level on shutdown, on start before anything else, and on power loss.
pub const SAFE_RELAY_ENERGIZED: bool = false;

/// Timing and wiring facts of one door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoorParams {
    pub fail_mode: FailMode,
    /// How long a grant keeps the door unlocked.
    pub pulse: Duration,
    /// Contact and button inputs must hold a level this long to count.
    pub debounce: Duration,
    /// An open door past this raises `door_held_open`.
    pub held_open: Duration,
    /// Opening the door up to this long after the relock still counts as authorised.
    pub shunt_grace: Duration,
}

/// What happened at a door, for `event/door` and `event/alarm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DoorEvent {
    Unlocked,
    Locked,
    Opened,
    Closed,
    /// The exit button was pressed (an access event with reason `exit_request`).
    ExitRequest,
    /// Alarm: the door opened while locked, without a grant or exit request.
    Forced,
    /// Alarm: the door stayed open past `held_open`.
    HeldOpen,
    /// The held-open alarm ended (door closed).
    HeldOpenCleared,
    /// Alarm: the fire input released the door.
    FireRelease,
    /// The fire input returned to normal.
    FireCleared,
}

impl DoorEvent {
    pub const ALL: [DoorEvent; 10] = [
        DoorEvent::Unlocked,
        DoorEvent::Locked,
        DoorEvent::Opened,
        DoorEvent::Closed,
        DoorEvent::ExitRequest,
        DoorEvent::Forced,
        DoorEvent::HeldOpen,
        DoorEvent::HeldOpenCleared,
        DoorEvent::FireRelease,
        DoorEvent::FireCleared,
    ];

    pub fn is_alarm(self) -> bool {
        matches!(
            self,
            DoorEvent::Forced
                | DoorEvent::HeldOpen
                | DoorEvent::HeldOpenCleared
                | DoorEvent::FireRelease
                | DoorEvent::FireCleared
        )
    }

    pub fn code(self) -> &'static str {
        match self {
            DoorEvent::Unlocked => "unlocked",
            DoorEvent::Locked => "locked",
            DoorEvent::Opened => "opened",
            DoorEvent::Closed => "closed",
            DoorEvent::ExitRequest => "exit_request",
            DoorEvent::Forced => "door_forced",
            DoorEvent::HeldOpen => "door_held_open",
            DoorEvent::HeldOpenCleared => "door_held_open_cleared",
            DoorEvent::FireRelease => "fire_release",
            DoorEvent::FireCleared => "fire_cleared",
        }
    }
}

/// What the shell must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Relay { energized: bool },
    Event(DoorEvent),
}

/// A debounced binary input: a level counts once it has held for the debounce time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debounced {
    stable: bool,
    pending: Option<(bool, MonoTime)>,
    hold: Duration,
}

impl Debounced {
    pub fn new(initial: bool, hold: Duration) -> Debounced {
        Debounced { stable: initial, pending: None, hold }
    }

    pub fn stable(&self) -> bool {
        self.stable
    }

    /// A raw level change (each bounce is one).
    pub fn raw(&mut self, level: bool, now: MonoTime) {
        if level == self.stable {
            self.pending = None;
        } else if self.pending.map(|(l, _)| l) != Some(level) {
            self.pending = Some((level, now));
        }
    }

    pub fn deadline(&self) -> Option<MonoTime> {
        self.pending.map(|(_, t)| t + self.hold)
    }

    /// The new stable level, if one settled by `now`.
    pub fn poll(&mut self, now: MonoTime) -> Option<bool> {
        match self.pending {
            Some((level, since)) if now.saturating_sub(since) >= self.hold => {
                self.pending = None;
                self.stable = level;
                Some(level)
            }
            _ => None,
        }
    }
}

/// Which input of the door changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// `true` = door open.
    Contact(bool),
    /// `true` = button pressed.
    Rex(bool),
    /// `true` = fire alarm active.
    Fire(bool),
}

/// One door.
#[derive(Debug, Clone)]
pub struct DoorCore {
    p: DoorParams,
    relay: bool,
    unlocked_until: Option<MonoTime>,
    authorised_until: Option<MonoTime>,
    contact: Option<Debounced>,
    rex: Option<Debounced>,
    fire: Option<Debounced>,
    open_since: Option<MonoTime>,
    held_alarm: bool,
    /// The door was forced open and has not closed since.
    forced: bool,
}

/// The door's standing alarms, for the retained `state/alarm/{door}`: each clears by itself
/// (forced and held-open when the door closes, fire release when the fire input returns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AlarmState {
    pub forced: bool,
    pub held_open: bool,
    pub fire_release: bool,
}

impl AlarmState {
    /// Any alarm standing.
    pub fn any(self) -> bool {
        self.forced || self.held_open || self.fire_release
    }
}

impl DoorCore {
    /// `contact`, `rex`, `fire`: the current level of each wired input (`None` if not wired).
    /// The relay is assumed to be in its safe state (the shell opened it that way).
    pub fn new(p: DoorParams, contact: Option<bool>, rex: Option<bool>, fire: Option<bool>, now: MonoTime) -> DoorCore {
        DoorCore {
            p,
            relay: SAFE_RELAY_ENERGIZED,
            unlocked_until: None,
            authorised_until: None,
            contact: contact.map(|l| Debounced::new(l, p.debounce)),
            rex: rex.map(|l| Debounced::new(l, p.debounce)),
            fire: fire.map(|l| Debounced::new(l, p.debounce)),
            open_since: contact.filter(|&o| o).map(|_| now),
            held_alarm: false,
            forced: false,
        }
    }

    pub fn relay_energized(&self) -> bool {
        self.relay
    }

    pub fn is_unlocked(&self) -> bool {
        self.unlocked_until.is_some() || self.fire_active()
    }

    pub fn is_open(&self) -> bool {
        self.contact.is_some_and(|c| c.stable())
    }

    /// The alarms standing now.
    pub fn alarms(&self) -> AlarmState {
        AlarmState { forced: self.forced, held_open: self.held_alarm, fire_release: self.fire_active() }
    }

    fn fire_active(&self) -> bool {
        self.fire.is_some_and(|f| f.stable())
    }

    fn sync_relay(&mut self, out: &mut Vec<Action>) {
        let want = self.p.fail_mode.relay_energized(self.is_unlocked());
        if want != self.relay {
            self.relay = want;
            out.push(Action::Relay { energized: want });
        }
    }

    /// Leave the safe state and take up normal operation (locked). Call once when ready.
    pub fn start(&mut self, now: MonoTime) -> Vec<Action> {
        let mut out = Vec::new();
        if self.fire_active() {
            out.push(Action::Event(DoorEvent::FireRelease));
        }
        self.tick_into(now, &mut out);
        self.sync_relay(&mut out);
        out
    }

    /// Unlock for the pulse time (a granted decision).
    pub fn grant(&mut self, now: MonoTime) -> Vec<Action> {
        let mut out = Vec::new();
        self.unlock_into(now, self.p.pulse, &mut out);
        out
    }

    /// Unlock for a given duration (remote unlock, bounded by the caller).
    pub fn unlock_for(&mut self, now: MonoTime, d: Duration) -> Vec<Action> {
        let mut out = Vec::new();
        self.unlock_into(now, d, &mut out);
        out
    }

    fn unlock_into(&mut self, now: MonoTime, d: Duration, out: &mut Vec<Action>) {
        let was = self.is_unlocked();
        let until = now + d;
        self.unlocked_until = Some(self.unlocked_until.map_or(until, |u| u.max(until)));
        self.authorised_until = Some(until + self.p.shunt_grace);
        if !was {
            out.push(Action::Event(DoorEvent::Unlocked));
        }
        self.sync_relay(out);
    }

    /// A raw input level change.
    pub fn input(&mut self, i: Input, now: MonoTime) -> Vec<Action> {
        match i {
            Input::Contact(l) => {
                if let Some(d) = &mut self.contact {
                    d.raw(l, now)
                }
            }
            Input::Rex(l) => {
                if let Some(d) = &mut self.rex {
                    d.raw(l, now)
                }
            }
            Input::Fire(l) => {
                if let Some(d) = &mut self.fire {
                    d.raw(l, now)
                }
            }
        }
        self.tick(now)
    }

    /// When [`DoorCore::tick`] must be called next.
    pub fn deadline(&self) -> Option<MonoTime> {
        let held = match (self.open_since, self.held_alarm) {
            (Some(t), false) if !self.fire_active() => Some(t + self.p.held_open),
            _ => None,
        };
        [
            self.unlocked_until,
            held,
            self.contact.and_then(|d| d.deadline()),
            self.rex.and_then(|d| d.deadline()),
            self.fire.and_then(|d| d.deadline()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Advance time: settle debounced inputs, relock after the pulse, raise held-open.
    pub fn tick(&mut self, now: MonoTime) -> Vec<Action> {
        let mut out = Vec::new();
        self.tick_into(now, &mut out);
        out
    }

    fn tick_into(&mut self, now: MonoTime, out: &mut Vec<Action>) {
        if let Some(pressed) = self.rex.as_mut().and_then(|d| d.poll(now)) {
            if pressed {
                out.push(Action::Event(DoorEvent::ExitRequest));
                self.unlock_into(now, self.p.pulse, out);
            }
        }
        if let Some(active) = self.fire.as_mut().and_then(|d| d.poll(now)) {
            out.push(Action::Event(if active { DoorEvent::FireRelease } else { DoorEvent::FireCleared }));
            if active {
                self.authorised_until = None;
            }
        }
        if let Some(open) = self.contact.as_mut().and_then(|d| d.poll(now)) {
            if open {
                out.push(Action::Event(DoorEvent::Opened));
                self.open_since = Some(now);
                let authorised = self.is_unlocked() || self.authorised_until.is_some_and(|t| now <= t);
                if !authorised {
                    self.forced = true;
                    out.push(Action::Event(DoorEvent::Forced));
                }
            } else {
                out.push(Action::Event(DoorEvent::Closed));
                self.open_since = None;
                self.forced = false;
                if self.held_alarm {
                    self.held_alarm = false;
                    out.push(Action::Event(DoorEvent::HeldOpenCleared));
                }
            }
        }
        if self.unlocked_until.is_some_and(|u| now >= u) {
            self.unlocked_until = None;
            if !self.fire_active() {
                out.push(Action::Event(DoorEvent::Locked));
            }
        }
        if let Some(since) = self.open_since {
            if !self.held_alarm && now.saturating_sub(since) >= self.p.held_open && !self.fire_active() {
                self.held_alarm = true;
                out.push(Action::Event(DoorEvent::HeldOpen));
            }
        }
        let fire_cleared = out.contains(&Action::Event(DoorEvent::FireCleared));
        if fire_cleared && !self.is_unlocked() {
            out.push(Action::Event(DoorEvent::Locked));
        }
        self.sync_relay(out);
    }

    /// Go to the safe state (shutdown).
    pub fn shutdown(&mut self) -> Vec<Action> {
        self.unlocked_until = None;
        if self.relay != SAFE_RELAY_ENERGIZED {
            self.relay = SAFE_RELAY_ENERGIZED;
            vec![Action::Relay { energized: SAFE_RELAY_ENERGIZED }]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(fail_mode: FailMode) -> DoorParams {
        DoorParams {
            fail_mode,
            pulse: Duration::from_secs(3),
            debounce: Duration::from_millis(50),
            held_open: Duration::from_secs(30),
            shunt_grace: Duration::from_secs(2),
        }
    }

    fn t(ms: u64) -> MonoTime {
        MonoTime::from_nanos(10_000_000_000 + ms * 1_000_000)
    }

    fn events(a: &[Action]) -> Vec<DoorEvent> {
        a.iter()
            .filter_map(|x| match x {
                Action::Event(e) => Some(*e),
                _ => None,
            })
            .collect()
    }

    fn relays(a: &[Action]) -> Vec<bool> {
        a.iter()
            .filter_map(|x| match x {
                Action::Relay { energized } => Some(*energized),
                _ => None,
            })
            .collect()
    }

    /// Drive the core through time the way the shell does.
    fn advance(d: &mut DoorCore, to: MonoTime) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(dl) = d.deadline() {
            if dl > to {
                break;
            }
            out.extend(d.tick(dl));
            assert!(d.deadline().is_none_or(|n| n > dl), "a handled deadline must move on");
        }
        out.extend(d.tick(to));
        out
    }

    #[test]
    fn fail_secure_grant_pulses_then_relocks() {
        let mut d = DoorCore::new(params(FailMode::Secure), Some(false), None, None, t(0));
        assert!(relays(&d.start(t(0))).is_empty(), "fail-secure stays de-energized when locked");
        let a = d.grant(t(100));
        assert_eq!(relays(&a), vec![true]);
        assert_eq!(events(&a), vec![DoorEvent::Unlocked]);
        assert!(advance(&mut d, t(3099)).is_empty());
        let a = advance(&mut d, t(3100));
        assert_eq!(relays(&a), vec![false]);
        assert_eq!(events(&a), vec![DoorEvent::Locked]);
    }

    #[test]
    fn fail_safe_is_energized_while_locked_and_safe_on_shutdown() {
        let mut d = DoorCore::new(params(FailMode::Safe), None, None, None, t(0));
        assert_eq!(relays(&d.start(t(0))), vec![true]);
        assert_eq!(relays(&d.grant(t(10))), vec![false]);
        assert_eq!(relays(&advance(&mut d, t(3010))), vec![true]);
        assert_eq!(relays(&d.shutdown()), vec![SAFE_RELAY_ENERGIZED]);
        // Fail-secure in the middle of a pulse: shutdown de-energizes (locks).
        let mut d = DoorCore::new(params(FailMode::Secure), None, None, None, t(0));
        d.start(t(0));
        d.grant(t(1));
        assert_eq!(relays(&d.shutdown()), vec![false]);
        assert!(d.shutdown().is_empty());
    }

    #[test]
    fn contact_bounce_is_one_open_and_forced_without_grant() {
        let mut d = DoorCore::new(params(FailMode::Secure), Some(false), None, None, t(0));
        d.start(t(0));
        let mut out = Vec::new();
        // Bounce: open/closed flips 1 ms apart, then settles open.
        for (i, l) in [true, false, true, false, true].into_iter().enumerate() {
            out.extend(d.input(Input::Contact(l), t(1000 + i as u64)));
        }
        out.extend(advance(&mut d, t(1200)));
        assert_eq!(events(&out), vec![DoorEvent::Opened, DoorEvent::Forced]);
        assert_eq!(d.alarms(), AlarmState { forced: true, ..AlarmState::default() });
        // A grant while it stands does not clear it: only closing the door does.
        d.grant(t(1300));
        assert!(d.alarms().forced);
        // Closing with bounce: one Closed.
        let mut out = Vec::new();
        for (i, l) in [false, true, false].into_iter().enumerate() {
            out.extend(d.input(Input::Contact(l), t(5000 + i as u64)));
        }
        out.extend(advance(&mut d, t(6000)));
        assert_eq!(events(&out), vec![DoorEvent::Locked, DoorEvent::Closed]); // the grant's pulse ended first
        assert!(!d.alarms().any(), "the forced alarm clears when the door closes");
    }

    #[test]
    fn opening_after_grant_is_authorised_and_held_open_alarms() {
        let mut d = DoorCore::new(params(FailMode::Secure), Some(false), None, None, t(0));
        d.start(t(0));
        d.grant(t(0));
        let mut out = d.input(Input::Contact(true), t(1000));
        out.extend(advance(&mut d, t(31_049)));
        assert_eq!(events(&out), vec![DoorEvent::Opened, DoorEvent::Locked]);
        let out = advance(&mut d, t(31_050));
        assert_eq!(events(&out), vec![DoorEvent::HeldOpen]);
        assert_eq!(d.alarms(), AlarmState { held_open: true, ..AlarmState::default() });
        let mut out = d.input(Input::Contact(false), t(40_000));
        out.extend(advance(&mut d, t(40_100)));
        assert_eq!(events(&out), vec![DoorEvent::Closed, DoorEvent::HeldOpenCleared]);
        assert!(!d.alarms().any());
        // Opening within the shunt grace after relock is still authorised.
        d.grant(t(50_000));
        let mut out = advance(&mut d, t(53_000));
        out.extend(d.input(Input::Contact(true), t(54_000)));
        out.extend(advance(&mut d, t(54_100)));
        assert!(!events(&out).contains(&DoorEvent::Forced), "{out:?}");
    }

    #[test]
    fn rex_unlocks_and_fire_releases_until_cleared() {
        let mut d = DoorCore::new(params(FailMode::Secure), Some(false), Some(false), Some(false), t(0));
        d.start(t(0));
        let mut out = d.input(Input::Rex(true), t(10));
        out.extend(advance(&mut d, t(100)));
        assert_eq!(events(&out), vec![DoorEvent::ExitRequest, DoorEvent::Unlocked]);
        assert_eq!(relays(&out), vec![true]);
        d.input(Input::Rex(false), t(200));
        advance(&mut d, t(4000));
        assert!(!d.relay_energized());
        // Fire: unlocked while active, even past any pulse.
        let mut out = d.input(Input::Fire(true), t(5000));
        out.extend(advance(&mut d, t(60_000)));
        assert_eq!(events(&out), vec![DoorEvent::FireRelease]);
        assert!(d.relay_energized());
        assert_eq!(d.alarms(), AlarmState { fire_release: true, ..AlarmState::default() });
        // A grant during fire changes nothing on the relay.
        assert!(relays(&d.grant(t(60_001))).is_empty());
        let mut out = d.input(Input::Fire(false), t(70_000));
        out.extend(advance(&mut d, t(70_100)));
        assert_eq!(events(&out), vec![DoorEvent::FireCleared, DoorEvent::Locked]);
        assert!(!d.relay_energized());
        assert!(!d.alarms().any());
        // A fail-safe door with fire active at start stays released.
        let mut d = DoorCore::new(params(FailMode::Safe), None, None, Some(true), t(0));
        let out = d.start(t(0));
        assert_eq!(events(&out), vec![DoorEvent::FireRelease]);
        assert!(relays(&out).is_empty(), "fire at start keeps the fail-safe door released");
    }
}
