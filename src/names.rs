//! Interned names of measurement points, devices and logins.
//!
//! The router stage owns the string → id maps ([`Interner`]); the id → string
//! tables ([`NameTable`]) are shared, append-only, and read by workers (only to
//! order two events at the same ts by their tag strings) and by the writer (to
//! render metric names and tags). Ids are dense, small, and never reused, so a
//! [`crate::aggregate::SeriesKey`] and a session's event cells can pack them.
//!
//! Each table is bounded (so garbage input cannot grow memory without bound),
//! but a valid event is never dropped for it (SPEC §1): once a table is full,
//! a new name resolves to [`OTHER`], which always has a place, and the router
//! counts the replacement. The catalog's names (interned first) keep their ids.

use ahash::AHashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// Append-only id → name table, shared between threads. Written once per new
/// name (rare), read per output batch, never per event.
#[derive(Debug, Default)]
pub struct NameTable {
    names: RwLock<Vec<Arc<str>>>,
}

impl NameTable {
    pub fn read(&self) -> RwLockReadGuard<'_, Vec<Arc<str>>> {
        self.names.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: u16) -> Arc<str> {
        self.read()[id as usize].clone()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The three shared tables.
#[derive(Debug, Default)]
pub struct Names {
    pub mp: NameTable,
    pub device: NameTable,
    pub login: NameTable,
}

impl Names {
    /// Tables holding these names, in id order (a restored checkpoint's).
    pub fn from_lists(lists: &[Vec<String>; 3]) -> Names {
        let table =
            |l: &Vec<String>| NameTable { names: RwLock::new(l.iter().map(|n| Arc::from(n.as_str())).collect()) };
        Names { mp: table(&lists[0]), device: table(&lists[1]), login: table(&lists[2]) }
    }

    /// The table of `kind`.
    pub fn table(&self, kind: NameKind) -> &NameTable {
        match kind {
            NameKind::Mp => &self.mp,
            NameKind::Device => &self.device,
            NameKind::Login => &self.login,
        }
    }

    /// The names of each table, in id order (for a checkpoint).
    pub fn to_lists(&self) -> [Vec<String>; 3] {
        let list = |t: &NameTable| t.read().iter().map(|n| n.to_string()).collect();
        [list(&self.mp), list(&self.device), list(&self.login)]
    }
}

/// The name every name beyond a full table is replaced by.
pub const OTHER: &str = "_other";

/// Most mp names of their own; [`OTHER`] may take one id more (ids are
/// `u16`, and `u16::MAX` means "no mp" in a series key).
pub const MP_CAPACITY: usize = 0xFFFE;
/// Most device names of their own; with [`OTHER`], ids fit the 12 bits of a
/// series key and of a session's event cell. Device strings are often free-form.
pub const DEVICE_CAPACITY: usize = (1 << 12) - 1;
/// Most login names of their own; with [`OTHER`], ids fit the 4 bits of a
/// session's event cell (logins are `in` or `out`, SPEC §1).
pub const LOGIN_CAPACITY: usize = (1 << 4) - 1;

/// Which table an [`Interner`] fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Mp,
    Device,
    Login,
}

impl NameKind {
    pub const ALL: [NameKind; 3] = [NameKind::Mp, NameKind::Device, NameKind::Login];

    /// Stable name, used as the `table` tag of health metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            NameKind::Mp => "mp",
            NameKind::Device => "device",
            NameKind::Login => "login",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Most names of their own in this table ([`OTHER`] may take one more id).
    pub fn capacity(self) -> usize {
        match self {
            NameKind::Mp => MP_CAPACITY,
            NameKind::Device => DEVICE_CAPACITY,
            NameKind::Login => LOGIN_CAPACITY,
        }
    }
}

/// string → id for one kind, owned by the router (and, while it compiles, by
/// the catalog). Admits `capacity` names of their own; then one more id is
/// [`OTHER`]'s. Several interners may fill one shared table (a reloaded catalog
/// adds its names while the router's interner lives on): a new id is always
/// the table's length, and a miss first indexes names others added.
#[derive(Debug)]
pub struct Interner {
    index: AHashMap<Box<str>, u16>,
    shared: Arc<Names>,
    kind: NameKind,
    capacity: usize,
    /// The id of [`OTHER`], once it is in the table.
    other: Option<u16>,
}

impl Interner {
    /// An interner of `capacity` names of their own ([`NameKind::capacity`],
    /// or less in tests), and [`OTHER`] beyond them.
    pub fn new(shared: Arc<Names>, kind: NameKind, capacity: usize) -> Interner {
        assert!((1..=MP_CAPACITY).contains(&capacity), "name table capacity {capacity}");
        let mut me = Interner { index: AHashMap::new(), shared, kind, capacity, other: None };
        // Ids already in the table (from the catalog or a checkpoint) stay valid.
        let shared = me.shared.clone();
        me.index_new(&shared.table(kind).read());
        me
    }

