//! The translation loop of `IommuUnit.translate` (after the context lookup)
//! and the copy of `DmaMemory.copy`, over the compiled IOTLB and walk: what a
//! DMA buffer costs without a Python object per page.

use crate::iotlb::{Core, Entry, Extent};
use crate::mem::{Mapping, SendPtr, Span};
use crate::walk::{walk, Ctx, FsFormat, WalkFault, WalkMem};

/// What one `translate` did: host runs of the translated prefix, the fault
/// that stopped it (with the IOVA it stopped at), and the walks it ran.
pub struct Translation {
    pub runs: Vec<(u64, u64)>,
    pub fault: Option<(u64, WalkFault)>,
    pub walks: u32,
    pub reads: u64,
}

impl Translation {
    pub fn done(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }
}

/// The first step of `translate`: one extent or entry covering the whole
/// range (the warm DMA buffer), which needs no memory.
pub fn fast(iotlb: &Core, did: u64, iova: u64, length: u64, write: bool) -> Option<Translation> {
    let hpa = iotlb.lock().lookup_span(did, iova, iova as u128 + length as u128, write)?;
    Some(Translation { runs: vec![(hpa, length)], fault: None, walks: 0, reads: 0 })
}

/// `[iova, iova + length)` for `write` through `iotlb` and, on misses, the
/// walk; `length > 0` and `iova + length <= 2**64` (the caller checks).
#[allow(clippy::too_many_arguments)]
pub fn translate(
    iotlb: &Core,
    mem: &WalkMem<'_>,
    ctx: Ctx,
    fs: &FsFormat,
    did: u64,
    iova: u64,
    length: u64,
    write: bool,
    generation0: u64,
) -> Translation {
    fast(iotlb, did, iova, length, write)
        .unwrap_or_else(|| slow(iotlb, mem, ctx, fs, did, iova, length, write, generation0))
}

/// `translate` after `fast` missed. `generation0` is the IOTLB generation the
/// caller read before it looked the context up: nothing walked here is
/// inserted once an invalidation (a context one included) bumped it.
#[allow(clippy::too_many_arguments)]
pub fn slow(
    iotlb: &Core,
    mem: &WalkMem<'_>,
    ctx: Ctx,
    fs: &FsFormat,
    did: u64,
    iova: u64,
    length: u64,
    write: bool,
    generation0: u64,
) -> Translation {
    let end = iova as u128 + length as u128;
    let mut out = Translation { runs: Vec::new(), fault: None, walks: 0, reads: 0 };
    let mut pos = iova as u128;
    let (mut run_hpa, mut run_len) = (0u64, 0u64);
    // the extent being built from consecutive same-size entries
    let (mut x_iova, mut x_hpa, mut x_lg2, mut x_count) = (0u64, 0u64, 0u32, 0u64);
    let (mut x_read, mut x_write) = (true, true);
    let mut entries: Vec<Entry> = Vec::new();
    let push = |runs: &mut Vec<(u64, u64)>, run_hpa: &mut u64, run_len: &mut u64, hpa: u64, n: u64| {
        if *run_len != 0 && *run_hpa as u128 + *run_len as u128 == hpa as u128 {
            *run_len += n;
        } else {
            if *run_len != 0 {
                runs.push((*run_hpa, *run_len));
            }
            *run_hpa = hpa;
            *run_len = n;
        }
    };
    while pos < end {
        let hit = iotlb.lock().lookup_extent(did, pos as u64, end, write);
        if let Some((hpa, n)) = hit {
            push(&mut out.runs, &mut run_hpa, &mut run_len, hpa, n);
            pos += n as u128;
            continue;
        }
        entries.clear();
        iotlb.lock().lookup_run_with(did, pos as u64, end, write, true, |slot| entries.push(slot.e));
        if entries.is_empty() {
            let result = walk(mem, ctx, fs, pos as u64, write);
            out.walks += 1;
            match result {
                Err(fault) => {
                    out.reads += u64::from(fault.reads);
                    if run_len != 0 {
                        out.runs.push((run_hpa, run_len));
                    }
                    out.fault = Some((pos as u64, fault));
                    return out;
                }
                Ok(ok) => {
                    out.reads += u64::from(ok.reads);
                    let entry =
                        Entry { iova: ok.iova, hpa: ok.hpa, size_lg2: ok.size_lg2, read: ok.read, write: ok.write };
                    iotlb.lock().insert(did, entry, None, Some(generation0));
                    entries.push(entry);
                }
            }
        }
        for entry in &entries {
            let off = (pos - entry.iova as u128) as u64;
            let n = ((end - pos) as u64).min(((1u128 << entry.size_lg2) - off as u128) as u64);
            push(&mut out.runs, &mut run_hpa, &mut run_len, entry.hpa.wrapping_add(off), n);
            pos += n as u128;
            let size = (x_count as u128) << x_lg2;
            if x_count != 0
                && entry.size_lg2 == x_lg2
                && entry.iova as u128 == x_iova as u128 + size
                && entry.hpa as u128 == x_hpa as u128 + size
            {
                x_count += 1;
                x_read = x_read && entry.read;
                x_write = x_write && entry.write;
            } else {
                if x_count >= 2 {
                    let ext = Extent {
                        iova: x_iova,
                        hpa: x_hpa,
                        size_lg2: x_lg2,
                        count: x_count,
                        read: x_read,
                        write: x_write,
                    };
                    iotlb.lock().insert_extent(did, ext, Some(generation0));
                }
                (x_iova, x_hpa, x_lg2, x_count) = (entry.iova, entry.hpa, entry.size_lg2, 1);
                (x_read, x_write) = (entry.read, entry.write);
            }
        }
    }
    if x_count >= 2 {
        let ext = Extent { iova: x_iova, hpa: x_hpa, size_lg2: x_lg2, count: x_count, read: x_read, write: x_write };
        iotlb.lock().insert_extent(did, ext, Some(generation0));
    }
    out.runs.push((run_hpa, run_len));
    out
}

/// The first `limit` bytes of `runs` as spans of `bank` (None: a run is not in it).
pub fn spans(bank: &Mapping, runs: &[(u64, u64)], limit: u64) -> Option<Vec<Span>> {
    let mut out = Vec::with_capacity(runs.len());
    let mut left = limit;
    for &(hpa, len) in runs {
        if left == 0 {
            break;
        }
        let n = len.min(left);
        let off = hpa.checked_sub(bank.base())?;
        let ptr = bank.span(off, n)?;
        out.push(Span { hpa, ptr: SendPtr(ptr), len: n });
        left -= n;
    }
    Some(out)
}
