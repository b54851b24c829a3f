//! Wiring checks for installers: `menshen test reader`, `menshen test relay`, `menshen test inputs`.
//!
//! The daemon must be stopped: these tools claim the same lines. [`analyze`] is pure: it explains
//! a frame the way an installer needs it (length, format, parity), and recognises the two classic
//! wiring faults: D0 and D1 swapped (every bit inverted, so the inverted frame passes parity) and a
//! missing common ground (pulses out of spec: noise).

use serde::Serialize;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::clock::MonoTime;
use crate::config::Config;
use crate::door::{Debounced, SAFE_RELAY_ENERGIZED};
use crate::hw::{self, Relay};
use crate::wiegand::{decode_fixed, Bits, Decoder, Format, Line, Outcome, Rejection, Timing, WEdge};

/// What a frame tells an installer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrameReport {
    pub bits: String,
    pub len: u8,
    /// The configured format of this length, if any.
    pub format: Option<String>,
    /// `ok`, `parity_error`, `no_format_of_this_length`, or a rejection code (noise, ...).
    pub result: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub facility: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number: Option<u64>,
    /// A likely wiring fault, in words, with what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

fn invert(b: Bits) -> Bits {
    let mask = if b.len >= 64 { u64::MAX } else { (1u64 << b.len) - 1 };
    Bits { value: !b.value & mask, len: b.len }
}

/// Explain one frame (pure).
pub fn analyze(bits: Bits, formats: &[Format], rejected: Option<Rejection>) -> FrameReport {
    let mut r = FrameReport {
        bits: bits.to_string(),
        len: bits.len,
        format: None,
        result: String::new(),
        facility: None,
        number: None,
        hint: None,
    };
    match rejected {
        Some(Rejection::Noise) => {
            r.result = "noise".into();
            r.hint = Some(
                "pulses out of spec: check that the reader's ground is common with the board's, and the cable".into(),
            );
            return r;
        }
        Some(Rejection::BothLinesLow) => {
            r.result = "both_lines_low".into();
            r.hint = Some("D0 and D1 were low together: a short between them, or a reader on the wrong voltage".into());
            return r;
        }
        Some(Rejection::LineStuckLow) => {
            r.result = "line_stuck_low".into();
            r.hint =
                Some("a data line is held low: check for a short to ground, reader power, or a missing pull-up".into());
            return r;
        }
        _ => {}
    }
    let candidates: Vec<Format> = Format::ALL.iter().copied().filter(|f| f.bits() == Some(bits.len)).collect();
    let configured = candidates.iter().copied().find(|f| formats.contains(f));
    r.format = configured.or(candidates.first().copied()).map(|f| f.to_string());
    let Some(f) = configured.or(candidates.first().copied()) else {
        r.result = "no_format_of_this_length".into();
        r.hint = Some(format!(
            "{} bits matches no known format: configure `raw`, or check for missed pulses (ground, cable length)",
            bits.len
        ));
        return r;
    };
    match decode_fixed(f, bits) {
        Ok(read) => {
            r.result = "ok".into();
            r.facility = Some(read.card.facility);
            r.number = Some(read.card.number);
            if configured.is_none() {
                r.hint =
                    Some(format!("a valid {f} frame, but this reader is not configured for {f}: add it to `formats`"));
            }
        }
        Err(_) => {
            r.result = "parity_error".into();
            if let Ok(read) = decode_fixed(f, invert(bits)) {
                r.hint = Some(format!(
                    "the inverted frame is a valid {f} card ({}:{}): D0 and D1 are swapped; exchange the two wires",
                    read.card.facility, read.card.number
                ));
            } else {
                r.hint = Some("parity fails: a missed or extra pulse (ground, cable), or a different format".into());
            }
        }
    }
    r
}

fn print_line(json: bool, human: String, v: &impl Serialize) {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string(v).unwrap_or_default());
    } else {
        let _ = writeln!(out, "{human}");
    }
    let _ = out.flush();
}

