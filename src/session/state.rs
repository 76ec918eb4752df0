//! One session's state in a single allocation of 8-byte cells:
//!
//! ```text
//! [ experiments: 4 bytes each, 2 per cell | first-met event per condition: 1 byte each, 8 per cell | events: 1 cell each ]
//! ```
//!
//! An experiment's conditions start where the previous experiments' end: the
//! offset is the sum of their condition counts (from the catalog), so it need
//! not be stored.
//!
//! One allocation means one cache miss to reach everything a session holds
//! after its table slot, and no per-vector headers or slack. Experiments and
//! condition bytes are inserted before the events (one short memmove for all
//! the experiments an event assigns first); events are appended.
//!
//! What few events carry goes in a second, boxed list of `(event, key, value)`
//! entries, 12 bytes each, allocated only for a session that has any: the
//! attributes conditions look at (key: the attribute name id), and non-zero
//! event values (key [`VALUE_KEY`], the value's bits). Most sessions have
//! neither and pay 8 bytes for the empty box pointer; a purchase costs one
//! 12-byte entry (plus, for the session's first entry, the 24-byte list header).

/// Why a checkpoint's session could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionDecodeError {
    #[error(transparent)]
    Bytes(#[from] crate::codec::DecodeError),
    /// The cell count does not fit the experiments and conditions it claims.
    #[error("session with {n_cells} cells for {n_exps} experiments and {n_conds} conditions")]
    Layout { n_cells: usize, n_exps: u16, n_conds: u16 },
}

/// Index of "no event".
pub(super) const NONE: u8 = u8::MAX;

/// Key of an extras entry holding an event's value (attribute name ids are
/// catalog indices, far below it).
pub(super) const VALUE_KEY: u32 = u32::MAX;

/// An extras entry: (event index, attribute name id or [`VALUE_KEY`], value id
/// or the event value's bits).
pub(super) type Extra = (u8, u32, u32);

/// Event order of SPEC §3: by ts, then device, then login, strings bytewise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OrderKey {
    pub ts: i64,
    pub device: u16,
    pub login: u16,
}

/// A kept event, packed in one cell: ts offset 32 bits, mp 16, device 12,
/// login 4 (the name tables' bounds, [`crate::names`], keep ids within them).
#[derive(Debug, Clone, Copy)]
pub(super) struct EvRec {
    /// ts − session base, in ms.
    pub off: u32,
    pub mp: u16,
    /// Below 2¹².
    pub device: u16,
    /// Below 2⁴.
    pub login: u8,
}

impl EvRec {
    #[inline]
    pub fn from_cell(c: u64) -> EvRec {
        EvRec { off: c as u32, mp: (c >> 32) as u16, device: ((c >> 48) & 0xFFF) as u16, login: (c >> 60) as u8 }
    }

    #[inline]
    fn cell(self) -> u64 {
        debug_assert!(self.device < 1 << 12 && self.login < 1 << 4);
        self.off as u64 | (self.mp as u64) << 32 | (self.device as u64) << 48 | (self.login as u64) << 60
    }
}

/// An experiment the session is assigned to, packed in 4 bytes: experiment
/// index 16 bits, variation slot 7, conflict 1, assigning event 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ExpState {
    pub experiment: u16,
    /// Winning variation, as a slot of the experiment's variation list (< 128).
    pub slot: u8,
    /// Index of the least event carrying the winning assignment.
    pub assigned: u8,
    pub conflict: bool,
}

impl ExpState {
    #[inline]
    fn from_bits(c: u32) -> ExpState {
        ExpState {
            experiment: c as u16,
            slot: (c >> 16) as u8 & 0x7F,
            conflict: (c >> 23) & 1 == 1,
            assigned: (c >> 24) as u8,
        }
    }

    #[inline]
    fn bits(self) -> u32 {
        debug_assert!(self.slot < 0x80);
        self.experiment as u32 | (self.slot as u32) << 16 | (self.conflict as u32) << 23 | (self.assigned as u32) << 24
    }
}

