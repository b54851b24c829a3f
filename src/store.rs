//! The durable store: residents, credentials and the event outbox in one redb file, with a
//! schema version.
//!
//! Durability bar (REQUIREMENTS D1): whatever is acknowledged is on disk first. Every write that
//! anyone is told about commits with `Durability::Immediate` (redb fdatasyncs the file before
//! `commit` returns). Only outbox removals after a broker PUBACK commit with `Durability::None`:
//! losing one re-sends an event with the same id (at-least-once), never loses one. Why redb and
//! not sled: `docs/decisions/0001-storage-engine.md`.
//!
//! Every write that can change a resident's mode or credentials runs the Art. 10 guard
//! ([`crate::policy::guard`]) on the state it would produce, inside the same transaction, and
//! aborts if it fails: no way in (CLI, MQTT, roster sync) can store a face-only resident.

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::Path;

use crate::model::{AccessMode, Credential, Resident, ResidentId};
use crate::policy::{guard, GuardError};
use crate::wiegand::CardId;

/// Bumped when the layout of a table changes; a newer file is refused, an older one migrated.
pub const SCHEMA_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const RESIDENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("residents");
const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Delivered events, kept (newest `journal_keep`) so the BMS can ask for them again.
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
/// Command request ids already seen (id → wall ms), and their arrival order for pruning.
const REQUESTS: TableDefinition<&str, i64> = TableDefinition::new("requests");
const REQUEST_LOG: TableDefinition<u64, &str> = TableDefinition::new("request_log");
/// Face consents: resident id → [`FaceConsent`] (JSON). Separate from every other record (Art. 2:
/// separate consent).
const CONSENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("face_consents");
/// Face templates, sealed (encrypted and bound to the resident id; see `privacy`): resident id →
/// blob. Never an image. The invariant kept by every write: a template exists only for a resident
/// who exists, whose mode admits face, and who has a face consent.
const TEMPLATES: TableDefinition<&str, &[u8]> = TableDefinition::new("face_templates");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store is in use by another process (is the daemon running? stop it, or use the MQTT API)")]
    Locked,
    #[error("the store was written by a newer Menshen (schema {found}, this build knows {SCHEMA_VERSION})")]
    NewerSchema { found: u64 },
    #[error("storage error: {0}")]
    Db(String),
    #[error("corrupt record in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error("no resident `{0}`")]
    NoResident(String),
    #[error("no credential `{0}`")]
    NoCredential(String),
    #[error("credential is already held by resident `{0}`")]
    CredentialTaken(String),
    #[error("resident `{0}` already exists")]
    ResidentExists(String),
    #[error("invalid resident: {0}")]
    InvalidResident(String),
    #[error("request id `{0}` was seen before: a command is carried out once")]
    DuplicateRequest(String),
    #[error("roster version {offered} is older than the applied version {applied}")]
    StaleVersion { offered: u64, applied: u64 },
    #[error("roster version {0} was applied with different content: a new snapshot needs a new version")]
    VersionConflict(u64),
    #[error("resident `{0}` has no face consent: record their separate consent first (SPC 2021 Art. 2)")]
    NoConsent(String),
    #[error("resident `{0}` has mode `card`: face is off for them, so no template may be stored")]
    FaceOff(String),
}

/// A resident's separate consent to face recognition (Art. 2), with the version of the published
/// processing rules they were shown.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FaceConsent {
    pub granted_ms: i64,
    pub rules_version: String,
}

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
    RemoveResident(ResidentId),
    /// Replace the whole roster with a snapshot (atomic, idempotent per version).
    Sync {
        version: u64,
        digest: u64,
        residents: Vec<(Resident, Vec<Credential>)>,
    },
    /// Change nothing: only claim the request id.
    Nothing,
}

/// What a [`RosterOp`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum OpOutcome {
    Done,
    ModeChanged { before: AccessMode },
    CredentialRemoved(Credential),
    ResidentRemoved { credentials: usize },
    Synced { residents: usize, credentials: usize, removed: usize },
}

/// A command's request id to record in the same transaction as its change (M3).
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub request_id: &'a str,
    pub now_ms: i64,
}

