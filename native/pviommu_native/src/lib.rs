//! `pviommu._native`: the optional compiled core of pviommu's IOMMU unit.
//!
//! The Python modules stay the reference and the fallback
//! (`pviommu/iommu/nested.py`, `iotlb.py`, `unit.py`, `pviommu/mem/dma.py`);
//! `pviommu/iommu/native.py` is the only Python code that imports this module,
//! and the tests compare the two implementations on the same inputs.

// `x % n == 0` rather than `is_multiple_of` (Rust 1.87): the crate builds with pyo3's minimum, 1.85
#![allow(clippy::manual_is_multiple_of)]

mod iotlb;
mod mem;
mod translate;
mod walk;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyMemoryView, PyTuple};

use crate::iotlb::{Core, Entry, Extent};
use crate::mem::{scatter_copy, Mapping};
use crate::walk::{Ctx, FsFormat, WalkFault, WalkMem, WalkOk};

/// A Python int that may be 2**64 (exclusive range ends).
fn end_of(obj: &Bound<'_, PyAny>) -> PyResult<u128> {
    match obj.extract::<u64>() {
        Ok(v) => Ok(u128::from(v)),
        Err(_) => obj.extract::<u128>(),
    }
}

fn nonempty(start: u64, end: u128) -> PyResult<()> {
    if end <= u128::from(start) {
        return Err(PyValueError::new_err(format!("empty range [{start:#x}, {end:#x})")));
    }
    Ok(())
}

fn aligned(iova: u64, size_lg2: u32) -> PyResult<()> {
    if size_lg2 >= 64 || iova & ((1u64 << size_lg2) - 1) != 0 {
        return Err(PyValueError::new_err(format!("IOVA {iova:#x} is not aligned to 2**{size_lg2}")));
    }
    Ok(())
}

// ---- IOTLB ------------------------------------------------------------------------------
/// The IOTLB (`pviommu.iommu.iotlb.Iotlb`'s methods and semantics). Entries
/// come back as the reference's `IotlbEntry` objects, statistics as its
/// `IotlbStats`; both classes are given at construction.
#[pyclass(module = "pviommu._native", name = "Iotlb", frozen, subclass)]
pub struct PyIotlb {
    core: Core,
    entry_cls: Py<PyAny>,
    stats_cls: Py<PyAny>,
}

impl PyIotlb {
    #[allow(clippy::too_many_arguments)]
    /// The entries of a run as `IotlbEntry` objects: the inserted ones where
    /// there is one, else new ones (built after the lock is released).
    fn run_objs<'py>(
        &self,
        py: Python<'py>,
        did: u64,
        start: u64,
        end: u128,
        write: bool,
        count: bool,
        limit: usize,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let mut found: Vec<(Entry, Option<Py<PyAny>>)> = Vec::new();
        self.core.lock().lookup_run_with(did, start, end, write, count, |slot| {
            if found.len() < limit {
                found.push((slot.e, slot.obj.as_ref().map(|o| o.clone_ref(py))));
            }
        });
        let cls = self.entry_cls.bind(py);
        let mut made: Vec<(Entry, Py<PyAny>)> = Vec::new();
        let out = found
            .into_iter()
            .map(|(e, obj)| match obj {
                Some(o) => Ok(o.into_bound(py)),
                None => {
                    let o = cls.call1((e.iova, e.hpa, e.size_lg2, e.read, e.write))?;
                    made.push((e, o.clone().unbind()));
                    Ok(o)
                }
            })
            .collect::<PyResult<Vec<_>>>()?;
        if !made.is_empty() {
            // keep what was built for the next lookup, where the entry is still the same one
            self.core.lock().adopt(did, made);
        }
        Ok(out)
    }
}

#[pymethods]
impl PyIotlb {
    #[new]
    #[pyo3(signature = (capacity=8192, *, entry_cls, stats_cls))]
    fn new(capacity: u64, entry_cls: Py<PyAny>, stats_cls: Py<PyAny>) -> Self {
        PyIotlb { core: Core::new(capacity), entry_cls, stats_cls }
    }

    #[getter]
    fn capacity(&self) -> u64 {
        self.core.lock().capacity
    }

    #[setter]
    fn set_capacity(&self, value: u64) {
        self.core.lock().capacity = value;
    }

    /// Read before a walk; pass to `insert`.
    #[getter]
    fn generation(&self) -> u64 {
        self.core.lock().generation
    }

