//! Residents and credentials: reads, and every change as one guarded [`RosterOp`].

use redb::{ReadableTable, ReadableTableMetadata};

use super::schema::*;
use super::{decode, encode, AuditEntry, Claim, Store, StoreError, Tables};
use crate::model::{AccessMode, Credential, CredentialKind, Resident, ResidentId};
use crate::wiegand::CardId;

/// A change to the roster: the one unit of change for the CLI and the MQTT commands alike.
#[derive(Debug, Clone, PartialEq)]
pub enum RosterOp {
    /// Insert or replace a resident; with `credentials`, their cards become exactly those.
    Upsert {
        resident: Resident,
        credentials: Option<Vec<Credential>>,
    },
    SetMode {
        id: ResidentId,
        mode: AccessMode,
    },
    AddCredential(Credential),
    /// Remove a credential by key.
    RemoveCredential(String),
    /// Set a resident's PIN (or duress PIN), replacing the one they had: a `CredentialKind::Pin`.
    SetPin(Credential),
    /// Remove a resident's PIN (`duress`: their duress PIN).
    RemovePin {
        resident: ResidentId,
        duress: bool,
    },
    RemoveResident(ResidentId),
    /// Replace the whole roster with a snapshot (atomic, idempotent per version).
    Sync {
        version: u64,
        digest: u64,
        residents: Vec<(Resident, Vec<Credential>)>,
    },
    /// Add a new resident with these credentials (refused if the id exists).
    Add {
        resident: Resident,
        credentials: Vec<Credential>,
    },
    /// Change nothing: only claim the request id.
    Nothing,
    /// Several ops in one transaction: all of them or none (`roster.batch`).
    Batch(Vec<RosterOp>),
}

impl RosterOp {
    /// The checks that need no store: every resident and credential is well formed.
    fn validate(&self) -> Result<(), StoreError> {
        let resident = |r: &Resident, cs: &mut dyn Iterator<Item = &Credential>| -> Result<(), StoreError> {
            r.validate().map_err(StoreError::InvalidResident)?;
            for c in cs {
                c.validity.validate().map_err(StoreError::InvalidResident)?;
            }
            Ok(())
        };
        match self {
            RosterOp::Upsert { resident: r, credentials } => resident(r, &mut credentials.iter().flatten()),
            RosterOp::AddCredential(c) | RosterOp::SetPin(c) => {
                c.validity.validate().map_err(StoreError::InvalidResident)
            }
            RosterOp::Add { resident: r, credentials } => resident(r, &mut credentials.iter()),
            RosterOp::Sync { residents, .. } => residents.iter().try_for_each(|(r, cs)| resident(r, &mut cs.iter())),
            RosterOp::Batch(ops) => ops.iter().enumerate().try_for_each(|(index, op)| {
                op.validate().map_err(|e| StoreError::InBatch { index, source: Box::new(e) })
            }),
            RosterOp::SetMode { .. }
            | RosterOp::RemoveCredential(_)
            | RosterOp::RemovePin { .. }
            | RosterOp::RemoveResident(_)
            | RosterOp::Nothing => Ok(()),
        }
    }
}

/// What a [`RosterOp`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum OpOutcome {
    Done,
    /// The op would change nothing (a mode set to itself): nothing was written.
    Unchanged,
    ModeChanged {
        before: AccessMode,
    },
    CredentialRemoved(Credential),
    ResidentRemoved {
        credentials: usize,
    },
    Synced {
        residents: usize,
        credentials: usize,
        removed: usize,
    },
    /// A batch: how many ops it applied (all of them).
    Batched {
        ops: usize,
    },
}

