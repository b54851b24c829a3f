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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// An output line that records (virtual time, level).
    struct Recorder(Arc<Mutex<Vec<(tokio::time::Instant, bool)>>>);

    impl OutputLine for Recorder {
        fn set(&mut self, high: bool) -> Result<(), HwError> {
            let mut v = self.0.lock().unwrap();
            if v.last().map(|l| l.1) != Some(high) {
                v.push((tokio::time::Instant::now(), high));
            }
            Ok(())
        }
    }

    type Log = Arc<Mutex<Vec<(tokio::time::Instant, bool)>>>;

    fn ctx(dir: &std::path::Path) -> StageCtx {
        let mut t: toml::Table = toml::from_str(crate::config::DEFAULT_CONFIG).unwrap();
        t["gate"].as_table_mut().unwrap().insert("state_dir".into(), dir.display().to_string().into());
        t.insert("face".into(), toml::toml! { pair_window_ms = 2000 }.into());
        let cfg = Arc::new(crate::config::parse(&toml::to_string(&t).unwrap()).unwrap());
        StageCtx {
            name: "feedback:front".into(),
            cfg: cfg.clone(),
            store: Arc::new(crate::store::Store::open(&cfg.store_path()).unwrap()),
            stats: Arc::new(crate::stats::Stats::default()),
            shutdown: tokio_util::sync::CancellationToken::new(),
            started: crate::clock::MonoTime::now(),
        }
    }

    /// The face wait blinks green for the pair window; a grant cuts it short at once; every
    /// pattern ends with everything off. Virtual time: the figures are exact.
    #[tokio::test(start_paused = true)]
    async fn the_face_wait_blinks_until_the_card_and_a_grant_cuts_it_short() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path());
        let mut cfg = ctx.cfg.readers[0].clone();
        cfg.feedback.active_level = Some(crate::config::ActiveLevel::High);
        let (green, beep): (Log, Log) = Default::default();
        let parts = FeedbackParts {
            cfg,
            green: Some(Box::new(Recorder(green.clone()))),
            red: None,
            beeper: Some(Box::new(Recorder(beep.clone()))),
        };
        let (tx, rx) = mpsc::channel(8);
        let stage = tokio::spawn(run(ctx.clone(), parts, rx));
        let t0 = tokio::time::Instant::now();
        tx.send(Cue::FaceWaiting).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        // 250 ms on, 250 ms off: on at 0, 500, 1000 ms.
        let ons: Vec<u128> = green.lock().unwrap().iter().filter(|l| l.1).map(|l| (l.0 - t0).as_millis()).collect();
        assert_eq!(ons, [0, 500, 1000], "{:?}", green.lock().unwrap());
        tx.send(Cue::Granted).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5_000)).await;
        let g = green.lock().unwrap().clone();
        let b = beep.lock().unwrap().clone();
        // The grant: green with a 150 ms beep, green 1 s in all, then off; no more blinking.
        let grant_at = t0 + Duration::from_millis(1_100);
        assert_eq!(
            b.iter().filter(|l| l.0 >= grant_at).map(|l| ((l.0 - grant_at).as_millis(), l.1)).collect::<Vec<_>>(),
            [(0, true), (150, false)]
        );
        assert_eq!(g.last().map(|l| ((l.0 - grant_at).as_millis(), l.1)), Some((1_000, false)));
        ctx.shutdown.cancel();
        stage.await.unwrap();
    }

    /// Without a card the face wait ends with the pair window, lines off.
    #[tokio::test(start_paused = true)]
    async fn the_face_wait_ends_with_the_pair_window() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path());
        let green: Log = Default::default();
        let parts = FeedbackParts {
            cfg: ctx.cfg.readers[0].clone(),
            green: Some(Box::new(Recorder(green.clone()))),
            red: None,
            beeper: None,
        };
        let (tx, rx) = mpsc::channel(8);
        let stage = tokio::spawn(run(ctx.clone(), parts, rx));
        let t0 = tokio::time::Instant::now();
        tx.send(Cue::FaceWaiting).await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let g = green.lock().unwrap().clone();
        // Active low (the default): on is low. Blinks for the 2 s window, then rests off (high).
        let ons: Vec<u128> = g.iter().filter(|l| !l.1).map(|l| (l.0 - t0).as_millis()).collect();
        assert_eq!(ons, [0, 500, 1000, 1500], "{g:?}");
        assert_eq!(g.last().map(|l| ((l.0 - t0).as_millis(), l.1)), Some((1_750, true)), "off, and nothing after");
        ctx.shutdown.cancel();
        stage.await.unwrap();
    }
}
