//! The nested walk of `pviommu/iommu/nested.py`, compiled: the same checks in
//! the same order, the same fault reasons and detail texts, the same entry
//! reads counted, the same Accessed/Dirty updates. `nested.py` is the
//! reference; tests/core/test_native_walk.py compares the two on random and
//! hostile tables, byte for byte in the banks.
//!
//! Fences against hostile tables, as in the reference: stage-2 tables are read
//! only inside bank 0; stage-1 tables and final pages only inside the
//! context's owner bank (the shim never hands us a context without one); each
//! walk descends exactly `levels` steps per stage, so loops cannot hang it.
//! Entries are read and updated with atomics (see `mem`).

use crate::mem::{bank_index_of, Mapping};

// FaultReason codes (pviommu/iommu/fault.py)
pub const FS_NOT_PRESENT: u8 = 0x71;
pub const FS_RESERVED: u8 = 0x72;
pub const FS_BEYOND_MGAW: u8 = 0x74;
pub const SS_NO_READ_FS_TOP: u8 = 0x75;
pub const SS_NO_READ_FS: u8 = 0x76;
pub const SS_NO_WRITE_AD: u8 = 0x77;
pub const SS_ACCESS: u8 = 0x78;
pub const SS_NOT_PRESENT: u8 = 0x79;
pub const SS_RESERVED: u8 = 0x7A;
pub const SS_BAD_ROOT: u8 = 0x7B;
pub const NON_CANONICAL: u8 = 0x80;
pub const USER_SUPERVISOR: u8 = 0x81;
pub const SS_BEYOND_MAX: u8 = 0x84;
pub const NO_WRITE: u8 = 0x85;
pub const NO_READ: u8 = 0x86;
pub const MSI_WINDOW: u8 = 0x87;

const MSI_WINDOW_START: u64 = 0xFEE0_0000;
const MSI_WINDOW_LAST: u64 = 0xFEEF_FFFF;
const PGTT_NESTED: u64 = 3;

/// Bits 51:12 of an entry (both formats).
const ADDR_MASK: u64 = ((1u64 << 52) - 1) & !0xFFF;
// x86-64 first stage (pt/fmt/x86_64.py)
const FS_P: u64 = 1 << 0;
const FS_RW: u64 = 1 << 1;
const FS_US: u64 = 1 << 2;
const FS_A: u64 = 1 << 5;
const FS_D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
// VT-d second stage (pt/fmt/vtd_ss.py)
const SS_R: u64 = 1 << 0;
const SS_W: u64 = 1 << 1;
const SS_SNP: u64 = 1 << 11;
const SS_TM: u64 = 1 << 62;

const PERM_R: u64 = 1;
const PERM_W: u64 = 2;

#[inline]
fn bits(hi: u32, lo: u32) -> u64 {
    (((1u128 << (hi + 1)) - 1) as u64) & !((1u64 << lo) - 1)
}

/// XD (bit 63): execute-disable only under the PASID entry's NXE, which our
/// context entries never enable, so a reserved bit (SDM), as in nested.py.
const FS_XD: u64 = 1 << 63;

/// The stage-1 format's reserved masks (X86_64Format(levels, oasz_lg2)),
/// with XD, which is reserved in every entry without NXE.
#[derive(Clone, Copy)]
pub struct FsFormat {
    table_rsvd: [u64; 5],
    leaf_rsvd: [u64; 3],
}

impl FsFormat {
    pub fn new(oasz_lg2: u32) -> Self {
        let above = (ADDR_MASK & !((1u64 << oasz_lg2) - 1)) | FS_XD;
        let mut table_rsvd = [above; 5];
        table_rsvd[3] |= PS;
        table_rsvd[4] |= PS;
        FsFormat { table_rsvd, leaf_rsvd: [above, above | bits(20, 13), above | bits(29, 13)] }
    }
}

const SS_COMMON_RSVD: u64 = SS_SNP | SS_TM; // oasz 52: no address bits above it

#[inline]
fn ss_reserved(level: u32, leaf: bool) -> u64 {
    if leaf {
        match level {
            0 => SS_COMMON_RSVD,
            1 => SS_COMMON_RSVD | bits(20, 11),
            _ => SS_COMMON_RSVD | bits(29, 11),
        }
    } else if level >= 3 {
        SS_COMMON_RSVD | PS
    } else {
        SS_COMMON_RSVD
    }
}

