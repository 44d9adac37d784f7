//! Host memory banks as the Python side maps them (`pviommu.mem.bank`).
//!
//! Bank `i` covers HPAs `[(i + 1) << 40, +size)`. The Python process maps each
//! bank file with `mmap(MAP_SHARED)`; every call that touches memory is handed
//! the banks it may use (`Bank.view.obj`, the mmap) and takes a buffer export
//! of each for the duration of the call only. An export keeps the mmap mapped
//! (CPython refuses to close an mmap with exports), so no pointer here can
//! outlive its mapping, and nothing is kept between calls: a bank that
//! `HostMemory` forgets is never reached again and never kept mapped.
//!
//! Other processes (the guest's CPU, other devices) write the same memory at
//! any time, so we never form a Rust reference to bank bytes: page-table
//! entries are read and updated with 8-byte atomics, data is moved with raw
//! `ptr::copy` (what memmove over shared memory is in C), and every offset is
//! bounds-checked first.

use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

pub const BANK_WINDOW_LG2: u32 = 40;

/// One mapped bank.
pub struct Mapping {
    ptr: *mut u8,
    len: u64,
    pub index: u32,
    /// The export that keeps the mmap mapped; released when the last `Arc` goes.
    _buf: PyUntypedBuffer,
}

// SAFETY: the pointed-to memory stays mapped while `_buf` lives, and it is only
// accessed through atomics or raw copies (never references), so sharing the
// pointer between threads is no different from sharing it between processes.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn new(index: u32, obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        let buf = PyUntypedBuffer::get(obj)?;
        if buf.readonly() {
            return Err(PyValueError::new_err(format!("bank {index}: buffer is read-only")));
        }
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(format!("bank {index}: buffer is not contiguous")));
        }
        let ptr = buf.buf_ptr().cast::<u8>();
        if ptr.is_null() || (ptr as usize) % 8 != 0 {
            return Err(PyValueError::new_err(format!("bank {index}: buffer is not 8-byte aligned")));
        }
        let len = buf.len_bytes() as u64;
        if len >= 1u64 << BANK_WINDOW_LG2 {
            return Err(PyValueError::new_err(format!("bank {index}: {len:#x} bytes exceed the bank window")));
        }
        Ok(Mapping { ptr, len, index, _buf: buf })
    }

    #[inline]
    pub fn base(&self) -> u64 {
        bank_base(self.index)
    }

    #[inline]
    pub fn size(&self) -> u64 {
        self.len
    }

    #[inline]
    fn atomic(&self, off: u64) -> Option<&AtomicU64> {
        if off % 8 != 0 || off > self.len.checked_sub(8)? {
            return None;
        }
        // SAFETY: in bounds and 8-byte aligned (the mapping is page-aligned);
        // the memory stays mapped while `self` lives; concurrent writers in
        // other processes are what atomics are for.
        Some(unsafe { AtomicU64::from_ptr(self.ptr.add(off as usize).cast::<u64>()) })
    }

    /// The little-endian u64 at `off` (None: out of bounds or unaligned).
    #[inline]
    pub fn load(&self, off: u64) -> Option<u64> {
        self.atomic(off).map(|a| u64::from_le(a.load(Ordering::Acquire)))
    }

    /// Replace the u64 at `off` by `new` only if it still holds `old`
    /// (the A/D update: set bits only if clear, never lose a guest's write).
    #[inline]
    pub fn compare_exchange(&self, off: u64, old: u64, new: u64) -> bool {
        match self.atomic(off) {
            Some(a) => a.compare_exchange(old.to_le(), new.to_le(), Ordering::AcqRel, Ordering::Acquire).is_ok(),
            None => false,
        }
    }

    /// Raw pointer to `[off, off + len)`, bounds-checked.
    #[inline]
    pub fn span(&self, off: u64, len: u64) -> Option<*mut u8> {
        let end = off.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in bounds of the mapping.
        Some(unsafe { self.ptr.add(off as usize) })
    }
}

