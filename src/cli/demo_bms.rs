//! The demo's BMS side: a mosquitto of its own on a free loopback port (started and stopped by the
//! demo, never a system service), and a BMS client that prints what a BMS receives and plays a
//! short command exchange.

use anyhow::Context;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A mosquitto child on `127.0.0.1:port`, killed when dropped.
pub struct DemoBroker {
    child: Child,
    pub port: u16,
}

/// The mosquitto binary: `MENSHEN_MOSQUITTO` (empty: none, the demo runs without a BMS view),
/// else `mosquitto` on the PATH or in /usr/sbin.
pub fn find_mosquitto() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MENSHEN_MOSQUITTO") {
        return (!p.is_empty()).then(|| PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

impl DemoBroker {
    /// Start mosquitto with a config of its own in `dir` (loopback only, anonymous, no
    /// persistence), and wait until it accepts connections.
    pub fn start(mosquitto: &Path, dir: &Path) -> anyhow::Result<DemoBroker> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("# The demo's own broker (menshen demo).\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )?;
        let log = dir.join("mosquitto.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(mosquitto)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", mosquitto.display()))?;
        let mut b = DemoBroker { child, port };
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(b);
            }
            if let Some(status) = b.child.try_wait()? {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                anyhow::bail!("mosquitto exited ({status}): {}", text.trim());
            }
            if Instant::now() > end {
                anyhow::bail!("mosquitto did not listen on 127.0.0.1:{port} within 10 s (log: {})", log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DemoBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Waiters = Arc<Mutex<HashMap<Vec<u8>, oneshot::Sender<Value>>>>;

/// A BMS client: prints every message under the gate's topics as it arrives, answers
/// [`DemoBms::command`] with the matching reply, and hands deletion receipts to the script.
pub struct DemoBms {
    client: rumqttc::v5::AsyncClient,
    waiters: Waiters,
    receipts: mpsc::UnboundedReceiver<Value>,
    root: String,
    reply_topic: String,
    next: u64,
    closing: Arc<std::sync::atomic::AtomicBool>,
}

/// At most `n` characters of `text`, with `…` when cut.
fn clip(text: &str, n: usize) -> String {
    let mut line: String = text.chars().take(n).collect();
    if text.chars().count() > n {
        line.push('…');
    }
    line
}

/// One line per message: the topic under the gate's root and the payload (an event whole but for
/// its `id`, `site`, `gate` and `type`, which every event carries; anything else shortened).
fn show(suffix: &str, payload: &[u8], retained: bool) {
    let text = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(mut m)) if suffix.starts_with("event/") => {
            for k in ["id", "site", "gate", "type"] {
                m.remove(k);
            }
            Value::Object(m).to_string()
        }
        _ => clip(&String::from_utf8_lossy(payload), 200),
    };
    let r = if retained { " (retained)" } else { "" };
    println!("  BMS ◀ {suffix}{r} {text}");
}

impl DemoBms {
    /// Connect to the demo broker and subscribe to the gate's topics and a reply topic.
    pub async fn connect(port: u16, root: &str) -> anyhow::Result<DemoBms> {
        let id = format!("demo-bms-{}", std::process::id());
        let mut o = rumqttc::v5::MqttOptions::new(id.clone(), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(Some(1 << 20));
        let (client, mut conn) = rumqttc::v5::AsyncClient::new(o, 100);
        let reply_topic = format!("bms/{id}/replies");
        let (sub_tx, sub_rx) = oneshot::channel();
        let (receipt_tx, receipts) = mpsc::unbounded_channel();
        let waiters: Waiters = Arc::default();
        let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (w, rt, r, c) = (waiters.clone(), reply_topic.clone(), root.to_string(), closing.clone());
        tokio::spawn(async move {
            let mut sub_tx = Some(sub_tx);
            let mut subacks = 0;
            loop {
                match conn.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(_))) => {
                        subacks += 1;
                        if subacks == 2 {
                            if let Some(t) = sub_tx.take() {
                                let _ = t.send(());
                            }
                        }
                    }
                    Ok(rumqttc::v5::Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).to_string();
                        let value: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if topic == rt {
                            let corr = p.properties.and_then(|pr| pr.correlation_data).map(|b| b.to_vec());
                            if let Some(tx) = corr.and_then(|c| w.lock().ok()?.remove(&c)) {
                                let _ = tx.send(value);
                            }
                            continue;
                        }
                        let suffix = topic.strip_prefix(&r).unwrap_or(&topic);
                        if suffix == "health" || suffix.starts_with("cmd/") {
                            continue;
                        }
                        show(suffix, &p.payload, p.retain);
                        if suffix == "event/privacy" && value["privacy"] == "template_deleted" {
                            let _ = receipt_tx.send(value["receipt"].clone());
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        if !c.load(std::sync::atomic::Ordering::Relaxed) {
                            println!("  BMS: broker connection lost ({error})");
                        }
                        return;
                    }
                }
            }
        });
        client.subscribe(format!("{root}#"), QoS::AtLeastOnce).await?;
        client.subscribe(reply_topic.clone(), QoS::AtLeastOnce).await?;
        tokio::time::timeout(Duration::from_secs(10), sub_rx)
            .await
            .context("the demo broker did not confirm the BMS's subscriptions")?
            .context("the BMS client stopped")?;
        Ok(DemoBms { client, waiters, receipts, root: root.to_string(), reply_topic, next: 0, closing })
    }

    /// Send a command (MQTT 5, with response topic and correlation data) and wait for its reply.
    pub async fn command(&mut self, verb: &str, payload: Value) -> anyhow::Result<Value> {
        self.next += 1;
        let corr = format!("demo-{}", self.next).into_bytes();
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().map_err(|_| anyhow::anyhow!("reply table poisoned"))?.insert(corr.clone(), tx);
        let props = PublishProperties {
            response_topic: Some(self.reply_topic.clone()),
            correlation_data: Some(corr.into()),
            ..Default::default()
        };
        let topic = format!("{}cmd/{verb}", self.root);
        println!("  BMS ▶ cmd/{verb} {payload}");
        self.client.publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_string(), props).await?;
        let reply = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .with_context(|| format!("no reply to {verb} within 10 s"))?
            .context("the BMS client stopped")?;
        println!("  BMS ◀ reply {}", clip(&reply.to_string(), 200));
        if reply["ok"] != true {
            anyhow::bail!("{verb} refused: {}", reply["error"]);
        }
        Ok(reply["result"].clone())
    }

    /// The next deletion receipt on `event/privacy`, waiting up to `timeout`.
    pub async fn receipt(&mut self, timeout: Duration) -> Option<Value> {
        tokio::time::timeout(timeout, self.receipts.recv()).await.ok().flatten()
    }

    pub async fn disconnect(&self) {
        self.closing.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.client.disconnect().await;
    }
}