/// The fields of a context entry the walk uses (`ContextEntry`).
#[derive(Clone, Copy)]
pub struct Ctx {
    pub pgtt: u64,
    /// stage-2 levels (`ctx.s2_levels or 4`)
    pub s2_levels: u32,
    /// stage-1 levels (`ctx.fs_levels or 4`)
    pub fs_levels: u32,
    pub ssptptr: u64,
    pub fsptptr: u64,
    /// the owner bank (never 0: the shim walks such contexts in Python)
    pub owner_bank: u32,
}

/// What a walk may touch: bank 0 and the owner's bank, if mapped.
pub struct WalkMem<'a> {
    pub bank0: Option<&'a Mapping>,
    pub owner: Option<&'a Mapping>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkOk {
    pub iova: u64,
    pub hpa: u64,
    pub size_lg2: u32,
    pub read: bool,
    pub write: bool,
    pub reads: u32,
}

/// Why the step that faulted was reading (the reference's `why` strings).
#[derive(Clone, Copy, Debug)]
pub enum Why {
    FsTable { level: u32, gpa: u64 },
    DataPage { iova: u64 },
    IovaAsGpa { iova: u64 },
    OutputOf { iova: u64 },
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Why::FsTable { level, gpa } => write!(f, "FS level {level} table at GPA {gpa:#x}"),
            Why::DataPage { iova } => write!(f, "data page of IOVA {iova:#x}"),
            Why::IovaAsGpa { iova } => write!(f, "IOVA {iova:#x} as GPA"),
            Why::OutputOf { iova } => write!(f, "output of IOVA {iova:#x}"),
        }
    }
}

/// A fault: its reason code, and the facts its detail text is made of (the
/// text is only formatted when someone asks, since most faults are counted).
#[derive(Clone, Copy, Debug)]
pub enum Detail {
    S2NotInBank0 { table: u64, why: Why },
    S2NotMapped { gpa: u64, why: Why },
    S2Reserved { entry: u64, level: u32 },
    Bank0Unmapped,
    OutsidePartition { hpa: u64, why: Why },
    NoBank { hpa: u64, why: Why },
    PastBank { hpa: u64, len: u64, index: i64, why: Why },
    BeyondS2Width { gpa: u64, why: Why },
    NonCanonical { iova: u64, vasz: u32 },
    S2DeniesRead { why: Why },
    FsNotPresent { iova: u64, level: u32 },
    FsSupervisor { iova: u64, level: u32 },
    FsReadOnly { iova: u64, level: u32 },
    FsReserved { entry: u64, level: u32 },
    S2DeniesAd { why: Why },
    Msi { iova: u64, gpa: u64 },
    S2ReadOnly { gpa: u64 },
    S2NoRead { gpa: u64 },
}

impl std::fmt::Display for Detail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Detail::S2NotInBank0 { table, why } => write!(f, "stage-2 table {table:#x} is not in bank 0 ({why})"),
            Detail::S2NotMapped { gpa, why } => write!(f, "GPA {gpa:#x} not mapped by stage 2 ({why})"),
            Detail::S2Reserved { entry, level } => {
                write!(f, "stage-2 entry {entry:#x} at level {level} has reserved bits")
            }
            Detail::Bank0Unmapped => write!(f, "bank 0 is not mapped"),
            Detail::OutsidePartition { hpa, why } => {
                write!(f, "stage 2 gave HPA {hpa:#x} outside the partition ({why})")
            }
            Detail::NoBank { hpa, why } => write!(f, "HPA {hpa:#x} names no bank ({why})"),
            Detail::PastBank { hpa, len, index, why } => {
                write!(f, "HPA {hpa:#x}+{len:#x} runs past bank {index} ({why})")
            }
            Detail::BeyondS2Width { gpa, why } => write!(f, "GPA {gpa:#x} beyond the stage-2 width ({why})"),
            Detail::NonCanonical { iova, vasz } => write!(f, "IOVA {iova:#x} is not canonical for {vasz} bits"),
            Detail::S2DeniesRead { why } => write!(f, "stage 2 denies reading the {why}"),
            Detail::FsNotPresent { iova, level } => write!(f, "IOVA {iova:#x}: P=0 at FS level {level}"),
            Detail::FsSupervisor { iova, level } => write!(f, "IOVA {iova:#x}: U/S=0 at FS level {level}"),
            Detail::FsReadOnly { iova, level } => write!(f, "IOVA {iova:#x}: R/W=0 at FS level {level}"),
            Detail::FsReserved { entry, level } => write!(f, "FS entry {entry:#x} at level {level} has reserved bits"),
            Detail::S2DeniesAd { why } => write!(f, "stage 2 denies the A/D update in the {why}"),
            Detail::Msi { iova, gpa } => write!(f, "IOVA {iova:#x} -> GPA {gpa:#x} is in the MSI window"),
            Detail::S2ReadOnly { gpa } => write!(f, "stage 2 maps GPA {gpa:#x} read-only"),
            Detail::S2NoRead { gpa } => write!(f, "stage 2 denies reading GPA {gpa:#x}"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct WalkFault {
    pub reason: u8,
    pub detail: Detail,
    pub reads: u32,
}

struct Fault(u8, Detail);

type Step<T> = Result<T, Fault>;

struct Walk<'a> {
    mem: &'a WalkMem<'a>,
    ctx: Ctx,
    fs: &'a FsFormat,
    reads: u32,
}

