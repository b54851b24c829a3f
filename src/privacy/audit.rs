//! The audit trail (REQUIREMENTS P9): enrolments, deletions, mode changes, consent changes,
//! roster and config changes, in an append-only file of JSON lines, each chained to the one
//! before by SHA-256, so that a changed, removed or inserted record breaks the chain at that
//! record. No biometric data and no names: residents appear by their opaque reference, cards
//! masked.
//!
//! Records are first written into the store in the same transaction as the change they describe
//! (so a change is never without its record), then moved to this file, numbered by that
//! transaction; a crash between the two repeats the move, and a number already in the file is
//! skipped. Records older than the retention period (default 3 years) are pruned from the front;
//! the first kept record still names the hash of the last pruned one.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::hex;

pub use crate::store::AuditEntry;

/// A chained record: one line of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub seq: u64,
    pub ts_ms: i64,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident: Option<String>,
    pub detail: String,
    /// Who made the change and its request id (`mqtt, request …`, `cli uid=0, request …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The previous record's hash (64 zeros before the first record ever).
    pub prev: String,
    /// SHA-256 over this record's JSON without `hash`.
    #[serde(default)]
    pub hash: String,
}

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl AuditRecord {
    fn compute_hash(&self) -> String {
        let mut body = self.clone();
        body.hash.clear();
        hex(&Sha256::digest(serde_json::to_vec(&body).unwrap_or_default()))
    }

    pub fn chain(seq: u64, e: &AuditEntry, prev: &str) -> AuditRecord {
        let mut r = AuditRecord {
            seq,
            ts_ms: e.ts_ms,
            kind: e.kind.clone(),
            resident: e.resident.clone(),
            detail: e.detail.clone(),
            by: e.by.clone(),
            prev: prev.to_string(),
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        r
    }
}

/// What [`verify_text`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The first broken record, if any: its line (1-based), its seq if readable, and why.
    pub broken: Option<Broken>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Broken {
    pub line: usize,
    pub seq: Option<u64>,
    pub why: String,
}

/// Check a whole audit file's text. Pure.
pub fn verify_text(text: &str) -> Verdict {
    let mut v = Verdict { records: 0, first_seq: None, last_seq: None, broken: None };
    let mut prev: Option<(u64, String)> = None;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let n = i + 1;
        let brk = |seq, why: String| Some(Broken { line: n, seq, why });
        let Some(body) = line.strip_suffix('\n') else {
            v.broken = brk(None, "the last record is cut short (no line end)".into());
            return v;
        };
        let r: AuditRecord = match serde_json::from_str(body) {
            Ok(r) => r,
            Err(e) => {
                let seq = serde_json::from_str::<serde_json::Value>(body).ok().and_then(|x| x["seq"].as_u64());
                v.broken = brk(seq, format!("not a valid record: {e}"));
                return v;
            }
        };
        if r.compute_hash() != r.hash {
            v.broken = brk(Some(r.seq), "its content does not match its hash (altered)".into());
            return v;
        }
        match &prev {
            None if r.seq == 1 && r.prev != GENESIS => {
                v.broken = brk(Some(1), "the first record does not start the chain".into());
                return v;
            }
            Some((pseq, phash)) if r.seq != pseq + 1 => {
                let _ = phash;
                v.broken = brk(Some(r.seq), format!("follows record {pseq}: records are missing or out of order"));
                return v;
            }
            Some((_, phash)) if &r.prev != phash => {
                v.broken = brk(Some(r.seq), "does not chain to the record before it".into());
                return v;
            }
            _ => {}
        }
        v.records += 1;
        v.first_seq.get_or_insert(r.seq);
        v.last_seq = Some(r.seq);
        prev = Some((r.seq, r.hash));
    }
    v
}

/// The audit file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    /// The last record's seq and hash, and the file length they were read at (read again if
    /// the file changed under us).
    tail: std::sync::Mutex<Option<(u64, String, u64)>>,
}

