#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! Camera faults in the whole daemon (REQUIREMENTS D3): corrupt frames, a camera that goes away
//! and a stalled camera are each reported within 5 s and recovered without a restart, while
//! cards keep working. The camera is the file source (no video device exists here); its faults
//! are real files: truncated JPEGs, a directory that vanishes, frames that stop coming.

mod common;

use common::{wait_for, Gate, GateOpts};
use std::time::Duration;

fn ok(out: std::process::Output) {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

use common::shared_models as shared;

fn card_still_works(gate: &Gate, n: u64) {
    let before = gate.status().unwrap()["stats"]["granted"].as_u64().unwrap();
    gate.swipe(7, n);
    assert!(
        wait_for(Duration::from_secs(5), || gate.status().unwrap()["stats"]["granted"].as_u64().unwrap() > before),
        "card not granted during a camera fault; log:\n{}",
        gate.log()
    );
}

#[test]
fn corrupt_gone_and_stalled_cameras_are_reported_and_recovered_while_cards_work() {
    let mut gate = Gate::new(GateOpts { pulse_ms: 200, ..Default::default() });
    let cam = gate.dir.path().join("camera");
    std::fs::create_dir_all(&cam).unwrap();
    let good = std::fs::read(shared().join("../data/smoke/George_W_Bush_0001.jpg")).unwrap();
    std::fs::write(cam.join("00.jpg"), &good).unwrap();
    gate.enable_face(&cam, 10.0);
    gate.edit_config(|t| {
        t["mqtt"].as_table_mut().unwrap().insert("enabled".into(), false.into());
    });
    ok(gate.resident(&["add", "r-1", "--card", "H10301:7:100"]));
    gate.start_sim();
    gate.start_daemon();
    gate.wait_camera("ok", Duration::from_secs(30));
    let pid = gate.daemon_pid();

    // 1. Corrupt JPEGs (truncated, and garbage with a JPEG header).
    std::fs::write(cam.join("00.jpg"), &good[..good.len() / 3]).unwrap();
    std::fs::write(cam.join("01.jpg"), [0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3, 4]).unwrap();
    let took = gate.wait_camera("corrupt", Duration::from_secs(5));
    eprintln!("corrupt frames reported after {took:?}");
    card_still_works(&gate, 100);
    std::fs::write(cam.join("00.jpg"), &good).unwrap();
    std::fs::remove_file(cam.join("01.jpg")).unwrap();
    gate.wait_camera("ok", Duration::from_secs(5));

    // 2. The camera goes away (unplugged): reported, and back when it returns.
    std::fs::remove_dir_all(&cam).unwrap();
    let took = gate.wait_camera("gone", Duration::from_secs(5));
    eprintln!("camera gone reported after {took:?}");
    card_still_works(&gate, 100);
    std::fs::create_dir_all(&cam).unwrap();
    std::fs::write(cam.join("00.jpg"), &good).unwrap();
    gate.wait_camera("ok", Duration::from_secs(5));

    // 3. A stalled camera: its frames stop coming (the fifo never delivers one).
    std::fs::remove_file(cam.join("00.jpg")).unwrap();
    let fifo = cam.join("00.jpg");
    ok(std::process::Command::new("mkfifo").arg(&fifo).output().unwrap());
    let took = gate.wait_camera("stalled", Duration::from_secs(6));
    eprintln!("stall reported after {took:?}");
    card_still_works(&gate, 100);
    // Unblock the reader, put a real frame back: recovered.
    // (A writer that finds no reader would block: it runs detached.)
    std::thread::spawn({
        let fifo = fifo.clone();
        move || {
            let _ = std::fs::write(&fifo, b"");
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    std::fs::remove_file(&fifo).unwrap();
    std::fs::write(cam.join("00.jpg"), &good).unwrap();
    gate.wait_camera("ok", Duration::from_secs(8));

    assert_eq!(gate.daemon_pid(), pid, "recovered without a restart");
}
