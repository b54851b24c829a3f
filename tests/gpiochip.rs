#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! The real GPIO driver (gpiocdev, `hardware.backend = "gpiochip"`) in the release daemon, on a
//! simulated gpiochip.
//!
//! No GPIO chip exists here (no hardware, no kernel modules, no gpio-sim). The character device
//! is simulated at the system-call boundary instead: `tests/support/fake_gpiochip.c`, built at
//! test time and loaded with LD_PRELOAD into the release binary (which has no test hooks),
//! answers what gpiocdev does — realpath/stat/statx of /dev/gpiochip0, the sysfs `dev` file, the
//! /dev listing, the chip and line ioctls, reads of line events — and keeps the lines in the
//! simulated chip (`menshen sim serve`), a process of its own as hardware is, which plays
//! Wiegand frames with real timing, bouncing contacts and the kernel's debounce timer, and
//! releases a dead process's lines as the kernel does.

mod common;

use common::{wait_for, Broker, Gate, GateOpts, Subscriber};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn ok(out: std::process::Output) {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// The newest modification time under `dir`.
fn newest(dir: &Path) -> std::time::SystemTime {
    let mut t = std::time::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let m = if p.is_dir() { newest(&p) } else { p.metadata().unwrap().modified().unwrap() };
        t = t.max(m);
    }
    t
}

/// The release daemon: `MENSHEN_RELEASE_BIN`, else target/release/menshen as the test command
/// builds it (`cargo build --release --benches`, before the tests), rebuilt here only if a
/// source is newer. (A build from inside `cargo test` sees another LD_LIBRARY_PATH, which
/// clang-sys's build script tracks, and would rebuild the whole release tree for nothing.)
fn release_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MENSHEN_RELEASE_BIN") {
        return p.into();
    }
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let bin = root.join("target/release/menshen");
            let built = bin.metadata().and_then(|m| m.modified()).ok();
            let modified = |f: &str| root.join(f).metadata().unwrap().modified().unwrap();
            let sources =
                [newest(&root.join("src")), modified("Cargo.lock"), modified("Cargo.toml")].into_iter().max().unwrap();
            if built.is_none_or(|b| b < sources) {
                let st = Command::new(env!("CARGO"))
                    .args(["build", "--release", "--quiet", "--benches"])
                    .env_remove("LD_LIBRARY_PATH")
                    .current_dir(root)
                    .status()
                    .unwrap();
                assert!(st.success(), "building the release daemon failed");
            }
            bin
        })
        .clone()
}

/// The simulated gpiochip library, built into `dir`, and the environment that loads it.
fn fake_chip(gate: &Gate) -> Vec<(&'static str, String)> {
    let lib = common::build_preload("fake_gpiochip", gate.dir.path());
    vec![
        ("LD_PRELOAD", lib.display().to_string()),
        ("FAKE_GPIOCHIP_SOCKET", gate.socket.display().to_string()),
        ("FAKE_GPIOCHIP_CHIPS", "pinctrl-bcm2711:58".into()),
    ]
}

/// A gate on the gpiochip backend: the reader's lines named as `gpioinfo` lists them and by
/// chip and offset, a 3 s pulse, a reader with green and red LEDs and a beeper (active low).
fn gpiochip_gate(broker: &Broker) -> Gate {
    let gate = Gate::new(GateOpts { mqtt_port: broker.port, pulse_ms: 3_000, ..Default::default() });
    gate.edit_config(|t| {
        t["hardware"].as_table_mut().unwrap().insert("backend".into(), "gpiochip".into());
        let r = t["readers"].as_array_mut().unwrap()[0].as_table_mut().unwrap();
        r.insert("d0_pin".into(), "GPIO17".into());
        r.insert("d1_pin".into(), "gpiochip0:27".into());
        let mut fb = toml::Table::new();
        fb.insert("green_pin".into(), 5.into());
        fb.insert("red_pin".into(), 6.into());
        fb.insert("beeper_pin".into(), 12.into());
        r.insert("feedback".into(), fb.into());
    });
    gate
}

