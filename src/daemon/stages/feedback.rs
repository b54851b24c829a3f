//! The feedback stage: one reader's green LED, red LED and beeper, playing the pattern of each
//! cue the gate stage sends (`feedback`, pure). A new cue cuts the one playing short; every
//! pattern, and the stage, end with all three off.

use std::time::Duration;
use tokio::sync::mpsc;

use super::StageCtx;
use crate::config::ReaderConfig;
use crate::feedback::{self, Cue, Outputs, Pattern};
use crate::hw::{HwError, OutputLine};

/// A reader's feedback lines (claimed, all off), in the order green, red, beeper.
pub struct FeedbackParts {
    pub cfg: ReaderConfig,
    pub green: Option<Box<dyn OutputLine>>,
    pub red: Option<Box<dyn OutputLine>>,
    pub beeper: Option<Box<dyn OutputLine>>,
}

impl FeedbackParts {
    fn show(&mut self, on: Outputs) -> Result<(), HwError> {
        let levels = feedback::levels(on, self.cfg.feedback.active_high());
        for (line, level) in [&mut self.green, &mut self.red, &mut self.beeper].into_iter().zip(levels) {
            if let Some(l) = line {
                l.set(level)?;
            }
        }
        Ok(())
    }
}

/// Play cues until shutdown.
pub async fn run(ctx: StageCtx, mut parts: FeedbackParts, mut cues: mpsc::Receiver<Cue>) {
    let pair_window = Duration::from_millis(ctx.cfg.face.pair_window_ms);
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let mut next: Option<Cue> = None;
    'cues: loop {
        let cue = match next.take() {
            Some(c) => c,
            None => tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                c = cues.recv() => match c { Some(c) => c, None => break },
                _ = beat.tick() => { ctx.beat(); continue }
            },
        };
        let configured = parts.cfg.feedback.pattern(cue).map(Vec::as_slice);
        let Pattern { steps, repeat_for } = feedback::pattern(configured, cue, pair_window);
        let until = repeat_for.map(|d| tokio::time::Instant::now() + d);
        loop {
            for step in &steps {
                if let Err(error) = parts.show(step.on) {
                    tracing::warn!(reader = %parts.cfg.name, %error, "reader feedback line");
                }
                let end = tokio::time::sleep(step.hold);
                tokio::pin!(end);
                loop {
                    tokio::select! {
                        _ = &mut end => break,
                        _ = ctx.shutdown.cancelled() => break 'cues,
                        c = cues.recv() => match c {
                            // The newer cue wins at once.
                            Some(c) => { next = Some(c); continue 'cues }
                            None => break 'cues,
                        },
                        _ = beat.tick() => ctx.beat(),
                    }
                }
            }
            if until.is_none_or(|u| tokio::time::Instant::now() >= u) {
                break;
            }
        }
        let _ = parts.show(Outputs::default());
    }
    if let Err(error) = parts.show(Outputs::default()) {
        tracing::warn!(reader = %parts.cfg.name, %error, "reader feedback lines not turned off");
    }
}
