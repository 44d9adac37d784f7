//! The IOTLB of `pviommu/iommu/iotlb.py`, compiled: the same entries (keyed by
//! DID, page size and IOVA page number), extents, generation check on insert,
//! wholesale eviction when full, invalidation granularities and statistics.
//! `iotlb.py` is the reference; tests/core/test_native_iotlb.py runs random
//! operation sequences against both.
//!
//! One mutex guards everything, as the reference's lock does, so an
//! `invalidate_*` that returned hides what it dropped from every later
//! lookup. It is only ever taken with the GIL held and never held while
//! calling into Python, so it cannot deadlock against the GIL.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use pyo3::{Py, PyAny};

/// Extents kept per domain before they are all dropped (iotlb.EXTENTS_PER_DOMAIN).
pub const EXTENTS_PER_DOMAIN: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub iova: u64,
    pub hpa: u64,
    pub size_lg2: u32,
    pub read: bool,
    pub write: bool,
}

impl Entry {
    #[inline]
    fn end(&self) -> u128 {
        self.iova as u128 + (1u128 << self.size_lg2)
    }
    #[inline]
    fn allows(&self, write: bool) -> bool {
        if write {
            self.write
        } else {
            self.read
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub iova: u64,
    pub hpa: u64,
    pub size_lg2: u32,
    pub count: u64,
    pub read: bool,
    pub write: bool,
}

impl Extent {
    #[inline]
    pub fn end(&self) -> u128 {
        self.iova as u128 + ((self.count as u128) << self.size_lg2)
    }
    #[inline]
    fn allows(&self, write: bool) -> bool {
        if write {
            self.write
        } else {
            self.read
        }
    }
}

/// One cached entry, with the `IotlbEntry` object it was inserted as (when
/// it came from Python), so lookups from Python return it without building one.
pub struct Slot {
    pub e: Entry,
    pub obj: Option<Py<PyAny>>,
}

#[derive(Default)]
struct Domain {
    entries: HashMap<(u32, u64), Slot>,
    /// page sizes present, largest first
    sizes: Vec<u32>,
    /// by start IOVA
    extents: BTreeMap<u64, Extent>,
}

#[derive(Clone, Copy, Default, Debug)]
pub struct Stats {
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    pub late_inserts_dropped: u64,
    pub evictions: u64,
    pub inv_global: u64,
    pub inv_domain: u64,
    pub inv_pages: u64,
    pub entries_dropped: u64,
}

pub struct State {
    domains: HashMap<u64, Domain>,
    count: u64,
    pub generation: u64,
    pub capacity: u64,
    pub stats: Stats,
}

/// Pages of `2**lg2` from `start`'s page to `(end - 1)`'s page.
#[inline]
fn pages(start: u128, end: u128, lg2: u32) -> u64 {
    (((end - 1) >> lg2) - (start >> lg2) + 1) as u64
}

impl State {
    /// Consecutive entries covering `[start, end)` from `start` (first miss
    /// stops), each handed to `visit`.
    pub fn lookup_run_with(
        &mut self,
        did: u64,
        start: u64,
        end: u128,
        write: bool,
        count: bool,
        mut visit: impl FnMut(&Slot),
    ) {
        let mut found = 0u64;
        if let Some(dom) = self.domains.get(&did) {
            let mut pos = start as u128;
            'outer: while pos < end {
                for &lg2 in &dom.sizes {
                    if let Some(slot) = dom.entries.get(&(lg2, (pos >> lg2) as u64)) {
                        if slot.e.allows(write) {
                            visit(slot);
                            found += 1;
                            pos = slot.e.end();
                            continue 'outer;
                        }
                    }
                }
                break;
            }
        }
        if count {
            self.stats.hits += found;
            if found == 0 {
                self.stats.misses += 1;
            }
        }
    }

    /// Whether `translate` of `[start, end)` would find everything cached
    /// (no walk): `lookup_span`, then extents and entries as its loop takes
    /// them. Counts nothing and changes nothing.
    pub fn covered(&self, did: u64, start: u64, end: u128, write: bool) -> bool {
        let Some(dom) = self.domains.get(&did) else { return false };
        let mut pos = start as u128;
        'outer: while pos < end {
            let p = pos as u64;
            if let Some((_, ext)) = dom.extents.range(..=p).next_back() {
                if pos < ext.end() && ext.allows(write) {
                    pos = ext.end().min(end);
                    continue;
                }
            }
            for &lg2 in &dom.sizes {
                if let Some(slot) = dom.entries.get(&(lg2, p >> lg2)) {
                    if slot.e.allows(write) {
                        pos = slot.e.end().min(end);
                        continue 'outer;
                    }
                }
            }
            return false;
        }
        true
    }

    pub fn lookup_span(&mut self, did: u64, start: u64, end: u128, write: bool) -> Option<u64> {
        let dom = self.domains.get(&did)?;
        if let Some((_, ext)) = dom.extents.range(..=start).next_back() {
            if end <= ext.end() && ext.allows(write) {
                self.stats.hits += pages(start as u128, end, ext.size_lg2);
                return Some(ext.hpa.wrapping_add(start - ext.iova));
            }
        }
        for &lg2 in &dom.sizes {
            if let Some(Slot { e, .. }) = dom.entries.get(&(lg2, start >> lg2)) {
                if end <= e.end() && e.allows(write) {
                    self.stats.hits += 1;
                    return Some(e.hpa.wrapping_add(start.wrapping_sub(e.iova)));
                }
            }
        }
        None
    }