/// `menshen doctor --json` (the release binary, on the fake chip): its `gpio` check.
fn doctor_gpio(gate: &Gate, env: &[(&str, String)]) -> Value {
    let out = Command::new(release_bin())
        .args(["doctor", "--json", "--config", gate.config.to_str().unwrap()])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["name"] == "gpio")
        .unwrap_or_else(|| panic!("no gpio check: {}", String::from_utf8_lossy(&out.stdout)))
}

fn line(state: &Value, n: u32) -> Value {
    state["lines"][n.to_string()].clone()
}

/// An output line's levels since `after_ns`: (time, high).
fn levels_after(state: &Value, n: u32, after_ns: u64) -> Vec<(u64, bool)> {
    line(state, n)["transitions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| (t["at_ns"].as_u64().unwrap(), t["high"].as_bool().unwrap()))
                .filter(|(t, _)| *t > after_ns)
                .collect()
        })
        .unwrap_or_default()
}

/// Swipe the enrolled card, SIGKILL the daemon while the relay is energized, and wait for the
/// chip to see its lines released; when the swipe began.
fn kill_mid_pulse(gate: &mut Gate) -> u64 {
    let t0 = gate.state()["now_ns"].as_u64().unwrap();
    gate.swipe(7, 12345);
    assert!(
        wait_for(Duration::from_secs(5), || relay_energized_after(gate, t0).first() == Some(&true)),
        "no grant; log:\n{}",
        gate.log()
    );
    gate.signal_daemon("KILL");
    assert!(wait_for(Duration::from_secs(5), || line(&gate.state(), 22)["claimed"] == false));
    t0
}

fn relay_energized_after(gate: &Gate, after_ns: u64) -> Vec<bool> {
    levels_after(&gate.state(), 22, after_ns).into_iter().map(|(_, high)| high).collect()
}

