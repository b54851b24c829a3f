//! The publish pipeline's bookkeeping, pure: what was handed to the client, which packet id it
//! got, which PUBACK completes which outbox event, and how much may be in flight.
//!
//! rumqttc hands publishes out in order and reports each one's packet id when it goes on the
//! wire (`Outgoing::Publish(pkid)`); the PUBACK names that id. An entry is `Some(seq)` for an
//! outbox event (removed from the outbox only after its PUBACK) and `None` for anything else
//! (replies, retained state, health).

use std::collections::{HashMap, VecDeque};

/// One acknowledgement's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// Not a packet of this pipeline.
    Unknown,
    /// The broker took it; `Some(seq)` for an outbox event.
    Delivered(Option<u64>),
    /// The broker refused it (an ACL, a quota); `Some(seq)` for an outbox event, which stays.
    Refused(Option<u64>),
}

/// Outbox removals are batched: flushed at this many, or when the link is quiet.
pub const ACK_BATCH: usize = 64;

#[derive(Debug)]
pub struct Pipeline {
    capacity: usize,
    awaiting_pkid: VecDeque<Option<u64>>,
    in_flight: HashMap<u16, Option<u64>>,
    /// Handed to the client and not yet acknowledged.
    queued: usize,
    /// The highest outbox seq handed to the client in this session.
    cursor: u64,
    /// Delivered outbox events not yet removed from the outbox.
    acks: Vec<u64>,
}

impl Pipeline {
    /// A pipeline that keeps at most `capacity` publishes in flight.
    pub fn new(capacity: usize) -> Pipeline {
        Pipeline {
            capacity: capacity.max(1),
            awaiting_pkid: VecDeque::new(),
            in_flight: HashMap::new(),
            queued: 0,
            cursor: 0,
            acks: Vec::new(),
        }
    }

    pub fn has_room(&self) -> bool {
        self.queued < self.capacity
    }

    /// How many more publishes may be handed over now.
    pub fn room(&self) -> usize {
        self.capacity.saturating_sub(self.queued)
    }

    /// The outbox events to read next start after this seq.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// A publish was handed to the client: `Some(seq)` for an outbox event.
    pub fn handed(&mut self, entry: Option<u64>) {
        if let Some(seq) = entry {
            self.cursor = self.cursor.max(seq);
        }
        self.awaiting_pkid.push_back(entry);
        self.queued += 1;
    }

    /// The client put the oldest handed publish on the wire with packet id `pkid`.
    pub fn sent(&mut self, pkid: u16) {
        if let Some(e) = self.awaiting_pkid.pop_front() {
            self.in_flight.insert(pkid, e);
        }
    }

    /// The PUBACK of `pkid`; a delivered event is queued for removal from the outbox.
    pub fn acked(&mut self, pkid: u16, delivered: bool) -> Acked {
        let Some(e) = self.in_flight.remove(&pkid) else { return Acked::Unknown };
        self.queued = self.queued.saturating_sub(1);
        if !delivered {
            return Acked::Refused(e);
        }
        if let Some(seq) = e {
            self.acks.push(seq);
        }
        Acked::Delivered(e)
    }

    /// Delivered events waiting for removal.
    pub fn acks_waiting(&self) -> bool {
        !self.acks.is_empty()
    }

    /// The delivered events to remove now: all of them, or none until a batch is full.
    pub fn take_acks(&mut self, all: bool) -> Vec<u64> {
        if all || self.acks.len() >= ACK_BATCH {
            std::mem::take(&mut self.acks)
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_removed_only_after_its_own_puback() {
        let mut p = Pipeline::new(3);
        p.handed(None); // status
        p.handed(Some(7));
        p.handed(Some(8));
        assert!(!p.has_room());
        assert_eq!(p.cursor(), 8);
        p.sent(1);
        p.sent(2);
        p.sent(3);
        assert_eq!(p.acked(3, true), Acked::Delivered(Some(8)));
        assert_eq!(p.acked(9, true), Acked::Unknown);
        assert_eq!(p.room(), 1);
        assert_eq!(p.acked(2, false), Acked::Refused(Some(7)));
        assert_eq!(p.acked(1, true), Acked::Delivered(None));
        assert_eq!(p.take_acks(false), Vec::<u64>::new(), "batched until full or quiet");
        assert_eq!(p.take_acks(true), vec![8], "the refused event stays in the outbox");
        assert!(!p.acks_waiting());
    }

    #[test]
    fn acks_flush_by_themselves_when_a_batch_is_full() {
        let mut p = Pipeline::new(ACK_BATCH + 1);
        for s in 1..=ACK_BATCH as u64 {
            p.handed(Some(s));
            p.sent(s as u16);
            p.acked(s as u16, true);
        }
        assert_eq!(p.take_acks(false).len(), ACK_BATCH);
    }
}