    pub fn lookup_extent(&mut self, did: u64, pos: u64, end: u128, write: bool) -> Option<(u64, u64)> {
        let dom = self.domains.get(&did)?;
        let (_, ext) = dom.extents.range(..=pos).next_back()?;
        if pos as u128 >= ext.end() || !ext.allows(write) {
            return None;
        }
        let n = (end.min(ext.end()) - pos as u128) as u64;
        self.stats.hits += pages(pos as u128, pos as u128 + n as u128, ext.size_lg2);
        Some((ext.hpa.wrapping_add(pos - ext.iova), n))
    }

    pub fn insert_extent(&mut self, did: u64, ext: Extent, generation: Option<u64>) -> bool {
        if generation != Some(self.generation) {
            return false;
        }
        let Some(dom) = self.domains.get_mut(&did) else { return false };
        let extents = &mut dom.extents;
        if extents.len() >= EXTENTS_PER_DOMAIN {
            extents.clear();
        }
        let before = extents.range(..=ext.iova).next_back().map(|(k, x)| (*k, x.end()));
        if let Some((k, end)) = before {
            if end > ext.iova as u128 {
                extents.remove(&k);
            }
        }
        let end = ext.end();
        let covered: Vec<u64> =
            extents.range(ext.iova..).take_while(|(k, _)| (**k as u128) < end).map(|(k, _)| *k).collect();
        for k in covered {
            extents.remove(&k);
        }
        extents.insert(ext.iova, ext);
        true
    }

    pub fn insert(&mut self, did: u64, entry: Entry, obj: Option<Py<PyAny>>, generation: Option<u64>) -> bool {
        if generation != Some(self.generation) {
            self.stats.late_inserts_dropped += 1;
            return false;
        }
        if self.count >= self.capacity {
            self.stats.evictions += self.count;
            self.domains.clear();
            self.count = 0;
        }
        let dom = self.domains.entry(did).or_default();
        let key = (entry.size_lg2, entry.iova >> entry.size_lg2);
        if dom.entries.insert(key, Slot { e: entry, obj }).is_none() {
            self.count += 1;
        }
        if !dom.sizes.contains(&entry.size_lg2) {
            dom.sizes.push(entry.size_lg2);
            dom.sizes.sort_unstable_by(|a, b| b.cmp(a));
        }
        self.stats.inserts += 1;
        true
    }

    /// Attach objects built for entries that had none, where each entry is
    /// still cached unchanged (lookups from Python return them from then on).
    pub fn adopt(&mut self, did: u64, made: Vec<(Entry, Py<PyAny>)>) {
        let Some(dom) = self.domains.get_mut(&did) else { return };
        for (e, obj) in made {
            if let Some(slot) = dom.entries.get_mut(&(e.size_lg2, e.iova >> e.size_lg2)) {
                if slot.e == e && slot.obj.is_none() {
                    slot.obj = Some(obj);
                }
            }
        }
    }

    pub fn invalidate_all(&mut self) -> u64 {
        self.generation += 1;
        let dropped = self.count;
        self.count = 0;
        self.domains.clear();
        self.stats.inv_global += 1;
        self.stats.entries_dropped += dropped;
        dropped
    }

    pub fn invalidate_domain(&mut self, did: u64) -> u64 {
        self.generation += 1;
        let dropped = self.domains.remove(&did).map_or(0, |d| d.entries.len() as u64);
        self.count -= dropped;
        self.stats.inv_domain += 1;
        self.stats.entries_dropped += dropped;
        dropped
    }

    /// `am` already checked (0..=52).
    pub fn invalidate_pages(&mut self, did: u64, addr: u64, am: u32) -> u64 {
        let span = 1u128 << (12 + am); // up to 2**64 (am = 52)
        let start128 = u128::from(addr) & !(span - 1);
        let (start, last) = (start128 as u64, (start128 + span - 1) as u64);
        self.generation += 1;
        self.stats.inv_pages += 1;
        let Some(dom) = self.domains.get_mut(&did) else { return 0 };
        dom.extents.retain(|&x, ext| !(x <= last && ext.end() > start as u128));
        let mut dropped = 0u64;
        for &lg2 in &dom.sizes {
            let (first, fin) = (start >> lg2, last >> lg2);
            if fin - first < dom.entries.len() as u64 {
                for vpn in first..=fin {
                    if dom.entries.remove(&(lg2, vpn)).is_some() {
                        dropped += 1;
                    }
                }
            } else {
                let before = dom.entries.len();
                dom.entries.retain(|&(s, vpn), _| !(s == lg2 && first <= vpn && vpn <= fin));
                dropped += (before - dom.entries.len()) as u64;
            }
        }
        self.count -= dropped;
        self.stats.entries_dropped += dropped;
        dropped
    }

    pub fn len(&self) -> u64 {
        self.count
    }
}

/// The state behind its lock.
pub struct Core {
    state: Mutex<State>,
}

impl Core {
    pub fn new(capacity: u64) -> Self {
        Core {
            state: Mutex::new(State {
                domains: HashMap::new(),
                count: 0,
                generation: 0,
                capacity,
                stats: Stats::default(),
            }),
        }
    }

    #[inline]
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // a panic while holding the lock leaves consistent state (every
        // operation completes its bookkeeping before it could panic)
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
