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

mod common;

use serde_json::{json, Value};
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
    let store = menshen::privacy::audit::AuditLog::open_store(&state.join("menshen.redb"))
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
    let text = std::fs::read_to_string(state.join("audit.jsonl")).unwrap_or_default();
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

/// The whole daemon with its state directory on cutfs (the admin socket elsewhere: cutfs has no
/// sockets), under swipes and MQTT roster commands from a BMS with a persistent session; each
/// round the power is cut at a random moment. After each cut the store opens and every
/// acknowledged command is in it; the relay starts safe; at the end every event reached the BMS
/// and no sequence number was ever published with two different contents (a published event
/// lost in a cut would let its number be reused for another). `POWER_CUT_DAEMON_ROUNDS` (CI: 10).
#[test]
fn the_whole_daemon_loses_nothing_acknowledged_in_power_cuts() {
    use common::{free_port, wait_for, Bms, Broker};
    let rounds: u64 = std::env::var("POWER_CUT_DAEMON_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let mut rng: u64 = std::env::var("POWER_CUT_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(20261123);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let port = free_port();
    let bdir = tempfile::tempdir().unwrap();
    let _broker = Broker::start_persistent(port, bdir.path());
    let bms = Bms::connect_with(port, Some("bms-power-cut"));
    let (mut gate, mut fs) = gate_on_cutfs(port, 150);
    let acked = |corr: &str| {
        bms.replies.lock().unwrap().iter().any(|(k, v)| k.as_deref() == Some(corr.as_bytes()) && v["ok"] == true)
    };
    // resident id -> the modes it may have: what its last acknowledged command set, and what a
    // later command sent but not acknowledged may have set (applied, the reply lost in the cut)
    let mut expect: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let started = Instant::now();
    for round in 0..rounds {
        gate.start_daemon();
        assert_eq!(gate.relay("front")["relay_energized"], false, "round {round}: the relay must start safe");
        let socket = gate.socket.clone();
        // Odd rounds: no swipes, and the power goes right after the last command's reply, so
        // nothing else is written between an acknowledgement and the cut.
        let quiet = round % 2 == 1;
        let swipes = if quiet { 0 } else { 1 + next() % 5 };
        let swiper = std::thread::spawn(move || {
            for n in 0..swipes {
                let (facility, card) = if n % 2 == 0 { (9, 9) } else { (8, 1000 + n) };
                let op = menshen::hw::sim::WorldOp::Swipe { reader: "front".into(), facility, card, format: None };
                let _ = menshen::hw::sim::request(&socket, &op);
            }
        });
        let n = 1 + next() % 4;
        let mut sent = Vec::new();
        for k in 0..n {
            let id = format!("pc-{round}-{k}");
            let corr = format!("up-{round}-{k}");
            let up = json!({"resident": {"id": id, "mode": "card",
                "cards": [{"format": "H10301", "facility": 70, "number": round * 10 + k}]}});
            let topic = "menshen/v1/site1/gate1/cmd/resident.upsert";
            bms.publish(topic, up.to_string().into_bytes(), Some(corr.as_bytes()), None, false);
            sent.push((id, corr, "card"));
            if k == 0 {
                let corr = format!("mode-{round}");
                let mode = json!({"resident": format!("pc-{round}-0"), "mode": "face_or_card"});
                let topic = "menshen/v1/site1/gate1/cmd/resident.set_mode";
                bms.publish(topic, mode.to_string().into_bytes(), Some(corr.as_bytes()), None, false);
                sent.push((format!("pc-{round}-0"), corr, "face_or_card"));
            }
            std::thread::sleep(Duration::from_millis(next() % 60));
        }
        if quiet {
            let (_, corr, _) = sent.last().unwrap();
            wait_for(Duration::from_secs(5), || acked(corr));
        } else {
            std::thread::sleep(Duration::from_millis(next() % 500));
        }
        // The power goes: the disk stops answering, the daemon dies, unsynced writes are lost.
        fs.say("freeze");
        gate.signal_daemon("KILL");
        swiper.join().unwrap();
        if round % 4 == 3 {
            fs.say("lose-all");
        } else {
            fs.say(&format!("cut {}", next()));
        }
        for (id, corr, mode) in sent {
            if acked(&corr) {
                expect.insert(id, vec![mode]);
            } else if let Some(modes) = expect.get_mut(&id) {
                modes.push(mode);
            }
        }
        let now = gate.resident_modes();
        for (id, modes) in &expect {
            let mode = now.get(id).map(String::as_str);
            assert!(
                mode.is_some_and(|m| modes.contains(&m)),
                "round {round}: acknowledged {id} ({modes:?}) lost: {mode:?}"
            );
        }
    }
    // The last start drains the outbox; then every event must have arrived, none with two contents.
    gate.start_daemon();
    assert!(wait_for(Duration::from_secs(30), || gate.status().unwrap()["outbox_depth"] == 0), "{}", gate.log());
    let last = gate.status().unwrap()["next_seq"].as_u64().unwrap() - 1;
    assert!(bms.all_events_arrived(last, Duration::from_secs(30)), "not every event arrived");
    assert!(gate.signal_daemon("TERM").success());
    let all = bms.events();
    let by_seq = common::events_by_seq(&all);
    let audit = gate.cli(&["audit", "verify", "--config", gate.config.to_str().unwrap()]);
    assert!(audit.status.success(), "audit chain: {}", String::from_utf8_lossy(&audit.stdout));
    eprintln!(
        "daemon on cutfs: {rounds} power cuts in {:?}: {} acknowledged roster commands kept; {} events (seq \
         1..={last}) delivered as {} messages, none conflicting",
        started.elapsed(),
        expect.len(),
        by_seq.len(),
        all.len()
    );
    assert!(!expect.is_empty(), "no command was acknowledged: the test tested nothing");
}

/// A full disk (issue: events were dropped when the store write failed). With the state
/// directory on cutfs switched to `full` (every write ENOSPC), the door keeps deciding from the
/// roster (read transactions), the events wait in memory (counted in `status`: what a crash would
/// lose), a remote unlock is refused (its request id cannot be claimed on disk) and a roster
/// command changes nothing. Once there is space, every held event is stored in the order it
/// happened and published, followed by one `store_unavailable` alarm that says how many waited.
#[test]
fn the_whole_daemon_on_a_full_disk_loses_no_event() {
    use common::{free_port, wait_for, Bms, Broker, Gate};
    let port = free_port();
    let _broker = Broker::start(port);
    let bms = Bms::connect(port);
    let (mut gate, mut fs) = gate_on_cutfs(port, 100);
    gate.start_daemon();
    assert!(wait_for(Duration::from_secs(10), || gate.status().is_some_and(|s| s["outbox_depth"] == 0)));
    let before = gate.status().unwrap()["next_seq"].as_u64().unwrap();
    let fingerprint = gate.fingerprint();

    fs.say("full");
    let grants = |g: &Gate| {
        g.relay("front")["transitions"].as_array().unwrap().iter().filter(|t| t["energized"] == true).count()
    };
    let swipes = 5;
    for n in 0..swipes {
        let had = grants(&gate);
        gate.swipe(9, 9);
        assert!(
            wait_for(Duration::from_secs(5), || grants(&gate) > had),
            "swipe {n} on a full disk: no grant\n{}",
            gate.log()
        );
        std::thread::sleep(Duration::from_millis(250)); // the relock, so the next grant moves the relay
    }
    let s = gate.status().unwrap();
    assert_eq!(s["store_write_failed"], true, "{s}");
    let held = s["events_held"].as_u64().unwrap();
    assert!(held >= swipes, "the access events wait in memory: {s}");
    assert_eq!(s["events_lost"], 0);
    assert_eq!(s["next_seq"].as_u64().unwrap(), before, "nothing was stored: {s}");

    // A remote unlock needs its request id on disk: refused, and the door does not move.
    let had = grants(&gate);
    let r = bms.command("site1", "gate1", "unlock", json!({"door": "front"}), Some(10));
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["code"], "internal_error", "{r}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(grants(&gate), had, "a refused unlock moved the relay");
    // A roster command is refused with nothing changed.
    let up = json!({"resident": {"id": "late", "mode": "card", "cards": [{"format": "H10301", "facility": 9, "number": 10}]}});
    let r = bms.command("site1", "gate1", "resident.upsert", up.clone(), None);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(gate.fingerprint(), fingerprint, "a refused command changed the roster");

    fs.say("space");
    assert!(
        wait_for(Duration::from_secs(20), || gate
            .status()
            .is_some_and(|s| s["events_held"] == 0 && s["store_write_failed"] == false && s["outbox_depth"] == 0)),
        "held events not stored after the disk has space again: {:?}\n{}",
        gate.status(),
        gate.log()
    );
    let last = gate.status().unwrap()["next_seq"].as_u64().unwrap() - 1;
    assert!(bms.all_events_arrived(last, Duration::from_secs(20)), "not every event arrived");
    let by_seq = common::events_by_seq(&bms.events());
    let after: Vec<&Value> = (before..=last).filter_map(|s| by_seq.get(&s)).collect();
    let alarm_at = after.iter().position(|e| e["alarm"] == "store_unavailable").expect("a store_unavailable alarm");
    let waited = &after[..alarm_at];
    let access: Vec<&&Value> = waited.iter().filter(|e| e["type"] == "access").collect();
    assert_eq!(access.len() as u64, swipes, "every swipe's event, stored after the outage: {waited:?}");
    assert!(access.iter().all(|e| e["decision"] == "granted" && e["resident"] == "known"));
    // In the order they happened, the alarm after them, saying how many waited.
    assert!(waited.windows(2).all(|w| w[0]["ts_ms"].as_i64() <= w[1]["ts_ms"].as_i64()), "{waited:?}");
    let detail = after[alarm_at]["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("{} events held in memory, 0 lost", waited.len())), "{detail}");
    assert!(!after.iter().any(|e| e["reason"] == "remote_unlock"), "the refused unlock left no event");
    // Writes work again.
    let r = bms.command("site1", "gate1", "resident.upsert", up, None);
    assert_eq!(r["ok"], true, "{r}");
    assert!(gate.signal_daemon("TERM").success());
    eprintln!(
        "full disk: {swipes} swipes granted, {} events held and then stored in order, alarm: {detail}",
        waited.len()
    );
}

/// A gate whose state directory is on a fresh cutfs (the admin socket off it: cutfs has no
/// sockets), its simulated chip running, with one resident `known` holding card 9:9.
fn gate_on_cutfs(port: u16, pulse_ms: u64) -> (common::Gate, CutFs) {
    let mut gate = common::Gate::new(common::GateOpts { mqtt_port: port, pulse_ms, ..common::GateOpts::default() });
    let mnt = gate.dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let fs = CutFs::mount(&mnt);
    let admin = gate.dir.path().join("admin.sock");
    gate.edit_config(|t| {
        let g = t["gate"].as_table_mut().unwrap();
        g.insert("state_dir".into(), mnt.join("state").display().to_string().into());
        g.insert("admin_socket".into(), admin.display().to_string().into());
    });
    gate.start_sim();
    let out = gate.resident(&["add", "known", "--card", "H10301:9:9"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (gate, fs)
}