#[test]
fn the_release_daemon_on_the_gpiochip_driver_opens_the_door_debounces_and_shows_feedback() {
    let broker = Broker::start(common::free_port());
    let mut gate = gpiochip_gate(&broker);
    ok(gate.resident(&["add", "r-1", "--card", "H10301:7:12345"]));
    let env = fake_chip(&gate);
    let sub = Subscriber::start(broker.port, "menshen/v1/#");
    gate.start_sim();
    // `menshen doctor` goes through the same driver: every line there and free; a line name the
    // board does not have is named.
    let g = doctor_gpio(&gate, &env);
    assert_eq!((g["status"].as_str(), g["message"].as_str()), (Some("ok"), Some("9 lines available")), "{g}");
    let good = std::fs::read_to_string(&gate.config).unwrap();
    gate.edit_config(|t| {
        t["doors"].as_array_mut().unwrap()[0].as_table_mut().unwrap().insert("rex_pin".into(), "NO_SUCH_LINE".into());
    });
    let g = doctor_gpio(&gate, &env);
    assert_eq!(g["status"], "fail");
    assert!(g["message"].as_str().unwrap().contains("NO_SUCH_LINE"), "{g}");
    std::fs::write(&gate.config, good).unwrap();
    gate.start_daemon_bin(&release_bin(), &env);
    // While the daemon holds them, the kernel (here, the chip) refuses them to anyone else.
    let g = doctor_gpio(&gate, &env);
    assert_eq!(g["status"], "fail");
    assert!(g["message"].as_str().unwrap().contains("busy"), "{g}");

    // Every line as the driver requested it: inputs pulled up, contacts and buttons debounced by
    // the kernel (the door's 50 ms), outputs driven at their safe level with a pull toward it.
    let s = gate.state();
    for (n, debounce) in [(17, None), (27, None), (23, Some(50_000)), (24, Some(50_000)), (25, Some(50_000))] {
        let l = line(&s, n);
        assert_eq!((l["claimed"].as_bool(), l["output"].as_bool()), (Some(true), Some(false)), "line {n}: {l}");
        assert_eq!(l["bias"], "pull-up", "line {n}");
        assert_eq!(l["debounce_us"].as_u64(), debounce, "line {n}");
    }
    let relay = line(&s, 22);
    assert_eq!((relay["output"].as_bool(), relay["high"].as_bool()), (Some(true), Some(false)), "{relay}");
    assert_eq!(relay["bias"], "pull-down", "the relay's safe level is held by a pull");
    for n in [5, 6, 12] {
        let l = line(&s, n);
        assert_eq!((l["output"].as_bool(), l["high"].as_bool()), (Some(true), Some(true)), "LED/beeper {n} off: {l}");
        assert_eq!(l["bias"], "pull-up", "line {n}");
    }

    // 1. A card: decoded from the kernel-stamped edges, granted, the relay pulses; green LED
    //    and one beep; the red LED stays off.
    let t0 = gate.state()["now_ns"].as_u64().unwrap();
    let swipe = gate.swipe(7, 12345);
    let ev = sub.wait_events("access", Duration::from_secs(10), |e| !e.is_empty());
    assert_eq!(ev.len(), 1, "{ev:?}\nlog:\n{}", gate.log());
    assert_eq!((ev[0]["decision"].as_str(), ev[0]["resident"].as_str()), (Some("granted"), Some("r-1")));
    assert_eq!(ev[0]["frame"]["bits"], swipe["bits"]);
    assert!(wait_for(Duration::from_secs(5), || relay_energized_after(&gate, t0) == [true, false]));
    let s = gate.state();
    let relay = levels_after(&s, 22, t0);
    let pulse_ms = (relay[1].0 - relay[0].0) as f64 / 1e6;
    assert!((2_900.0..3_500.0).contains(&pulse_ms), "pulse {pulse_ms} ms, configured 3000");
    let last_edge = swipe["last_edge_ns"].as_u64().unwrap();
    assert!(relay[0].0 > last_edge, "the relay moved after the frame's last edge");
    let green: Vec<bool> = levels_after(&s, 5, t0).into_iter().map(|l| l.1).collect();
    let beeper: Vec<bool> = levels_after(&s, 12, t0).into_iter().map(|l| l.1).collect();
    assert_eq!(green, [false, true], "green on (low), then off");
    assert_eq!(beeper, [false, true], "one beep");
    assert!(levels_after(&s, 6, t0).is_empty(), "the red LED stayed off");

    // 2. An unknown card: denied, red LED and three beeps, the relay does not move.
    let t1 = gate.state()["now_ns"].as_u64().unwrap();
    gate.swipe(7, 999);
    let ev = sub.wait_events("access", Duration::from_secs(10), |e| e.len() >= 2);
    assert_eq!(ev[1]["decision"], "denied");
    assert!(wait_for(Duration::from_secs(5), || levels_after(&gate.state(), 6, t1).len() >= 2));
    let s = gate.state();
    let beeps = levels_after(&s, 12, t1).into_iter().filter(|l| !l.1).count();
    assert_eq!(beeps, 3, "three beeps for a denial");
    assert!(levels_after(&s, 5, t1).is_empty(), "the green LED stayed off");
    assert!(relay_energized_after(&gate, t1).is_empty(), "no relay movement for a denial");

    // 3. The door contact bounces on opening and closing: the kernel's debounce hands the daemon
    //    one settled edge each way, so exactly one `opened` and one `closed`.
    gate.world(menshen::hw::sim::WorldOp::Door { door: "front".into(), open: true });
    assert!(wait_for(Duration::from_secs(5), || sub.events("door").iter().any(|e| e["event"] == "opened")));
    gate.world(menshen::hw::sim::WorldOp::Door { door: "front".into(), open: false });
    assert!(wait_for(Duration::from_secs(5), || sub.events("door").iter().any(|e| e["event"] == "closed")));
    std::thread::sleep(Duration::from_millis(300));
    let doors = sub.events("door");
    let count = |what: &str| doors.iter().filter(|e| e["event"] == what).count();
    assert_eq!((count("opened"), count("closed")), (1, 1), "{doors:?}");

    // 4. The exit button (bouncing, debounced by the kernel) unlocks the door.
    let t2 = gate.state()["now_ns"].as_u64().unwrap();
    gate.world(menshen::hw::sim::WorldOp::Rex { door: "front".into(), hold_ms: None });
    assert!(wait_for(Duration::from_secs(5), || relay_energized_after(&gate, t2).first() == Some(&true)));
    let exits = sub.wait_events("access", Duration::from_secs(5), |e| e.iter().any(|e| e["reason"] == "exit_request"));
    assert_eq!(exits.iter().filter(|e| e["reason"] == "exit_request").count(), 1, "{exits:?}");

    // A clean stop puts the relay and the LEDs at their safe levels and releases every line.
    let st = gate.signal_daemon("TERM");
    assert!(st.success(), "{st:?}\n{}", gate.log());
    let s = gate.state();
    assert_eq!(line(&s, 22)["high"], false, "relay de-energized");
    for n in [5, 6, 12, 17, 22, 23] {
        assert_eq!(line(&s, n)["claimed"], false, "line {n} released");
    }
}