#[inline]
pub fn bank_base(index: u32) -> u64 {
    (u64::from(index) + 1) << BANK_WINDOW_LG2
}

/// `(hpa >> 40) - 1`: the bank whose window holds `hpa` (-1 below bank 0).
#[inline]
pub fn bank_index_of(hpa: u64) -> i64 {
    (hpa >> BANK_WINDOW_LG2) as i64 - 1
}

/// A raw pointer that may cross into a closure run without the GIL.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut u8);
// SAFETY: see `Mapping`: bank memory is process-shared by design.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// A span of bank memory, resolved: where it starts and how long it is.
#[derive(Clone, Copy)]
pub struct Span {
    pub hpa: u64,
    pub ptr: SendPtr,
    pub len: u64,
}

/// Copy the concatenation of `src` into the concatenation of `dst` (the first
/// `limit` bytes), with memmove semantics when any source span overlaps any
/// destination span.
pub fn scatter_copy(src: &[Span], dst: &[Span], limit: u64) {
    let overlap = src.iter().any(|s| dst.iter().any(|d| s.hpa < d.hpa + d.len && d.hpa < s.hpa + s.len));
    if src.len() == 1 && dst.len() == 1 {
        let n = limit.min(src[0].len).min(dst[0].len) as usize;
        // SAFETY: both spans were bounds-checked against their mappings;
        // `ptr::copy` is memmove (overlap-safe).
        unsafe { std::ptr::copy(src[0].ptr.0, dst[0].ptr.0, n) };
        return;
    }
    let gathered: Vec<u8>;
    let staged: [Span; 1];
    let src = if overlap {
        let mut buf = vec![0u8; limit as usize];
        let mut pos = 0usize;
        for s in src {
            let n = (s.len as usize).min(buf.len() - pos);
            // SAFETY: `s` is bounds-checked; `buf` has room for `n` bytes at `pos`.
            unsafe { std::ptr::copy_nonoverlapping(s.ptr.0, buf.as_mut_ptr().add(pos), n) };
            pos += n;
            if pos == buf.len() {
                break;
            }
        }
        gathered = buf;
        staged = [Span { hpa: 0, ptr: SendPtr(gathered.as_ptr().cast_mut()), len: gathered.len() as u64 }];
        &staged[..]
    } else {
        src
    };
    let (mut si, mut di, mut so, mut dof, mut left) = (0usize, 0usize, 0u64, 0u64, limit);
    while left > 0 && si < src.len() && di < dst.len() {
        let (s, d) = (&src[si], &dst[di]);
        let n = (s.len - so).min(d.len - dof).min(left);
        // SAFETY: offsets stay inside each bounds-checked span; no overlap
        // between the two sides (or the source was staged in `gathered`).
        unsafe { std::ptr::copy(s.ptr.0.add(so as usize), d.ptr.0.add(dof as usize), n as usize) };
        so += n;
        dof += n;
        left -= n;
        if so == s.len {
            si += 1;
            so = 0;
        }
        if dof == d.len {
            di += 1;
            dof = 0;
        }
    }
}

/// Write a success-style completion record over `spans` (32 bytes): every
/// byte but the first zeroed, then the status byte, with release ordering,
/// so a poller that sees the status sees the whole record
/// (`DmaMemory.write_record`: bytes 1.. first, byte 0 last).
pub fn write_record(spans: &[Span], status: u8) {
    let mut skip = 1u64;
    for s in spans {
        if skip < s.len {
            // SAFETY: inside a bounds-checked span.
            unsafe { std::ptr::write_bytes(s.ptr.0.add(skip as usize), 0, (s.len - skip) as usize) };
        }
        skip = skip.saturating_sub(s.len);
    }
    if let Some(first) = spans.first() {
        // SAFETY: the first byte of a bounds-checked, non-empty span.
        let byte = unsafe { std::sync::atomic::AtomicU8::from_ptr(first.ptr.0) };
        byte.store(status, Ordering::Release);
    }
}
