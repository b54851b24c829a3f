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
        let store = Store { db };
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
        }
        tx.commit()?;
        Ok(())
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

    /// Run `f` in one durable write transaction over residents and credentials; it reports
    /// which residents it touched, and the guard checks each of them before the commit.
    fn mutate<T>(
        &self,
        now_ms: i64,
        f: impl FnOnce(
            &mut redb::Table<&str, &[u8]>,
            &mut redb::Table<&str, &[u8]>,
        ) -> Result<(T, Vec<ResidentId>), StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.db.begin_write()?;
        let out = {
            let mut residents = tx.open_table(RESIDENTS)?;
            let mut creds = tx.open_table(CREDENTIALS)?;
            let (out, touched) = f(&mut residents, &mut creds)?;
            if !touched.is_empty() {
                let mut all: Vec<Credential> = Vec::new();
                for row in creds.iter()? {
                    let (_, v) = row?;
                    all.push(decode("credentials", v.value())?);
                }
                for id in touched {
                    if let Some(v) = residents.get(id.as_str())? {
                        let r: Resident = decode("residents", v.value())?;
                        guard(&r, &all, now_ms)?;
                    }
                }
            }
            out
        };
        tx.commit()?;
        Ok(out)
    }

    /// Add a resident with their credentials atomically (a face mode needs its card in the same
    /// transaction). Fails if the resident exists or a credential is held by someone else.
    pub fn add_resident(&self, r: &Resident, credentials: &[Credential], now_ms: i64) -> Result<(), StoreError> {
        r.validate().map_err(StoreError::InvalidResident)?;
        self.mutate(now_ms, |residents, creds| {
            if residents.get(r.id.as_str())?.is_some() {
                return Err(StoreError::ResidentExists(r.id.to_string()));
            }
            residents.insert(r.id.as_str(), encode(r).as_slice())?;
            for c in credentials {
                put_credential(creds, r, c)?;
            }
            Ok(((), vec![r.id.clone()]))
        })
    }

    /// Insert or replace a resident record (their credentials stay).
    pub fn upsert_resident(&self, r: &Resident, now_ms: i64) -> Result<(), StoreError> {
        r.validate().map_err(StoreError::InvalidResident)?;
        self.mutate(now_ms, |residents, _| {
            residents.insert(r.id.as_str(), encode(r).as_slice())?;
            Ok(((), vec![r.id.clone()]))
        })
    }

    /// Change a resident's access mode (P2); returns the previous mode.
    pub fn set_mode(&self, id: &ResidentId, mode: AccessMode, now_ms: i64) -> Result<AccessMode, StoreError> {
        self.mutate(now_ms, |residents, _| {
            let mut r: Resident = match residents.get(id.as_str())? {
                Some(v) => decode("residents", v.value())?,
                None => return Err(StoreError::NoResident(id.to_string())),
            };
            let before = r.mode;
            r.mode = mode;
            residents.insert(id.as_str(), encode(&r).as_slice())?;
            Ok((before, vec![id.clone()]))
        })
    }

    pub fn add_credential(&self, c: &Credential, now_ms: i64) -> Result<(), StoreError> {
        c.validity.validate().map_err(StoreError::InvalidResident)?;
        self.mutate(now_ms, |residents, creds| {
            let r: Resident = match residents.get(c.resident.as_str())? {
                Some(v) => decode("residents", v.value())?,
                None => return Err(StoreError::NoResident(c.resident.to_string())),
            };
            put_credential(creds, &r, c)?;
            Ok(((), vec![c.resident.clone()]))
        })
    }

    /// Remove a credential by key; refused if its holder would be left face-only.
    pub fn remove_credential(&self, key: &str, now_ms: i64) -> Result<Credential, StoreError> {
        self.mutate(now_ms, |_, creds| {
            let c: Credential = match creds.remove(key)? {
                Some(v) => decode("credentials", v.value())?,
                None => return Err(StoreError::NoCredential(key.to_string())),
            };
            let holder = c.resident.clone();
            Ok((c, vec![holder]))
        })
    }

    /// Remove a resident and every credential they hold.
    pub fn remove_resident(&self, id: &ResidentId, now_ms: i64) -> Result<usize, StoreError> {
        self.mutate(now_ms, |residents, creds| {
            if residents.remove(id.as_str())?.is_none() {
                return Err(StoreError::NoResident(id.to_string()));
            }
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
            Ok((keys.len(), Vec::new()))
        })
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

    /// Remove delivered events (after the broker's PUBACK). Not fsynced: see the module doc.
    pub fn ack_events(&self, seqs: &[u64]) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::None).map_err(|e| StoreError::Db(e.to_string()))?;
        {
            let mut t = tx.open_table(OUTBOX)?;
            for s in seqs {
                t.remove(*s)?;
            }
        }
        tx.commit()?;
        Ok(())
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
}
