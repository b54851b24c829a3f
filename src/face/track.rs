//! From frames to one decision: a face verdict needs the same outcome on several frames within
//! a time window, so one bad frame never opens the door (and one odd frame never refuses).
//! Pure: the caller passes the monotonic time in.

use std::collections::VecDeque;

/// What one frame showed.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameOutcome {
    /// No face, or a face that failed a quality gate: not evidence either way.
    Nothing,
    Spoof,
    Unknown,
    Match {
        resident: String,
        score: f32,
    },
}

pub use crate::bus::Verdict;

pub use crate::config::Agreement;

#[derive(Debug, Clone)]
pub struct Tracker {
    cfg: Agreement,
    recent: VecDeque<(u64, FrameOutcome)>,
    quiet_until: u64,
}

impl Tracker {
    pub fn new(cfg: Agreement) -> Tracker {
        Tracker { cfg, recent: VecDeque::new(), quiet_until: 0 }
    }

    /// Feed one frame's outcome at `now_ms`; a verdict when the last `frames` face frames inside
    /// the window agree.
    pub fn observe(&mut self, now_ms: u64, outcome: FrameOutcome) -> Option<Verdict> {
        while self.recent.front().is_some_and(|(t, _)| now_ms.saturating_sub(*t) > self.cfg.window_ms) {
            self.recent.pop_front();
        }
        if outcome == FrameOutcome::Nothing {
            return None;
        }
        self.recent.push_back((now_ms, outcome));
        while self.recent.len() > self.cfg.frames.max(1) {
            self.recent.pop_front();
        }
        if now_ms < self.quiet_until || self.recent.len() < self.cfg.frames.max(1) {
            return None;
        }
        let first = &self.recent[0].1;
        let same = |o: &FrameOutcome| match (first, o) {
            (FrameOutcome::Match { resident: a, .. }, FrameOutcome::Match { resident: b, .. }) => a == b,
            (a, b) => a == b,
        };
        if !self.recent.iter().all(|(_, o)| same(o)) {
            return None;
        }
        let verdict = match first {
            FrameOutcome::Match { resident, .. } => {
                // The weakest of the agreeing frames is the score that counts.
                let score = self
                    .recent
                    .iter()
                    .filter_map(|(_, o)| match o {
                        FrameOutcome::Match { score, .. } => Some(*score),
                        _ => None,
                    })
                    .fold(f32::INFINITY, f32::min);
                Verdict::Matched { resident: resident.clone(), score }
            }
            FrameOutcome::Spoof => Verdict::Spoof,
            FrameOutcome::Unknown => Verdict::NotRecognized,
            FrameOutcome::Nothing => return None,
        };
        self.recent.clear();
        self.quiet_until = now_ms + self.cfg.cooldown_ms;
        Some(verdict)
    }
}

/// The coarse score bucket an event may carry (never the score itself).
pub fn score_bucket(score: f32) -> &'static str {
    match score {
        s if s >= 0.75 => "high",
        s if s >= 0.6 => "medium",
        _ => "low",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(r: &str) -> FrameOutcome {
        FrameOutcome::Match { resident: r.into(), score: 0.7 }
    }

    #[test]
    fn one_frame_never_decides() {
        let mut t = Tracker::new(Agreement::default());
        assert_eq!(t.observe(0, m("alice")), None);
        assert_eq!(t.observe(100, m("alice")), None);
        assert_eq!(t.observe(200, m("alice")), Some(Verdict::Matched { resident: "alice".into(), score: 0.7 }));
    }

    #[test]
    fn a_bad_frame_in_between_breaks_agreement() {
        let mut t = Tracker::new(Agreement::default());
        t.observe(0, m("alice"));
        t.observe(100, m("mallory"));
        assert_eq!(t.observe(200, m("alice")), None);
        assert_eq!(t.observe(300, m("alice")), None);
        assert!(matches!(t.observe(400, m("alice")), Some(Verdict::Matched { .. })));
    }

    #[test]
    fn frames_too_far_apart_do_not_agree_and_no_face_frames_are_ignored() {
        let mut t = Tracker::new(Agreement::default());
        t.observe(0, m("a"));
        t.observe(1000, m("a"));
        assert_eq!(t.observe(2600, m("a")), None, "both earlier frames fell out of the 1.5 s window");
        assert_eq!(t.observe(2700, FrameOutcome::Nothing), None);
        assert_eq!(t.observe(2800, m("a")), None);
        assert!(matches!(t.observe(2900, m("a")), Some(Verdict::Matched { .. })));
    }

    #[test]
    fn spoof_and_unknown_verdicts_and_cooldown() {
        let mut t = Tracker::new(Agreement::default());
        for i in 0..2 {
            assert_eq!(t.observe(i * 10, FrameOutcome::Spoof), None);
        }
        assert_eq!(t.observe(20, FrameOutcome::Spoof), Some(Verdict::Spoof));
        for i in 0..3 {
            assert_eq!(t.observe(100 + i * 10, FrameOutcome::Unknown), None, "cooldown");
        }
        let mut u = Tracker::new(Agreement::default());
        u.observe(0, FrameOutcome::Unknown);
        u.observe(1, FrameOutcome::Unknown);
        assert_eq!(u.observe(2, FrameOutcome::Unknown), Some(Verdict::NotRecognized));
        assert_eq!(score_bucket(0.8), "high");
        assert_eq!(score_bucket(0.55), "low");
    }
}