/// Translate the page holding `iova` (the reference's `NestedWalker.walk`
/// without trace, dry run or paging-structure caches).
pub fn walk(mem: &WalkMem<'_>, ctx: Ctx, fs: &FsFormat, iova: u64, write: bool) -> Result<WalkOk, WalkFault> {
    let mut w = Walk { mem, ctx, fs, reads: 0 };
    let result = if ctx.pgtt == PGTT_NESTED { w.nested(iova, write) } else { w.finish(iova, None, write) };
    result.map_err(|Fault(reason, detail)| WalkFault { reason, detail, reads: w.reads })
}

impl<'a> Walk<'a> {
    /// Stage 2 of `gpa`: (HPA, leaf size_lg2, R/W ANDed over the levels).
    fn s2(&mut self, gpa: u64, why: Why) -> Step<(u64, u32, u64)> {
        let bank0 = self.mem.bank0.ok_or(Fault(SS_BAD_ROOT, Detail::Bank0Unmapped))?;
        let (base, size) = (bank0.base() as i128, bank0.size() as i128);
        let top = self.ctx.s2_levels - 1;
        let mut table = self.ctx.ssptptr;
        let mut perm = PERM_R | PERM_W;
        for level in (0..=top).rev() {
            let idx = (gpa >> (12 + 9 * level)) & 511;
            let off = table as i128 - base + ((idx as i128) << 3);
            if !(0..=size - 8).contains(&off) {
                let reason = if level == top { SS_BAD_ROOT } else { SS_ACCESS };
                return Err(Fault(reason, Detail::S2NotInBank0 { table, why }));
            }
            // in bounds and aligned (tables are 4 KiB aligned, the shim checks the roots)
            let entry = bank0.load(off as u64).ok_or(Fault(SS_ACCESS, Detail::S2NotInBank0 { table, why }))?;
            self.reads += 1;
            if entry & (SS_R | SS_W) == 0 {
                return Err(Fault(SS_NOT_PRESENT, Detail::S2NotMapped { gpa, why }));
            }
            let leaf = level == 0 || (entry & PS != 0 && level <= 2);
            if entry & ss_reserved(level, leaf) != 0 {
                return Err(Fault(SS_RESERVED, Detail::S2Reserved { entry, level }));
            }
            perm &= entry & (SS_R | SS_W);
            if leaf {
                let shift = 12 + 9 * level;
                let oa = entry & ADDR_MASK & !((1u64 << shift) - 1);
                return Ok((oa | (gpa & ((1u64 << shift) - 1)), shift, perm));
            }
            table = entry & ADDR_MASK;
        }
        unreachable!("level 0 holds only leaves")
    }

    /// The owner bank and the offset of stage-2 output `[hpa, hpa + len)`.
    fn host(&self, hpa: u64, len: u64, why: Why) -> Step<(&'a Mapping, u64)> {
        let index = bank_index_of(hpa);
        if index <= 0 || index != i64::from(self.ctx.owner_bank) {
            return Err(Fault(SS_ACCESS, Detail::OutsidePartition { hpa, why }));
        }
        let bank = self.mem.owner.ok_or(Fault(SS_ACCESS, Detail::NoBank { hpa, why }))?;
        let off = hpa - bank.base();
        if off as u128 + len as u128 > bank.size() as u128 {
            return Err(Fault(SS_ACCESS, Detail::PastBank { hpa, len, index, why }));
        }
        Ok((bank, off))
    }

    #[inline]
    fn gpa_fits(&self, gpa: u64, reason: u8, why: Why) -> Step<()> {
        if gpa >> (12 + 9 * self.ctx.s2_levels) != 0 {
            return Err(Fault(reason, Detail::BeyondS2Width { gpa, why }));
        }
        Ok(())
    }