impl Store {
    pub fn resident(&self, id: &ResidentId) -> Result<Option<Resident>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(RESIDENTS)?;
        t.get(id.as_str())?.map(|v| decode("residents", v.value())).transpose()
    }

    pub fn residents(&self) -> Result<Vec<Resident>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(RESIDENTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("residents", v.value())?);
        }
        Ok(out)
    }

    /// How many residents and credentials the roster holds (table lengths: no decoding).
    pub fn roster_counts(&self) -> Result<(u64, u64), StoreError> {
        let tx = self.read()?;
        Ok((tx.open_table(RESIDENTS)?.len()?, tx.open_table(CREDENTIALS)?.len()?))
    }

    pub fn credentials(&self) -> Result<Vec<Credential>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(CREDENTIALS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("credentials", v.value())?);
        }
        Ok(out)
    }

    pub fn credentials_of(&self, id: &ResidentId) -> Result<Vec<Credential>, StoreError> {
        Ok(self.credentials()?.into_iter().filter(|c| &c.resident == id).collect())
    }

    /// The credential for a card and its holder, if enrolled.
    pub fn lookup_card(&self, card: &CardId) -> Result<Option<(Credential, Resident)>, StoreError> {
        self.lookup_credential(&card.key())
    }

    /// A credential by its key (`CredentialKind::key`: a card, or a PIN's keyed hash) and its
    /// holder.
    pub fn lookup_credential(&self, key: &str) -> Result<Option<(Credential, Resident)>, StoreError> {
        let tx = self.read()?;
        let creds = tx.open_table(CREDENTIALS)?;
        let Some(v) = creds.get(key)? else {
            return Ok(None);
        };
        let cred: Credential = decode("credentials", v.value())?;
        let residents = tx.open_table(RESIDENTS)?;
        let Some(r) = residents.get(cred.resident.as_str())? else {
            return Err(StoreError::Corrupt { table: "credentials", detail: "credential without resident".into() });
        };
        let resident: Resident = decode("residents", r.value())?;
        Ok(Some((cred, resident)))
    }

    /// Apply a roster change, recording `claim` in the same durable transaction.
    pub fn apply(&self, op: RosterOp, claim: Option<Claim<'_>>, now_ms: i64) -> Result<OpOutcome, StoreError> {
        op.validate()?;
        self.mutate(now_ms, claim, |t| apply_in(t, op, now_ms))
    }

    /// Add a resident with their credentials atomically (a face mode needs its card in the same
    /// transaction). Fails if the resident exists or a credential is held by someone else.
    pub fn add_resident(&self, r: &Resident, credentials: &[Credential], now_ms: i64) -> Result<(), StoreError> {
        self.apply(RosterOp::Add { resident: r.clone(), credentials: credentials.to_vec() }, None, now_ms).map(|_| ())
    }

    /// Insert or replace a resident record (their credentials stay).
    pub fn upsert_resident(&self, r: &Resident, now_ms: i64) -> Result<(), StoreError> {
        self.apply(RosterOp::Upsert { resident: r.clone(), credentials: None }, None, now_ms).map(|_| ())
    }

    /// Change a resident's access mode (P2); returns the previous mode.
    pub fn set_mode(&self, id: &ResidentId, mode: AccessMode, now_ms: i64) -> Result<AccessMode, StoreError> {
        match self.apply(RosterOp::SetMode { id: id.clone(), mode }, None, now_ms)? {
            OpOutcome::ModeChanged { before } => Ok(before),
            _ => Ok(mode),
        }
    }

    pub fn add_credential(&self, c: &Credential, now_ms: i64) -> Result<(), StoreError> {
        self.apply(RosterOp::AddCredential(c.clone()), None, now_ms).map(|_| ())
    }

    /// Remove a credential by key; refused if its holder would be left face-only.
    pub fn remove_credential(&self, key: &str, now_ms: i64) -> Result<Credential, StoreError> {
        match self.apply(RosterOp::RemoveCredential(key.to_string()), None, now_ms)? {
            OpOutcome::CredentialRemoved(c) => Ok(c),
            _ => Err(StoreError::NoCredential(key.to_string())),
        }
    }

    /// Remove a resident and every credential they hold.
    pub fn remove_resident(&self, id: &ResidentId, now_ms: i64) -> Result<usize, StoreError> {
        match self.apply(RosterOp::RemoveResident(id.clone()), None, now_ms)? {
            OpOutcome::ResidentRemoved { credentials } => Ok(credentials),
            _ => Ok(0),
        }
    }
}