struct Tables<'t> {
    residents: redb::Table<'t, &'static str, &'static [u8]>,
    creds: redb::Table<'t, &'static str, &'static [u8]>,
    meta: redb::Table<'t, &'static str, u64>,
    consents: redb::Table<'t, &'static str, &'static [u8]>,
    templates: redb::Table<'t, &'static str, &'static [u8]>,
}

/// Delete every template that the invariant no longer allows (resident gone, mode `card`, no
/// consent), in the caller's transaction. Returns the resident ids whose template went.
fn enforce_template_invariant(t: &mut Tables<'_>) -> Result<Vec<String>, StoreError> {
    let mut ids = Vec::new();
    for row in t.templates.iter()? {
        let (k, _) = row?;
        ids.push(k.value().to_string());
    }
    let mut gone = Vec::new();
    for id in ids {
        let allowed = match t.residents.get(id.as_str())? {
            Some(v) => {
                let r: Resident = decode("residents", v.value())?;
                r.mode.admits_face() && t.consents.get(id.as_str())?.is_some()
            }
            None => false,
        };
        if !allowed {
            t.templates.remove(id.as_str())?;
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
        }
    }
    if !gone.is_empty() {
        let g = t.meta.get("templates_generation")?.map(|v| v.value()).unwrap_or(0);
        t.meta.insert("templates_generation", g + 1)?;
    }
    Ok(gone)
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked,
            other => StoreError::Db(other.to_string()),
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { table, detail: e.to_string() })
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serialising plain structs of strings and numbers to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// One event waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub seq: u64,
    pub json: Vec<u8>,
}

