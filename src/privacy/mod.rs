//! The privacy core (REQUIREMENTS P3–P9): template protection at rest, verifiable deletion and
//! the audit trail. What the law asks and which code answers it is mapped in `docs/privacy.md`.
//!
//! - [`keys`]: the device key (outside the database) wraps one data key per template; a template
//!   is sealed with its own data key. Deleting a template destroys its data key file, so the
//!   ciphertext left in free pages of the database can no longer be decrypted.
//! - [`receipt`]: deletion receipts signed with the gate's Ed25519 key (pure signing and checking).
//! - [`audit`]: the append-only, hash-chained audit log and its verification.
//! - [`shred`]: the step that turns the store's pending deletions into destroyed keys and signed
//!   receipts, and the retention sweep.

pub mod audit;
pub mod keys;
pub mod receipt;
pub mod shred;

pub use keys::{DeviceKey, Keyring, SealError};
pub use receipt::{Receipt, Signer};

pub use crate::digest::{hex, unhex};

/// SHA-256 of the rules text, hex: what a consent names next to the version.
pub fn rules_sha256(text: &str) -> String {
    crate::digest::sha256_hex(text.as_bytes())
}

/// How a consent is asked for (CLI flags or the `consent.record` command).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConsentRequest {
    pub channel: String,
    pub retention_days: Option<u32>,
    pub minor: bool,
    pub guardian: Option<String>,
    /// The rules version and sha256 the resident was shown; they must be the gate's current ones.
    pub shown_rules: Option<(String, String)>,
}

/// Build a consent against the gate's current published rules, within the configured limits.
pub fn consent_for(
    cfg: &crate::config::Config,
    req: &ConsentRequest,
    now_ms: i64,
) -> Result<crate::model::FaceConsent, String> {
    let (version, text) = cfg.rules()?;
    let sha = rules_sha256(&text);
    if let Some((v, s)) = &req.shown_rules {
        if *v != version || !s.eq_ignore_ascii_case(&sha) {
            return Err(format!(
                "the rules shown ({v}, sha256 {}) are not the gate's current rules ({version}, sha256 {}): \
                 show the current rules (`rules.get`) and ask again",
                s.get(..12).unwrap_or(s),
                &sha[..12]
            ));
        }
    }
    let retention_days = req.retention_days.unwrap_or(cfg.privacy.default_retention_days);
    if retention_days > cfg.privacy.max_retention_days {
        return Err(format!(
            "retention_days {retention_days} is over this site's limit of {} days",
            cfg.privacy.max_retention_days
        ));
    }
    let c = crate::model::FaceConsent {
        granted_ms: now_ms,
        rules_version: version,
        rules_sha256: sha,
        purpose: "gate_access".into(),
        retention_days,
        channel: req.channel.clone(),
        minor: req.minor,
        guardian: req.guardian.clone(),
    };
    c.validate()?;
    Ok(c)
}

/// Everything the gate holds about a resident (PIPL Art. 45): mode, validity, masked cards, the
/// face consent, whether a face template exists and when it was last used, and deletions not yet
/// receipted. Never the template, never a full card number.
pub fn export(
    store: &crate::store::Store,
    id: &crate::model::ResidentId,
) -> Result<serde_json::Value, crate::store::StoreError> {
    let r = store.resident(id)?.ok_or_else(|| crate::store::StoreError::NoResident(id.to_string()))?;
    let cards: Vec<serde_json::Value> = store
        .credentials_of(id)?
        .iter()
        .map(|c| serde_json::json!({"credential": c.credential.masked(), "validity": c.validity}))
        .collect();
    let meta = store.template_meta(id)?;
    let pending: Vec<crate::store::PendingDeletion> =
        store.pending_deletions()?.into_iter().filter(|d| d.resident == id.as_str()).collect();
    Ok(serde_json::json!({
        "resident": id,
        "mode": r.mode,
        "validity": r.validity,
        "schedule": r.schedule,
        "credentials": cards,
        "face_consent": store.face_consent(id)?,
        "face_template": match meta {
            Some(m) => serde_json::json!({"stored": true, "enrolled_ms": m.enrolled_ms, "last_used_ms": m.last_used_ms,
                                         "key_id": m.key_id, "encrypted": "XChaCha20-Poly1305, own data key"}),
            None => serde_json::json!({"stored": false}),
        },
        "deletions_pending_receipt": pending,
        "note": "the template itself is never exported; camera images are never stored",
    }))
}

/// Why a template was not stored.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(transparent)]
    Seal(#[from] keys::SealError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Seal `template` under a new data key and store it (the store's transaction checks the
/// resident, their mode and consent). A refused template takes its data key with it. The one
/// way a template is stored: from photos (CLI) and from the gate's camera (`face.enrol`) alike.
pub fn store_template(
    store: &crate::store::Store,
    keyring: &keys::Keyring,
    id: &crate::model::ResidentId,
    template: &[f32],
    now_ms: i64,
) -> Result<keys::KeyId, TemplateError> {
    let (key_id, sealed) = keyring.seal(id.as_str(), template)?;
    if let Err(e) = store.put_template(id, &key_id, &sealed, now_ms) {
        // The data key was written first: it goes with the refused template.
        if let Err(error) = keyring.destroy(&key_id) {
            tracing::error!(%error, key_id = %key_id, "data key of a refused template not destroyed (the orphan sweep retries)");
        }
        return Err(e.into());
    }
    Ok(key_id)
}

/// Every stored template opened with the keyring, as a gallery of dimension `dim`; templates
/// that cannot be opened or added are returned with the reason, beside it.
pub fn open_gallery(
    store: &crate::store::Store,
    keyring: &keys::Keyring,
    dim: usize,
) -> Result<(crate::face::matcher::Gallery, Vec<(String, String)>), crate::store::StoreError> {
    let mut g = crate::face::matcher::Gallery::new(dim);
    let mut unusable = Vec::new();
    for (owner, blob) in store.templates()? {
        let added = keyring
            .open_template(&owner, &blob)
            .map_err(|e| e.to_string())
            .and_then(|t| g.add(&owner, &t).map_err(|e| e.to_string()));
        if let Err(why) = added {
            unusable.push((owner, why));
        }
    }
    Ok((g, unusable))
}
