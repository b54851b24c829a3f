//! Face consents and sealed templates, and the pending deletions that the privacy stage turns
//! into destroyed keys and receipts. The store holds only sealed bytes: it knows nothing of keys.

use redb::{Durability, ReadableTable, ReadableTableMetadata};

use super::schema::*;
use super::{decode, encode, AuditEntry, Claim, OutboxEntry, Store, StoreError, Tables};
use crate::model::{FaceConsent, Resident, ResidentId, DAY_MS};

/// Bookkeeping of one stored template (no biometric data).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TemplateMeta {
    pub key_id: String,
    pub enrolled_ms: i64,
    pub last_used_ms: i64,
}

/// A template deleted from the store whose key is still to be destroyed and receipted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingDeletion {
    pub resident: String,
    pub key_id: String,
    /// `face_turned_off`, `consent_withdrawn`, `resident_removed`, `retention_expired`.
    pub why: String,
    pub at_ms: i64,
}

fn delete_template_in(t: &mut Tables<'_>, id: &str, why: &str) -> Result<bool, StoreError> {
    if t.templates.remove(id)?.is_none() {
        return Ok(false);
    }
    // The data key's id is kept in the template's bookkeeping (written with the template).
    let key_id = match t.template_meta.remove(id)? {
        Some(v) => decode::<TemplateMeta>("face_template_meta", v.value())?.key_id,
        None => String::new(),
    };
    if !key_id.is_empty() {
        let p = PendingDeletion { resident: id.to_string(), key_id: key_id.clone(), why: why.into(), at_ms: t.now_ms };
        t.deletions.insert(key_id.as_str(), encode(&p).as_slice())?;
    }
    t.audit.push(AuditEntry::new(t.now_ms, "deletion", Some(id), format!("face template and its key {key_id}: {why}")));
    let g = t.meta.get("templates_generation")?.map(|v| v.value()).unwrap_or(0);
    t.meta.insert("templates_generation", g + 1)?;
    Ok(true)
}

/// Delete every template that the invariant no longer allows (resident gone, mode `card`, no
/// consent), in the caller's transaction. Returns the resident ids whose template went.
pub(super) fn enforce_template_invariant(t: &mut Tables<'_>) -> Result<Vec<String>, StoreError> {
    let mut ids = Vec::new();
    for row in t.templates.iter()? {
        let (k, _) = row?;
        ids.push(k.value().to_string());
    }
    let mut gone = Vec::new();
    for id in ids {
        let why = match t.residents.get(id.as_str())? {
            Some(v) => {
                let r: Resident = decode("residents", v.value())?;
                if !r.mode.admits_face() {
                    Some("face_turned_off")
                } else if t.consents.get(id.as_str())?.is_none() {
                    Some("consent_withdrawn")
                } else {
                    None
                }
            }
            None => Some("resident_removed"),
        };
        if let Some(why) = why {
            delete_template_in(t, &id, why)?;
            gone.push(id);
        }
    }
    // A removed resident's consent goes with them.
    let mut orphans = Vec::new();
    for row in t.consents.iter()? {
        let (k, _) = row?;
        orphans.push(k.value().to_string());
    }
    for id in orphans {
        if t.residents.get(id.as_str())?.is_none() {
            t.consents.remove(id.as_str())?;
            t.audit.push(AuditEntry::new(t.now_ms, "consent_withdrawn", Some(&id), "resident removed"));
        }
    }
    Ok(gone)
}

impl Store {
    /// Record a resident's separate face consent (durable before it returns). Checked here so
    /// that no path can store a consent that is bundled, unlimited or without its rules.
    pub fn record_face_consent(
        &self,
        id: &ResidentId,
        c: &FaceConsent,
        claim: Option<Claim<'_>>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        c.validate().map_err(StoreError::InvalidConsent)?;
        self.mutate(now_ms, claim, |t| {
            if t.residents.get(id.as_str())?.is_none() {
                return Err(StoreError::NoResident(id.to_string()));
            }
            t.consents.insert(id.as_str(), encode(c).as_slice())?;
            let guardian = c.guardian.as_deref().map(|g| format!(", guardian {g}")).unwrap_or_default();
            t.audit.push(AuditEntry::new(
                now_ms,
                "consent_recorded",
                Some(id.as_str()),
                format!(
                    "rules {} (sha256 {}), purpose {}, retention {} days, channel {}{guardian}",
                    c.rules_version,
                    c.rules_sha256.get(..12).unwrap_or(""),
                    c.purpose,
                    c.retention_days,
                    c.channel
                ),
            ));
            Ok(((), Vec::new()))
        })
    }