/// Most events kept for one session (event indices are `u8`).
pub const MAX_EVENTS_PER_SESSION: usize = 254;
/// Longest time span of one session's events (ts offsets are `u32` ms).
pub const MAX_SESSION_SPAN_MS: i64 = u32::MAX as i64;

#[derive(Debug, Default)]
pub(super) struct Session {
    /// ts of offset 0: the least ts of the session's events.
    pub base: i64,
    /// Greatest event ts − base.
    max_off: u32,
    n_exps: u16,
    n_conds: u16,
    /// [`Extra`] entries: the attributes conditions look at (kept to evaluate
    /// experiments assigned later) and the non-zero event values. Rare, so
    /// boxed: 8 bytes in every session instead of a 24-byte `Vec` header.
    #[allow(clippy::box_collection)]
    extras: Option<Box<Vec<Extra>>>,
    cells: Vec<u64>,
}

#[inline]
fn cond_cells(n: usize) -> usize {
    n.div_ceil(8)
}

#[inline]
fn exp_cells(n: usize) -> usize {
    n.div_ceil(2)
}

impl Session {
    /// Appends this session to a checkpoint.
    pub fn encode(&self, e: &mut crate::codec::Enc) {
        e.i64(self.base);
        e.u32(self.max_off);
        e.u16(self.n_exps);
        e.u16(self.n_conds);
        let extras = self.extras();
        e.u32(extras.len() as u32);
        for &(i, k, v) in extras {
            e.u8(i);
            e.u32(k);
            e.u32(v);
        }
        e.u32(self.cells.len() as u32);
        for &c in &self.cells {
            e.u64(c);
        }
    }

    /// Reads a session written by [`Session::encode`], checking that its
    /// layout is consistent.
    pub fn decode(d: &mut crate::codec::Dec<'_>) -> Result<Session, SessionDecodeError> {
        let (base, max_off, n_exps, n_conds) = (d.i64()?, d.u32()?, d.u16()?, d.u16()?);
        let n_extras = d.u32()? as usize;
        let mut extras = Vec::new();
        for _ in 0..n_extras {
            extras.push((d.u8()?, d.u32()?, d.u32()?));
        }
        let n_cells = d.u32()? as usize;
        let fixed = exp_cells(n_exps as usize) + cond_cells(n_conds as usize);
        if n_cells < fixed || n_cells - fixed > MAX_EVENTS_PER_SESSION {
            return Err(SessionDecodeError::Layout { n_cells, n_exps, n_conds });
        }
        let mut cells = Vec::with_capacity(n_cells);
        for _ in 0..n_cells {
            cells.push(d.u64()?);
        }
        let extras = (!extras.is_empty()).then(|| Box::new(extras));
        Ok(Session { base, max_off, n_exps, n_conds, extras, cells })
    }

    #[inline]
    fn events_start(&self) -> usize {
        exp_cells(self.n_exps as usize) + cond_cells(self.n_conds as usize)
    }

    /// The event cells, oldest first.
    #[inline]
    pub fn event_cells(&self) -> &[u64] {
        &self.cells[self.events_start()..]
    }

    #[inline]
    pub fn n_events(&self) -> usize {
        self.cells.len() - self.events_start()
    }

    #[inline]
    pub fn event(&self, i: usize) -> EvRec {
        EvRec::from_cell(self.cells[self.events_start() + i])
    }

    #[inline]
    pub fn ts(&self, i: u8) -> i64 {
        self.base + self.event(i as usize).off as i64
    }

    #[inline]
    pub fn key(&self, i: u8) -> OrderKey {
        let e = self.event(i as usize);
        OrderKey { ts: self.base + e.off as i64, device: e.device, login: e.login as u16 }
    }

    /// The greatest event ts (meaningless before the first event).
    #[inline]
    pub fn max_ts(&self) -> i64 {
        self.base + self.max_off as i64
    }