/// One roster op inside an open transaction: what it did and the residents it touched (the
/// guard checks them before the commit).
pub(super) fn apply_in(
    t: &mut Tables<'_>,
    op: RosterOp,
    now_ms: i64,
) -> Result<(OpOutcome, Vec<ResidentId>), StoreError> {
    match op {
        RosterOp::Nothing => Ok((OpOutcome::Done, Vec::new())),
        RosterOp::Batch(ops) => {
            let n = ops.len();
            let mut touched: Vec<(usize, ResidentId)> = Vec::new();
            for (index, op) in ops.into_iter().enumerate() {
                if let RosterOp::Batch(_) | RosterOp::Sync { .. } = op {
                    let e = StoreError::InvalidResident("a batch holds resident and credential changes only".into());
                    return Err(StoreError::InBatch { index, source: Box::new(e) });
                }
                let (_, t2) =
                    apply_in(t, op, now_ms).map_err(|e| StoreError::InBatch { index, source: Box::new(e) })?;
                touched.extend(t2.into_iter().map(|id| (index, id)));
            }
            // The guard on the state the whole batch produces, here so that a refusal names its
            // entry (the transaction's own guard then finds nothing more).
            let (entries, ids): (Vec<usize>, Vec<ResidentId>) = touched.into_iter().unzip();
            if let Some((k, e)) = super::guard_all(t, &ids, now_ms)? {
                return Err(StoreError::InBatch { index: entries[k], source: Box::new(StoreError::Guard(e)) });
            }
            Ok((OpOutcome::Batched { ops: n }, ids))
        }
        RosterOp::Add { resident: r, credentials } => {
            if t.residents.get(r.id.as_str())?.is_some() {
                return Err(StoreError::ResidentExists(r.id.to_string()));
            }
            t.residents.insert(r.id.as_str(), encode(&r).as_slice())?;
            for c in &credentials {
                put_credential(&mut t.creds, &r, c)?;
            }
            t.audit.push(AuditEntry::new(
                now_ms,
                "resident_added",
                Some(r.id.as_str()),
                format!("mode {}", r.mode.name()),
            ));
            Ok((OpOutcome::Done, vec![r.id]))
        }
        RosterOp::Upsert { resident, credentials } => {
            let before = t.residents.get(resident.id.as_str())?.map(|v| decode::<Resident>("residents", v.value()));
            match before.transpose()? {
                None => t.audit.push(AuditEntry::new(
                    now_ms,
                    "resident_added",
                    Some(resident.id.as_str()),
                    format!("mode {}", resident.mode.name()),
                )),
                Some(b) if b.mode != resident.mode => t.audit.push(AuditEntry::new(
                    now_ms,
                    "mode_changed",
                    Some(resident.id.as_str()),
                    format!("{} -> {}", b.mode.name(), resident.mode.name()),
                )),
                Some(_) => {}
            }
            t.residents.insert(resident.id.as_str(), encode(&resident).as_slice())?;
            if let Some(cs) = credentials {
                // The resident's cards become exactly these; their PINs stay (PINs are set only
                // by `credential.add`, never carried in a roster).
                remove_cards_of(&mut t.creds, &resident.id)?;
                for c in &cs {
                    put_credential(&mut t.creds, &resident, c)?;
                }
            }
            Ok((OpOutcome::Done, vec![resident.id]))
        }
        RosterOp::SetMode { id, mode } => {
            let mut r: Resident = match t.residents.get(id.as_str())? {
                Some(v) => decode("residents", v.value())?,
                None => return Err(StoreError::NoResident(id.to_string())),
            };
            let before = r.mode;
            if before == mode {
                // Nothing to change: no write, no audit record (kind to a BMS that retries).
                return Ok((OpOutcome::Unchanged, Vec::new()));
            }
            r.mode = mode;
            t.residents.insert(id.as_str(), encode(&r).as_slice())?;
            t.audit.push(AuditEntry::new(
                now_ms,
                "mode_changed",
                Some(id.as_str()),
                format!("{} -> {}", before.name(), mode.name()),
            ));
            Ok((OpOutcome::ModeChanged { before }, vec![id]))
        }
        RosterOp::AddCredential(c) => {
            let r: Resident = match t.residents.get(c.resident.as_str())? {
                Some(v) => decode("residents", v.value())?,
                None => return Err(StoreError::NoResident(c.resident.to_string())),
            };
            put_credential(&mut t.creds, &r, &c)?;
            t.audit.push(AuditEntry::new(now_ms, "credential_added", Some(c.resident.as_str()), c.credential.masked()));
            Ok((OpOutcome::Done, vec![c.resident]))
        }
        RosterOp::SetPin(c) => {
            let CredentialKind::Pin(pin) = c.credential else {
                return Err(StoreError::InvalidResident("set_pin takes a PIN".into()));
            };
            let r: Resident = match t.residents.get(c.resident.as_str())? {
                Some(v) => decode("residents", v.value())?,
                None => return Err(StoreError::NoResident(c.resident.to_string())),
            };
            if let Some(v) = t.creds.get(c.credential.key().as_str())? {
                let existing: Credential = decode("credentials", v.value())?;
                match existing.credential {
                    _ if existing.resident != r.id => return Err(StoreError::PinTaken),
                    CredentialKind::Pin(p) if p.duress != pin.duress => return Err(StoreError::DuressSameAsPin),
                    _ => {}
                }
            }
            remove_where(&mut t.creds, |x| {
                x.resident == r.id && matches!(x.credential, CredentialKind::Pin(p) if p.duress == pin.duress)
            })?;
            put_credential(&mut t.creds, &r, &c)?;
            t.audit.push(AuditEntry::new(now_ms, "credential_added", Some(c.resident.as_str()), c.credential.masked()));
            Ok((OpOutcome::Done, vec![c.resident]))
        }
        RosterOp::RemovePin { resident, duress } => {
            let n = remove_where(&mut t.creds, |x| {
                x.resident == resident && matches!(x.credential, CredentialKind::Pin(p) if p.duress == duress)
            })?;
            let what = if duress { "duress pin" } else { "pin" };
            if n == 0 {
                return Err(StoreError::NoPin(resident.to_string(), if duress { "duress PIN" } else { "PIN" }));
            }
            t.audit.push(AuditEntry::new(now_ms, "credential_removed", Some(resident.as_str()), what.to_string()));
            Ok((OpOutcome::Done, vec![resident]))
        }
        RosterOp::RemoveCredential(key) => {
            let c: Credential = match t.creds.remove(key.as_str())? {
                Some(v) => decode("credentials", v.value())?,
                None => return Err(StoreError::NoCredential(key)),
            };
            let holder = c.resident.clone();
            t.audit.push(AuditEntry::new(now_ms, "credential_removed", Some(holder.as_str()), c.credential.masked()));
            Ok((OpOutcome::CredentialRemoved(c), vec![holder]))
        }
        RosterOp::RemoveResident(id) => {
            if t.residents.remove(id.as_str())?.is_none() {
                return Err(StoreError::NoResident(id.to_string()));
            }
            let n = remove_credentials_of(&mut t.creds, &id)?;
            t.audit.push(AuditEntry::new(now_ms, "resident_removed", Some(id.as_str()), format!("{n} credentials")));
            Ok((OpOutcome::ResidentRemoved { credentials: n }, Vec::new()))
        }
        RosterOp::Sync { version, digest, residents } => {
            let applied = t.meta.get("roster_version")?.map(|v| v.value()).unwrap_or(0);
            let applied_digest = t.meta.get("roster_digest")?.map(|v| v.value());
            if version < applied {
                return Err(StoreError::StaleVersion { offered: version, applied });
            }
            if version == applied && applied_digest.is_some_and(|d| d != digest) {
                return Err(StoreError::VersionConflict(version));
            }
            let before = t.residents.len()?;
            let mut old_modes = std::collections::HashMap::new();
            for row in t.residents.iter()? {
                let (k, v) = row?;
                let r: Resident = decode("residents", v.value())?;
                old_modes.insert(k.value().to_string(), r.mode);
            }
            for (r, _) in &residents {
                if let Some(m) = old_modes.get(r.id.as_str()).filter(|m| **m != r.mode) {
                    t.audit.push(AuditEntry::new(
                        now_ms,
                        "mode_changed",
                        Some(r.id.as_str()),
                        format!("{} -> {} (roster.sync {version})", m.name(), r.mode.name()),
                    ));
                }
            }
            t.residents.retain(|_, _| false)?;
            // Cards are replaced; a PIN stays while its holder is in the new roster.
            let keep: std::collections::HashSet<&str> = residents.iter().map(|(r, _)| r.id.as_str()).collect();
            let mut kept_pins = 0;
            let mut drop_keys = Vec::new();
            for row in t.creds.iter()? {
                let (k, v) = row?;
                let c: Credential = decode("credentials", v.value())?;
                if c.credential.is_pin() && keep.contains(c.resident.as_str()) {
                    kept_pins += 1;
                } else {
                    drop_keys.push(k.value().to_string());
                }
            }
            for k in &drop_keys {
                t.creds.remove(k.as_str())?;
            }
            let mut touched = Vec::with_capacity(residents.len());
            let mut n_creds = 0;
            for (r, cs) in &residents {
                if t.residents.insert(r.id.as_str(), encode(r).as_slice())?.is_some() {
                    return Err(StoreError::InvalidResident(format!("resident {} appears twice in the roster", r.id)));
                }
                for c in cs {
                    put_credential(&mut t.creds, r, c)?;
                    n_creds += 1;
                }
                touched.push(r.id.clone());
            }
            t.meta.insert("roster_version", version)?;
            t.meta.insert("roster_digest", digest)?;
            let removed = before.saturating_sub(residents.len() as u64) as usize;
            t.audit.push(AuditEntry::new(
                now_ms,
                "roster_synced",
                None,
                format!(
                    "version {version}: {} residents, {n_creds} credentials, {kept_pins} PINs kept",
                    residents.len()
                ),
            ));
            Ok((OpOutcome::Synced { residents: residents.len(), credentials: n_creds, removed }, touched))
        }
    }
}