/// `menshen test reader`: print every frame on a reader until `count` frames or `seconds` pass.
pub async fn test_reader(
    cfg: Arc<Config>,
    reader: &str,
    count: usize,
    seconds: u64,
    json: bool,
) -> anyhow::Result<usize> {
    let rc = cfg.reader(reader).ok_or_else(|| anyhow::anyhow!("no reader named `{reader}` in the config"))?.clone();
    let shutdown = CancellationToken::new();
    let (gpio, chip) = hw::open_gpio(&cfg, &shutdown).await?;
    // As the daemon claims them: one request, edges in the kernel's order.
    let mut pair = gpio.inputs(&[&rc.d0_pin, &rc.d1_pin])?;
    let (Some(mut d1_line), Some(mut d0_line)) = (pair.pop(), pair.pop()) else {
        anyhow::bail!("reader `{reader}`: the driver returned no lines");
    };
    let (mut d0, mut d1) = (d0_line.edges()?, d1_line.edges()?);
    let formats = rc.parsed_formats();
    // Collect whole frames by the gap (raw, no early completion), then explain them.
    let mut dec = Decoder::new(&[Format::Raw], Timing { pulse_max: rc.timing().pulse_max, ..rc.timing() }, false);
    if !json {
        println!(
            "reading `{reader}` (D0 GPIO{}, D1 GPIO{}, formats {}); present a card, Ctrl-C to stop",
            rc.d0_pin,
            rc.d1_pin,
            rc.formats.join(",")
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut seen = 0;
    let mut batch = Vec::new();
    while seen < count {
        let mut outs = Vec::new();
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::signal::ctrl_c() => break,
            Some(e) = d0.recv() => batch.push(WEdge { line: Line::D0, high: e.high, at: e.at }),
            Some(e) = d1.recv() => batch.push(WEdge { line: Line::D1, high: e.high, at: e.at }),
            _ = async { match dec.deadline() { Some(t) => tokio::time::sleep(t.until(MonoTime::now())).await, None => std::future::pending().await } } => {
                outs.extend(dec.on_deadline(MonoTime::now()));
            }
        }
        while let Ok(e) = d0.try_recv() {
            batch.push(WEdge { line: Line::D0, high: e.high, at: e.at });
        }
        while let Ok(e) = d1.try_recv() {
            batch.push(WEdge { line: Line::D1, high: e.high, at: e.at });
        }
        batch.sort_by_key(|e| e.at);
        for e in batch.drain(..) {
            outs.extend(dec.on_edge(e));
        }
        for o in outs {
            let report = match o {
                Outcome::Card(r) => analyze(r.bits, &formats, None),
                Outcome::Rejected { why: Rejection::ShortFrame, bits } => analyze(bits, &formats, None),
                Outcome::Rejected { why, bits } => analyze(bits, &formats, Some(why)),
            };
            let human = format!(
                "{:>2} bits  {}  format {}  {}{}{}",
                report.len,
                report.bits,
                report.format.as_deref().unwrap_or("-"),
                report.result,
                match (report.facility, report.number) {
                    (Some(f), Some(n)) => format!("  facility {f} card {n}"),
                    _ => String::new(),
                },
                report.hint.as_deref().map(|h| format!("\n          hint: {h}")).unwrap_or_default()
            );
            print_line(json, human, &report);
            seen += 1;
        }
    }
    shutdown.cancel();
    drop((d0_line, d1_line, gpio));
    if let Some(t) = chip {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    Ok(seen)
}

/// `menshen test relay`: pulse one door's relay once for its configured time.
pub async fn test_relay(cfg: Arc<Config>, door: &str) -> anyhow::Result<()> {
    let dc = cfg.door(door).ok_or_else(|| anyhow::anyhow!("no door named `{door}` in the config"))?.clone();
    let shutdown = CancellationToken::new();
    let (gpio, chip) = hw::open_gpio(&cfg, &shutdown).await?;
    let mut relay = Relay::open(gpio.as_ref(), &dc.relay_pin, dc.relay_active_high)?;
    println!("door `{door}`: relay GPIO{} energized for {} ms ...", dc.relay_pin, dc.pulse_ms);
    relay.set(!SAFE_RELAY_ENERGIZED)?;
    tokio::time::sleep(Duration::from_millis(dc.pulse_ms)).await;
    relay.set(SAFE_RELAY_ENERGIZED)?;
    println!("door `{door}`: relay back to its safe state (de-energized); did the lock click twice?");
    drop(relay);
    shutdown.cancel();
    drop(gpio);
    if let Some(t) = chip {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    Ok(())
}

/// `menshen test inputs`: print every door's contact, exit button and fire input, then each
/// debounced change, for `seconds`.
pub async fn test_inputs(cfg: Arc<Config>, seconds: u64, json: bool) -> anyhow::Result<usize> {
    let shutdown = CancellationToken::new();
    let (gpio, chip) = hw::open_gpio(&cfg, &shutdown).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, hw::Edge)>();
    let mut inputs = Vec::new();
    let mut lines = Vec::new();
    for d in &cfg.doors {
        for (kind, pin, level) in [
            ("contact", &d.contact_pin, d.contact_open_level),
            ("rex", &d.rex_pin, d.rex_active_level),
            ("fire", &d.fire_pin, d.fire_active_level),
        ] {
            let Some(pin) = pin.clone() else { continue };
            // The same lines as the daemon claims them: debounced by the kernel where it can.
            let mut line = gpio.input(&pin, Some(Duration::from_millis(d.debounce_ms)))?;
            let active = level.is_active(line.level()?);
            let mut edges = line.edges()?;
            let idx = inputs.len();
            let txc = tx.clone();
            tokio::spawn(async move {
                while let Some(e) = edges.recv().await {
                    if txc.send((idx, e)).is_err() {
                        break;
                    }
                }
            });
            let name = format!("{}.{kind}", d.name);
            let word = move |a: bool| match (kind, a) {
                ("contact", true) => "open",
                ("contact", false) => "closed",
                ("rex", true) | ("fire", true) => "active",
                _ => "inactive",
            };
            print_line(
                json,
                format!("{name:<16} GPIO{pin:<3} {}", word(active)),
                &serde_json::json!({"input": name, "pin": pin, "state": word(active), "initial": true}),
            );
            let hold = if line.debounced() { Duration::ZERO } else { Duration::from_millis(d.debounce_ms) };
            lines.push(line);
            inputs.push((name, pin, level, word, Debounced::new(active, hold)));
        }
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut changes = 0;
    loop {
        let next = inputs.iter().filter_map(|i| i.4.deadline()).min();
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::signal::ctrl_c() => break,
            Some((i, e)) = rx.recv() => { let lvl = inputs[i].2; inputs[i].4.raw(lvl.is_active(e.high), e.at); }
            _ = async { match next { Some(t) => tokio::time::sleep(t.until(MonoTime::now())).await, None => std::future::pending().await } } => {}
        }
        let now = MonoTime::now();
        for (name, pin, _, word, deb) in inputs.iter_mut() {
            if let Some(active) = deb.poll(now) {
                changes += 1;
                print_line(
                    json,
                    format!("{name:<16} GPIO{pin:<3} -> {}", word(active)),
                    &serde_json::json!({"input": name, "pin": pin, "state": word(active)}),
                );
            }
        }
    }
    shutdown.cancel();
    drop((lines, gpio));
    if let Some(t) = chip {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wiegand::encode;

    #[test]
    fn a_good_frame_is_explained() {
        let r = analyze(encode(Format::H10301, 7, 12345).unwrap(), &[Format::H10301], None);
        assert_eq!((r.result.as_str(), r.facility, r.number, r.hint.is_none()), ("ok", Some(7), Some(12345), true));
    }

    #[test]
    fn swapped_data_lines_are_recognised_in_every_format() {
        for f in [Format::H10301, Format::H10306, Format::C1k35s, Format::H10304] {
            let good = encode(f, 5, 4321).unwrap();
            let r = analyze(invert(good), &[f], None);
            assert_eq!(r.result, "parity_error", "{f}");
            let hint = r.hint.unwrap();
            assert!(hint.contains("swapped") && hint.contains("5:4321"), "{f}: {hint}");
        }
    }

    #[test]
    fn other_faults_get_their_hint() {
        let b = Bits::parse("0101").unwrap();
        assert!(analyze(b, &[Format::H10301], Some(Rejection::Noise)).hint.unwrap().contains("ground"));
        assert_eq!(analyze(b, &[Format::H10301], None).result, "no_format_of_this_length");
        let h = analyze(encode(Format::H10306, 1, 2).unwrap(), &[Format::H10301], None);
        assert_eq!(h.result, "ok");
        assert!(h.hint.unwrap().contains("not configured for H10306"));
        let mut bad = encode(Format::H10301, 7, 12345).unwrap();
        bad.value ^= 1 << 5;
        let r = analyze(bad, &[Format::H10301], None);
        assert_eq!(r.result, "parity_error");
        assert!(!r.hint.unwrap().contains("swapped"));
    }
}
