//! Interned names of measurement points, devices and logins.
//!
//! The router stage owns the string → id maps ([`Interner`]); the id → string
//! tables ([`NameTable`]) are shared, append-only, and read by workers (only to
//! order two events at the same ts by their tag strings) and by the writer (to
//! render metric names and tags). Ids are dense, small, and never reused, so a
//! [`crate::aggregate::SeriesKey`] can pack them.

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

    /// The names of each table, in id order (for a checkpoint).
    pub fn to_lists(&self) -> [Vec<String>; 3] {
        let list = |t: &NameTable| t.read().iter().map(|n| n.to_string()).collect();
        [list(&self.mp), list(&self.device), list(&self.login)]
    }
}

/// Which table an [`Interner`] fills.
#[derive(Debug, Clone, Copy)]
pub enum NameKind {
    Mp,
    Device,
    Login,
}

/// string → id for one kind, owned by the router. Refuses new names beyond its
/// capacity so that garbage input cannot grow memory without bound.
#[derive(Debug)]
pub struct Interner {
    index: AHashMap<Box<str>, u16>,
    shared: Arc<Names>,
    kind: NameKind,
    capacity: usize,
}

impl Interner {
    pub fn new(shared: Arc<Names>, kind: NameKind, capacity: usize) -> Interner {
        let mut me = Interner { index: AHashMap::new(), shared, kind, capacity };
        // Ids already in the table (from the catalog) stay valid.
        let existing: Vec<Arc<str>> = me.table().read().clone();
        for (i, n) in existing.iter().enumerate() {
            me.index.insert(n.as_ref().into(), i as u16);
        }
        me
    }

    fn table(&self) -> &NameTable {
        match self.kind {
            NameKind::Mp => &self.shared.mp,
            NameKind::Device => &self.shared.device,
            NameKind::Login => &self.shared.login,
        }
    }

    /// The id of `name`, adding it if new; `None` when the table is full.
    #[inline]
    pub fn intern(&mut self, name: &str) -> Option<u16> {
        if let Some(&id) = self.index.get(name) {
            return Some(id);
        }
        if self.index.len() >= self.capacity {
            return None;
        }
        let id = self.index.len() as u16;
        self.table().names.write().unwrap_or_else(|e| e.into_inner()).push(Arc::from(name));
        self.index.insert(name.into(), id);
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
}