    fn __len__(&self) -> usize {
        self.core.lock().len() as usize
    }

    /// A snapshot of the counters, as an `IotlbStats`.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let s = self.core.lock().stats;
        self.stats_cls.bind(py).call1((
            s.hits,
            s.misses,
            s.inserts,
            s.late_inserts_dropped,
            s.evictions,
            s.inv_global,
            s.inv_domain,
            s.inv_pages,
            s.entries_dropped,
        ))
    }

    #[pyo3(signature = (did, iova, write=false, *, count=true))]
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        did: u64,
        iova: u64,
        write: bool,
        count: bool,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        Ok(self.run_objs(py, did, iova, u128::from(iova) + 1, write, count, 1)?.into_iter().next())
    }

    #[pyo3(signature = (did, start, end, write, *, count=true))]
    fn lookup_run<'py>(
        &self,
        py: Python<'py>,
        did: u64,
        start: u64,
        end: &Bound<'py, PyAny>,
        write: bool,
        count: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let end = end_of(end)?;
        PyList::new(py, self.run_objs(py, did, start, end, write, count, usize::MAX)?)
    }

    fn lookup_span(&self, did: u64, start: u64, end: &Bound<'_, PyAny>, write: bool) -> PyResult<Option<u64>> {
        let end = end_of(end)?;
        nonempty(start, end)?;
        Ok(self.core.lock().lookup_span(did, start, end, write))
    }

    fn lookup_extent(&self, did: u64, pos: u64, end: &Bound<'_, PyAny>, write: bool) -> PyResult<Option<(u64, u64)>> {
        let end = end_of(end)?;
        nonempty(pos, end)?;
        Ok(self.core.lock().lookup_extent(did, pos, end, write))
    }

    /// Cache `entry` (an `IotlbEntry`) unless an invalidation happened since `generation`.
    fn insert(
        &self,
        py: Python<'_>,
        did: u64,
        entry: &Bound<'_, PyAny>,
        generation: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let e = Entry {
            iova: entry.getattr(intern!(py, "iova"))?.extract()?,
            hpa: entry.getattr(intern!(py, "hpa"))?.extract()?,
            size_lg2: entry.getattr(intern!(py, "size_lg2"))?.extract()?,
            read: entry.getattr(intern!(py, "read"))?.is_truthy()?,
            write: entry.getattr(intern!(py, "write"))?.is_truthy()?,
        };
        aligned(e.iova, e.size_lg2)?;
        // a generation that is no u64 can be no current one: the insert is late
        let generation = generation.extract::<u64>().ok();
        Ok(self.core.lock().insert(did, e, Some(entry.clone().unbind()), generation))
    }

    /// Remember `ext` (an `Extent`) unless an invalidation happened since `generation`.
    fn insert_extent(
        &self,
        py: Python<'_>,
        did: u64,
        ext: &Bound<'_, PyAny>,
        generation: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let x = Extent {
            iova: ext.getattr(intern!(py, "iova"))?.extract()?,
            hpa: ext.getattr(intern!(py, "hpa"))?.extract()?,
            size_lg2: ext.getattr(intern!(py, "size_lg2"))?.extract()?,
            count: ext.getattr(intern!(py, "count"))?.extract()?,
            read: ext.getattr(intern!(py, "read"))?.is_truthy()?,
            write: ext.getattr(intern!(py, "write"))?.is_truthy()?,
        };
        aligned(x.iova, x.size_lg2)?;
        let generation = generation.extract::<u64>().ok();
        Ok(self.core.lock().insert_extent(did, x, generation))
    }

    /// Refuse every insert of a walk that started before now (a context
    /// invalidation: what was walked under the old context must not land).
    fn bump_generation(&self) {
        self.core.lock().generation += 1;
    }

    fn invalidate_all(&self) -> u64 {
        self.core.lock().invalidate_all()
    }

    fn invalidate_domain(&self, did: u64) -> u64 {
        self.core.lock().invalidate_domain(did)
    }

    fn invalidate_pages(&self, did: u64, addr: u64, am: i64) -> PyResult<u64> {
        if !(0..=52).contains(&am) {
            return Err(PyValueError::new_err(format!("address mask {am} out of range")));
        }
        Ok(self.core.lock().invalidate_pages(did, addr, am as u32))
    }
}