    /// Withdraw the face consent; the template goes in the same transaction. Without a consent
    /// nothing changes and nothing is audited (`withdrawn: false`).
    pub fn withdraw_face_consent(
        &self,
        id: &ResidentId,
        claim: Option<Claim<'_>>,
        now_ms: i64,
    ) -> Result<Withdrawal, StoreError> {
        self.mutate(now_ms, claim, |t| {
            if t.residents.get(id.as_str())?.is_none() {
                return Err(StoreError::NoResident(id.to_string()));
            }
            let withdrawn = t.consents.remove(id.as_str())?.is_some();
            if withdrawn {
                t.audit.push(AuditEntry::new(now_ms, "consent_withdrawn", Some(id.as_str()), "by the resident"));
            }
            let template_deleted = t.templates.get(id.as_str())?.is_some();
            Ok((Withdrawal { withdrawn, template_deleted }, Vec::new()))
        })
    }

    pub fn face_consent(&self, id: &ResidentId) -> Result<Option<FaceConsent>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(CONSENTS)?;
        t.get(id.as_str())?.map(|v| decode("face_consents", v.value())).transpose()
    }

    /// Store a sealed template under data key `key_id`; refused without a face consent or with
    /// mode `card`. A template it replaces is deleted (its key destroyed, a receipt signed).
    pub fn put_template(&self, id: &ResidentId, key_id: &str, sealed: &[u8], now_ms: i64) -> Result<(), StoreError> {
        self.mutate(now_ms, None, |t| {
            let r: Resident = match t.residents.get(id.as_str())? {
                Some(v) => decode("residents", v.value())?,
                None => return Err(StoreError::NoResident(id.to_string())),
            };
            if !r.mode.admits_face() {
                return Err(StoreError::FaceOff(id.to_string()));
            }
            if t.consents.get(id.as_str())?.is_none() {
                return Err(StoreError::NoConsent(id.to_string()));
            }
            delete_template_in(t, id.as_str(), "replaced_by_new_enrolment")?;
            t.templates.insert(id.as_str(), sealed)?;
            let meta = TemplateMeta { key_id: key_id.to_string(), enrolled_ms: now_ms, last_used_ms: now_ms };
            t.template_meta.insert(id.as_str(), encode(&meta).as_slice())?;
            t.audit.push(AuditEntry::new(
                now_ms,
                "enrolment",
                Some(id.as_str()),
                format!("face template, key {key_id}"),
            ));
            let g = t.meta.get("templates_generation")?.map(|v| v.value()).unwrap_or(0);
            t.meta.insert("templates_generation", g + 1)?;
            Ok(((), Vec::new()))
        })
    }

    /// A template's bookkeeping (no biometric data).
    pub fn template_meta(&self, id: &ResidentId) -> Result<Option<TemplateMeta>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(TEMPLATE_META)?;
        t.get(id.as_str())?.map(|v| decode("face_template_meta", v.value())).transpose()
    }

    /// Note a face use (a match that opened or paired), for the retention clock.
    pub fn touch_template(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.touch_templates(&[(id.to_string(), now_ms)])
    }

    /// Note many face uses in one commit (the privacy stage batches them off the card path).
    pub fn touch_templates(&self, uses: &[(String, i64)]) -> Result<(), StoreError> {
        if uses.is_empty() {
            return Ok(());
        }
        let mut tx = self.write()?;
        // Not fsynced on its own: a lost touch only makes the template expire sooner.
        tx.set_durability(Durability::None).map_err(|e| StoreError::Db(e.to_string()))?;
        {
            let mut t = tx.open_table(TEMPLATE_META)?;
            for (id, now_ms) in uses {
                let meta =
                    t.get(id.as_str())?.map(|v| decode::<TemplateMeta>("face_template_meta", v.value())).transpose()?;
                if let Some(mut m) = meta {
                    m.last_used_ms = m.last_used_ms.max(*now_ms);
                    t.insert(id.as_str(), encode(&m).as_slice())?;
                }
            }
        }
        self.commit(tx)?;
        Ok(())
    }

    /// Delete every template not used for longer than its consent's retention period (P7).
    /// Returns the residents whose template went.
    pub fn expire_templates(&self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        self.mutate(now_ms, None, |t| {
            let mut expired = Vec::new();
            for row in t.template_meta.iter()? {
                let (k, v) = row?;
                let m: TemplateMeta = decode("face_template_meta", v.value())?;
                let days = match t.consents.get(k.value())? {
                    Some(c) => decode::<FaceConsent>("face_consents", c.value())?.retention_days,
                    None => 0,
                };
                if now_ms - m.enrolled_ms.max(m.last_used_ms) > i64::from(days) * DAY_MS {
                    expired.push(k.value().to_string());
                }
            }
            for id in &expired {
                delete_template_in(t, id, "retention_expired")?;
            }
            Ok((expired, Vec::new()))
        })
    }

    /// Deletions whose key is still to be destroyed and receipted, oldest first.
    pub fn pending_deletions(&self) -> Result<Vec<PendingDeletion>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(DELETIONS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode::<PendingDeletion>("pending_deletions", v.value())?);
        }
        out.sort_by_key(|d| d.at_ms);
        Ok(out)
    }

    /// A deletion is done: its receipt event goes into the outbox and the pending row goes, in
    /// one durable transaction (a crash before it repeats the deletion step, never loses it).
    pub fn complete_deletion(
        &self,
        key_id: &str,
        event: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<OutboxEntry, StoreError> {
        let mut tx = self.write()?;
        tx.set_durability(Durability::Immediate).map_err(|e| StoreError::Db(e.to_string()))?;
        let entry = {
            let mut meta = tx.open_table(META)?;
            let mut outbox = tx.open_table(OUTBOX)?;
            let mut del = tx.open_table(DELETIONS)?;
            del.remove(key_id)?;
            let seq = meta.get("next_seq")?.map(|v| v.value()).unwrap_or(1);
            let json = event(seq);
            outbox.insert(seq, json.as_slice())?;
            meta.insert("next_seq", seq + 1)?;
            OutboxEntry { seq, json }
        };
        self.commit(tx)?;
        Ok(entry)
    }

    /// Every data key id the store still refers to (templates and pending deletions).
    pub fn referenced_key_ids(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let tx = self.read()?;
        let mut out = std::collections::HashSet::new();
        for row in tx.open_table(TEMPLATE_META)?.iter()? {
            let (_, v) = row?;
            out.insert(decode::<TemplateMeta>("face_template_meta", v.value())?.key_id);
        }
        for row in tx.open_table(DELETIONS)?.iter()? {
            let (k, _) = row?;
            out.insert(k.value().to_string());
        }
        Ok(out)
    }

    /// Every sealed template (resident id, blob).
    /// How many face templates the store holds.
    pub fn template_count(&self) -> Result<u64, StoreError> {
        let tx = self.read()?;
        Ok(tx.open_table(TEMPLATES)?.len()?)
    }

    pub fn templates(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.read()?;
        let t = match tx.open_table(TEMPLATES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Changes whenever a template is added or deleted (the face thread reloads on a change).
    pub fn templates_generation(&self) -> Result<u64, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(META)?;
        Ok(t.get("templates_generation")?.map(|v| v.value()).unwrap_or(0))
    }
}

/// What [`Store::withdraw_face_consent`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Withdrawal {
    /// There was a consent, and it is gone.
    pub withdrawn: bool,
    /// A template was deleted with it.
    pub template_deleted: bool,
}