    #[inline]
    pub fn n_exps(&self) -> usize {
        self.n_exps as usize
    }

    #[inline]
    pub fn exp(&self, i: usize) -> ExpState {
        ExpState::from_bits((self.cells[i / 2] >> (32 * (i % 2))) as u32)
    }

    #[inline]
    pub fn set_exp(&mut self, i: usize, s: ExpState) {
        let c = &mut self.cells[i / 2];
        let shift = 32 * (i % 2);
        *c = (*c & !(0xFFFF_FFFF << shift)) | (s.bits() as u64) << shift;
    }

    #[inline]
    pub fn first_met(&self, j: usize) -> u8 {
        (self.cells[exp_cells(self.n_exps as usize) + j / 8] >> (8 * (j % 8))) as u8
    }

    #[inline]
    pub fn set_first_met(&mut self, j: usize, event: u8) {
        let c = &mut self.cells[exp_cells(self.n_exps as usize) + j / 8];
        let shift = 8 * (j % 8);
        *c = (*c & !(0xFF << shift)) | (event as u64) << shift;
    }

    pub fn attr_of(&self, event: usize, name: u32) -> Option<u32> {
        self.extras().iter().find(|a| a.0 as usize == event && a.1 == name).map(|a| a.2)
    }

    pub fn push_attr(&mut self, event: u8, name: u32, value: u32) {
        debug_assert_ne!(name, VALUE_KEY);
        self.push_extra((event, name, value));
    }

    /// Records the non-zero value of event `event` (a zero is not stored).
    pub fn push_value(&mut self, event: u8, value: i32) {
        if value != 0 {
            self.push_extra((event, VALUE_KEY, value as u32));
        }
    }

    /// Appends an extras entry, growing by half at most (a `Vec` would start
    /// at 4 entries: most sessions with extras hold one or two).
    fn push_extra(&mut self, x: Extra) {
        let v = self.extras.get_or_insert_with(Default::default);
        if v.len() == v.capacity() {
            v.reserve_exact((v.len() / 2).max(1));
        }
        v.push(x);
    }

    /// Attribute and value entries, in the order they were added.
    #[inline]
    pub fn extras(&self) -> &[Extra] {
        self.extras.as_deref().map_or(&[][..], |a| &a[..])
    }

    /// Reserves room for a new session's first event and its assignments.
    pub fn reserve_first(&mut self, assignments: usize, conditions: usize) {
        self.cells.reserve_exact(assignments + cond_cells(conditions) + 1);
    }

    /// Records an event; `None` if it would not fit (too many events, a tag id
    /// over its bits, or a time span beyond what offsets hold).
    pub fn push_event(&mut self, ts: i64, mp: u16, device: u16, login: u16) -> Option<u8> {
        let n = self.n_events();
        if n >= MAX_EVENTS_PER_SESSION || device >= 1 << 12 || login >= 1 << 4 {
            return None;
        }
        if n == 0 {
            self.base = ts;
            self.max_off = 0;
        } else if ts < self.base {
            if self.max_ts() - ts > MAX_SESSION_SPAN_MS {
                return None;
            }
            // Offsets are the low 32 bits and stay below 2³²: add in place.
            let shift = (self.base - ts) as u64;
            let start = self.events_start();
            for c in &mut self.cells[start..] {
                *c += shift;
            }
            self.max_off += shift as u32;
            self.base = ts;
        } else if ts - self.base > MAX_SESSION_SPAN_MS {
            return None;
        }
        self.max_off = self.max_off.max((ts - self.base) as u32);
        self.grow(1);
        self.cells.push(EvRec { off: (ts - self.base) as u32, mp, device, login: login as u8 }.cell());
        Some(n as u8)
    }

    /// Makes room for `n` more cells, growing by a quarter at most: sessions
    /// are many and small, so slack costs more than the odd reallocation.
    #[inline]
    fn grow(&mut self, n: usize) {
        let free = self.cells.capacity() - self.cells.len();
        if free < n {
            self.cells.reserve_exact(n.max(self.cells.len() / 4).max(2));
        }
    }