// ---- walk ---------------------------------------------------------------------------------
/// The nested walk (`NestedWalker.walk` without trace, dry run or caches),
/// the translation loop and the copy. Each call is handed the `HostMemory`
/// and takes, only when it must read memory, a buffer export of bank 0's and
/// the owner bank's mmaps (`host.bank(i).view.obj`) for that call alone.
/// Results are the reference's objects (classes and `FaultReason` members
/// given at construction). Every method returns None for a case it leaves to
/// the reference.
#[pyclass(module = "pviommu._native", name = "Walker", frozen)]
pub struct PyWalker {
    fs: FsFormat,
    walk_ok: Py<PyAny>,
    walk_fault: Py<PyAny>,
    run: Py<PyAny>,
    translation: Py<PyAny>,
    memmove_result: Py<PyAny>,
    /// the three results of a warm MEMMOVE (no walk), made once: record not asked,
    /// record written, record due (results are immutable tuples)
    memmove_warm: [Py<PyAny>; 3],
    /// exceptions of `host.bank(i)` that mean "no such bank" (the reference's fault)
    missing: Py<PyAny>,
    reasons: Vec<Option<Py<PyAny>>>,
}

/// The banks of one call, exported while it runs.
struct Held {
    bank0: Option<Mapping>,
    owner: Option<Mapping>,
}

impl Held {
    fn mem(&self) -> WalkMem<'_> {
        WalkMem { bank0: self.bank0.as_ref(), owner: self.owner.as_ref() }
    }
}

impl PyWalker {
    /// The context's fields, or None when the walk is left to the reference
    /// (no owner bank to fence into, roots not 8-byte aligned, odd values).
    fn ctx_of(&self, py: Python<'_>, ctx: &Bound<'_, PyAny>, owner: u64) -> PyResult<Option<Ctx>> {
        let get = |name: &Bound<'_, pyo3::types::PyString>| -> PyResult<Option<u64>> {
            Ok(ctx.getattr(name)?.extract::<u64>().ok())
        };
        let (Some(pgtt), Some(aw), Some(fspm), Some(ssptptr), Some(fsptptr)) = (
            get(intern!(py, "pgtt"))?,
            get(intern!(py, "aw"))?,
            get(intern!(py, "fspm"))?,
            get(intern!(py, "ssptptr"))?,
            get(intern!(py, "fsptptr"))?,
        ) else {
            return Ok(None);
        };
        if owner == 0 || owner > u64::from(u32::MAX) || (ssptptr | fsptptr) & 7 != 0 {
            return Ok(None);
        }
        let s2_levels = match aw {
            1 => 3,
            3 => 5,
            _ => 4,
        };
        let fs_levels = if fspm == 1 { 5 } else { 4 };
        Ok(Some(Ctx { pgtt, s2_levels, fs_levels, ssptptr, fsptptr, owner_bank: owner as u32 }))
    }

    /// Bank `index` of `host` (mapping it on first use, as the reference's
    /// `host.bank` does): `Ok(Some(None))` where there is none, `Ok(None)`
    /// when its view is no plain buffer over the mapping (a test's spy, say):
    /// the call is then left to the reference, which goes through that view.
    fn bank(&self, py: Python<'_>, host: &Bound<'_, PyAny>, index: u32) -> PyResult<Option<Option<Mapping>>> {
        let missing = self.missing.bind(py);
        let view = match host.call_method1(intern!(py, "bank"), (index,)) {
            Ok(bank) => bank.getattr(intern!(py, "view"))?,
            Err(e) if e.matches(py, missing)? => return Ok(Some(None)),
            Err(e) => return Err(e),
        };
        if !view.is_instance_of::<PyMemoryView>() {
            return Ok(None);
        }
        Ok(Some(Some(Mapping::new(index, &view.getattr(intern!(py, "obj"))?)?)))
    }

    /// The banks of a call on `ctx`, or None when it is left to the reference.
    fn held(&self, py: Python<'_>, host: &Bound<'_, PyAny>, ctx: &Ctx) -> PyResult<Option<Held>> {
        let (Some(bank0), Some(owner)) = (self.bank(py, host, 0)?, self.bank(py, host, ctx.owner_bank)?) else {
            return Ok(None);
        };
        Ok(Some(Held { bank0, owner }))
    }

    fn ok_obj<'py>(&self, py: Python<'py>, ok: &WalkOk) -> PyResult<Bound<'py, PyAny>> {
        self.walk_ok.bind(py).call1((ok.iova, ok.hpa, ok.size_lg2, ok.read, ok.write, ok.reads))
    }

    fn fault_obj<'py>(&self, py: Python<'py>, f: &WalkFault) -> PyResult<Bound<'py, PyAny>> {
        let reason = self.reasons[f.reason as usize]
            .as_ref()
            .ok_or_else(|| PyValueError::new_err(format!("no FaultReason {:#x}", f.reason)))?;
        self.walk_fault.bind(py).call1((reason.bind(py), f.detail.to_string(), f.reads))
    }

    fn translation_obj<'py>(&self, py: Python<'py>, t: &translate::Translation) -> PyResult<Bound<'py, PyAny>> {
        let run = self.run.bind(py);
        let runs = PyList::empty(py);
        for &(hpa, n) in &t.runs {
            runs.append(run.call1((hpa, n))?)?;
        }
        let (fault_iova, fault) = match &t.fault {
            Some((iova, f)) => (*iova, self.fault_obj(py, f)?),
            None => (0, py.None().into_bound(py)),
        };
        // a named tuple made as `tuple.__new__(cls, fields)` does it: no Python frame
        let fields = PyTuple::new(
            py,
            [
                runs.into_any(),
                fault,
                fault_iova.into_pyobject(py)?.into_any(),
                t.walks.into_pyobject(py)?.into_any(),
                t.reads.into_pyobject(py)?.into_any(),
            ],
        )?;
        py.get_type::<PyTuple>().call_method1(intern!(py, "__new__"), (self.translation.bind(py), fields))
    }
}

