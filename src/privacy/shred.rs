//! Deletion, carried to the end (REQUIREMENTS P7). The store deletes a template in the same
//! transaction as the change that turns face off (mode, consent, removal, retention) and leaves a
//! pending deletion behind; [`Privacy::settle`] destroys the data key file, signs the receipt and
//! puts it into the outbox as `event/privacy`, removing the pending deletion in that same durable
//! transaction. A crash anywhere repeats the step: destroying a key twice is harmless and the
//! receipt keeps its id (derived from the key id), so consumers de-duplicate it.
//!
//! The daemon calls `settle` after every command and once a second, and `sweep` (retention) every
//! minute; the CLI calls both after each change it makes.

use std::path::Path;

use super::keys::{DeviceKey, Keyring, SealError};
use super::receipt::{Receipt, Signer};
use crate::config::Config;
use crate::events::NewEvent;
use crate::store::{PendingDeletion, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The gate's privacy keys: the keyring (device key + data keys) and the receipt signer.
#[derive(Debug)]
pub struct Privacy {
    pub keyring: Keyring,
    pub signer: Signer,
    site: String,
    gate: String,
}

impl Privacy {
    pub fn open(cfg: &Config) -> Result<Privacy, SealError> {
        let device = DeviceKey::load(&cfg.device_key_path())?;
        Ok(Privacy {
            keyring: Keyring::open(&cfg.keyring_dir(), device)?,
            signer: Signer::load(&cfg.signing_key_path())?,
            site: cfg.gate.site.clone(),
            gate: cfg.gate.gate.clone(),
        })
    }

    /// For tests: explicit paths.
    pub fn open_at(
        keys: &Path,
        device_key: &Path,
        signing_key: &Path,
        site: &str,
        gate: &str,
    ) -> Result<Privacy, SealError> {
        Ok(Privacy {
            keyring: Keyring::open(keys, DeviceKey::load(device_key)?)?,
            signer: Signer::load(signing_key)?,
            site: site.into(),
            gate: gate.into(),
        })
    }

    /// The receipt for a deletion (signed now).
    pub fn receipt(&self, d: &PendingDeletion, now_ms: i64) -> Receipt {
        let random = crate::privacy::unhex(&d.key_id)
            .and_then(|b| <[u8; 16]>::try_from(b.as_slice()).ok())
            .map(u128::from_be_bytes)
            .unwrap_or(0);
        let id = ulid::Ulid::from_parts(u64::try_from(d.at_ms).unwrap_or(0), random);
        self.signer.sign(Receipt {
            receipt_id: id.to_string(),
            site: self.site.clone(),
            gate: self.gate.clone(),
            resident: d.resident.clone(),
            what: "face_template".into(),
            key_id: d.key_id.clone(),
            why: d.why.clone(),
            deleted_at_ms: d.at_ms,
            signed_at_ms: now_ms,
            key: String::new(),
            signature: String::new(),
        })
    }

    /// Destroy the keys of every pending deletion and store their signed receipts as events.
    /// Returns the receipts (already durable in the outbox).
    pub fn settle(&self, store: &Store, now_ms: i64, backfill: bool) -> Result<Vec<Receipt>, PrivacyError> {
        let mut out = Vec::new();
        for d in store.pending_deletions()? {
            self.keyring.destroy(&d.key_id)?;
            let r = self.receipt(&d, now_ms);
            let ev = NewEvent::template_deleted(now_ms, &r);
            let (site, gate) = (self.site.clone(), self.gate.clone());
            store.complete_deletion(&d.key_id, move |seq| ev.to_json(seq, &site, &gate, backfill))?;
            tracing::info!(resident = %d.resident, why = %d.why, receipt = %r.receipt_id, "face template key destroyed; receipt signed");
            out.push(r);
        }
        Ok(out)
    }

    /// The retention sweep: delete templates unused past their consent's period, then settle.
    pub fn sweep(&self, store: &Store, now_ms: i64, backfill: bool) -> Result<Vec<Receipt>, PrivacyError> {
        let expired = store.expire_templates(now_ms)?;
        if !expired.is_empty() {
            tracing::info!(n = expired.len(), "face templates past their retention period deleted");
        }
        self.settle(store, now_ms, backfill)
    }

    /// Destroy data keys the store does not refer to (an enrolment that never committed).
    pub fn destroy_orphans(&self, store: &Store) -> Result<usize, PrivacyError> {
        let keep = store.referenced_key_ids()?;
        Ok(self.keyring.destroy_orphans(&keep)?)
    }

    /// The identity message (retained `identity` topic, `menshen identity`).
    pub fn identity(&self) -> serde_json::Value {
        self.signer.identity(&self.site, &self.gate)
    }
}