    fn nested(&mut self, iova: u64, write: bool) -> Step<WalkOk> {
        let levels = self.ctx.fs_levels;
        let vasz = 12 + 9 * levels;
        let upper = !((1u64 << vasz) - 1);
        let want = if iova & (1u64 << (vasz - 1)) != 0 { upper } else { 0 };
        if iova & upper != want {
            return Err(Fault(NON_CANONICAL, Detail::NonCanonical { iova, vasz }));
        }
        let top = levels - 1;
        let mut table_gpa = self.ctx.fsptptr;
        for level in (0..=top).rev() {
            let why = Why::FsTable { level, gpa: table_gpa };
            self.gpa_fits(table_gpa, FS_BEYOND_MGAW, why)?;
            let (table_hpa, _, s2perm) = self.s2(table_gpa, why)?;
            if s2perm & PERM_R == 0 {
                let reason = if level == top { SS_NO_READ_FS_TOP } else { SS_NO_READ_FS };
                return Err(Fault(reason, Detail::S2DeniesRead { why }));
            }
            let idx = (iova >> (12 + 9 * level)) & 511;
            let (bank, off) = self.host(table_hpa.wrapping_add(idx << 3), 8, why)?;
            let entry = bank.load(off).ok_or(Fault(SS_ACCESS, Detail::NoBank { hpa: table_hpa, why }))?;
            self.reads += 1;
            if entry & FS_P == 0 {
                return Err(Fault(FS_NOT_PRESENT, Detail::FsNotPresent { iova, level }));
            }
            if entry & FS_US == 0 {
                return Err(Fault(USER_SUPERVISOR, Detail::FsSupervisor { iova, level }));
            }
            if entry & FS_RW == 0 && write {
                return Err(Fault(NO_WRITE, Detail::FsReadOnly { iova, level }));
            }
            let leaf = level == 0 || (entry & PS != 0 && level <= 2);
            let rsvd = if leaf { self.fs.leaf_rsvd[level as usize] } else { self.fs.table_rsvd[level as usize] };
            if entry & rsvd != 0 {
                return Err(Fault(FS_RESERVED, Detail::FsReserved { entry, level }));
            }
            let ad = if leaf && write { FS_A | FS_D } else { FS_A };
            if entry & ad != ad {
                if s2perm & PERM_W == 0 {
                    return Err(Fault(SS_NO_WRITE_AD, Detail::S2DeniesAd { why }));
                }
                // set only if the entry is unchanged; a guest write in between wins
                bank.compare_exchange(off, entry, entry | ad);
            }
            if leaf {
                let shift = 12 + 9 * level;
                let gpa = (entry & ADDR_MASK & !((1u64 << shift) - 1)) | (iova & ((1u64 << shift) - 1));
                return self.finish(iova, Some((gpa, shift)), write);
            }
            table_gpa = entry & ADDR_MASK;
        }
        unreachable!("level 0 holds only leaves")
    }

    /// Stage 2 of the final GPA (= IOVA without stage 1) and the page checks.
    fn finish(&mut self, iova: u64, s1: Option<(u64, u32)>, write: bool) -> Step<WalkOk> {
        let (gpa, s1_lg2) = match s1 {
            None => {
                self.gpa_fits(iova, SS_BEYOND_MAX, Why::IovaAsGpa { iova })?;
                (iova, 64)
            }
            Some((gpa, lg2)) => {
                self.gpa_fits(gpa, FS_BEYOND_MGAW, Why::OutputOf { iova })?;
                (gpa, lg2)
            }
        };
        if (MSI_WINDOW_START..=MSI_WINDOW_LAST).contains(&gpa) {
            return Err(Fault(MSI_WINDOW, Detail::Msi { iova, gpa }));
        }
        let why = Why::DataPage { iova };
        let (hpa, s2_lg2, perm) = self.s2(gpa, why)?;
        if write && perm & PERM_W == 0 {
            return Err(Fault(NO_WRITE, Detail::S2ReadOnly { gpa }));
        }
        if !write && perm & PERM_R == 0 {
            return Err(Fault(NO_READ, Detail::S2NoRead { gpa }));
        }
        let shift = s1_lg2.min(s2_lg2);
        let low = iova & ((1u64 << shift) - 1);
        self.host(hpa.wrapping_sub(low), 1u64 << shift, why)?;
        Ok(WalkOk {
            iova: iova - low,
            hpa: hpa - low,
            size_lg2: shift,
            read: perm & PERM_R != 0,
            write,
            reads: self.reads,
        })
    }
}
