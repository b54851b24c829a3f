//! Reader feedback (pure): what a Wiegand reader's green LED, red LED and beeper show for each
//! cue — granted, denied, a face waiting for its card (`face_and_card`), a PIN key, a lockout.
//! A pattern is a list of steps, each a set of outputs held for a time; the feedback stage plays
//! it on the reader's lines and ends with everything off.

use std::time::Duration;

/// What happened at a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cue {
    Granted,
    Denied,
    /// A face matched in `face_and_card`: present the card. Repeats for the pair window.
    FaceWaiting,
    /// A key was pressed on a PIN keypad.
    PinEntry,
    /// Too many wrong attempts: the reader is locked out for a while.
    Lockout,
}

impl Cue {
    pub const ALL: [Cue; 5] = [Cue::Granted, Cue::Denied, Cue::FaceWaiting, Cue::PinEntry, Cue::Lockout];

    pub fn code(self) -> &'static str {
        match self {
            Cue::Granted => "granted",
            Cue::Denied => "denied",
            Cue::FaceWaiting => "face_waiting",
            Cue::PinEntry => "pin_entry",
            Cue::Lockout => "lockout",
        }
    }
}

/// The outputs on during one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outputs {
    pub green: bool,
    pub red: bool,
    pub beep: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub on: Outputs,
    pub hold: Duration,
}

/// A cue's steps, and whether they repeat (until the next cue or `repeat_for` passes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    pub steps: Vec<Step>,
    pub repeat_for: Option<Duration>,
}

/// A step as the config writes it: `["green+beep", 150]` (`""` or `"off"`: all off).
pub type StepSpec = (String, u64);

/// Steps a pattern may have, and the longest step.
pub const MAX_STEPS: usize = 32;
pub const MAX_STEP_MS: u64 = 10_000;

pub fn parse_outputs(s: &str) -> Result<Outputs, String> {
    let mut o = Outputs::default();
    if s.is_empty() || s == "off" {
        return Ok(o);
    }
    for part in s.split('+') {
        match part.trim() {
            "green" => o.green = true,
            "red" => o.red = true,
            "beep" => o.beep = true,
            other => return Err(format!("`{other}` is not green, red, beep or off")),
        }
    }
    Ok(o)
}

pub fn parse_steps(spec: &[StepSpec]) -> Result<Vec<Step>, String> {
    if spec.is_empty() || spec.len() > MAX_STEPS {
        return Err(format!("a pattern has 1-{MAX_STEPS} steps"));
    }
    spec.iter()
        .map(|(outs, ms)| {
            if !(1..=MAX_STEP_MS).contains(ms) {
                return Err(format!("a step lasts 1-{MAX_STEP_MS} ms, not {ms}"));
            }
            Ok(Step { on: parse_outputs(outs)?, hold: Duration::from_millis(*ms) })
        })
        .collect()
}

fn steps(s: &[(&str, u64)]) -> Vec<StepSpec> {
    s.iter().map(|(o, ms)| (o.to_string(), *ms)).collect()
}

/// The built-in pattern of a cue (what most access-control readers do).
pub fn default_spec(cue: Cue) -> Vec<StepSpec> {
    match cue {
        Cue::Granted => steps(&[("green+beep", 150), ("green", 850)]),
        Cue::Denied => {
            steps(&[("red+beep", 100), ("red", 100), ("red+beep", 100), ("red", 100), ("red+beep", 100), ("red", 500)])
        }
        Cue::FaceWaiting => steps(&[("green", 250), ("off", 250)]),
        Cue::PinEntry => steps(&[("beep", 30)]),
        Cue::Lockout => steps(&[("red+beep", 1000), ("red", 4000)]),
    }
}

/// A cue's pattern: the configured steps (validated at load) or the built-in ones;
/// `pair_window` bounds the face wait.
pub fn pattern(configured: Option<&[StepSpec]>, cue: Cue, pair_window: Duration) -> Pattern {
    let spec = configured.map(<[StepSpec]>::to_vec).unwrap_or_else(|| default_spec(cue));
    let steps = parse_steps(&spec).unwrap_or_default();
    let repeat_for = (cue == Cue::FaceWaiting).then_some(pair_window);
    Pattern { steps, repeat_for }
}

/// The level of each line for `on`, given the lines' active level.
pub fn levels(on: Outputs, active_high: bool) -> [bool; 3] {
    [on.green == active_high, on.red == active_high, on.beep == active_high]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_outputs("green+beep").unwrap(), Outputs { green: true, red: false, beep: true });
        assert_eq!(parse_outputs("off").unwrap(), Outputs::default());
        assert!(parse_outputs("blue").unwrap_err().contains("blue"));
        assert!(parse_steps(&[("red".into(), 0)]).is_err());
        assert!(parse_steps(&[]).is_err());
        assert!(parse_steps(&vec![("red".to_string(), 10); MAX_STEPS + 1]).is_err());
        for cue in Cue::ALL {
            assert!(parse_steps(&default_spec(cue)).is_ok(), "{cue:?}");
        }
    }

    #[test]
    fn patterns_follow_the_config_and_only_the_face_wait_repeats() {
        let window = Duration::from_secs(8);
        let p = pattern(None, Cue::Granted, window);
        assert!(p.steps[0].on.green && p.steps[0].on.beep && p.repeat_for.is_none());
        assert_eq!(pattern(None, Cue::FaceWaiting, window).repeat_for, Some(window));
        let denied = vec![("red".to_string(), 2000)];
        let p = pattern(Some(&denied), Cue::Denied, window);
        assert_eq!(
            p.steps,
            vec![Step { on: Outputs { red: true, ..Outputs::default() }, hold: Duration::from_secs(2) }]
        );
        // Active-low lines (most readers): on is low.
        assert_eq!(levels(Outputs { green: true, ..Outputs::default() }, false), [false, true, true]);
        assert_eq!(levels(Outputs { green: true, ..Outputs::default() }, true), [true, false, false]);
    }
}