/// Copies at least this long run without the GIL (shorter ones cost less than the hand-off).
const DETACH_COPY: u64 = 64 * 1024;

#[pymethods]
impl PyWalker {
    #[new]
    #[pyo3(signature = (fs_mgaw_lg2=48, *, walk_ok, walk_fault, run, translation, memmove_result, missing, reasons))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        fs_mgaw_lg2: u32,
        walk_ok: Py<PyAny>,
        walk_fault: Py<PyAny>,
        run: Py<PyAny>,
        translation: Py<PyAny>,
        memmove_result: Py<PyAny>,
        missing: Py<PyAny>,
        reasons: &Bound<'_, PyDict>,
    ) -> PyResult<Self> {
        if !(32..=52).contains(&fs_mgaw_lg2) {
            return Err(PyValueError::new_err(format!("output width {fs_mgaw_lg2} outside 32..52")));
        }
        let mut table: Vec<Option<Py<PyAny>>> = (0..256).map(|_| None).collect();
        for (code, member) in reasons.iter() {
            let code: u8 = code.extract()?;
            table[code as usize] = Some(member.unbind());
        }
        let make = |t: u32, written: bool, due: bool| -> PyResult<Py<PyAny>> {
            let fields = (t, 0u32, 0u64, written, due).into_pyobject(py)?;
            Ok(py
                .get_type::<PyTuple>()
                .call_method1(intern!(py, "__new__"), (memmove_result.bind(py), fields))?
                .unbind())
        };
        let memmove_warm = [make(2, false, false)?, make(3, true, false)?, make(2, false, true)?];
        Ok(PyWalker {
            fs: FsFormat::new(fs_mgaw_lg2),
            walk_ok,
            walk_fault,
            run,
            translation,
            memmove_result,
            memmove_warm,
            missing,
            reasons: table,
        })
    }

    /// `NestedWalker.walk(ctx, iova, write)` over `host` (a `HostMemory`): a
    /// `WalkOk` or `WalkFault`, or None for a context or IOVA left to the reference.
    fn walk<'py>(
        &self,
        py: Python<'py>,
        host: &Bound<'py, PyAny>,
        ctx: &Bound<'py, PyAny>,
        iova: &Bound<'py, PyAny>,
        write: bool,
        owner_bank: u64,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let (Some(c), Ok(iova)) = (self.ctx_of(py, ctx, owner_bank)?, iova.extract::<u64>()) else { return Ok(None) };
        let Some(held) = self.held(py, host, &c)? else { return Ok(None) };
        let result = walk::walk(&held.mem(), c, &self.fs, iova, write);
        match result {
            Ok(ok) => self.ok_obj(py, &ok).map(Some),
            Err(f) => self.fault_obj(py, &f).map(Some),
        }
    }

    /// `IommuUnit.translate`'s loop after the context lookup, for domain
    /// `did` of `ctx` through `iotlb`: a translation object (runs, WalkFault
    /// or None, IOVA of the fault, walks, entry reads), or None when left to
    /// the reference. `length > 0`, `iova + length <= 2**64`.
    #[pyo3(signature = (host, iotlb, ctx, did, iova, length, write, owner_bank, generation))]
    #[allow(clippy::too_many_arguments)]
    fn translate<'py>(
        &self,
        py: Python<'py>,
        host: &Bound<'py, PyAny>,
        iotlb: &Bound<'py, PyIotlb>,
        ctx: &Bound<'py, PyAny>,
        did: u64,
        iova: u64,
        length: u64,
        write: bool,
        owner_bank: u64,
        generation: u64,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        if length == 0 || u128::from(iova) + u128::from(length) > 1u128 << 64 {
            return Err(PyValueError::new_err(format!("bad range {iova:#x}+{length:#x}")));
        }
        let core = &iotlb.get().core;
        // a covering hit needs neither the context's tables nor memory (and a
        // miss has changed nothing, so the context may still be declined)
        let t = match translate::fast(core, did, iova, length, write) {
            Some(t) => t,
            None => {
                let Some(c) = self.ctx_of(py, ctx, owner_bank)? else { return Ok(None) };
                let Some(held) = self.held(py, host, &c)? else { return Ok(None) };
                translate::slow(core, &held.mem(), c, &self.fs, did, iova, length, write, generation)
            }
        };
        self.translation_obj(py, &t).map(Some)
    }

    /// Execute one MEMMOVE descriptor (64 bytes) of domain `did` of `ctx`
    /// exactly as the Python device model would -- validation, the copy
    /// through `iotlb`, the success record written status byte last -- when
    /// it is valid, completes without a fault and every translation it needs
    /// is already in the IOTLB (so no walk, no fault and no page request can
    /// come up). Returns `(translations, walks, reads, record_written,
    /// record_due)`; `record_due`: the record is still to be written by the
    /// caller (after a copy long enough to run without the GIL, or when the
    /// record's translation was no longer cached). Returns None, having
    /// touched nothing, for every other case: the caller runs the model.
    /// The device's counters and interrupt stay with the caller.
    /// `limits` is `(allowed_flags, max_xfer, overlap_copy, shared, wq_priv,
    /// num_int_handles)` (the shim's `MoveLimits`); the result is made as
    /// the `memmove_result` class given at construction.
    #[pyo3(signature = (host, iotlb, ctx, did, desc, limits, owner_bank, generation))]
    #[allow(clippy::too_many_arguments)]
    fn memmove<'py>(
        &self,
        py: Python<'py>,
        host: &Bound<'py, PyAny>,
        iotlb: &Bound<'py, PyIotlb>,
        ctx: &Bound<'py, PyAny>,
        did: u64,
        desc: &[u8],
        limits: (u32, u64, bool, bool, bool, u64),
        owner_bank: u64,
        generation: u64,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let (allowed, max_xfer, overlap_copy, shared, wq_priv, num_int_handles) = limits;
        let lim = MoveLimits { allowed, max_xfer, overlap_copy, shared, wq_priv, num_int_handles };
        let Some((translations, walks, reads, written, due)) =
            self.memmove_impl(py, host, iotlb, ctx, did, desc, lim, owner_bank, generation)?
        else {
            return Ok(None);
        };
        let warm = match (translations, walks, reads, written, due) {
            (2, 0, 0, false, false) => Some(&self.memmove_warm[0]),
            (3, 0, 0, true, false) => Some(&self.memmove_warm[1]),
            (2, 0, 0, false, true) => Some(&self.memmove_warm[2]),
            _ => None,
        };
        if let Some(result) = warm {
            return Ok(Some(result.bind(py).clone()));
        }
        let fields = (translations, walks, reads, written, due).into_pyobject(py)?;
        py.get_type::<PyTuple>().call_method1(intern!(py, "__new__"), (self.memmove_result.bind(py), fields)).map(Some)
    }

    /// `DmaMemory.copy(src, dst, length)` through `translate` on both sides:
    /// `(done, source translation, destination translation)`, or None when
    /// left to the reference. Bytes move with memmove semantics; long copies
    /// run without the GIL.
    #[pyo3(signature = (host, iotlb, ctx, did, src, dst, length, owner_bank, generation))]
    #[allow(clippy::too_many_arguments)]
    fn copy<'py>(
        &self,
        py: Python<'py>,
        host: &Bound<'py, PyAny>,
        iotlb: &Bound<'py, PyIotlb>,
        ctx: &Bound<'py, PyAny>,
        did: u64,
        src: u64,
        dst: u64,
        length: u64,
        owner_bank: u64,
        generation: u64,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let Some(c) = self.ctx_of(py, ctx, owner_bank)? else { return Ok(None) };
        let top = 1u128 << 64;
        if length == 0 || u128::from(src) + u128::from(length) > top || u128::from(dst) + u128::from(length) > top {
            return Err(PyValueError::new_err(format!("bad copy {src:#x} -> {dst:#x} +{length:#x}")));
        }
        let Some(held) = self.held(py, host, &c)? else { return Ok(None) };
        let core = &iotlb.get().core;
        let rs = translate::translate(core, &held.mem(), c, &self.fs, did, src, length, false, generation);
        let rd = translate::translate(core, &held.mem(), c, &self.fs, did, dst, length, true, generation);
        let limit = rs.done().min(rd.done());
        if limit > 0 {
            // every run the walk let through lies in the owner bank (its fence)
            let spans = held.owner.as_ref().and_then(|bank| {
                Some((translate::spans(bank, &rs.runs, limit)?, translate::spans(bank, &rd.runs, limit)?))
            });
            let Some((s, d)) = spans else {
                return Err(PyValueError::new_err("translated runs outside the owner bank"));
            };
            if limit >= DETACH_COPY {
                py.detach(|| scatter_copy(&s, &d, limit));
            } else {
                scatter_copy(&s, &d, limit);
            }
        }
        let (a, b) = (self.translation_obj(py, &rs)?, self.translation_obj(py, &rd)?);
        PyTuple::new(py, [limit.into_pyobject(py)?.into_any(), a, b]).map(Some)
    }
}

