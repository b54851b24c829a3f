#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "powercut")]
//! Power cuts (REQUIREMENTS D1): the store, the key files and the audit file on `cutfs`, a FUSE
//! filesystem that forgets, on command, every write not yet fsynced (and keeps a random part of
//! them, as a disk may). Each round: the workload (`examples/power_cut_writer.rs`) changes the
//! store and says what was acknowledged; at a random moment the filesystem freezes (EIO), the
//! workload is SIGKILLed, the power is "cut", and the store is opened again and checked:
//!
//! - it opens;
//! - every acknowledged event is there with its content, and no event exists that was never made;
//! - every acknowledged resident is there, and none that was never attempted;
//! - every acknowledged consent and template is there, and the template opens with its data key
//!   (the key file survived); an acknowledged deletion left no template; an acknowledged settle
//!   left its signed receipt and no key file;
//! - the audit file verifies (its chain intact) and holds a record of every acknowledged change.
//!
//! Zero acknowledged loss is the bar. Needs root (FUSE) and `tools/cutfs` built (the test
//! command does both: `cargo build --release --manifest-path tools/cutfs/Cargo.toml`). Rounds:
//! `POWER_CUT_ROUNDS` (CI: 30).

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn cutfs_bin() -> PathBuf {
    std::env::var_os("MENSHEN_CUTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/cutfs/target/release/cutfs"))
}

fn writer_bin() -> PathBuf {
    // target/<profile>/deps/power_cut-… → target/<profile>/examples/power_cut_writer
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("examples/power_cut_writer");
    assert!(bin.exists(), "{} missing: cargo build --example power_cut_writer", bin.display());
    bin
}

struct CutFs {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    mount: PathBuf,
}

impl CutFs {
    fn mount(at: &Path) -> CutFs {
        let bin = cutfs_bin();
        assert!(
            bin.exists(),
            "{} missing: cargo build --release --manifest-path tools/cutfs/Cargo.toml",
            bin.display()
        );
        let mut child = Command::new(&bin).arg(at).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "mounted", "cutfs did not mount (root and /dev/fuse needed)");
        CutFs { child, stdin, stdout, mount: at.to_path_buf() }
    }

    fn say(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("ok"), "cutfs {cmd}: {line}");
        line.trim().to_string()
    }
}

impl Drop for CutFs {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workload, and what it has said so far.
struct Writer {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
    stderr: PathBuf,
}

impl Writer {
    fn start(state: &Path, first: u64, stderr: &Path) -> Writer {
        let mut child = Command::new(writer_bin())
            .arg(state)
            .arg(first.to_string())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(stderr).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                l2.lock().unwrap().push(line);
            }
        });
        Writer { child, lines, reader, stderr: stderr.to_path_buf() }
    }

    /// Still running (a workload that stopped on its own before the cut is a failure).
    fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!(
                "the workload stopped before the power cut ({st}): {}\n{:?}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default(),
                self.lines.lock().unwrap().last()
            );
        }
    }

    /// SIGKILL, then everything it printed.
    fn kill(mut self) -> Vec<String> {
        let _ = self.child.kill();
        self.child.wait().unwrap();
        self.reader.join().unwrap();
        let lines = self.lines.lock().unwrap().clone();
        lines
    }
}

#[derive(Default)]
struct Expect {
    events: BTreeMap<u64, String>,
    residents: BTreeSet<String>,
    attempted: BTreeSet<String>,
    consents: BTreeSet<String>,
    templates: HashMap<String, String>,
    carded: BTreeSet<String>,
    settled: BTreeSet<String>,
}

#[test]
fn acknowledged_changes_survive_power_cuts() {
    let rounds: u64 = std::env::var("POWER_CUT_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let seed: u64 = std::env::var("POWER_CUT_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(20261123);
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut fs = CutFs::mount(&mnt);
    let state = mnt.join("state");
    let mut exp = Expect::default();
    let mut rng = seed;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut first = 1u64;
    let mut acked_total = 0usize;
    let started = Instant::now();
    for round in 0..rounds {
        let run_for = Duration::from_millis(30 + next() % 300);
        let mut w = Writer::start(&state, first, &dir.path().join("writer.err"));
        let t = Instant::now();
        while t.elapsed() < run_for {
            std::thread::sleep(Duration::from_millis(5));
        }
        w.assert_running();
        // Power goes: the disk stops answering, the processes die, unsynced writes are lost
        // (all of them every fourth round; a random part otherwise).
        fs.say("freeze");
        let said = w.kill();
        if round % 4 == 3 {
            fs.say("lose-all");
        } else {
            fs.say(&format!("cut {}", next()));
        }
        for line in &said {
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["ack", "event", seq] => {
                    let seq: u64 = seq.parse().unwrap();
                    exp.events.insert(seq, format!("{{\"n\":{seq}}}"));
                }
                ["try", "upsert", id, _] => {
                    exp.attempted.insert(id.to_string());
                }
                ["ack", "upsert", id, _] => {
                    exp.residents.insert(id.to_string());
                }
                ["ack", "consent", id] => {
                    exp.consents.insert(id.to_string());
                }
                ["ack", "template", id, kid] => {
                    exp.templates.insert(id.to_string(), kid.to_string());
                }
                ["ack", "card", id] => {
                    exp.carded.insert(id.to_string());
                }
                ["ack", "settle", id, _] => {
                    exp.settled.insert(id.to_string());
                }
                ["error", ..] => panic!("the workload failed before the cut: {line}"),
                _ => {}
            }
        }
        acked_total += said.iter().filter(|l| l.starts_with("ack")).count();
        first += 1_000;
        check(&state, &exp, round);
    }
    eprintln!(
        "{rounds} power cuts in {:?}: {acked_total} acknowledged changes, {} events, {} residents, {} templates, \
         {} deletions settled; none lost",
        started.elapsed(),
        exp.events.len(),
        exp.residents.len(),
        exp.templates.len(),
        exp.settled.len()
    );
    assert!(exp.events.len() as u64 >= rounds, "the workload made progress");
    assert!(!exp.settled.is_empty(), "some deletions were settled");
}