fn remove_credentials_of(creds: &mut redb::Table<&str, &[u8]>, id: &ResidentId) -> Result<usize, StoreError> {
    remove_where(creds, |c| &c.resident == id)
}

fn remove_cards_of(creds: &mut redb::Table<&str, &[u8]>, id: &ResidentId) -> Result<usize, StoreError> {
    remove_where(creds, |c| &c.resident == id && !c.credential.is_pin())
}

fn remove_where(creds: &mut redb::Table<&str, &[u8]>, pred: impl Fn(&Credential) -> bool) -> Result<usize, StoreError> {
    let mut keys = Vec::new();
    for row in creds.iter()? {
        let (k, v) = row?;
        let c: Credential = decode("credentials", v.value())?;
        if pred(&c) {
            keys.push(k.value().to_string());
        }
    }
    for k in &keys {
        creds.remove(k.as_str())?;
    }
    Ok(keys.len())
}

fn put_credential(creds: &mut redb::Table<&str, &[u8]>, holder: &Resident, c: &Credential) -> Result<(), StoreError> {
    if c.resident != holder.id {
        return Err(StoreError::InvalidResident("credential names another resident".into()));
    }
    let key = c.credential.key();
    if let Some(v) = creds.get(key.as_str())? {
        let existing: Credential = decode("credentials", v.value())?;
        if existing.resident != holder.id {
            return Err(StoreError::CredentialTaken(existing.resident.to_string()));
        }
    }
    creds.insert(key.as_str(), encode(c).as_slice())?;
    Ok(())
}