// ---- a whole MEMMOVE descriptor, warm ----------------------------------------------------
const DESC_SIZE: usize = 64;
const COMP_SIZE: u64 = 32;
const OP_MEMMOVE: u32 = 0x03;
const F_CRAV: u32 = 0x0004;
const F_RCR: u32 = 0x0008;
const F_RCI: u32 = 0x0010;
const STATUS_SUCCESS: u8 = 0x01;

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The fields of a 64-byte descriptor a MEMMOVE uses (`pviommu.abi.dsa.Descriptor`).
struct MoveDesc {
    flags: u32,
    completion: u64,
    src: u64,
    dst: u64,
    size: u64,
}

/// `desc` if it is a MEMMOVE that `checks.validate` and `device._run` let run
/// to a plain copy with these work-queue limits, else None (the Python model
/// then produces whatever status or special path applies).
fn memmove_desc(desc: &[u8], lim: &MoveLimits) -> Option<MoveDesc> {
    if desc.len() != DESC_SIZE {
        return None;
    }
    let (d0, d1) = (le_u32(desc, 0), le_u32(desc, 4));
    let (opcode, flags, privileged, rsvd) = (d1 >> 24, d1 & 0xFF_FFFF, d0 >> 31 != 0, (d0 >> 20) & 0x7FF);
    let d = MoveDesc {
        flags,
        completion: le_u64(desc, 8),
        src: le_u64(desc, 16),
        dst: le_u64(desc, 24),
        size: u64::from(le_u32(desc, 32)),
    };
    let int_handle = u64::from(u16::from_le_bytes([desc[36], desc[37]]));
    let rsvd1 = u16::from_le_bytes([desc[38], desc[39]]);
    let top = 1u128 << 64;
    let ok = opcode == OP_MEMMOVE
        && !(flags & F_CRAV != 0 && d.completion % COMP_SIZE != 0) // CRA_ALIGN
        && flags & !lim.allowed == 0 // INVALID_FLAGS
        && rsvd == 0 && rsvd1 == 0 && desc[40..].iter().all(|&b| b == 0) // NOZERO_RESERVE
        && !(lim.shared && privileged && !lim.wq_priv) // PRIV_BAD
        && !(flags & F_RCI != 0 && int_handle >= lim.num_int_handles) // INT_HANDLE_INVAL
        && 0 < d.size && d.size <= lim.max_xfer // XFER_ERANGE
        && u128::from(d.src) + u128::from(d.size) <= top && u128::from(d.dst) + u128::from(d.size) <= top
        && u128::from(d.completion) + u128::from(COMP_SIZE) <= top;
    if !ok {
        return None;
    }
    let overlap = d.src < d.dst.wrapping_add(d.size) && d.dst < d.src.wrapping_add(d.size);
    if overlap && (!lim.overlap_copy || d.dst > d.src) {
        return None; // OVERLAP_BUFFERS, or the descending copy (result 1)
    }
    Some(d)
}

