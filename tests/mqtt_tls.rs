//! TLS with a pinned CA and client certificates, and a per-gate ACL, on a real mosquitto with
//! certificates made by openssl at test time (REQUIREMENTS M4).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, wait_for, Broker, Gate, GateOpts};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, and certificates it signs: `{name}.pem` / `{name}.key`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path, ca: &str) -> Pki {
        let dir = dir.join(ca);
        std::fs::create_dir_all(&dir).unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                &format!("/CN={ca}"),
            ],
        );
        Pki { dir }
    }

    fn issue(&self, name: &str, server: bool) -> (PathBuf, PathBuf) {
        let d = &self.dir;
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        let ext = if server { "subjectAltName=DNS:localhost,IP:127.0.0.1" } else { "extendedKeyUsage=clientAuth" };
        std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
        (d.join(format!("{name}.pem")), d.join(format!("{name}.key")))
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

fn readable_by_all(dir: &Path) {
    // mosquitto drops root privileges before it reads its certificates.
    Command::new("chmod").args(["-R", "a+rX"]).arg(dir).status().unwrap();
}

fn tls_client(
    port: u16,
    id: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> (rumqttc::v5::Client, rumqttc::v5::Connection) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let certs = CertificateDer::pem_file_iter(cert).unwrap().collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    let mut o = rumqttc::v5::MqttOptions::new(id, "localhost", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(Arc::new(cfg))));
    rumqttc::v5::Client::new(o, 100)
}

/// A mosquitto with a TLS listener (server certificate from `pki`) and `auth` settings.
fn tls_broker(port: u16, certs: &Path, pki: &Pki, cert: &Path, key: &Path, auth: &str) -> Broker {
    let conf = format!(
        "per_listener_settings false\npersistence false\nset_tcp_nodelay true\nlistener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n{auth}",
        pki.ca().display(),
        cert.display(),
        key.display()
    );
    readable_by_all(certs);
    let broker_dir = tempfile::tempdir().unwrap();
    readable_by_all(broker_dir.path());
    Broker::with_config(port, broker_dir, &conf)
}

/// A gate configured for TLS to `localhost` (the broker certificate's name) with this CA pinned.
fn tls_gate(port: u16, ca: &Path, cert: &Path, key: &Path) -> Gate {
    let gate = Gate::new(GateOpts { mqtt_port: port, ..GateOpts::default() });
    let files = [("ca_file", ca), ("client_cert_file", cert), ("client_key_file", key)];
    gate.edit_config(|t| {
        let m = t["mqtt"].as_table_mut().unwrap();
        m.insert("host".into(), "localhost".into());
        let tls: toml::Table = files.iter().map(|(k, p)| (k.to_string(), p.display().to_string().into())).collect();
        m.insert("tls".into(), tls.into());
    });
    gate
}

type Seen = Arc<Mutex<Vec<(String, Value)>>>;
type Acks = Arc<Mutex<Vec<PubAckReason>>>;
type LastError = Arc<Mutex<Option<String>>>;

/// Drive a client's connection on a thread; record publishes and PUBACK reasons.
fn drive(mut conn: rumqttc::v5::Connection) -> (Seen, Acks, LastError) {
    let seen: Seen = Arc::default();
    let acks: Acks = Arc::default();
    let err: LastError = Arc::default();
    let (s, a, e) = (seen.clone(), acks.clone(), err.clone());
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(rumqttc::v5::Event::Incoming(Packet::Publish(p))) => {
                    let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    s.lock().unwrap().push((String::from_utf8_lossy(&p.topic).to_string(), v));
                }
                Ok(rumqttc::v5::Event::Incoming(Packet::PubAck(p))) => a.lock().unwrap().push(p.reason),
                Ok(_) => {}
                Err(x) => {
                    *e.lock().unwrap() = Some(x.to_string());
                    break;
                }
            }
        }
    });
    (seen, acks, err)
}

