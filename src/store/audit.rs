//! Audit records as data: written in the transaction of the change they describe, then handed
//! to an [`AuditSink`] (the audit file, which `privacy::audit` keeps and chains). The store knows
//! nothing of the file: without a sink, records wait in the store, never lost.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::schema::AUDIT_PENDING;
use super::{decode, Store, StoreError};

/// A change to record (before it is numbered and chained).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub ts_ms: i64,
    /// `enrolment`, `deletion`, `mode_changed`, `consent_recorded`, `consent_withdrawn`,
    /// `resident_added`, `resident_removed`, `credential_added`, `credential_removed`,
    /// `roster_synced`, `roster_sync_discarded`, `config_changed`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident: Option<String>,
    pub detail: String,
    /// Who made the change and its request id (`mqtt, request …`, `cli uid=0, request …`); none
    /// for the gate's own changes (retention, a config change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

impl AuditEntry {
    pub fn new(ts_ms: i64, kind: &str, resident: Option<&str>, detail: impl Into<String>) -> AuditEntry {
        AuditEntry { ts_ms, kind: kind.into(), resident: resident.map(str::to_string), detail: detail.into(), by: None }
    }
}

/// Where numbered audit records go once their change is committed; `append` returns how many it
/// wrote (numbers already there are skipped, so a repeated hand-over is harmless).
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    fn append(&self, entries: &[(u64, AuditEntry)]) -> std::io::Result<usize>;
}

impl Store {
    /// Hand audit records to `sink` from now on (and those waiting, at once).
    pub fn set_audit_sink(&mut self, sink: Box<dyn AuditSink>) {
        self.audit = Some(sink);
        self.flush_audit();
    }

    /// Move audit records from the store to the sink (after each change, and when the sink is
    /// attached). A failure is logged and retried at the next change: the records stay.
    pub fn flush_audit(&self) {
        let Some(sink) = &self.audit else { return };
        let run = || -> Result<usize, StoreError> {
            let pending: Vec<(u64, AuditEntry)> = {
                let tx = self.read()?;
                let t = tx.open_table(AUDIT_PENDING)?;
                let mut out = Vec::new();
                for row in t.iter()? {
                    let (k, v) = row?;
                    out.push((k.value(), decode("audit_pending", v.value())?));
                }
                out
            };
            if pending.is_empty() {
                return Ok(0);
            }
            let n = sink.append(&pending).map_err(|e| StoreError::Db(format!("audit file: {e}")))?;
            let tx = self.write()?;
            {
                let mut t = tx.open_table(AUDIT_PENDING)?;
                for (k, _) in &pending {
                    t.remove(*k)?;
                }
            }
            self.commit(tx)?;
            Ok(n)
        };
        if let Err(error) = run() {
            tracing::error!(%error, "audit records not yet moved to the audit file (kept in the store; retried)");
        }
    }
}