#[test]
fn a_sigkilled_daemon_leaves_the_relay_where_the_kernel_leaves_it_and_a_lost_chip_stops_it() {
    let broker = Broker::start(common::free_port());
    let mut gate = gpiochip_gate(&broker);
    ok(gate.resident(&["add", "r-1", "--card", "H10301:7:12345"]));
    let env = fake_chip(&gate);
    let bin = release_bin();
    let sub = Subscriber::start(broker.port, "menshen/v1/#");
    gate.start_sim();
    gate.start_daemon_bin(&bin, &env);

    // SIGKILL in the middle of a 3 s unlock: nothing in the process runs, so nothing of ours
    // sets the safe level. The kernel releases the request; the line goes back to being an
    // input (as the Pi's pin controller does on free) and the pull it was requested with holds
    // it low: the relay (active high) is de-energized, and the active-low LEDs and beeper rest
    // high (off).
    let t0 = kill_mid_pulse(&mut gate);
    let s = gate.state();
    let relay = line(&s, 22);
    assert_eq!((relay["output"].as_bool(), relay["high"].as_bool()), (Some(false), Some(false)), "{relay}");
    assert_eq!(s["doors"]["front"]["relay_energized"], false);
    let after = levels_after(&s, 22, t0);
    assert_eq!(after.iter().map(|l| l.1).collect::<Vec<_>>(), [true, false], "energized, then released low");
    for n in [5, 6, 12] {
        assert_eq!(line(&s, n)["high"], true, "feedback line {n} rests off");
    }

    // The next start claims everything again at its safe level.
    gate.start_daemon_bin(&bin, &env);
    assert_eq!(line(&gate.state(), 22)["claimed"], true);

    // The chip goes away (a board fault): the driver's reads fail with ENODEV, the daemon says
    // so and exits non-zero, for systemd (Restart=always) to restart it.
    gate.world(menshen::hw::sim::WorldOp::Unplug);
    let st = gate.wait_daemon_exit(Duration::from_secs(10));
    assert!(!st.success(), "the daemon must not look healthy without its chip");
    assert!(gate.log().contains("GPIO line lost"), "{}", gate.log());
    // While it is gone, a start fails at once, naming the chip.
    gate.spawn_daemon(&bin, &env);
    let st = gate.wait_daemon_exit(Duration::from_secs(10));
    assert!(!st.success());
    assert!(gate.log().contains("opening the GPIO chip gpiochip0"), "{}", gate.log());
    // Back: the daemon starts, the stored alarm reaches the BMS, and a card opens the door.
    gate.world(menshen::hw::sim::WorldOp::Plug);
    gate.start_daemon_bin(&bin, &env);
    let alarms =
        sub.wait_events("alarm", Duration::from_secs(10), |e| e.iter().any(|a| a["alarm"] == "gpio_line_lost"));
    let lost: Vec<_> = alarms.iter().filter(|a| a["alarm"] == "gpio_line_lost").collect();
    assert_eq!(lost.len(), 1, "one alarm for the lost chip: {alarms:?}");
    assert_eq!(lost[0]["reader"], "front");
    let t1 = gate.state()["now_ns"].as_u64().unwrap();
    gate.swipe(7, 12345);
    assert!(
        wait_for(Duration::from_secs(5), || relay_energized_after(&gate, t1).first() == Some(&true)),
        "{}",
        gate.log()
    );
}