/// The store.
pub struct Store {
    db: Database,
    path: std::path::PathBuf,
    /// Request ids younger than this are never forgotten (at least the longest command lifetime).
    request_min_age_ms: i64,
    /// Beyond this many remembered request ids, the oldest (past the minimum age) are pruned.
    request_keep: u64,
    /// How many delivered events stay available for `events.backfill`.
    journal_keep: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Open (or create) the store file, creating its directory if needed.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(format!("{}: {e}", dir.display())))?;
        }
        let db = Database::create(path)?;
        let store = Store {
            db,
            path: path.to_path_buf(),
            request_min_age_ms: 24 * 3600 * 1000,
            request_keep: 10_000,
            journal_keep: 10_000,
        };
        store.init()?;
        Ok(store)
    }

    fn init(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => return Err(StoreError::NewerSchema { found: v }),
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                    meta.insert("next_seq", 1)?;
                }
            }
            tx.open_table(RESIDENTS)?;
            tx.open_table(CREDENTIALS)?;
            tx.open_table(OUTBOX)?;
            tx.open_table(JOURNAL)?;
            tx.open_table(REQUESTS)?;
            tx.open_table(REQUEST_LOG)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Retention of request ids and delivered events (from the configuration).
    pub fn set_retention(&mut self, request_min_age_ms: i64, request_keep: u64, journal_keep: u64) {
        self.request_min_age_ms = request_min_age_ms;
        self.request_keep = request_keep;
        self.journal_keep = journal_keep;
    }

    /// The size of the store file in bytes.
    pub fn file_size(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// The applied roster version (0: none yet).
    pub fn roster_version(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(meta.get("roster_version")?.map(|v| v.value()).unwrap_or(0))
    }

    /// A SHA-256 over the whole roster (residents, credentials, version): equal fingerprints,
    /// equal rosters. `menshen status` shows it, so a test or an operator can see "nothing changed".
    pub fn fingerprint(&self) -> Result<String, StoreError> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.roster_version()?.to_be_bytes());
        for r in self.residents()? {
            h.update(encode(&r));
        }
        for c in self.credentials()? {
            h.update(encode(&c));
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// How many request ids are remembered.
    pub fn remembered_requests(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(REQUESTS)?.len()?)
    }

    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(meta.get("schema_version")?.map(|v| v.value()).unwrap_or(0))
    }

    // ---- residents and credentials -------------------------------------------------------

    pub fn resident(&self, id: &ResidentId) -> Result<Option<Resident>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RESIDENTS)?;
        t.get(id.as_str())?.map(|v| decode("residents", v.value())).transpose()
    }

    pub fn residents(&self) -> Result<Vec<Resident>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RESIDENTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("residents", v.value())?);
        }
        Ok(out)
    }

    pub fn credentials(&self) -> Result<Vec<Credential>, StoreError> {
        let tx = self.db.begin_read()?;
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
        let tx = self.db.begin_read()?;
        let creds = tx.open_table(CREDENTIALS)?;
        let Some(v) = creds.get(card.key().as_str())? else {
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

    /// Run `f` in one durable write transaction over the roster; it reports which residents it
    /// touched, and the guard checks each of them before the commit. A `claim` records the
    /// command's request id in the same transaction (refused if seen before), so a command is
    /// carried out once or not at all.
    fn mutate<T>(
        &self,
        now_ms: i64,
        claim: Option<Claim<'_>>,
        f: impl FnOnce(&mut Tables<'_>) -> Result<(T, Vec<ResidentId>), StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.db.begin_write()?;
        let out = {
            let mut t = Tables {
                residents: tx.open_table(RESIDENTS)?,
                creds: tx.open_table(CREDENTIALS)?,
                meta: tx.open_table(META)?,
                consents: tx.open_table(CONSENTS)?,
                templates: tx.open_table(TEMPLATES)?,
            };
            if let Some(c) = claim {
                self.claim_in(&tx, &mut t.meta, c)?;
            }
            let (out, touched) = f(&mut t)?;
            // Turning face off (mode `card`, removal, a sync without the resident) deletes the
            // template in the same transaction as the change: at once, never later.
            for id in enforce_template_invariant(&mut t)? {
                tracing::info!(resident = %id, "face template deleted (face turned off or resident removed)");
            }
            if !touched.is_empty() {
                let mut by_holder: std::collections::HashMap<ResidentId, Vec<Credential>> =
                    std::collections::HashMap::new();
                for row in t.creds.iter()? {
                    let (_, v) = row?;
                    let c: Credential = decode("credentials", v.value())?;
                    by_holder.entry(c.resident.clone()).or_default().push(c);
                }
                for id in touched {
                    if let Some(v) = t.residents.get(id.as_str())? {
                        let r: Resident = decode("residents", v.value())?;
                        guard(&r, by_holder.get(&id).map_or(&[][..], Vec::as_slice), now_ms)?;
                    }
                }
            }
            out
        };
        tx.commit()?;
        Ok(out)
    }

    fn claim_in(
        &self,
        tx: &redb::WriteTransaction,
        meta: &mut redb::Table<&str, u64>,
        c: Claim<'_>,
    ) -> Result<(), StoreError> {
        let mut ids = tx.open_table(REQUESTS)?;
        let mut log = tx.open_table(REQUEST_LOG)?;
        if ids.get(c.request_id)?.is_some() {
            return Err(StoreError::DuplicateRequest(c.request_id.to_string()));
        }
        let n = meta.get("next_request")?.map(|v| v.value()).unwrap_or(1);
        ids.insert(c.request_id, c.now_ms)?;
        log.insert(n, c.request_id)?;
        meta.insert("next_request", n + 1)?;
        // Prune the oldest beyond the cap, but never one younger than the minimum age.
        let mut excess = ids.len()?.saturating_sub(self.request_keep);
        let mut drop_log = Vec::new();
        if excess > 0 {
            for row in log.iter()? {
                if excess == 0 {
                    break;
                }
                let (k, v) = row?;
                let id = v.value().to_string();
                let ts = ids.get(id.as_str())?.map(|t| t.value()).unwrap_or(i64::MIN);
                if ts > c.now_ms - self.request_min_age_ms {
                    break;
                }
                drop_log.push((k.value(), id));
                excess -= 1;
            }
        }
        for (k, id) in drop_log {
            log.remove(k)?;
            ids.remove(id.as_str())?;
        }
        Ok(())
    }

    /// Apply a roster change, recording `claim` in the same durable transaction.
    pub fn apply(&self, op: RosterOp, claim: Option<Claim<'_>>, now_ms: i64) -> Result<OpOutcome, StoreError> {
        match &op {
            RosterOp::Upsert { resident, credentials } => {
                resident.validate().map_err(StoreError::InvalidResident)?;
                for c in credentials.iter().flatten() {
                    c.validity.validate().map_err(StoreError::InvalidResident)?;
                }
            }
            RosterOp::AddCredential(c) => c.validity.validate().map_err(StoreError::InvalidResident)?,
            RosterOp::Sync { residents, .. } => {
                for (r, cs) in residents {
                    r.validate().map_err(StoreError::InvalidResident)?;
                    for c in cs {
                        c.validity.validate().map_err(StoreError::InvalidResident)?;
                    }
                }
            }
            _ => {}
        }
        self.mutate(now_ms, claim, |t| match op {
            RosterOp::Nothing => Ok((OpOutcome::Done, Vec::new())),
            RosterOp::Upsert { resident, credentials } => {
                t.residents.insert(resident.id.as_str(), encode(&resident).as_slice())?;
                if let Some(cs) = credentials {
                    remove_credentials_of(&mut t.creds, &resident.id)?;
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
                r.mode = mode;
                t.residents.insert(id.as_str(), encode(&r).as_slice())?;
                Ok((OpOutcome::ModeChanged { before }, vec![id]))
            }
            RosterOp::AddCredential(c) => {
                let r: Resident = match t.residents.get(c.resident.as_str())? {
                    Some(v) => decode("residents", v.value())?,
                    None => return Err(StoreError::NoResident(c.resident.to_string())),
                };
                put_credential(&mut t.creds, &r, &c)?;
                Ok((OpOutcome::Done, vec![c.resident]))
            }
            RosterOp::RemoveCredential(key) => {
                let c: Credential = match t.creds.remove(key.as_str())? {
                    Some(v) => decode("credentials", v.value())?,
                    None => return Err(StoreError::NoCredential(key)),
                };
                let holder = c.resident.clone();
                Ok((OpOutcome::CredentialRemoved(c), vec![holder]))
            }
            RosterOp::RemoveResident(id) => {
                if t.residents.remove(id.as_str())?.is_none() {
                    return Err(StoreError::NoResident(id.to_string()));
                }
                let n = remove_credentials_of(&mut t.creds, &id)?;
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
                t.residents.retain(|_, _| false)?;
                t.creds.retain(|_, _| false)?;
                let mut touched = Vec::with_capacity(residents.len());
                let mut n_creds = 0;
                for (r, cs) in &residents {
                    t.residents.insert(r.id.as_str(), encode(r).as_slice())?;
                    for c in cs {
                        put_credential(&mut t.creds, r, c)?;
                        n_creds += 1;
                    }
                    touched.push(r.id.clone());
                }
                t.meta.insert("roster_version", version)?;
                t.meta.insert("roster_digest", digest)?;
                let removed = before.saturating_sub(residents.len() as u64) as usize;
                Ok((OpOutcome::Synced { residents: residents.len(), credentials: n_creds, removed }, touched))
            }
        })
    }

    /// Add a resident with their credentials atomically (a face mode needs its card in the same
    /// transaction). Fails if the resident exists or a credential is held by someone else.
    pub fn add_resident(&self, r: &Resident, credentials: &[Credential], now_ms: i64) -> Result<(), StoreError> {
        r.validate().map_err(StoreError::InvalidResident)?;
        self.mutate(now_ms, None, |t| {
            if t.residents.get(r.id.as_str())?.is_some() {
                return Err(StoreError::ResidentExists(r.id.to_string()));
            }
            t.residents.insert(r.id.as_str(), encode(r).as_slice())?;
            for c in credentials {
                put_credential(&mut t.creds, r, c)?;
            }
            Ok(((), vec![r.id.clone()]))
        })
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

    // ---- face consent and templates -----------------------------------------------------

    /// Record a resident's separate face consent (durable before it returns).
    pub fn record_face_consent(&self, id: &ResidentId, rules_version: &str, now_ms: i64) -> Result<(), StoreError> {
        self.mutate(now_ms, None, |t| {
            if t.residents.get(id.as_str())?.is_none() {
                return Err(StoreError::NoResident(id.to_string()));
            }
            let c = FaceConsent { granted_ms: now_ms, rules_version: rules_version.to_string() };
            t.consents.insert(id.as_str(), encode(&c).as_slice())?;
            Ok(((), Vec::new()))
        })
    }

    /// Withdraw the face consent; the template goes in the same transaction. Returns whether a
    /// template was deleted.
    pub fn withdraw_face_consent(&self, id: &ResidentId, now_ms: i64) -> Result<bool, StoreError> {
        self.mutate(now_ms, None, |t| {
            t.consents.remove(id.as_str())?;
            let had = t.templates.get(id.as_str())?.is_some();
            Ok((had, Vec::new()))
        })
    }

    pub fn face_consent(&self, id: &ResidentId) -> Result<Option<FaceConsent>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = match tx.open_table(CONSENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        t.get(id.as_str())?.map(|v| decode("face_consents", v.value())).transpose()
    }

    /// Store a sealed template; refused without a face consent or with mode `card`.
    pub fn put_template(&self, id: &ResidentId, sealed: &[u8], now_ms: i64) -> Result<(), StoreError> {
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
            t.templates.insert(id.as_str(), sealed)?;
            let g = t.meta.get("templates_generation")?.map(|v| v.value()).unwrap_or(0);
            t.meta.insert("templates_generation", g + 1)?;
            Ok(((), Vec::new()))
        })
    }

    /// Every sealed template (resident id, blob).
    pub fn templates(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read()?;
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
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        Ok(t.get("templates_generation")?.map(|v| v.value()).unwrap_or(0))
    }

    // ---- the event outbox ---------------------------------------------------------------

    /// Append events durably, assigning consecutive sequence numbers. `build(seq)` makes each
    /// event's JSON with its number. Returns the stored entries once they are on disk.
    pub fn append_events<F>(&self, builders: Vec<F>) -> Result<Vec<OutboxEntry>, StoreError>
    where
        F: FnOnce(u64) -> Vec<u8>,
    {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate).map_err(|e| StoreError::Db(e.to_string()))?;
        let mut out = Vec::with_capacity(builders.len());
        {
            let mut meta = tx.open_table(META)?;
            let mut outbox = tx.open_table(OUTBOX)?;
            let mut seq = meta.get("next_seq")?.map(|v| v.value()).unwrap_or(1);
            for b in builders {
                let json = b(seq);
                outbox.insert(seq, json.as_slice())?;
                out.push(OutboxEntry { seq, json });
                seq += 1;
            }
            meta.insert("next_seq", seq)?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// Up to `limit` undelivered events with `seq > after`, oldest first.
    pub fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..)? {
            let (k, v) = row?;
            out.push(OutboxEntry { seq: k.value(), json: v.value().to_vec() });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Move delivered events (after the broker's PUBACK) from the outbox to the journal, which
    /// keeps the newest `journal_keep` for `events.backfill`. Not fsynced: see the module doc.
    pub fn ack_events(&self, seqs: &[u64]) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::None).map_err(|e| StoreError::Db(e.to_string()))?;
        {
            let mut t = tx.open_table(OUTBOX)?;
            let mut j = tx.open_table(JOURNAL)?;
            for s in seqs {
                if let Some(v) = t.remove(*s)? {
                    if self.journal_keep > 0 {
                        j.insert(*s, v.value())?;
                    }
                }
            }
            let excess = j.len()?.saturating_sub(self.journal_keep);
            for _ in 0..excess {
                if j.pop_first()?.is_none() {
                    break;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Up to `limit` events with `seq >= from`, delivered (journal) or not (outbox), in order.
    pub fn events_from(&self, from: u64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for table in [JOURNAL, OUTBOX] {
            let t = tx.open_table(table)?;
            for row in t.range(from..)? {
                let (k, v) = row?;
                out.push(OutboxEntry { seq: k.value(), json: v.value().to_vec() });
                if out.len() >= limit {
                    break;
                }
            }
        }
        out.sort_by_key(|e| e.seq);
        out.truncate(limit);
        Ok(out)
    }

    /// The oldest sequence number `events_from` can still return.
    pub fn oldest_kept_seq(&self) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read()?;
        let j = tx.open_table(JOURNAL)?.first()?.map(|(k, _)| k.value());
        let o = tx.open_table(OUTBOX)?.first()?.map(|(k, _)| k.value());
        Ok(j.into_iter().chain(o).min())
    }

    /// Make every earlier non-durable commit durable (on shutdown).
    pub fn sync(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.commit()?;
        Ok(())
    }

    pub fn outbox_depth(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(OUTBOX)?.len()?)
    }

    /// The sequence number the next event will get.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(meta.get("next_seq")?.map(|v| v.value()).unwrap_or(1))
    }
}

fn remove_credentials_of(creds: &mut redb::Table<&str, &[u8]>, id: &ResidentId) -> Result<usize, StoreError> {
    let mut keys = Vec::new();
    for row in creds.iter()? {
        let (k, v) = row?;
        let c: Credential = decode("credentials", v.value())?;
        if &c.resident == id {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CredentialKind, Validity};
    use crate::wiegand::Format;

    fn rid(s: &str) -> ResidentId {
        ResidentId::new(s).unwrap()
    }

    fn resident(id: &str, mode: AccessMode) -> Resident {
        Resident { id: rid(id), mode, validity: Validity::default(), schedule: None }
    }

    fn card(id: &str, n: u64) -> Credential {
        Credential {
            credential: CredentialKind::Card(CardId { format: Format::H10301, facility: 7, number: n }),
            resident: rid(id),
            validity: Validity::default(),
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
        (dir, s)
    }

    #[test]
    fn a_template_needs_consent_and_a_face_mode_and_goes_when_face_is_turned_off() {
        let (_d, s) = open();
        s.add_resident(&resident("a", AccessMode::FaceOrCard), &[card("a", 1)], 0).unwrap();
        s.add_resident(&resident("c", AccessMode::Card), &[card("c", 3)], 0).unwrap();
        let blob = b"sealed".as_slice();
        assert!(matches!(s.put_template(&rid("a"), blob, 1), Err(StoreError::NoConsent(_))));
        s.record_face_consent(&rid("a"), "v1", 1).unwrap();
        s.record_face_consent(&rid("c"), "v1", 1).unwrap();
        assert!(matches!(s.put_template(&rid("c"), blob, 1), Err(StoreError::FaceOff(_))));
        let g0 = s.templates_generation().unwrap();
        s.put_template(&rid("a"), blob, 2).unwrap();
        assert_eq!(s.templates().unwrap(), vec![("a".to_string(), blob.to_vec())]);
        assert!(s.templates_generation().unwrap() > g0);
        assert_eq!(s.face_consent(&rid("a")).unwrap().unwrap().rules_version, "v1");
        // Mode to card: the template goes in the same transaction.
        s.set_mode(&rid("a"), AccessMode::Card, 3).unwrap();
        assert!(s.templates().unwrap().is_empty());
        // Withdrawing consent deletes it too.
        s.set_mode(&rid("a"), AccessMode::FaceOrCard, 4).unwrap();
        s.put_template(&rid("a"), blob, 5).unwrap();
        assert!(s.withdraw_face_consent(&rid("a"), 6).unwrap());
        assert!(s.templates().unwrap().is_empty());
        assert!(s.face_consent(&rid("a")).unwrap().is_none());
        // Removing the resident deletes it.
        s.record_face_consent(&rid("a"), "v1", 7).unwrap();
        s.put_template(&rid("a"), blob, 8).unwrap();
        s.remove_resident(&rid("a"), 9).unwrap();
        assert!(s.templates().unwrap().is_empty());
        assert!(s.face_consent(&rid("a")).unwrap().is_none(), "the consent goes with the resident");
        // A sync that leaves the resident out deletes it.
        s.add_resident(&resident("b", AccessMode::FaceAndCard), &[card("b", 2)], 10).unwrap();
        s.record_face_consent(&rid("b"), "v1", 10).unwrap();
        s.put_template(&rid("b"), blob, 10).unwrap();
        let snapshot = vec![(resident("c", AccessMode::Card), vec![card("c", 3)])];
        s.apply(RosterOp::Sync { version: 1, digest: 1, residents: snapshot }, None, 11).unwrap();
        assert!(s.templates().unwrap().is_empty());
    }

    #[test]
    fn residents_and_cards_roundtrip_and_survive_reopen() {
        let (dir, s) = open();
        s.add_resident(&resident("a", AccessMode::Card), &[card("a", 1)], 0).unwrap();
        let (c, r) = s.lookup_card(&CardId { format: Format::H10301, facility: 7, number: 1 }).unwrap().unwrap();
        assert_eq!((c.resident.as_str(), r.mode), ("a", AccessMode::Card));
        drop(s);
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
        assert_eq!(s.residents().unwrap().len(), 1);
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert!(s.lookup_card(&CardId { format: Format::H10301, facility: 7, number: 2 }).unwrap().is_none());
    }

    #[test]
    fn second_open_is_refused_while_the_first_is_open() {
        let (dir, _s) = open();
        assert!(matches!(Store::open(&dir.path().join("s.redb")), Err(StoreError::Locked)));
    }

    #[test]
    fn the_guard_runs_on_every_write() {
        let (_d, s) = open();
        // Face mode without a card: refused, nothing stored.
        let err = s.add_resident(&resident("f", AccessMode::FaceOrCard), &[], 0).unwrap_err();
        assert!(matches!(err, StoreError::Guard(_)));
        assert!(s.residents().unwrap().is_empty());
        // With a card: accepted.
        s.add_resident(&resident("f", AccessMode::FaceOrCard), &[card("f", 5)], 0).unwrap();
        // Removing the last card: refused, card still there.
        assert!(matches!(s.remove_credential(&card("f", 5).credential.key(), 0), Err(StoreError::Guard(_))));
        assert_eq!(s.credentials_of(&rid("f")).unwrap().len(), 1);
        // A card-mode resident may switch to face once they hold a card, not before.
        s.add_resident(&resident("c", AccessMode::Card), &[], 0).unwrap();
        assert!(matches!(s.set_mode(&rid("c"), AccessMode::FaceAndCard, 0), Err(StoreError::Guard(_))));
        assert_eq!(s.resident(&rid("c")).unwrap().unwrap().mode, AccessMode::Card);
        s.add_credential(&card("c", 6), 0).unwrap();
        assert_eq!(s.set_mode(&rid("c"), AccessMode::FaceAndCard, 0).unwrap(), AccessMode::Card);
        // An expired card does not count.
        let mut late = card("e", 9);
        late.validity.valid_until_ms = Some(100);
        assert!(s.add_resident(&resident("e", AccessMode::FaceOrCard), &[late], 200).is_err());
        // Upserting a face mode over a card-less resident is refused too.
        s.add_resident(&resident("u", AccessMode::Card), &[], 0).unwrap();
        assert!(s.upsert_resident(&resident("u", AccessMode::FaceOrCard), 0).is_err());
    }

    #[test]
    fn a_card_belongs_to_one_resident_and_removal_takes_cards() {
        let (_d, s) = open();
        s.add_resident(&resident("a", AccessMode::Card), &[card("a", 1)], 0).unwrap();
        s.add_resident(&resident("b", AccessMode::Card), &[], 0).unwrap();
        assert!(matches!(s.add_credential(&card("b", 1), 0), Err(StoreError::CredentialTaken(_))));
        assert_eq!(s.remove_resident(&rid("a"), 0).unwrap(), 1);
        assert!(s.credentials().unwrap().is_empty());
        assert!(matches!(s.remove_resident(&rid("a"), 0), Err(StoreError::NoResident(_))));
    }

    #[test]
    fn outbox_assigns_sequence_numbers_and_acks_remove() {
        let (dir, s) = open();
        let stored = s
            .append_events(
                (0..5).map(|i| move |seq: u64| format!("{{\"i\":{i},\"seq\":{seq}}}").into_bytes()).collect(),
            )
            .unwrap();
        assert_eq!(stored.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(s.outbox_depth().unwrap(), 5);
        s.ack_events(&[1, 2]).unwrap();
        let rest = s.outbox_after(0, 10).unwrap();
        assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(s.outbox_after(3, 1).unwrap()[0].seq, 4);
        s.sync().unwrap();
        drop(s);
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
        assert_eq!(s.next_seq().unwrap(), 6, "sequence numbers continue after reopen");
        assert_eq!(s.outbox_depth().unwrap(), 3);
    }

    #[test]
    fn request_ids_are_claimed_once_with_their_change() {
        let (_d, s) = open();
        let claim = |id| Some(Claim { request_id: id, now_ms: 1_000 });
        let up = RosterOp::Upsert { resident: resident("a", AccessMode::Card), credentials: Some(vec![card("a", 1)]) };
        s.apply(up.clone(), claim("r1"), 1_000).unwrap();
        assert!(matches!(s.apply(up, claim("r1"), 1_000), Err(StoreError::DuplicateRequest(_))));
        // A refused change does not use up its request id (one transaction).
        let bad = RosterOp::SetMode { id: rid("a"), mode: AccessMode::FaceOrCard };
        s.apply(RosterOp::RemoveCredential(card("a", 1).credential.key()), claim("r2"), 1_000).unwrap();
        assert!(matches!(s.apply(bad, claim("r3"), 1_000), Err(StoreError::Guard(_))));
        s.apply(RosterOp::Nothing, claim("r3"), 1_000).unwrap();
        assert_eq!(s.remembered_requests().unwrap(), 3);
    }

    #[test]
    fn request_ids_are_pruned_only_past_the_minimum_age() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.redb")).unwrap();
        s.set_retention(1_000, 3, 10);
        for (i, id) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            s.apply(RosterOp::Nothing, Some(Claim { request_id: id, now_ms: 100 + i as i64 }), 0).unwrap();
        }
        assert_eq!(s.remembered_requests().unwrap(), 5, "all younger than the minimum age");
        s.apply(RosterOp::Nothing, Some(Claim { request_id: "f", now_ms: 5_000 }), 0).unwrap();
        assert_eq!(s.remembered_requests().unwrap(), 3);
        let err = s.apply(RosterOp::Nothing, Some(Claim { request_id: "f", now_ms: 5_001 }), 0);
        assert!(matches!(err, Err(StoreError::DuplicateRequest(_))));
    }

    #[test]
    fn roster_sync_is_atomic_idempotent_and_versioned() {
        let (_d, s) = open();
        s.add_resident(&resident("old", AccessMode::Card), &[card("old", 9)], 0).unwrap();
        let snap = vec![
            (resident("a", AccessMode::FaceOrCard), vec![card("a", 1)]),
            (resident("b", AccessMode::Card), vec![]),
        ];
        let sync = |v, d, r: Vec<(Resident, Vec<Credential>)>| RosterOp::Sync { version: v, digest: d, residents: r };
        let out = s.apply(sync(3, 77, snap.clone()), None, 0).unwrap();
        assert_eq!(out, OpOutcome::Synced { residents: 2, credentials: 1, removed: 0 });
        assert!(s.resident(&rid("old")).unwrap().is_none());
        assert_eq!(s.roster_version().unwrap(), 3);
        // The same snapshot again: the same state.
        s.apply(sync(3, 77, snap.clone()), None, 0).unwrap();
        assert_eq!(s.residents().unwrap().len(), 2);
        assert!(matches!(s.apply(sync(3, 78, snap.clone()), None, 0), Err(StoreError::VersionConflict(3))));
        assert!(matches!(s.apply(sync(2, 1, snap), None, 0), Err(StoreError::StaleVersion { .. })));
        // A snapshot with a face-only resident is refused whole.
        let bad = vec![(resident("c", AccessMode::Card), vec![]), (resident("f", AccessMode::FaceOrCard), vec![])];
        assert!(matches!(s.apply(sync(4, 1, bad), None, 0), Err(StoreError::Guard(_))));
        assert_eq!(s.residents().unwrap().len(), 2);
        assert_eq!(s.roster_version().unwrap(), 3);
    }

    #[test]
    fn delivered_events_stay_in_the_journal_for_backfill() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.redb")).unwrap();
        s.set_retention(0, 10, 3);
        s.append_events((0..6).map(|_| |seq: u64| format!("{{\"seq\":{seq}}}").into_bytes()).collect()).unwrap();
        s.ack_events(&[1, 2, 3, 4]).unwrap();
        let all = s.events_from(0, 100).unwrap();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3, 4, 5, 6]);
        assert_eq!(s.events_from(4, 2).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(s.oldest_kept_seq().unwrap(), Some(2));
        assert_eq!(s.outbox_depth().unwrap(), 2);
    }
}
