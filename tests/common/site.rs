//! Helpers for tests and benches of a site (many gates): the mosquitto bridge and the pages of a
//! paged `roster.sync`.

use serde_json::{json, Value};

/// A mosquitto on `port` bridged (MQTT 5, persistent, QoS 1 both ways) to the broker on `to`.
pub fn bridge_config(port: u16, to: u16) -> String {
    format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n\
         max_queued_messages 100000\n\
         connection site-bridge\naddress 127.0.0.1:{to}\nbridge_protocol_version mqttv50\n\
         cleansession false\nrestart_timeout 1\ntry_private true\n\
         topic menshen/# both 1\ntopic bms/# both 1\n"
    )
}

/// A roster snapshot cut into `roster.sync` pages whose JSON is at most `page_bytes`.
pub fn pages(version: u64, sync_id: &str, residents: &[Value], page_bytes: usize) -> Vec<Value> {
    let mut chunks: Vec<Vec<Value>> = vec![Vec::new()];
    let mut size = 0;
    for r in residents {
        let n = r.to_string().len() + 1;
        if size + n > page_bytes - 512 && !chunks.last().unwrap().is_empty() {
            chunks.push(Vec::new());
            size = 0;
        }
        size += n;
        chunks.last_mut().unwrap().push(r.clone());
    }
    let total = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| json!({"version": version, "sync_id": sync_id, "page": i, "pages": total, "residents": c}))
        .collect()
}