/// The scripted exchange: read the rules, record a consent against them, turn a resident's face
/// off, and check the deletion receipt that follows. Returns how many receipts verified.
pub async fn exchange(bms: &mut DemoBms, cfg_path: &Path, dir: &Path, face: bool) -> anyhow::Result<usize> {
    println!("\n▶ the BMS reads the published processing rules (rules.get)");
    let rules = bms.command("rules.get", json!({})).await?;
    println!("\n▶ r-1002 agrees to those rules at the management office: the BMS records her separate face consent");
    let consent = json!({
        "resident": "r-1002",
        "rules_version": rules["version"],
        "rules_sha256": rules["sha256"],
        "channel": "bms",
    });
    bms.command("consent.record", consent).await?;
    if !face {
        println!(
            "\n▶ r-1002 changes her mind: resident.set_mode face_and_card -> card (no template stored: face part off)"
        );
        bms.command("resident.set_mode", json!({"resident": "r-1002", "mode": "card"})).await?;
        return Ok(0);
    }
    println!("\n▶ r-1004 turns face off in the BMS app: resident.set_mode face_or_card -> card; her template is deleted at once");
    bms.command("resident.set_mode", json!({"resident": "r-1004", "mode": "card"})).await?;
    let receipt = bms
        .receipt(Duration::from_secs(5))
        .await
        .context("no deletion receipt on event/privacy within 5 s of turning face off")?;
    let file = dir.join("receipt-r-1004.json");
    std::fs::write(&file, serde_json::to_string_pretty(&receipt)?)?;
    let me = std::env::args().next().unwrap_or_else(|| "menshen".into());
    println!("\n▶ the resident checks the signed receipt: {me} verify-receipt {}", file.display());
    match super::verify_receipt(&file, None, cfg_path)? {
        Ok(line) => {
            println!("  receipt {line}");
            Ok(1)
        }
        Err(why) => anyhow::bail!("the deletion receipt does not verify: {why}"),
    }
}
