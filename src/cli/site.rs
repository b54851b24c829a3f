//! `menshen site`: the whole site from any machine that reaches the broker, with its own
//! credentials. `status` only reads the retained `summary` and `status` topics every gate
//! publishes (nothing is asked of a gate); `command` sends one `_site` command and waits until
//! every known gate has answered.

use anyhow::{bail, Context};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

use super::{SiteCmd, SiteConn};
use crate::clock::wall_ms;
use crate::command::SITE_SCOPE;
use crate::config::MqttConfig;

/// A summary older than this many of its gate's intervals (plus [`GRACE_MS`]) means the gate is
/// silent: its `online` status is retained, but it has not spoken since (a cut bridge or
/// network, where no last will reached this broker).
const STALE_INTERVALS: i64 = 3;
const GRACE_MS: i64 = 30_000;

/// One gate as the retained messages show it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GateView {
    pub gate: String,
    /// `online`, `offline` (its last will or goodbye), `silent` (see [`STALE_INTERVALS`]) or
    /// `unknown` (a summary but no status).
    pub state: String,
    pub summary: Option<Value>,
    pub status: Option<Value>,
}

impl GateView {
    fn last_seen_ms(&self) -> Option<i64> {
        self.summary.as_ref().and_then(|s| s["ts_ms"].as_i64())
    }

    fn json(&self, now_ms: i64) -> Value {
        let s = self.summary.clone().unwrap_or(Value::Null);
        let field = |k: &str| s.get(k).cloned().unwrap_or(Value::Null);
        json!({
            "gate": self.gate,
            "state": self.state,
            "version": s.get("version").or_else(|| self.status.as_ref().and_then(|v| v.get("version"))).cloned(),
            "roster_version": field("roster_version"),
            "residents": field("residents"),
            "credentials": field("credentials"),
            "templates": field("templates"),
            "deletions_pending": field("deletions_pending"),
            "camera": field("camera"),
            "outbox_depth": field("outbox_depth"),
            "last_event_ms": field("last_event_ms"),
            "last_seen_ms": self.last_seen_ms(),
            "last_seen_ago_s": self.last_seen_ms().map(|t| (now_ms - t).max(0) / 1000),
            "roster_sync": field("roster_sync"),
        })
    }
}

/// Decide each gate's state from its retained `status` and `summary` (pure: `now_ms` given).
pub fn gate_views(retained: &BTreeMap<String, (Option<Value>, Option<Value>)>, now_ms: i64) -> Vec<GateView> {
    retained
        .iter()
        .map(|(gate, (status, summary))| {
            let said = status.as_ref().and_then(|s| s["state"].as_str()).unwrap_or("");
            let fresh = summary.as_ref().is_some_and(|s| {
                let interval_ms = s["interval_s"].as_i64().unwrap_or(0) * 1000;
                let ts = s["ts_ms"].as_i64().unwrap_or(0);
                interval_ms == 0 || now_ms - ts <= STALE_INTERVALS * interval_ms + GRACE_MS
            });
            let state = match said {
                "offline" => "offline",
                "online" if fresh => "online",
                "online" => "silent",
                _ => "unknown",
            };
            GateView { gate: gate.clone(), state: state.into(), summary: summary.clone(), status: status.clone() }
        })
        .collect()
}

fn mqtt_config(c: &SiteConn) -> anyhow::Result<MqttConfig> {
    let mut t = toml::Table::new();
    t.insert("enabled".into(), true.into());
    t.insert("host".into(), c.host.clone().into());
    t.insert("port".into(), i64::from(c.port).into());
    if let Some(u) = &c.username {
        t.insert("username".into(), u.clone().into());
    }
    if let Some(p) = &c.password_file {
        t.insert("password_file".into(), p.display().to_string().into());
    }
    if let Some(ca) = &c.ca_file {
        let mut tls = toml::Table::new();
        tls.insert("ca_file".into(), ca.display().to_string().into());
        if let (Some(cert), Some(key)) = (&c.client_cert_file, &c.client_key_file) {
            tls.insert("client_cert_file".into(), cert.display().to_string().into());
            tls.insert("client_key_file".into(), key.display().to_string().into());
        }
        t.insert("tls".into(), tls.into());
    }
    MqttConfig::deserialize(t).context("connection options")
}

