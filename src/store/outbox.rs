//! The event outbox (durable before publish, removed after PUBACK) and the journal of delivered
//! events for `events.backfill`.

use redb::{Durability, ReadableTable, ReadableTableMetadata};

use super::schema::*;
use super::{Store, StoreError};

/// One event waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub seq: u64,
    pub json: Vec<u8>,
}

impl Store {
    /// Append events durably, assigning consecutive sequence numbers. `build(seq)` makes each
    /// event's JSON with its number. Returns the stored entries once they are on disk.
    pub fn append_events<F>(&self, builders: Vec<F>) -> Result<Vec<OutboxEntry>, StoreError>
    where
        F: FnOnce(u64) -> Vec<u8>,
    {
        let mut tx = self.write()?;
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
        self.commit(tx)?;
        Ok(out)
    }

    /// Up to `limit` undelivered events with `seq > after`, oldest first.
    pub fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let tx = self.read()?;
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
        let mut tx = self.write()?;
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
        self.commit(tx)?;
        Ok(())
    }

    /// Up to `limit` events with `seq >= from`, delivered (journal) or not (outbox), in order.
    pub fn events_from(&self, from: u64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let tx = self.read()?;
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
        let tx = self.read()?;
        let j = tx.open_table(JOURNAL)?.first()?.map(|(k, _)| k.value());
        let o = tx.open_table(OUTBOX)?.first()?.map(|(k, _)| k.value());
        Ok(j.into_iter().chain(o).min())
    }

    pub fn outbox_depth(&self) -> Result<u64, StoreError> {
        let tx = self.read()?;
        Ok(tx.open_table(OUTBOX)?.len()?)
    }

    /// The sequence number the next event will get.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        let tx = self.read()?;
        let meta = tx.open_table(META)?;
        Ok(meta.get("next_seq")?.map(|v| v.value()).unwrap_or(1))
    }
}
