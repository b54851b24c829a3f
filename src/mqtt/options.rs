//! The connection options: broker address, credentials, TLS (rustls, ring, the configured CA
//! only), keep-alive, the last will, and the reconnect backoff.

use rand::Rng;
use rumqttc::v5::mqttbytes::v5::LastWill;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;

/// The retained `status` payload (`online`, `offline`; the last will is `offline`).
pub fn status_payload(state: &str) -> Vec<u8> {
    serde_json::json!({"state": state, "version": env!("CARGO_PKG_VERSION")}).to_string().into_bytes()
}

/// The rustls client configuration: the configured CA only (pinned, no system roots), an
/// optional client certificate, the ring provider.
fn tls_config(t: &crate::config::TlsConfig) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&t.ca_file)
        .map_err(|e| anyhow::anyhow!("mqtt.tls.ca_file {}: {e}", t.ca_file.display()))?
    {
        let cert = cert.map_err(|e| anyhow::anyhow!("mqtt.tls.ca_file {}: {e}", t.ca_file.display()))?;
        roots.add(cert).map_err(|e| anyhow::anyhow!("mqtt.tls.ca_file {}: {e}", t.ca_file.display()))?;
    }
    if roots.is_empty() {
        anyhow::bail!("mqtt.tls.ca_file {}: no certificate in it", t.ca_file.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match (&t.client_cert_file, &t.client_key_file) {
        (Some(c), Some(k)) => {
            let certs = CertificateDer::pem_file_iter(c)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("mqtt.tls.client_cert_file {}: {e}", c.display()))?;
            let key = PrivateKeyDer::from_pem_file(k)
                .map_err(|e| anyhow::anyhow!("mqtt.tls.client_key_file {}: {e}", k.display()))?;
            builder.with_client_auth_cert(certs, key)?
        }
        _ => builder.with_no_client_auth(),
    })
}

/// The daemon's connection options, with its `offline` last will.
pub fn options(cfg: &Config) -> anyhow::Result<MqttOptions> {
    let id = cfg.mqtt.client_id.clone().unwrap_or_else(|| format!("menshen-{}-{}", cfg.gate.site, cfg.gate.gate));
    let mut o = base_options(&cfg.mqtt, id)?;
    // A persistent session: commands the BMS sends while the gate is away wait for it on the
    // broker (QoS 1), so an offline gate catches up on roster changes (docs/site.md). M3 holds:
    // the broker drops an unlock whose message expiry passes, and the gate checks it again.
    if cfg.mqtt.session_expiry_secs > 0 {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(cfg.mqtt.session_expiry_secs));
    }
    o.set_last_will(LastWill::new(
        format!("{}status", cfg.topic_root()),
        status_payload("offline"),
        QoS::AtLeastOnce,
        true,
        None,
    ));
    Ok(o)
}

/// Address, login, TLS and limits, without a last will (`menshen doctor` connects with these).
pub fn base_options(m: &crate::config::MqttConfig, client_id: String) -> anyhow::Result<MqttOptions> {
    let mut o = MqttOptions::new(client_id, m.host.clone(), m.port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive_secs));
    o.set_clean_start(true);
    o.set_outgoing_inflight_upper_limit(m.inflight);
    // The broker drops anything larger for us; between our limit and this, commands are refused
    // with a reply (payload_too_large) instead of the connection failing.
    let max_packet = (m.max_payload_bytes.saturating_mul(2) + (64 << 10)).min(u32::MAX as usize) as u32;
    o.set_max_packet_size(Some(max_packet));
    // TCP_NODELAY (plain and TLS): a reply is a small write right after the small PUBACK of the
    // command; with Nagle on it waits for the broker's delayed ACK (~40 ms on Linux) every time.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(m.tcp_nodelay);
    o.set_network_options(net);
    if let Some(user) = &m.username {
        let password = match &m.password_file {
            Some(p) => {
                let bytes = crate::secrets::read_private(p)
                    .map_err(|e| anyhow::anyhow!("mqtt.password_file {}: {e}", p.display()))?;
                String::from_utf8(bytes)
                    .map_err(|_| anyhow::anyhow!("mqtt.password_file {}: not UTF-8", p.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_string()
            }
            None => String::new(),
        };
        o.set_credentials(user.clone(), password);
    }
    if let Some(t) = &m.tls {
        let c = tls_config(t)?;
        o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(Arc::new(c))));
    }
    Ok(o)
}

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, current: min }
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The next delay: uniform in [min, current], then current doubles up to max.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let hi = self.current.as_millis().max(self.min.as_millis()) as u64;
        let d = Duration::from_millis(rng.gen_range(self.min.as_millis() as u64..=hi));
        self.current = (self.current * 2).min(self.max);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1_000));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay(&mut rng)).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_millis(1_000)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(400)), "{delays:?}");
        b.reset();
        assert!(b.next_delay(&mut rng) <= Duration::from_millis(100));
    }
}

#[cfg(test)]
mod nodelay {
    #[test]
    fn tcp_nodelay_is_on_unless_turned_off_to_measure() {
        // rumqttc's NetworkOptions has no getter: the effect is measured by
        // `cargo bench --bench command_round_trip` (docs/performance.md).
        let cfg = crate::config::parse(crate::config::DEFAULT_CONFIG).unwrap();
        assert!(cfg.mqtt.tcp_nodelay);
        let off = crate::config::parse(
            &format!("{}\n", crate::config::DEFAULT_CONFIG).replace("[mqtt]\n", "[mqtt]\ntcp_nodelay = false\n"),
        )
        .unwrap();
        assert!(!off.mqtt.tcp_nodelay);
    }
}
