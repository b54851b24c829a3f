//! A broker that refuses some of the gate's publishes (MQTT 5 PUBACK reason 135, an ACL), on a
//! real mosquitto with a password file and the per-gate ACL of docs/mqtt.md.
//!
//! A refused reply (or any refused non-event publish) is logged, counted and dropped with the
//! connection kept: anyone allowed to send a command must not be able to flap the gate. A
//! refused event stays in the outbox and blocks the events behind it (in-order delivery): it is
//! retried with backoff, `health` says so at once, and when the broker accepts it the events go
//! out in order, followed by an alarm.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, wait_for, Bms, Broker, Gate, GateOpts};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

/// The ACL of docs/mqtt.md for gate1 and the BMS, with `gate_events` as the event topics gate1
/// may write.
fn acl(gate_events: &str) -> String {
    format!(
        "user gate1\ntopic read menshen/v1/site1/gate1/cmd/#\ntopic write menshen/v1/site1/gate1/status\n\
         topic write menshen/v1/site1/gate1/state/#\ntopic write menshen/v1/site1/gate1/health\ntopic write menshen/v1/site1/gate1/summary\n\
         topic write menshen/v1/site1/gate1/identity\n{gate_events}\
         topic read menshen/v1/site1/_site/cmd/#\ntopic write bms/+/replies\n\n\
         user bms\ntopic readwrite menshen/v1/#\ntopic readwrite bms/#\n"
    )
}

const ALL_EVENTS: &str = "topic write menshen/v1/site1/gate1/event/#\n";
const NO_ACCESS_EVENTS: &str = "topic write menshen/v1/site1/gate1/event/door\n\
    topic write menshen/v1/site1/gate1/event/alarm\ntopic write menshen/v1/site1/gate1/event/privacy\n\
    topic write menshen/v1/site1/gate1/event/system\n";

/// A broker with users gate1 and bms (passwords = names) and the ACL in `dir/acl`.
fn acl_broker(port: u16, gate_events: &str) -> (Broker, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    for (i, user) in ["gate1", "bms"].iter().enumerate() {
        let mut c = Command::new("mosquitto_passwd");
        if i == 0 {
            c.arg("-c");
        }
        assert!(c.arg("-b").arg(&pw).args([user, user]).status().unwrap().success());
    }
    let acl_file = dir.path().join("acl");
    std::fs::write(&acl_file, acl(gate_events)).unwrap();
    // mosquitto drops root privileges before it reads its files.
    Command::new("chmod").args(["-R", "a+rX"]).arg(dir.path()).status().unwrap();
    let text = format!(
        "listener {port} 127.0.0.1\npersistence false\nset_tcp_nodelay true\nallow_anonymous false\npassword_file {}\n\
         acl_file {}\n",
        pw.display(),
        acl_file.display()
    );
    (Broker::with_config(port, dir, &text), acl_file)
}

fn gate_as_gate1(port: u16) -> Gate {
    let gate = Gate::new(GateOpts { mqtt_port: port, ..Default::default() });
    let pw = gate.dir.path().join("mqtt.pw");
    std::fs::write(&pw, "gate1").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    gate.edit_config(|t| {
        let m = t["mqtt"].as_table_mut().unwrap();
        m.insert("username".into(), "gate1".into());
        m.insert("password_file".into(), pw.display().to_string().into());
    });
    gate
}

fn stat(gate: &Gate, key: &str) -> u64 {
    gate.status().unwrap()["stats"][key].as_u64().unwrap_or(0)
}

fn online(gate: &Gate) -> bool {
    gate.status().is_some_and(|s| s["stats"]["mqtt_online"] == true)
}

/// The ACL broker, gate1 connected to it, and the BMS logged in.
fn up(gate_events: &str) -> (Broker, std::path::PathBuf, Gate, Bms) {
    let (broker, acl_file) = acl_broker(free_port(), gate_events);
    let mut gate = gate_as_gate1(broker.port);
    gate.start_sim();
    gate.start_daemon();
    let bms = Bms::connect_login(broker.port, "bms", "bms");
    assert!(wait_for(Duration::from_secs(15), || online(&gate)), "gate never connected:\n{}", gate.log());
    (broker, acl_file, gate, bms)
}

