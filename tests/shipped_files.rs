//! No default credentials (issue 6, security checks): every file the package ships (the .deb
//! assets in Cargo.toml, the maintainer scripts, the configs) is scanned for passwords, tokens,
//! keys and credentials in URLs; every shipped config parses with no MQTT login, no TLS client key
//! and no key file outside the gate's own state directory; and two fresh gates generate different
//! device and receipt-signing keys (nothing secret is shared between installations).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The files the .deb installs (globs expanded), plus the maintainer scripts and both configs.
fn shipped() -> Vec<PathBuf> {
    let manifest: toml::Table = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap().parse().unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let mut files = Vec::new();
    for asset in deb["assets"].as_array().unwrap() {
        let src = asset[0].as_str().unwrap();
        if src.starts_with("target/") {
            continue; // the binary
        }
        match src.split_once("*") {
            Some((dir, ext)) => {
                for e in std::fs::read_dir(Path::new(ROOT).join(dir)).unwrap() {
                    let p = e.unwrap().path();
                    if p.to_string_lossy().ends_with(ext) {
                        files.push(p);
                    }
                }
            }
            None => files.push(Path::new(ROOT).join(src)),
        }
    }
    let scripts = deb["maintainer-scripts"].as_str().unwrap();
    for e in std::fs::read_dir(Path::new(ROOT).join(scripts)).unwrap() {
        files.push(e.unwrap().path());
    }
    for c in ["config/menshen.toml", "config/menshen.rpi.toml", "systemd/menshen.service"] {
        files.push(Path::new(ROOT).join(c));
    }
    files.sort();
    files.dedup();
    files
}

/// A credential written into a line: `password = "x"`, `token: x`, `Environment=SECRET=x`, ...
fn assigns_a_secret(line: &str) -> bool {
    let l = line.trim().to_ascii_lowercase();
    if l.starts_with('#') || l.starts_with("//") || l.is_empty() {
        return false;
    }
    let words = ["password", "passwd", "secret", "token", "api_key", "apikey", "psk", "private_key"];
    let Some(eq) = l.find(['=', ':']) else { return false };
    let (key, value) = (l[..eq].trim(), l[eq + 1..].trim().trim_matches(['"', '\'']));
    if key.trim() == "environment" {
        // systemd `Environment=NAME=value`: the variable is the key.
        return assigns_a_secret(value);
    }
    // A key naming a file or a credential name is fine (`password_file`, `LoadCredential=`).
    let key_is_secret = words.iter().any(|w| key.contains(w)) && !key.ends_with("_file") && !key.contains("credential");
    key_is_secret && !value.is_empty()
}

/// `scheme://user:password@host`.
fn url_with_password(text: &str) -> Option<&str> {
    text.split_whitespace().find(|w| {
        w.split_once("://").is_some_and(|(_, rest)| {
            rest.split_once('@').is_some_and(|(userinfo, _)| !userinfo.contains('/') && userinfo.contains(':'))
        })
    })
}

/// 32 or more bytes of hex or base64 in one token: a key or a hash pasted into a file.
fn key_material(word: &str) -> bool {
    let w = word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '+' && c != '/' && c != '=');
    let hex = w.len() >= 64 && w.chars().all(|c| c.is_ascii_hexdigit());
    let b64 = w.len() >= 44 && w.ends_with('=') && w.chars().all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c));
    hex || b64
}

#[test]
fn no_shipped_file_holds_a_credential() {
    let files = shipped();
    assert!(files.len() >= 8, "{files:?}");
    let mut lines = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let name = f.strip_prefix(ROOT).unwrap().display().to_string();
        assert!(!text.contains("PRIVATE KEY-----"), "{name}: a private key");
        let is_doc = name.ends_with(".md");
        for (n, line) in text.lines().enumerate() {
            lines += 1;
            // Documentation may show placeholders (`rtsp://user:password@...`); what is installed
            // as configuration, unit or script may not.
            if !is_doc {
                assert!(!assigns_a_secret(line), "{name}:{}: a credential: {line}", n + 1);
                if let Some(u) = url_with_password(line) {
                    assert!(line.trim_start().starts_with('#'), "{name}:{}: a URL with a password: {u}", n + 1);
                }
            }
            // A sha256 checksum is allowed where it says so (the model manifest pins files).
            if !line.contains("sha256") {
                assert!(!line.split_whitespace().any(key_material), "{name}:{}: key material: {line}", n + 1);
            }
        }
    }
    eprintln!("{} shipped files, {lines} lines: no credential", files.len());
}

#[test]
fn the_scanner_finds_what_it_looks_for() {
    // Each rule fires on a planted credential, so the scan above can fail.
    for bad in [
        "password = \"admin\"",
        "mqtt_password: hunter2",
        "Environment=MQTT_TOKEN=abc",
        "psk = 0011",
        "  api_key = 'k'",
    ] {
        assert!(assigns_a_secret(bad), "{bad}");
    }
    for fine in
        ["# password = \"admin\"", "password_file = \"/etc/menshen/mqtt-password\"", "LoadCredential=a:b", "x = 1"]
    {
        assert!(!assigns_a_secret(fine), "{fine}");
    }
    assert!(url_with_password("url = \"rtsp://admin:12345@10.0.0.5/stream\"").is_some());
    assert!(url_with_password("url = \"rtsp://10.0.0.5/stream\"").is_none());
    assert!(key_material(&"ab".repeat(32)));
    assert!(key_material("q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80="));
    assert!(!key_material("menshen/v1/site1/gate1/cmd/resident.upsert"));
}

#[test]
fn shipped_configs_have_no_login_and_keep_keys_in_the_state_directory() {
    for f in ["config/menshen.toml", "config/menshen.rpi.toml"] {
        let cfg = menshen::config::parse(&std::fs::read_to_string(Path::new(ROOT).join(f)).unwrap()).unwrap();
        assert!(cfg.mqtt.username.is_none() && cfg.mqtt.password_file.is_none(), "{f}: an MQTT login");
        assert!(cfg.mqtt.tls.is_none(), "{f}: TLS files (a client key) configured");
        assert!(cfg.privacy.device_key_file.is_none() && cfg.privacy.signing_key_file.is_none(), "{f}: key files");
        assert!(cfg.device_key_path().starts_with(&cfg.gate.state_dir), "{f}");
        assert!(cfg.signing_key_path().starts_with(&cfg.gate.state_dir), "{f}");
    }
    // The unit reads keys only as systemd credentials the installer creates: none is shipped.
    let unit = std::fs::read_to_string(Path::new(ROOT).join("systemd/menshen.service")).unwrap();
    for l in unit.lines().filter(|l| l.contains("LoadCredential") || l.contains("SetCredential")) {
        assert!(l.trim_start().starts_with('#'), "the unit ships a credential: {l}");
    }
}

#[test]
fn each_gate_generates_its_own_keys() {
    let gates = [common::Gate::new(common::GateOpts::default()), common::Gate::new(common::GateOpts::default())];
    let mut keys = Vec::new();
    for g in &gates {
        let out = g.cli(&["identity", "--config", g.config.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let id: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let state = g.dir.path().join("state");
        let signing = state.join("signing.key");
        assert_eq!(std::fs::metadata(&signing).unwrap().permissions().mode() & 0o777, 0o600);
        keys.push((id["receipt_key"].as_str().unwrap().to_string(), std::fs::read(signing).unwrap()));
    }
    assert_ne!(keys[0].0, keys[1].0, "two gates share a receipt-signing key");
    assert_ne!(keys[0].1, keys[1].1);
}
