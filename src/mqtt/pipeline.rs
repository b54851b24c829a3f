//! The publish pipeline's bookkeeping, pure: what was handed to the client, which packet id it
//! got, which PUBACK completes which outbox event, how much may be in flight, and which refused
//! event holds back the ones behind it.
//!
//! rumqttc hands publishes out in order and reports each one's packet id when it goes on the
//! wire (`Outgoing::Publish(pkid)`); the PUBACK names that id. An entry is an outbox event
//! (removed from the outbox only after its PUBACK), a reply, or anything else (retained state,
//! health).
//!
//! A refused event (an ACL, a quota: MQTT 5 PUBACK reason ≥ 0x80) stays in the outbox and is
//! *held*: no further outbox event is handed over until [`Pipeline::release`] rewinds the cursor
//! to it, so events go out in sequence order. Replies and state are never held.

use std::collections::{HashMap, VecDeque};

/// What one publish was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// The outbox event with this seq.
    Event(u64),
    /// A command reply.
    Reply,
    /// Retained status and state, health.
    Other,
}

/// One acknowledgement's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// Not a packet of this pipeline.
    Unknown,
    /// The broker took it.
    Delivered(Entry),
    /// The broker refused it (an ACL, a quota); an outbox event stays, and is held.
    Refused(Entry),
}

/// Outbox removals are batched: flushed at this many, or when the link is quiet.
pub const ACK_BATCH: usize = 64;

#[derive(Debug)]
pub struct Pipeline {
    capacity: usize,
    awaiting_pkid: VecDeque<Entry>,
    in_flight: HashMap<u16, Entry>,
    /// Handed to the client and not yet acknowledged.
    queued: usize,
    /// The highest outbox seq handed to the client in this session.
    cursor: u64,
    /// Delivered outbox events not yet removed from the outbox.
    acks: Vec<u64>,
    /// The lowest refused event, holding back the outbox until released.
    held: Option<u64>,
    /// A released event on trial: sent alone, nothing behind it until the broker takes it.
    probing: Option<u64>,
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
            held: None,
            probing: None,
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

    /// How many outbox events may be handed over now: none while a refused event is held, one
    /// (the released event itself) while it is on trial, else the room.
    pub fn outbox_room(&self) -> usize {
        match (self.held, self.probing) {
            (Some(_), _) => 0,
            (None, Some(seq)) if self.cursor >= seq => 0,
            (None, Some(_)) => self.room().min(1),
            (None, None) => self.room(),
        }
    }

    /// The refused event holding back the outbox.
    pub fn held(&self) -> Option<u64> {
        self.held
    }

    /// Retry the held event: the next outbox read starts at it (the events behind it that were
    /// already delivered may go again: at least once). Returns its seq.
    pub fn release(&mut self) -> Option<u64> {
        let seq = self.held.take()?;
        self.cursor = self.cursor.min(seq.saturating_sub(1));
        self.probing = Some(seq);
        Some(seq)
    }

    /// Read the outbox from its start again: events it holds that were delivered are sent
    /// again (duplicates, never a loss). For a store that went back to its last durable commit.
    pub fn rewind(&mut self) {
        self.cursor = 0;
    }

    /// Start a connection with `seq` on trial (a block from the connection before): the outbox is
    /// read from it, and nothing behind it goes until the broker takes it.
    pub fn probe_first(&mut self, seq: u64) {
        self.held = Some(seq);
        self.release();
    }

