//! The face runtime install (issue 7): `menshen doctor` loads the pinned ONNX Runtime and checks
//! every model against the manifest; a bad library or model fails its check with a fix, and the
//! daemon refuses to start on it with exit code 6 and a clear message, never a panic, leaving the
//! relay in its safe state.
//!
//! The runtime comes from `$MENSHEN_RUNTIME_DIR`, else `target/menshen-runtime` (the test command
//! installs it there with `scripts/setup-runtime.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Broker, Gate, GateOpts};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn runtime_dir() -> PathBuf {
    let d = std::env::var_os("MENSHEN_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/menshen-runtime"));
    assert!(
        d.join("lib/libonnxruntime.so.1.31.1").exists(),
        "no ONNX Runtime in {}: run scripts/setup-runtime.sh --dest target/menshen-runtime (scripts/test.sh does)",
        d.display()
    );
    d
}

fn with_face(gate: &Gate, lib: &Path, models: &Path) {
    gate.edit_config(|t| {
        let mut f = toml::Table::new();
        f.insert("enabled".into(), true.into());
        f.insert("onnxruntime_library".into(), lib.display().to_string().into());
        f.insert("models_dir".into(), models.display().to_string().into());
        t.insert("face".into(), f.into());
    });
}

fn onnx_check(gate: &Gate) -> Value {
    let out = gate.cli(&["doctor", "--json", "--config", gate.config.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["name"] == "onnx")
        .expect("an onnx check")
}

#[test]
fn doctor_loads_the_runtime_and_checks_every_model() {
    let rt = runtime_dir();
    let gate = Gate::new(GateOpts::default());
    assert_eq!(onnx_check(&gate)["status"], "skip", "face is off by default");
    with_face(&gate, &rt.join("lib/libonnxruntime.so.1.31.1"), &rt.join("models"));
    let c = onnx_check(&gate);
    assert_eq!(c["status"], "ok", "{c}");
    assert!(c["message"].as_str().unwrap().contains("4 models"), "{c}");

    // One byte changed in a model: refused by sha256, with a fix.
    let bad = gate.dir.path().join("models");
    std::fs::create_dir_all(&bad).unwrap();
    for e in std::fs::read_dir(rt.join("models")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), bad.join(e.file_name())).unwrap();
    }
    let victim = bad.join("mobilefacenet.onnx");
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    with_face(&gate, &rt.join("lib/libonnxruntime.so.1.31.1"), &bad);
    let c = onnx_check(&gate);
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["message"].as_str().unwrap().contains("mobilefacenet"), "{c}");
    assert!(c["message"].as_str().unwrap().contains("sha256"), "{c}");
    assert!(c["fix"].as_str().unwrap().contains("setup-runtime"), "{c}");

    // A library that is not the pinned one: refused before it is loaded.
    let fake = gate.dir.path().join("libonnxruntime.so.1.31.1");
    std::fs::write(&fake, b"\x7fELF not really").unwrap();
    with_face(&gate, &fake, &rt.join("models"));
    let c = onnx_check(&gate);
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["message"].as_str().unwrap().contains("not the pinned ONNX Runtime"), "{c}");
}

#[test]
fn the_daemon_refuses_to_start_on_a_bad_runtime_and_starts_on_a_good_one() {
    let rt = runtime_dir();
    let broker = Broker::start(common::free_port());
    let mut gate = Gate::new(GateOpts { mqtt_port: broker.port, ..Default::default() });
    gate.start_sim();
    with_face(&gate, &gate.dir.path().join("missing/libonnxruntime.so.1.31.1"), &rt.join("models"));
    let out = std::process::Command::new(common::BIN)
        .args(["run", "--config", gate.config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("face.onnxruntime_library"), "{stderr}");
    assert!(stderr.contains("fix: run scripts/setup-runtime.sh"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The relay was claimed in its safe state and released so.
    assert_eq!(gate.relay("front")["relay_energized"], false);

    with_face(&gate, &rt.join("lib/libonnxruntime.so.1.31.1"), &rt.join("models"));
    gate.start_daemon();
    assert!(gate.log().contains("face runtime checked and loaded"), "{}", gate.log());
    gate.swipe(1, 1);
    assert!(common::wait_for(std::time::Duration::from_secs(5), || {
        gate.status().unwrap()["stats"]["denied"].as_u64().unwrap() >= 1
    }));
}

/// `menshen resident enrol-face` uses the configured runtime (`face.onnxruntime_library`,
/// `face.models_dir`, overridden by `MENSHEN_ORT_LIB` / `MENSHEN_MODELS_DIR`) from any working
/// directory, and when it cannot load it, says which paths it tried and where each came from.
#[test]
fn enrol_face_uses_the_configured_runtime_from_anywhere_and_names_what_it_tried() {
    let rt = runtime_dir();
    let gate = Gate::new(GateOpts::default());
    with_face(&gate, Path::new("/nonexistent/libonnxruntime.so"), Path::new("/nonexistent/models"));
    let cfg = gate.config.to_str().unwrap().to_string();
    for args in [
        vec!["resident", "add", "f-1", "--mode", "face_or_card", "--card", "H10301:7:9", "--config", &cfg],
        vec!["resident", "consent", "f-1", "--config", &cfg],
    ] {
        let out = gate.cli(&args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let photo = common::shared_models().join("../data/smoke/George_W_Bush_0001.jpg");
    let enrol = |env: &[(&str, PathBuf)]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_menshen"))
            .args(["resident", "enrol-face", "f-1", "--config", &cfg, "--min-good", "1", "--photo"])
            .arg(&photo)
            .current_dir("/")
            .env_remove("MENSHEN_ORT_LIB")
            .env_remove("MENSHEN_MODELS_DIR")
            .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
            .output()
            .unwrap()
    };
    // The configured paths do not exist: it fails, naming them, their keys and the overrides.
    let out = enrol(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for needle in ["/nonexistent/libonnxruntime.so", "face.onnxruntime_library", "MENSHEN_ORT_LIB", "face.models_dir"] {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    // The overrides, from `/` (not the repository): it enrols.
    let out = enrol(&[
        ("MENSHEN_ORT_LIB", rt.join("lib/libonnxruntime.so.1.31.1")),
        ("MENSHEN_MODELS_DIR", common::shared_models()),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("enrolled"));
}