/// (translations, walks, entry reads, record written, record due)
type MoveResult = (u32, u32, u64, bool, bool);

struct MoveLimits {
    allowed: u32,
    max_xfer: u64,
    overlap_copy: bool,
    shared: bool,
    wq_priv: bool,
    num_int_handles: u64,
}

impl PyWalker {
    #[allow(clippy::too_many_arguments)]
    fn memmove_impl<'py>(
        &self,
        py: Python<'py>,
        host: &Bound<'py, PyAny>,
        iotlb: &Bound<'py, PyIotlb>,
        ctx: &Bound<'py, PyAny>,
        did: u64,
        desc: &[u8],
        lim: MoveLimits,
        owner_bank: u64,
        generation: u64,
    ) -> PyResult<Option<MoveResult>> {
        let Some(d) = memmove_desc(desc, &lim) else { return Ok(None) };
        let Some(c) = self.ctx_of(py, ctx, owner_bank)? else { return Ok(None) };
        let record = d.flags & F_CRAV != 0 && d.flags & F_RCR != 0;
        let core = &iotlb.get().core;
        {
            let st = core.lock();
            let end = |a: u64, n: u64| u128::from(a) + u128::from(n);
            if !st.covered(did, d.src, end(d.src, d.size), false)
                || !st.covered(did, d.dst, end(d.dst, d.size), true)
                || (record && !st.covered(did, d.completion, end(d.completion, COMP_SIZE), true))
            {
                return Ok(None);
            }
        }
        // everything is cached: no walk reads bank 0, only the owner's bank is touched
        let Some(owner) = self.bank(py, host, c.owner_bank)? else { return Ok(None) };
        let held = Held { bank0: None, owner };
        let mem = held.mem();
        let rs = translate::translate(core, &mem, c, &self.fs, did, d.src, d.size, false, generation);
        let rd = translate::translate(core, &mem, c, &self.fs, did, d.dst, d.size, true, generation);
        let (mut walks, mut reads) = (rs.walks + rd.walks, rs.reads + rd.reads);
        let owner = held.owner.as_ref();
        let spans = |runs: &[(u64, u64)], n: u64| owner.and_then(|bank| translate::spans(bank, runs, n));
        if rs.fault.is_some() || rd.fault.is_some() || rs.done() != d.size || rd.done() != d.size {
            return Ok(None); // an invalidation raced the check: nothing touched, the model runs it
        }
        let (Some(s), Some(t)) = (spans(&rs.runs, d.size), spans(&rd.runs, d.size)) else {
            return Err(PyRuntimeError::new_err("warm MEMMOVE: translation left the owner bank"));
        };
        let detached = d.size >= DETACH_COPY;
        if detached {
            py.detach(|| scatter_copy(&s, &t, d.size));
        } else {
            scatter_copy(&s, &t, d.size);
        }
        if !record {
            return Ok(Some((2, walks, reads, false, false)));
        }
        if detached {
            // other threads ran during the copy (an owner change, a flush): the record is
            // written by the model, whose translation checks the epoch and the IOTLB again
            return Ok(Some((2, walks, reads, false, true)));
        }
        let rr = translate::translate(core, &mem, c, &self.fs, did, d.completion, COMP_SIZE, true, generation);
        walks += rr.walks;
        reads += rr.reads;
        let Some(spans) = spans(&rr.runs, COMP_SIZE).filter(|_| rr.fault.is_none() && rr.done() == COMP_SIZE) else {
            return Ok(Some((2, walks, reads, false, true))); // flushed meanwhile: the model writes (or faults) it
        };
        mem::write_record(&spans, STATUS_SUCCESS);
        Ok(Some((3, walks, reads, true, false)))
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyIotlb>()?;
    m.add_class::<PyWalker>()?;
    m.add("EXTENTS_PER_DOMAIN", iotlb::EXTENTS_PER_DOMAIN)?;
    // what pviommu/iommu/native.py expects; a module left from an older build is not used
    m.add("API_VERSION", 3)?;
    Ok(())
}
