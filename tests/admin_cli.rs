#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! `menshen resident …` with the daemon running (through its admin socket) and stopped (on the
//! store): the same output, exit codes, Art. 10 refusal and audit trail; the socket serves root,
//! the daemon's user and the admin group only (SO_PEERCRED), and counts the others it refuses.

mod common;

use common::{Broker, Gate, GateOpts, Subscriber, BIN};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use std::time::Duration;

fn text(o: &Output) -> (Option<i32>, String, String) {
    (o.status.code(), String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
}

/// The same commands against a gate, one run stopped and one running: what each prints.
fn script(gate: &Gate) -> Vec<(Option<i32>, String, String)> {
    [
        &["add", "r-1", "--mode", "face_or_card", "--card", "H10301:7:1001"][..],
        &["add", "r-1", "--card", "H10301:7:1009"],
        &["set-mode", "r-1", "card"],
        &["set-mode", "r-1", "card"],
        &["set-mode", "r-1", "face_or_card"],
        // Art. 10: removing the only card of a face_or_card resident would leave face alone.
        &["remove-card", "H10301:7:1001"],
        &["consent", "r-1"],
        &["withdraw-consent", "r-1"],
        &["list"],
        &["remove", "r-1"],
    ]
    .iter()
    .map(|a| text(&gate.resident(a)))
    .collect()
}

#[test]
fn resident_commands_work_the_same_with_the_daemon_running_or_stopped() {
    let broker = Broker::start(common::free_port());
    // Stopped: the CLI opens the store itself.
    let stopped_gate = Gate::new(GateOpts { mqtt_port: broker.port, ..Default::default() });
    let stopped = script(&stopped_gate);

    // Running: the store is the daemon's; the CLI goes through the admin socket.
    let mut gate = Gate::new(GateOpts { mqtt_port: broker.port, ..Default::default() });
    let sub = Subscriber::start(broker.port, "menshen/v1/#");
    gate.start_sim();
    gate.start_daemon();
    let running = script(&gate);
    let status = gate.status().unwrap();
    assert_eq!(status["admin_commands"], 8, "{status}");

    // Same exit codes and output, line for line (request ids and times are not printed).
    for (i, (s, r)) in stopped.iter().zip(&running).enumerate() {
        assert_eq!(s, r, "command {i} differs: stopped {s:?} running {r:?}");
    }
    assert_eq!(running[0], (Some(0), "added resident r-1 (mode face_or_card, 1 card(s))\n".into(), String::new()));
    assert_eq!(running[1].0, Some(1));
    assert!(running[1].2.contains("exists"), "{:?}", running[1]);
    assert_eq!(running[3].1, "resident r-1: already mode card, nothing changed\n");
    assert_eq!(running[5].0, Some(1));
    assert!(running[5].2.contains("face must never be the only way in"), "{:?}", running[5]);
    assert!(running[8].1.starts_with("r-1\tface_or_card\tH10301:"), "{:?}", running[8]);

    // Through the daemon, the changes reach the BMS as the MQTT commands' would.
    let privacy = sub.wait_events("privacy", Duration::from_secs(5), |e| {
        e.iter().any(|v| v["privacy"] == "consent_withdrawn")
            && e.iter().filter(|v| v["privacy"] == "mode_changed").count() >= 2
    });
    let modes: Vec<_> = privacy.iter().filter(|v| v["privacy"] == "mode_changed").collect();
    assert_eq!(modes[0]["from_mode"], "face_or_card");
    assert_eq!(modes[0]["to_mode"], "card");
    assert!(modes[0]["request_id"].as_str().unwrap().starts_with("cli-"), "{}", modes[0]);
    assert!(privacy.iter().any(|v| v["privacy"] == "consent_recorded"));

    // Both audit trails name the channel and the caller's uid (root here), and verify.
    for g in [&stopped_gate, &gate] {
        let audit = std::fs::read_to_string(g.dir.path().join("state/audit.jsonl")).unwrap();
        let recs: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        for kind in ["resident_added", "mode_changed", "consent_recorded", "consent_withdrawn", "resident_removed"] {
            let r = recs.iter().find(|r| r["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in {audit}"));
            assert!(r["by"].as_str().unwrap().starts_with("cli uid=0, request cli-"), "{r}");
        }
        let v = g.cli(&["audit", "verify", "--config", g.config.to_str().unwrap()]);
        assert!(v.status.success(), "{v:?}");
    }
}

#[test]
fn a_user_outside_root_and_the_admin_group_is_refused_and_counted() {
    const NOBODY: u32 = 65534;
    let mut gate = Gate::new(GateOpts::default());
    gate.start_sim();
    gate.start_daemon();
    // Let an unprivileged user reach the config and the socket's directory, as a
    // misconfigured install might; the socket's own mode and SO_PEERCRED still hold.
    use std::os::unix::fs::PermissionsExt;
    let open = |p: &std::path::Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    open(gate.dir.path(), 0o755);
    open(&gate.dir.path().join("state"), 0o755);
    open(&gate.config, 0o644);
    let socket = gate.dir.path().join("state/admin.sock");
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o660);
    let as_nobody = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(["resident"]).args(args).arg("--config").arg(&gate.config).uid(NOBODY).gid(NOBODY);
        text(&c.output().unwrap())
    };

    // The socket's mode keeps nobody out, and the CLI does not fall back to the store.
    let (code, out, err) = as_nobody(&["add", "r-9", "--card", "H10301:7:9009"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("the daemon is running") && err.contains("group `menshen`"), "{err}");

    // With the mode opened up, SO_PEERCRED refuses the peer, and the daemon counts it.
    open(&socket, 0o666);
    let (code, _, err) = as_nobody(&["add", "r-9", "--card", "H10301:7:9009"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("refused: uid 65534 is not root"), "{err}");
    let (code, _, err) = as_nobody(&["list"]);
    assert_eq!(code, Some(1), "{err}");
    let status = gate.status().unwrap();
    assert_eq!(status["admin_refused"], 2, "{status}");
    assert_eq!(status["admin_commands"], 0, "{status}");
    // Nothing was added by either attempt.
    assert!(!text(&gate.resident(&["list"])).1.contains("r-9"));
}