#[test]
fn a_refused_reply_is_counted_and_dropped_and_the_link_stays_up() {
    let (_broker, _acl, gate, bms) = up(ALL_EVENTS);
    // The gate's own replies work under this ACL.
    let r = bms.command("site1", "gate1", "health.get", json!({}), None);
    assert_eq!(r["ok"], true, "{r}");
    let connects = stat(&gate, "mqtt_connects");
    let statuses = bms.messages("/gate1/status").len();

    let topic = "menshen/v1/site1/gate1/cmd/health.get";
    // Inside the reply prefix but refused by the broker's ACL (bms/+/replies has three levels).
    for i in 0..5 {
        bms.publish_replying_to(topic, b"{}".to_vec(), format!("acl-{i}").as_bytes(), "bms/replies");
    }
    // Outside the reply prefix (`mqtt.reply_topic_prefix`, default `bms/`): refused before publishing.
    for i in 0..5 {
        bms.publish_replying_to(topic, b"{}".to_vec(), format!("sys-{i}").as_bytes(), "$SYS/broker/x");
    }
    assert!(
        wait_for(Duration::from_secs(10), || stat(&gate, "replies_refused") >= 5),
        "refused replies not counted: {}\n{}",
        gate.status().unwrap()["stats"],
        gate.log()
    );
    assert!(wait_for(Duration::from_secs(10), || gate.status().unwrap()["stats"]["command_rejections"]
        ["invalid_reply_to"]
        == 5));
    // A command right behind them is answered on the same connection.
    let r = bms.command("site1", "gate1", "health.get", json!({}), None);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(stat(&gate, "mqtt_connects"), connects, "the gate reconnected:\n{}", gate.log());
    assert_eq!(bms.messages("/gate1/status").len(), statuses, "status flapped (retained topics re-sent)");
    assert!(!gate.log().contains("MQTT broker unreachable"), "{}", gate.log());
    assert_eq!(stat(&gate, "replies_refused"), 5);
    common::schema::check_all(&bms);
}

fn seqs(bms: &Bms, kind: &str) -> Vec<u64> {
    bms.messages(&format!("/event/{kind}")).iter().filter_map(|v| v["seq"].as_u64()).collect()
}

#[test]
fn a_refused_event_blocks_the_events_behind_it_keeps_the_link_and_goes_out_when_allowed() {
    let (broker, acl_file, gate, bms) = up(NO_ACCESS_EVENTS);
    // Whatever the start produced is delivered first (system events are allowed).
    assert!(wait_for(Duration::from_secs(10), || gate.status().unwrap()["outbox_depth"] == 0));
    let connects = stat(&gate, "mqtt_connects");

    // An unknown card: an access event, which this ACL refuses.
    gate.swipe(99, 4242);
    assert!(
        wait_for(Duration::from_secs(10), || gate.status().unwrap()["outbox_blocked"].is_object()),
        "the block is not reported: {}\n{}",
        gate.status().unwrap(),
        gate.log()
    );
    let blocked = gate.status().unwrap()["outbox_blocked"].clone();
    assert_eq!(blocked["reason"], "NotAuthorized", "{blocked}");
    let held = blocked["seq"].as_u64().unwrap();
    // health says so at once, on its own (it is not an event).
    assert!(
        wait_for(Duration::from_secs(5), || bms
            .messages("/gate1/health")
            .iter()
            .any(|h| h["outbox_blocked"]["seq"] == held)),
        "no health report of the block"
    );
    // Door events behind it (an allowed topic) wait too: events go out in order.
    gate.world(menshen::hw::sim::WorldOp::Door { door: "front".into(), open: true });
    assert!(wait_for(Duration::from_secs(5), || gate.status().unwrap()["next_seq"].as_u64().unwrap() > held + 1));
    // Several retries' worth (backoff 50..500 ms): nothing behind the held event goes out.
    std::thread::sleep(Duration::from_millis(1500));
    let early: Vec<u64> = bms.events().iter().filter_map(|v| v["seq"].as_u64()).filter(|s| *s >= held).collect();
    assert!(early.is_empty(), "sent while the event at {held} was refused: {early:?}");
    assert_eq!(stat(&gate, "mqtt_connects"), connects, "the gate reconnected:\n{}", gate.log());
    assert!(gate.status().unwrap()["outbox_depth"].as_u64().unwrap() >= 2);

    // The operator fixes the ACL; the broker re-reads it.
    std::fs::write(&acl_file, acl(ALL_EVENTS)).unwrap();
    broker.reload();
    assert!(
        wait_for(Duration::from_secs(10), || seqs(&bms, "access").contains(&held)),
        "the held event never went out:\n{}",
        gate.log()
    );
    assert!(
        wait_for(Duration::from_secs(10), || !seqs(&bms, "door").is_empty()
            && bms.messages("/event/alarm").iter().any(|a| a["alarm"] == "publish_refused")),
        "{:?}",
        bms.events()
    );
    // In order: the held access event before the door event behind it.
    let order: Vec<u64> = bms.events().iter().filter_map(|v| v["seq"].as_u64()).filter(|s| *s >= held).collect();
    assert_eq!(order.first(), Some(&held), "{order:?}");
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "out of order: {order:?}");
    let alarms: Vec<Value> =
        bms.messages("/event/alarm").into_iter().filter(|a| a["alarm"] == "publish_refused").collect();
    assert_eq!(alarms.len(), 1, "one alarm, not one per retry: {alarms:?}");
    assert!(alarms[0]["detail"].as_str().unwrap().contains(&held.to_string()), "{}", alarms[0]);
    assert!(wait_for(Duration::from_secs(5), || gate.status().unwrap()["outbox_blocked"].is_null()));
    assert_eq!(stat(&gate, "mqtt_connects"), connects, "the gate reconnected:\n{}", gate.log());
    // The health reports with the block, and the alarm, are valid against the schemas.
    common::schema::check_all(&bms);
}