    /// A publish was handed to the client.
    pub fn handed(&mut self, entry: Entry) {
        if let Entry::Event(seq) = entry {
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

    /// The PUBACK of `pkid`; a delivered event is queued for removal from the outbox, a refused
    /// one is held.
    pub fn acked(&mut self, pkid: u16, delivered: bool) -> Acked {
        let Some(e) = self.in_flight.remove(&pkid) else { return Acked::Unknown };
        self.queued = self.queued.saturating_sub(1);
        if !delivered {
            if let Entry::Event(seq) = e {
                self.held = Some(self.held.map_or(seq, |h| h.min(seq)));
                self.probing = None;
            }
            return Acked::Refused(e);
        }
        if let Entry::Event(seq) = e {
            self.acks.push(seq);
            // Only the event on trial ends the trial: an event behind it that was still in
            // flight from before the refusal does not (it would let the rest overtake it).
            if self.probing == Some(seq) {
                self.probing = None;
            }
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
        p.handed(Entry::Other); // status
        p.handed(Entry::Event(7));
        p.handed(Entry::Event(8));
        assert!(!p.has_room());
        assert_eq!(p.cursor(), 8);
        p.sent(1);
        p.sent(2);
        p.sent(3);
        assert_eq!(p.acked(3, true), Acked::Delivered(Entry::Event(8)));
        assert_eq!(p.acked(9, true), Acked::Unknown);
        assert_eq!(p.room(), 1);
        assert_eq!(p.acked(2, false), Acked::Refused(Entry::Event(7)));
        assert_eq!(p.acked(1, true), Acked::Delivered(Entry::Other));
        assert_eq!(p.take_acks(false), Vec::<u64>::new(), "batched until full or quiet");
        assert_eq!(p.take_acks(true), vec![8], "the refused event stays in the outbox");
        assert!(!p.acks_waiting());
    }

    #[test]
    fn a_refused_event_holds_the_outbox_until_released_and_then_goes_first() {
        let mut p = Pipeline::new(10);
        for (pkid, e) in [(1, Entry::Event(4)), (2, Entry::Reply), (3, Entry::Event(5)), (4, Entry::Event(6))] {
            p.handed(e);
            p.sent(pkid);
        }
        assert_eq!(p.outbox_room(), 6);
        // A refused reply holds nothing.
        assert_eq!(p.acked(2, false), Acked::Refused(Entry::Reply));
        assert_eq!(p.outbox_room(), 7);
        // Event 5 refused, then 6 too: the lowest is held; 4 was delivered.
        assert_eq!(p.acked(4, false), Acked::Refused(Entry::Event(6)));
        assert_eq!(p.acked(3, false), Acked::Refused(Entry::Event(5)));
        assert_eq!(p.acked(1, true), Acked::Delivered(Entry::Event(4)));
        assert_eq!(p.outbox_room(), 0);
        assert_eq!(p.held(), Some(5));
        assert_eq!(p.cursor(), 6);
        // Released: the next read starts at 5, and takes only 5.
        assert_eq!(p.release(), Some(5));
        assert_eq!(p.cursor(), 4);
        assert_eq!(p.outbox_room(), 1);
        assert_eq!(p.release(), None);
        p.handed(Entry::Event(5));
        p.sent(5);
        assert_eq!(p.outbox_room(), 0, "nothing behind the event on trial");
        // Refused again: held again.
        assert_eq!(p.acked(5, false), Acked::Refused(Entry::Event(5)));
        assert_eq!((p.held(), p.outbox_room()), (Some(5), 0));
        // Released again, with event 6 (from before the refusal) still in flight.
        p.handed(Entry::Event(6));
        p.sent(7);
        p.release();
        p.handed(Entry::Event(5));
        p.sent(8);
        // 6 is delivered during the trial: still on trial, nothing else goes.
        assert_eq!(p.acked(7, true), Acked::Delivered(Entry::Event(6)));
        assert_eq!(p.outbox_room(), 0);
        // 5 is taken: the outbox flows.
        assert_eq!(p.acked(8, true), Acked::Delivered(Entry::Event(5)));
        assert_eq!(p.outbox_room(), 10);
        assert_eq!(p.take_acks(true), vec![4, 6, 5]);
    }

    #[test]
    fn acks_flush_by_themselves_when_a_batch_is_full() {
        let mut p = Pipeline::new(ACK_BATCH + 1);
        for s in 1..=ACK_BATCH as u64 {
            p.handed(Entry::Event(s));
            p.sent(s as u16);
            p.acked(s as u16, true);
        }
        assert_eq!(p.take_acks(false).len(), ACK_BATCH);
    }
}