#[test]
fn on_a_kernel_that_keeps_released_outputs_the_relay_stays_until_the_restart_makes_it_safe() {
    // Raspberry Pi OS keeps a released output at its last level by default
    // (`pinctrl_bcm2835.persist_gpio_outputs`); no request flag changes that. A SIGKILL mid-pulse
    // then leaves the relay energized until the daemon starts again (systemd: within
    // RestartSec=1), and the start's first act is to claim it de-energized.
    let broker = Broker::start(common::free_port());
    let mut gate = gpiochip_gate(&broker);
    ok(gate.resident(&["add", "r-1", "--card", "H10301:7:12345"]));
    let env = fake_chip(&gate);
    let bin = release_bin();
    gate.start_sim_args(&["--on-release", "keep"]);
    gate.start_daemon_bin(&bin, &env);
    kill_mid_pulse(&mut gate);
    let relay = line(&gate.state(), 22);
    assert_eq!(
        (relay["output"].as_bool(), relay["high"].as_bool()),
        (Some(true), Some(true)),
        "kept energized: {relay}"
    );
    let t1 = gate.state()["now_ns"].as_u64().unwrap();
    gate.start_daemon_bin(&bin, &env);
    let s = gate.state();
    assert_eq!(s["doors"]["front"]["relay_energized"], false, "the start claims the relay de-energized");
    assert_eq!(levels_after(&s, 22, t1).first().map(|l| l.1), Some(false));
}

/// `menshen test reader` and `menshen test relay`, the installer's wiring checks, through the
/// same driver: D0/D1 as one request, the frame decoded from the kernel's timestamps; the relay
/// pulsed and left de-energized.
#[test]
fn the_wiring_checks_run_through_the_gpiochip_driver() {
    let broker = Broker::start(common::free_port());
    let mut gate = gpiochip_gate(&broker);
    gate.edit_config(|t| {
        t["doors"].as_array_mut().unwrap()[0].as_table_mut().unwrap().insert("pulse_ms".into(), 300.into());
    });
    let env = fake_chip(&gate);
    let bin = release_bin();
    gate.start_sim();
    let cfg = gate.config.to_str().unwrap().to_string();
    let envs = || env.iter().map(|(k, v)| (*k, v.as_str()));
    let reader = Command::new(&bin)
        .args(["test", "reader", "--reader", "front", "--count", "1", "--seconds", "20", "--json", "--config", &cfg])
        .envs(envs())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let claimed = |n: u32| line(&gate.state(), n)["claimed"] == true;
    assert!(wait_for(Duration::from_secs(10), || claimed(17) && claimed(27)), "test reader did not claim D0/D1");
    gate.swipe(7, 4242);
    let out = reader.wait_with_output().unwrap();
    assert!(out.status.success());
    let frame: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("result").is_some())
        .unwrap_or_else(|| panic!("no frame: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(
        (frame["result"].as_str(), frame["number"].as_u64(), frame["len"].as_u64()),
        (Some("ok"), Some(4242), Some(26)),
        "{frame}"
    );

    let t0 = gate.state()["now_ns"].as_u64().unwrap();
    let out =
        Command::new(&bin).args(["test", "relay", "--door", "front", "--config", &cfg]).envs(envs()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Claimed de-energized (low), energized, de-energized again.
    let pulse = levels_after(&gate.state(), 22, t0);
    assert_eq!(pulse.iter().map(|l| l.1).collect::<Vec<_>>(), [false, true, false], "{pulse:?}");
    let ms = (pulse[2].0 - pulse[1].0) as f64 / 1e6;
    assert!((290.0..800.0).contains(&ms), "pulse {ms} ms, configured 300");
    assert_eq!(line(&gate.state(), 22)["claimed"], false, "released after the check");
}