impl AuditLog {
    pub fn new(path: &Path) -> AuditLog {
        AuditLog { path: path.to_path_buf(), tail: std::sync::Mutex::new(None) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open the store with this file as its audit sink: the daemon's and the tools' way to open
    /// the store, so that every change's record reaches `audit.jsonl` (beside the store).
    pub fn open_store(path: &Path) -> Result<crate::store::Store, crate::store::StoreError> {
        Ok(AuditLog::open_store_shared(path)?.0)
    }

    /// As [`AuditLog::open_store`], also returning the audit file for others to share (the
    /// privacy stage prunes through the same handle, so an append and a prune never interleave).
    pub fn open_store_shared(
        path: &Path,
    ) -> Result<(crate::store::Store, std::sync::Arc<AuditLog>), crate::store::StoreError> {
        let mut store = crate::store::Store::open(path)?;
        let log = std::sync::Arc::new(AuditLog::new(&path.with_file_name("audit.jsonl")));
        store.set_audit_sink(Box::new(log.clone()));
        Ok((store, log))
    }

    /// The last record's seq and hash. A last line cut short by a power cut (an append that was
    /// never fsynced, so its records are still waiting in the store) is removed first; nothing
    /// else is ever removed, so an altered record stays for `verify` to find.
    fn read_tail(&self) -> std::io::Result<(u64, String)> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, GENESIS.into())),
            Err(e) => return Err(e),
        };
        let mut last = (0, GENESIS.to_string());
        let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
        let mut torn = false;
        for (i, line) in lines.iter().enumerate() {
            let complete = line.ends_with(b"\n");
            match serde_json::from_slice::<AuditRecord>(line.strip_suffix(b"\n").unwrap_or(line)) {
                Ok(r) if complete => last = (r.seq, r.hash),
                // Only the last line can be cut short by a power cut; a damaged record in the
                // middle is evidence and stays.
                _ => torn = i + 1 == lines.len(),
            }
        }
        let good_end = if torn { text.len() - lines.last().map_or(0, |l| l.len()) } else { text.len() };
        if torn && good_end < text.len() {
            tracing::warn!(path = %self.path.display(), bytes = text.len() - good_end, "audit file: a record cut short by a power cut removed (it is written again from the store)");
            let f = std::fs::OpenOptions::new().write(true).open(&self.path)?;
            f.set_len(good_end as u64)?;
            f.sync_all()?;
        }
        Ok(last)
    }

    /// Append numbered entries (seq, entry), skipping numbers already written; fsynced.
    pub fn append(&self, entries: &[(u64, AuditEntry)]) -> std::io::Result<usize> {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let len = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        let (mut seq, mut hash) = match tail.take() {
            Some((s, h, l)) if l == len => (s, h),
            _ => self.read_tail()?,
        };
        let mut out = String::new();
        let mut n = 0;
        for (s, e) in entries {
            if *s <= seq {
                continue;
            }
            let r = AuditRecord::chain(*s, e, &hash);
            out.push_str(&serde_json::to_string(&r).unwrap_or_default());
            out.push('\n');
            seq = *s;
            hash = r.hash;
            n += 1;
        }
        if n > 0 {
            use std::os::unix::fs::OpenOptionsExt;
            let new = !self.path.exists();
            let mut f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&self.path)?;
            f.write_all(out.as_bytes())?;
            f.sync_data()?;
            if new {
                crate::durable::sync_parent(&self.path)?;
            }
        }
        let len = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        *tail = Some((seq, hash, len));
        Ok(n)
    }

    /// Drop records older than `before_ms` from the front (the chain's anchor moves with them).
    /// Returns how many went.
    pub fn prune(&self, before_ms: i64) -> std::io::Result<usize> {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        *tail = None;
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut dropped = 0;
        let mut keep = String::new();
        let mut keeping = false;
        for line in text.split_inclusive('\n') {
            if !keeping {
                match serde_json::from_str::<AuditRecord>(line.trim_end()) {
                    Ok(r) if r.ts_ms < before_ms => {
                        dropped += 1;
                        continue;
                    }
                    _ => keeping = true,
                }
            }
            keep.push_str(line);
        }
        if dropped > 0 {
            let tmp = self.path.with_extension("prune");
            std::fs::write(&tmp, keep)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            crate::durable::sync_parent(&self.path)?;
        }
        Ok(dropped)
    }
}