    /// Adds experiments `exps`, the first-met events of their conditions in
    /// `first_met` (each one's after those of the ones before it, and after
    /// those of the experiments already held): one move of the condition
    /// bytes and the events, however many experiments an event assigns.
    pub fn push_exps(&mut self, exps: &[ExpState], first_met: &[u8]) {
        if exps.is_empty() {
            return;
        }
        let (n0, c0) = (self.n_exps as usize, self.n_conds as usize);
        let (n1, c1) = (n0 + exps.len(), c0 + first_met.len());
        let (old_e, old_c) = (exp_cells(n0), cond_cells(c0));
        let (new_e, new_c) = (exp_cells(n1), cond_cells(c1));
        let added = new_e + new_c - old_e - old_c;
        self.grow(added);
        let len = self.cells.len();
        self.cells.resize(len + added, 0);
        // The events, then the condition bytes, move right (the events
        // first, since the condition bytes move into where they were).
        self.cells.copy_within(old_e + old_c..len, new_e + new_c);
        self.cells.copy_within(old_e..old_e + old_c, new_e);
        self.cells[old_e..new_e].fill(0);
        self.cells[new_e + old_c..new_e + new_c].fill(0);
        self.n_exps = n1 as u16;
        for (k, &x) in exps.iter().enumerate() {
            self.set_exp(n0 + k, x);
        }
        self.n_conds = c1 as u16;
        for (k, &e) in first_met.iter().enumerate() {
            self.set_first_met(c0 + k, e);
        }
    }

    /// The first state cell, if any (to pull the allocation into cache).
    #[inline]
    pub fn first_cell(&self) -> Option<u64> {
        self.cells.first().copied()
    }