#[test]
fn gates_talk_tls_with_client_certificates_and_stay_in_their_own_topics() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "site-ca");
    let (srv_cert, srv_key) = pki.issue("broker", true);
    let (g1_cert, g1_key) = pki.issue("gate1", false);
    let (bms_cert, bms_key) = pki.issue("bms", false);
    let rogue = Pki::new(dir.path(), "rogue-ca");
    let (rogue_cert, rogue_key) = rogue.issue("gate1", false);
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "user gate1\ntopic readwrite menshen/v1/site1/gate1/#\ntopic read menshen/v1/site1/_site/cmd/#\n\
         topic write bms/+/replies\n\nuser bms\ntopic readwrite menshen/v1/#\ntopic readwrite bms/#\n",
    )
    .unwrap();
    let auth = format!(
        "allow_anonymous false\nacl_file {}\nrequire_certificate true\n\
         use_identity_as_username true\n",
        acl.display()
    );
    let _broker = tls_broker(port, dir.path(), &pki, &srv_cert, &srv_key, &auth);

    // The BMS, over TLS with its own certificate.
    let (bms, conn) = tls_client(port, "bms", &pki.ca(), &bms_cert, &bms_key);
    let (seen, _, bms_err) = drive(conn);
    bms.subscribe("menshen/v1/#", QoS::AtLeastOnce).unwrap();
    bms.subscribe("bms/bms/replies", QoS::AtLeastOnce).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(bms_err.lock().unwrap().is_none(), "{:?}", bms_err.lock().unwrap());

    // The gate, with TLS, the CA pinned and its client certificate; host "localhost" matches the SAN.
    let mut gate = tls_gate(port, &pki.ca(), &g1_cert, &g1_key);
    gate.start_sim();
    gate.start_daemon();
    let online =
        || seen.lock().unwrap().iter().any(|(t, v)| t == "menshen/v1/site1/gate1/status" && v["state"] == "online");
    assert!(wait_for(Duration::from_secs(10), online), "gate never online over TLS; log:\n{}", gate.log());
    gate.swipe(9, 9);
    assert!(
        wait_for(Duration::from_secs(5), || seen
            .lock()
            .unwrap()
            .iter()
            .any(|(t, _)| t.ends_with("gate1/event/access"))),
        "no event over TLS"
    );
    // A command over TLS gets its reply.
    let p = serde_json::json!({"request_id": "tls-1", "reply_to": "bms/bms/replies"}).to_string();
    bms.publish("menshen/v1/site1/gate1/cmd/health.get", QoS::AtLeastOnce, false, p).unwrap();
    assert!(wait_for(Duration::from_secs(5), || seen
        .lock()
        .unwrap()
        .iter()
        .any(|(t, v)| t == "bms/bms/replies" && v["request_id"] == "tls-1" && v["ok"] == true)));

    // With gate1's identity, publishing to gate2's topics is refused by the ACL (MQTT 5: 135).
    let (intruder, conn) = tls_client(port, "gate1-intruder", &pki.ca(), &g1_cert, &g1_key);
    let (_, acks, _) = drive(conn);
    intruder.publish("menshen/v1/site1/gate2/cmd/unlock", QoS::AtLeastOnce, false, "{\"door\":\"front\"}").unwrap();
    intruder.publish("menshen/v1/site1/gate2/event/access", QoS::AtLeastOnce, false, "{}").unwrap();
    assert!(wait_for(Duration::from_secs(5), || acks.lock().unwrap().len() >= 2));
    assert!(acks.lock().unwrap().iter().all(|r| *r == PubAckReason::NotAuthorized), "{:?}", acks.lock().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!seen.lock().unwrap().iter().any(|(t, _)| t.contains("/gate2/")), "a gate reached another gate's topics");

    // A certificate from another CA is refused by the broker.
    let (_rogue, conn) = tls_client(port, "rogue", &rogue.ca(), &rogue_cert, &rogue_key);
    let (_, _, rogue_err) = drive(conn);
    assert!(wait_for(Duration::from_secs(5), || rogue_err.lock().unwrap().is_some()), "rogue client was not refused");
}

#[test]
fn a_gate_with_the_wrong_ca_pinned_does_not_connect() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "site-ca");
    let (srv_cert, srv_key) = pki.issue("broker", true);
    let (g1_cert, g1_key) = pki.issue("gate1", false);
    let other = Pki::new(dir.path(), "other-ca");
    let _broker = tls_broker(port, dir.path(), &pki, &srv_cert, &srv_key, "allow_anonymous true\n");
    let mut gate = tls_gate(port, &other.ca(), &g1_cert, &g1_key);
    gate.start_sim();
    gate.start_daemon();
    assert!(wait_for(Duration::from_secs(5), || gate.log().contains("MQTT broker unreachable")), "{}", gate.log());
    let st = gate.status().unwrap();
    assert_eq!(st["stats"]["mqtt_online"], false);
    assert_eq!(st["stats"]["mqtt_connects"], 0);
    assert!(gate.log().to_lowercase().contains("certificate"), "the log says why: {}", gate.log());
    // The doctor says so too, with the same options.
    let out = gate.cli(&["doctor", "--config", gate.config.to_str().unwrap(), "--json"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let broker = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["name"] == "broker")
        .unwrap_or_else(|| panic!("no broker check: {text}"));
    assert_eq!(broker["status"], "fail", "{broker}");
    assert!(broker["message"].as_str().unwrap().to_lowercase().contains("certificate"), "{broker}");
}