fn check(state: &Path, exp: &Expect, round: u64) {
    use menshen::model::ResidentId;
    let store = menshen::store::Store::open(&state.join("menshen.redb"))
        .unwrap_or_else(|e| panic!("round {round}: the store does not open after the cut: {e}"));
    // Events: every acknowledged one, with its content; none that was never made.
    let mut stored: BTreeMap<u64, String> = BTreeMap::new();
    let last = store.next_seq().unwrap();
    for e in store.events_from(1, 1_000_000).unwrap() {
        stored.insert(e.seq, String::from_utf8(e.json).unwrap());
    }
    for (seq, content) in &exp.events {
        assert_eq!(stored.get(seq), Some(content), "round {round}: acknowledged event {seq} lost");
    }
    for (seq, content) in &stored {
        if !content.contains("\"n\"") {
            continue; // a deletion receipt
        }
        assert_eq!(content, &format!("{{\"n\":{seq}}}"), "round {round}: event {seq} changed");
        assert!(*seq < last);
    }
    // Residents.
    let residents: BTreeSet<String> =
        store.residents().unwrap().into_iter().map(|r| r.id.as_str().to_string()).collect();
    for id in &exp.residents {
        assert!(residents.contains(id), "round {round}: acknowledged resident {id} lost");
    }
    for id in &residents {
        assert!(exp.attempted.contains(id), "round {round}: resident {id} was never written");
    }
    // Face lifecycle.
    let cfg_keys = state.join("keys");
    let privacy = menshen::privacy::shred::Privacy::open_at(
        &cfg_keys,
        &state.join("device.key"),
        &state.join("signing.key"),
        "site1",
        "gate1",
    )
    .unwrap();
    let templates: HashMap<String, Vec<u8>> = store.templates().unwrap().into_iter().collect();
    for id in &exp.consents {
        let rid = ResidentId::new(id).unwrap();
        assert!(store.face_consent(&rid).unwrap().is_some(), "round {round}: acknowledged consent of {id} lost");
    }
    for (id, kid) in &exp.templates {
        if exp.carded.contains(id) {
            assert!(!templates.contains_key(id), "round {round}: {id}'s template survived its deletion");
            continue;
        }
        // Unless a later (unacknowledged) deletion went through, the template is there and opens.
        if let Some(blob) = templates.get(id) {
            assert_eq!(menshen::privacy::keys::key_id_of(blob).as_deref(), Some(kid.as_str()));
            privacy
                .keyring
                .open_template(id, blob)
                .unwrap_or_else(|e| panic!("round {round}: {id}'s template does not open after the cut: {e}"));
        } else {
            let pending = store.pending_deletions().unwrap();
            let receipted = stored.values().any(|c| c.contains(kid.as_str()));
            assert!(
                pending.iter().any(|d| &d.key_id == kid) || receipted,
                "round {round}: acknowledged template of {id} lost without a deletion"
            );
        }
    }
    for id in &exp.settled {
        let kid = &exp.templates[id];
        assert!(!cfg_keys.join(format!("{kid}.key")).exists(), "round {round}: {id}'s key came back");
        let receipt = stored.values().find(|c| c.contains(kid.as_str()));
        let receipt = receipt.unwrap_or_else(|| panic!("round {round}: {id}'s settled receipt lost"));
        let r = menshen::privacy::Receipt::from_json(receipt).unwrap();
        r.verify(&privacy.signer.public_key()).unwrap();
    }
    // The audit file: intact, and a record of every acknowledged resident.
    let text = std::fs::read_to_string(store.audit_path()).unwrap_or_default();
    let v = menshen::privacy::audit::verify_text(&text);
    assert_eq!(v.broken, None, "round {round}: the audit chain broke in a power cut");
    let audited: BTreeSet<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "resident_added")
        .filter_map(|r| r["resident"].as_str().map(str::to_string))
        .collect();
    for id in &exp.residents {
        assert!(audited.contains(id), "round {round}: the audit record of {id} lost");
    }
}