    /// Heap bytes owned (for the bytes-per-session figure).
    pub fn heap_bytes(&self) -> usize {
        self.cells.capacity() * 8 + self.extras.as_ref().map_or(0, |a| 24 + a.capacity() * size_of::<Extra>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_round_trip() {
        let e = EvRec { off: 0xDEAD_BEEF, mp: 0xFFFE, device: 4095, login: 15 };
        let back = EvRec::from_cell(e.cell());
        assert_eq!((back.off, back.mp, back.device, back.login), (e.off, e.mp, e.device, e.login));
        let x = ExpState { experiment: 65535, slot: 127, assigned: 254, conflict: true };
        assert_eq!(ExpState::from_bits(x.bits()), x);
        let y = ExpState { experiment: 7, slot: 0, assigned: 0, conflict: false };
        assert_eq!(ExpState::from_bits(y.bits()), y);
    }

    #[test]
    fn values_are_kept_only_for_events_that_carry_one_and_survive_a_checkpoint() {
        let mut s = Session::default();
        for (i, v) in [0, 1299, 0, -10_000_000].into_iter().enumerate() {
            let idx = s.push_event(1_000 + i as i64, 4, 0, 0).unwrap();
            s.push_value(idx, v);
        }
        s.push_attr(1, 7, 9);
        assert_eq!(s.extras(), &[(1, VALUE_KEY, 1299), (3, VALUE_KEY, -10_000_000i32 as u32), (1, 7, 9)]);
        assert_eq!(s.heap_bytes() - s.cells.capacity() * 8, 24 + 3 * 12, "exact growth for small lists");
        assert_eq!(s.attr_of(1, 7), Some(9));
        let mut e = crate::codec::Enc::default();
        s.encode(&mut e);
        let back = Session::decode(&mut crate::codec::Dec::new(&e.buf)).unwrap();
        assert_eq!(back.extras(), s.extras());
        let mut plain = Session::default();
        plain.push_event(1_000, 4, 0, 0);
        plain.push_value(0, 0);
        assert!(plain.extras.is_none(), "a zero value costs nothing");
    }

    #[test]
    fn earlier_event_rebases_offsets() {
        let mut s = Session::default();
        assert_eq!(s.push_event(10_000, 1, 0, 0), Some(0));
        assert_eq!(s.push_event(4_000, 2, 0, 0), Some(1));
        assert_eq!((s.ts(0), s.ts(1), s.base, s.max_ts()), (10_000, 4_000, 4_000, 10_000));
        assert_eq!(s.push_event(4_000 + MAX_SESSION_SPAN_MS + 1, 2, 0, 0), None);
    }

    #[test]
    fn experiments_and_conditions_insert_before_events() {
        let mut s = Session::default();
        s.push_event(1_000, 5, 1, 2);
        let x = ExpState { experiment: 9, slot: 1, assigned: 0, conflict: false };
        for i in 0..11u16 {
            s.push_exps(&[ExpState { experiment: i, ..x }], &[0, NONE]);
        }
        s.push_event(2_000, 6, 1, 2);
        assert_eq!(s.n_exps(), 11);
        assert_eq!(s.n_events(), 2);
        assert_eq!(s.event(0).mp, 5);
        assert_eq!(s.event(1).mp, 6);
        for i in 0..11 {
            let e = s.exp(i);
            assert_eq!((e.experiment, e.slot), (i as u16, 1));
            assert_eq!((s.first_met(2 * i), s.first_met(2 * i + 1)), (0, NONE));
        }
        s.set_first_met(19, 1);
        assert_eq!(s.first_met(19), 1);
        assert_eq!(s.first_met(18), 0);
        s.set_exp(4, ExpState { experiment: 4, slot: 3, assigned: 1, conflict: true });
        assert_eq!(s.exp(4), ExpState { experiment: 4, slot: 3, assigned: 1, conflict: true });
        assert_eq!(s.exp(5).experiment, 5);
        assert_eq!(s.event(0).mp, 5);
    }

    #[test]
    fn experiments_added_in_groups_keep_every_experiment_condition_and_event() {
        let x = |i: u16| ExpState { experiment: i, slot: (i % 3) as u8, assigned: (i % 2) as u8, conflict: i == 4 };
        // Condition counts that cross cell boundaries at odd places.
        let conds = |i: u16| -> Vec<u8> { (0..(i * 5 % 7) as u8).map(|j| if j % 3 == 0 { NONE } else { j }).collect() };
        for groups in [vec![9], vec![1; 9], vec![1, 8], vec![2, 1, 6], vec![3, 3, 3], vec![6, 0, 3]] {
            let mut s = Session::default();
            s.push_event(1_000, 5, 1, 2);
            s.push_event(2_000, 6, 3, 1);
            let mut next = 0u16;
            for n in &groups {
                let part: Vec<u16> = (next..next + *n as u16).collect();
                next += *n as u16;
                let exps: Vec<_> = part.iter().map(|&i| x(i)).collect();
                let met: Vec<_> = part.iter().flat_map(|&i| conds(i)).collect();
                s.push_exps(&exps, &met);
                s.push_event(3_000 + next as i64, 7, 0, 0);
            }
            let all_conds: Vec<u8> = (0..9).flat_map(conds).collect();
            assert_eq!(s.n_exps(), 9, "{groups:?}");
            assert_eq!(s.n_conds as usize, all_conds.len(), "{groups:?}");
            assert_eq!(s.cells.len(), exp_cells(9) + cond_cells(all_conds.len()) + 2 + groups.len());
            for i in 0..9 {
                assert_eq!(s.exp(i as usize), x(i), "{groups:?}");
            }
            for (j, &e) in all_conds.iter().enumerate() {
                assert_eq!(s.first_met(j), e, "{groups:?} condition {j}");
            }
            assert_eq!((s.event(0).mp, s.event(1).mp, s.event(2).mp), (5, 6, 7));
            assert_eq!(s.ts(1), 2_000);
        }
    }
}
