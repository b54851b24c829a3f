//! The workload of the power-cut test (`tests/power_cut.rs`): it changes a real store the way the
//! daemon does, and prints a line *after* each change is acknowledged (the call returned Ok), so
//! the test knows exactly what was promised before the power went.
//!
//! `power_cut_writer STATE_DIR FIRST_RESIDENT` loops until killed:
//! - `try X` then `ack X` around each step;
//! - `ack event SEQ` for each stored event (its content is `{"n":SEQ}`);
//! - resident `r-N` (card) upserted with request id `q-N`; every third one goes through the face
//!   lifecycle: mode `face_or_card`, consent, a sealed template (its own data key), mode `card`
//!   (the template deleted), and the deletion settled (key destroyed, signed receipt stored).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test workload: a failure ends it, the test sees it

use menshen::model::FaceConsent;
use menshen::model::{AccessMode, Credential, CredentialKind, Resident, ResidentId, Validity};
use menshen::store::{Claim, RosterOp};
use menshen::wiegand::{CardId, Format};
use std::io::Write;
use std::path::PathBuf;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("STATE_DIR"));
    let first: u64 = args.next().expect("FIRST_RESIDENT").parse().expect("a number");
    let store = match menshen::privacy::audit::AuditLog::open_store(&dir.join("menshen.redb")) {
        Ok(s) => s,
        Err(e) => {
            say(&format!("error open {e}"));
            std::process::exit(3);
        }
    };
    let privacy = menshen::privacy::shred::Privacy::open_at(
        &dir.join("keys"),
        &dir.join("device.key"),
        &dir.join("signing.key"),
        "site1",
        "gate1",
    )
    .expect("privacy keys");
    say("ready");
    let now = 1_800_000_000_000i64;
    let mut n = first;
    loop {
        // An event, as the gate stage stores one.
        let stored = store.append_events(vec![|seq: u64| format!("{{\"n\":{seq}}}").into_bytes()]).expect("event");
        say(&format!("ack event {}", stored[0].seq));
        // Deliveries: the oldest waiting events leave the outbox (not fsynced: may come back).
        if n % 4 == 0 {
            let seqs: Vec<u64> = store.outbox_after(0, 2).unwrap().iter().map(|e| e.seq).collect();
            store.ack_events(&seqs).expect("ack");
        }
        let id = format!("r-{n}");
        let rid = ResidentId::new(&id).unwrap();
        let card = CardId { format: Format::H10301, facility: (n / 65_536 % 256) as _, number: (n % 65_536) as _ };
        let cred =
            Credential { credential: CredentialKind::Card(card), resident: rid.clone(), validity: Validity::default() };
        let face = n % 3 == 0;
        let mode = if face { AccessMode::FaceOrCard } else { AccessMode::Card };
        let r = Resident { id: rid.clone(), mode, validity: Validity::default(), schedule: None };
        let rq = format!("q-{n}");
        say(&format!("try upsert {id} {}", mode.name()));
        store
            .apply(
                RosterOp::Upsert { resident: r, credentials: Some(vec![cred]) },
                Some(Claim { request_id: &rq, now_ms: now, by: "mqtt" }),
                now,
            )
            .expect("upsert");
        say(&format!("ack upsert {id} {}", mode.name()));
        if face {
            let c = FaceConsent {
                granted_ms: now,
                rules_version: "v1".into(),
                rules_sha256: "ab".repeat(32),
                purpose: "gate_access".into(),
                retention_days: 30,
                channel: "bms".into(),
                minor: false,
                guardian: None,
            };
            say(&format!("try consent {id}"));
            store.record_face_consent(&rid, &c, None, now).expect("consent");
            say(&format!("ack consent {id}"));
            let template: Vec<f32> = (0..128).map(|j| ((n as usize * 7 + j) as f32).cos()).collect();
            let (kid, sealed) = privacy.keyring.seal(&id, &template).expect("seal");
            say(&format!("try template {id} {kid}"));
            store.put_template(&rid, &kid, &sealed, now).expect("template");
            say(&format!("ack template {id} {kid}"));
            if n % 2 == 0 {
                say(&format!("try card {id}"));
                store.set_mode(&rid, AccessMode::Card, now).expect("mode");
                say(&format!("ack card {id}"));
                say(&format!("try settle {id}"));
                let receipts = privacy.settle(&store, now, false).expect("settle");
                say(&format!("ack settle {id} {}", receipts.len()));
            }
        }
        n += 1;
    }
}