    /// Indexes the names of `names` this interner has not seen yet.
    fn index_new(&mut self, names: &[Arc<str>]) {
        for (i, n) in names.iter().enumerate().skip(self.index.len()) {
            self.index.insert(n.as_ref().into(), i as u16);
            if n.as_ref() == OTHER {
                self.other = Some(i as u16);
            }
        }
    }

    /// The id of `name`, adding it if new; `None` when the table is full
    /// (for names that must keep their own id: the catalog's).
    #[inline]
    pub fn intern(&mut self, name: &str) -> Option<u16> {
        if let Some(&id) = self.index.get(name) {
            return Some(id);
        }
        self.add(name, self.capacity)
    }

    /// The id of `name`, adding it if new; when the table is full, the id of
    /// [`OTHER`] and `true` (the name was replaced). Never fails: the event
    /// keeps its place in every total, under `_other`.
    #[inline]
    pub fn resolve(&mut self, name: &str) -> (u16, bool) {
        if let Some(&id) = self.index.get(name) {
            return (id, false);
        }
        self.resolve_new(name)
    }

    #[cold]
    fn resolve_new(&mut self, name: &str) -> (u16, bool) {
        if let Some(id) = self.add(name, self.capacity) {
            return (id, false);
        }
        let other = match self.other {
            Some(id) => id,
            // One id past the names of their own is always free for it.
            None => self.add(OTHER, self.capacity + 1).expect("a full table keeps one id for _other"),
        };
        (other, true)
    }

    /// Adds `name` (not known to this interner) if the table holds fewer
    /// than `limit` names; returns its id (also when another interner had
    /// added it meanwhile).
    fn add(&mut self, name: &str, limit: usize) -> Option<u16> {
        let shared = self.shared.clone();
        let mut names = shared.table(self.kind).names.write().unwrap_or_else(|e| e.into_inner());
        self.index_new(&names);
        if let Some(&id) = self.index.get(name) {
            return Some(id);
        }
        if names.len() >= limit {
            return None;
        }
        let id = names.len() as u16;
        names.push(Arc::from(name));
        self.index_new(&names);
        Some(id)
    }

    /// The id of `name` if already known.
    pub fn lookup(&self, name: &str) -> Option<u16> {
        self.index.get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intern_is_dense_and_shared() {
        let names = Arc::new(Names::default());
        let mut i = Interner::new(names.clone(), NameKind::Device, 2);
        assert_eq!(i.intern("desktop"), Some(0));
        assert_eq!(i.intern("mobile"), Some(1));
        assert_eq!(i.intern("desktop"), Some(0));
        assert_eq!(i.intern("tablet"), None);
        assert_eq!(&*names.device.get(1), "mobile");
        let again = Interner::new(names, NameKind::Device, 8);
        assert_eq!(again.lookup("mobile"), Some(1));
    }

    /// What broke: a valid event whose name did not fit a full table was
    /// dropped. Now it resolves to `_other`, one id past the names of their own.
    #[test]
    fn a_full_table_resolves_new_names_to_other() {
        let names = Arc::new(Names::default());
        let mut i = Interner::new(names.clone(), NameKind::Device, 2);
        assert_eq!(i.resolve("desktop"), (0, false));
        assert_eq!(i.resolve("mobile"), (1, false));
        assert_eq!(i.resolve("tablet"), (2, true));
        assert_eq!(i.resolve("watch"), (2, true));
        assert_eq!(i.resolve("mobile"), (1, false));
        assert_eq!(i.intern("tv"), None, "the catalog's names never become _other");
        assert_eq!(names.device.read().iter().map(|n| n.to_string()).collect::<Vec<_>>(), ["desktop", "mobile", OTHER]);
        // A literal `_other` in the input is that name, not a replacement.
        let mut j = Interner::new(Arc::new(Names::default()), NameKind::Login, 1);
        assert_eq!(j.resolve(OTHER), (0, false));
        assert_eq!(j.resolve("in"), (0, true));
    }

    /// Two interners filling one table (the router's, and a reloaded
    /// catalog's) agree on every id.
    #[test]
    fn interners_sharing_a_table_agree() {
        let names = Arc::new(Names::default());
        let mut router = Interner::new(names.clone(), NameKind::Device, 8);
        assert_eq!(router.resolve("desktop"), (0, false));
        let mut catalog = Interner::new(names.clone(), NameKind::Device, 8);
        assert_eq!(catalog.intern("mobile"), Some(1));
        assert_eq!(router.resolve("tablet"), (2, false), "not 1: that id is mobile's");
        assert_eq!(router.resolve("mobile"), (1, false), "the catalog's name, found");
        assert_eq!(names.device.len(), 3);
        assert_eq!(&*names.device.get(2), "tablet");
    }
}