impl crate::store::AuditSink for std::sync::Arc<AuditLog> {
    fn append(&self, entries: &[(u64, AuditEntry)]) -> std::io::Result<usize> {
        AuditLog::append(self, entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_opened_through_the_audit_log_writes_a_verifiable_chain() {
        use crate::model::{AccessMode, Credential, CredentialKind, Resident, ResidentId, Validity};
        use crate::wiegand::{CardId, Format};
        let dir = tempfile::tempdir().unwrap();
        let s = AuditLog::open_store(&dir.path().join("s.redb")).unwrap();
        let id = ResidentId::new("a").unwrap();
        let r = Resident { id: id.clone(), mode: AccessMode::Card, validity: Validity::default(), schedule: None };
        let card = CardId { format: Format::H10301, facility: 7, number: 1 };
        let c =
            Credential { credential: CredentialKind::Card(card), resident: id.clone(), validity: Validity::default() };
        s.add_resident(&r, &[c], 1).unwrap();
        s.set_mode(&id, AccessMode::FaceOrCard, 2).unwrap();
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let v = verify_text(&text);
        assert_eq!((v.records, v.broken), (2, None), "{text}");
        assert!(text.contains("\"kind\":\"resident_added\"") && text.contains("\"kind\":\"mode_changed\""));
    }

    #[test]
    fn the_chain_names_the_first_altered_record() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(&dir.path().join("audit.jsonl"));
        let e = |ts, kind: &str| AuditEntry::new(ts, kind, Some("r-1"), "x");
        assert_eq!(log.append(&[(1, e(10, "consent_recorded")), (2, e(20, "enrolment"))]).unwrap(), 2);
        // A number already written is skipped (a repeated move after a crash).
        assert_eq!(log.append(&[(2, e(20, "enrolment")), (3, e(30, "deletion"))]).unwrap(), 1);
        let fresh = AuditLog::new(log.path());
        assert_eq!(fresh.append(&[(4, e(40, "mode_changed"))]).unwrap(), 1, "tail read from the file");
        let text = std::fs::read_to_string(log.path()).unwrap();
        let v = verify_text(&text);
        assert_eq!((v.records, v.first_seq, v.last_seq, v.broken), (4, Some(1), Some(4), None));
        // Change record 3's kind (same length): record 3 is named.
        let bad = text.replacen("\"deletion\"", "\"deletiom\"", 1);
        let b = verify_text(&bad).broken.unwrap();
        assert_eq!((b.line, b.seq), (3, Some(3)), "{b:?}");
        // Remove record 2: record 3 is named.
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let b = verify_text(&[lines[0], lines[2], lines[3]].concat()).broken.unwrap();
        assert_eq!(b.seq, Some(3));
        // Recompute a forged record's hash: the next record no longer chains.
        let mut r: AuditRecord = serde_json::from_str(lines[1].trim_end()).unwrap();
        r.detail = "forged".into();
        r.hash = r.compute_hash();
        let forged = [lines[0], &format!("{}\n", serde_json::to_string(&r).unwrap()), lines[2], lines[3]].concat();
        assert_eq!(verify_text(&forged).broken.unwrap().seq, Some(3));
        // A cut-off last line.
        assert_eq!(verify_text(&text[..text.len() - 5]).broken.unwrap().line, 4);
        // A last record cut short by a power cut is removed and written again; a damaged record
        // in the middle is kept (evidence).
        let whole = std::fs::read_to_string(log.path()).unwrap();
        std::fs::write(log.path(), &whole[..whole.len() - 7]).unwrap();
        let again = AuditLog::new(log.path());
        assert_eq!(again.append(&[(4, e(40, "mode_changed")), (5, e(45, "deletion"))]).unwrap(), 2);
        let v = verify_text(&std::fs::read_to_string(log.path()).unwrap());
        assert_eq!((v.records, v.broken), (5, None));
        let fixed = std::fs::read_to_string(log.path()).unwrap();
        let lines: Vec<&str> = fixed.split_inclusive('\n').collect();
        let cut_middle = [lines[0], &lines[1][..20], lines[2], lines[3], lines[4]].concat();
        std::fs::write(log.path(), &cut_middle).unwrap();
        let again = AuditLog::new(log.path());
        assert_eq!(again.append(&[(6, e(60, "deletion"))]).unwrap(), 1);
        let after = std::fs::read_to_string(log.path()).unwrap();
        assert!(after.starts_with(&cut_middle), "nothing but a torn last line is ever removed");
        assert_eq!(verify_text(&after).broken.unwrap().line, 2);
        std::fs::write(log.path(), &fixed).unwrap();
        let log = AuditLog::new(log.path());
        // Pruning keeps a chain that verifies from its new first record.
        assert_eq!(log.prune(25).unwrap(), 2);
        let v = verify_text(&std::fs::read_to_string(log.path()).unwrap());
        assert_eq!((v.records, v.first_seq, v.broken), (3, Some(3), None));
        assert_eq!(log.append(&[(6, e(50, "deletion"))]).unwrap(), 1);
        assert_eq!(verify_text(&std::fs::read_to_string(log.path()).unwrap()).broken, None);
    }
}