async fn connect(c: &SiteConn, what: &str) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let m = mqtt_config(c)?;
    let id = format!("menshen-site-{what}-{}-{:08x}", std::process::id(), rand::random::<u32>());
    let opts = crate::mqtt::base_options(&m, id)?;
    let (client, mut el) = AsyncClient::new(opts, 64);
    let until = tokio::time::Instant::now() + Duration::from_millis(c.connect_timeout_ms);
    loop {
        match tokio::time::timeout_at(until, el.poll()).await {
            Err(_) => bail!("no CONNACK from {}:{} within {} ms", c.host, c.port, c.connect_timeout_ms),
            Ok(Err(e)) => bail!("cannot connect to {}:{}: {e}", c.host, c.port),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok((client, el)),
            Ok(Ok(_)) => {}
        }
    }
}

/// Read every gate's retained `status` and `summary`: subscribe, then take what comes until the
/// broker has been quiet for `quiet_ms` (retained messages follow the SUBACK at once) or
/// `wait_ms` passed.
pub async fn read_site(c: &SiteConn, site: &str) -> anyhow::Result<BTreeMap<String, (Option<Value>, Option<Value>)>> {
    let (client, mut el) = connect(c, "status").await?;
    let filters = [format!("menshen/v1/{site}/+/status"), format!("menshen/v1/{site}/+/summary")];
    for f in &filters {
        client.subscribe(f.clone(), QoS::AtLeastOnce).await?;
    }
    let mut out: BTreeMap<String, (Option<Value>, Option<Value>)> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(c.wait_ms);
    let mut subacks = 0;
    let quiet = Duration::from_millis(c.quiet_ms);
    loop {
        let until =
            if subacks < filters.len() { deadline } else { (tokio::time::Instant::now() + quiet).min(deadline) };
        let ev = match tokio::time::timeout_at(until, el.poll()).await {
            Err(_) => break,
            Ok(Err(e)) => bail!("broker connection lost: {e}"),
            Ok(Ok(ev)) => ev,
        };
        match ev {
            Event::Incoming(Packet::SubAck(_)) => subacks += 1,
            Event::Incoming(Packet::Publish(p)) => {
                let topic = String::from_utf8_lossy(&p.topic).to_string();
                let parts: Vec<&str> = topic.split('/').collect();
                let (Some(gate), Some(kind)) = (parts.get(3), parts.get(4)) else { continue };
                if gate.starts_with('_') {
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else { continue };
                let e = out.entry(gate.to_string()).or_default();
                match *kind {
                    "status" => e.0 = Some(v),
                    "summary" => e.1 = Some(v),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let _ = client.disconnect().await;
    Ok(out)
}

fn ago(now_ms: i64, t: Option<i64>) -> String {
    match t {
        None => "-".into(),
        Some(t) => {
            let s = (now_ms - t).max(0) / 1000;
            match s {
                0..=119 => format!("{s}s ago"),
                120..=7199 => format!("{}m ago", s / 60),
                _ => format!("{}h ago", s / 3600),
            }
        }
    }
}

fn table(views: &[GateView], now_ms: i64) -> String {
    let mut rows = vec![[
        "GATE",
        "STATE",
        "VERSION",
        "ROSTER",
        "RESIDENTS",
        "TEMPLATES",
        "DELETIONS",
        "CAMERA",
        "OUTBOX",
        "LAST EVENT",
        "LAST SEEN",
        "SYNC",
    ]
    .map(String::from)
    .to_vec()];
    for v in views {
        let j = v.json(now_ms);
        let n = |k: &str| j[k].as_u64().map_or("-".to_string(), |x| x.to_string());
        let sync = match j["roster_sync"].as_object() {
            Some(p) => format!(
                "v{} page {}/{}",
                p["version"].as_u64().unwrap_or(0),
                p["next_page"].as_u64().unwrap_or(0),
                p["pages"].as_u64().unwrap_or(0)
            ),
            None => "-".into(),
        };
        rows.push(vec![
            v.gate.clone(),
            v.state.clone(),
            j["version"].as_str().unwrap_or("-").to_string(),
            n("roster_version"),
            n("residents"),
            n("templates"),
            n("deletions_pending"),
            j["camera"].as_str().unwrap_or("-").to_string(),
            n("outbox_depth"),
            ago(now_ms, j["last_event_ms"].as_i64()),
            ago(now_ms, j["last_seen_ms"].as_i64()),
            sync,
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Send one `_site` command and collect the replies until every expected gate answered.
async fn site_command(
    c: &SiteConn,
    site: &str,
    verb: &str,
    payload: Value,
    expect: Vec<String>,
    timeout_ms: u64,
) -> anyhow::Result<Value> {
    let (client, mut el) = connect(c, "cmd").await?;
    let request_id = format!("site-{}-{:016x}", wall_ms(), rand::random::<u64>());
    let reply_topic = format!("{}menshen-site/{request_id}", c.reply_prefix);
    client.subscribe(reply_topic.clone(), QoS::AtLeastOnce).await?;
    // Wait for the SUBACK: a reply that came before it would be lost.
    let until = tokio::time::Instant::now() + Duration::from_millis(c.connect_timeout_ms);
    loop {
        match tokio::time::timeout_at(until, el.poll()).await {
            Err(_) => bail!("no SUBACK for {reply_topic}"),
            Ok(Err(e)) => bail!("broker connection lost: {e}"),
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
        }
    }
    let mut body = match payload {
        Value::Object(m) => m,
        _ => bail!("--payload must be a JSON object"),
    };
    body.insert("request_id".into(), Value::String(request_id.clone()));
    let props = PublishProperties {
        response_topic: Some(reply_topic.clone()),
        correlation_data: Some(request_id.clone().into_bytes().into()),
        message_expiry_interval: Some((timeout_ms / 1000).max(1) as u32),
        ..Default::default()
    };
    let topic = format!("menshen/v1/{site}/{SITE_SCOPE}/cmd/{verb}");
    client
        .publish_with_properties(topic, QoS::AtLeastOnce, false, serde_json::to_vec(&Value::Object(body))?, props)
        .await?;
    let mut replies: BTreeMap<String, Value> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    while !expect.iter().all(|g| replies.contains_key(g)) {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Err(_) => break,
            Ok(Err(e)) => bail!("broker connection lost: {e}"),
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else { continue };
                if v["request_id"].as_str() != Some(request_id.as_str()) {
                    continue;
                }
                if let Some(g) = v["gate"].as_str() {
                    replies.insert(g.to_string(), v);
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    let _ = client.disconnect().await;
    let missing: Vec<&String> = expect.iter().filter(|g| !replies.contains_key(*g)).collect();
    Ok(json!({
        "request_id": request_id,
        "command": verb,
        "expected": expect.len(),
        "answered": replies.len(),
        "missing": missing,
        "refused": replies.iter().filter(|(_, v)| v["ok"] != Value::Bool(true)).map(|(g, _)| g).collect::<Vec<_>>(),
        "replies": replies,
    }))
}

/// `menshen site ...`: Ok(exit code).
pub fn site_cmd(cmd: SiteCmd) -> anyhow::Result<u8> {
    let rt = super::run::runtime()?;
    rt.block_on(async move {
        match cmd {
            SiteCmd::Status { conn, site, json } => {
                let retained = read_site(&conn, &site).await?;
                let now = wall_ms();
                let views = gate_views(&retained, now);
                if json {
                    let gates: Vec<Value> = views.iter().map(|v| v.json(now)).collect();
                    let out = json!({"site": site, "ts_ms": now, "gates": gates,
                        "online": views.iter().filter(|v| v.state == "online").count()});
                    println!("{}", serde_json::to_string_pretty(&out)?);
                } else if views.is_empty() {
                    println!("no gate of site `{site}` has published a status on this broker");
                } else {
                    print!("{}", table(&views, now));
                    let online = views.iter().filter(|v| v.state == "online").count();
                    println!("{online} of {} gates online", views.len());
                }
                // For monitoring: 0 only when there are gates and every one is online.
                let all_online = !views.is_empty() && views.iter().all(|v| v.state == "online");
                Ok(if all_online { 0 } else { 2 })
            }
            SiteCmd::Command { conn, site, verb, payload, gates, timeout_ms, json } => {
                let payload: Value = serde_json::from_str(&payload).context("--payload")?;
                let expect = if gates.is_empty() {
                    // Every gate the site's retained messages show online.
                    let retained = read_site(&conn, &site).await?;
                    gate_views(&retained, wall_ms())
                        .into_iter()
                        .filter(|v| v.state == "online")
                        .map(|v| v.gate)
                        .collect()
                } else {
                    gates
                };
                if expect.is_empty() {
                    bail!("no gate to wait for: none is online on this broker (or name them with --gates)");
                }
                let out = site_command(&conn, &site, &verb, payload, expect, timeout_ms).await?;
                let missing = out["missing"].as_array().map_or(0, Vec::len);
                if json {
                    println!("{}", serde_json::to_string_pretty(&out)?);
                } else {
                    for (g, r) in out["replies"].as_object().into_iter().flatten() {
                        let what = if r["ok"] == Value::Bool(true) {
                            "ok".to_string()
                        } else {
                            format!("{}: {}", r["code"].as_str().unwrap_or("?"), r["message"].as_str().unwrap_or(""))
                        };
                        println!("{g}  {what}");
                    }
                    for g in out["missing"].as_array().into_iter().flatten() {
                        println!("{}  no answer", g.as_str().unwrap_or("?"));
                    }
                    println!("{} of {} gates answered", out["answered"], out["expected"]);
                }
                Ok(if missing == 0 { 0 } else { 2 })
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(ts: i64, interval: i64) -> Value {
        json!({"ts_ms": ts, "interval_s": interval, "roster_version": 3, "version": "0.1.0"})
    }

    #[test]
    fn a_gate_is_online_offline_or_silent_by_its_retained_messages() {
        let now = 1_000_000_000;
        let mut m = BTreeMap::new();
        m.insert("a".to_string(), (Some(json!({"state": "online"})), Some(summary(now - 5_000, 60))));
        m.insert("b".to_string(), (Some(json!({"state": "offline"})), Some(summary(now - 5_000, 60))));
        m.insert("c".to_string(), (Some(json!({"state": "online"})), Some(summary(now - 3 * 60_000 - 31_000, 60))));
        m.insert("d".to_string(), (None, Some(summary(now, 60))));
        m.insert("e".to_string(), (Some(json!({"state": "online"})), Some(summary(now - 3_600_000, 0))));
        let states: Vec<(String, String)> = gate_views(&m, now).into_iter().map(|v| (v.gate, v.state)).collect();
        let want = [("a", "online"), ("b", "offline"), ("c", "silent"), ("d", "unknown"), ("e", "online")];
        assert_eq!(states, want.map(|(g, s)| (g.to_string(), s.to_string())).to_vec());
        let v = gate_views(&m, now).remove(1).json(now);
        assert_eq!((v["last_seen_ago_s"].as_i64(), v["roster_version"].as_u64()), (Some(5), Some(3)));
    }
}
