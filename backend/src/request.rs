//! virtio-blk requests: the descriptor chain a guest places in a virtqueue,
//! parsed and checked into a [`Request`] before any I/O happens.
//!
//! A chain is `header (device-readable, 16 bytes) | data segments | status
//! byte (device-writable)`. The header and the status byte may share a
//! descriptor with data; everything else about the chain is checked here:
//! guest addresses, directions, segment count and size, sector alignment,
//! and the range against the disk's capacity.

use crate::direct::AlignedBuf;
use std::time::Instant;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::GuestMem;

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Bytes of the serial number GET_ID returns (virtio spec: 20, not NUL-terminated if full).
pub const ID_BYTES: usize = 20;
const HEADER_LEN: u64 = 16;
const DWZ_SEGMENT_LEN: u64 = 16;

/// The status byte written back to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
}

/// The operation a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes { unmap: bool },
}

impl Op {
    /// Whether the operation modifies the disk.
    pub fn is_write(self) -> bool {
        matches!(self, Op::Write | Op::Discard | Op::WriteZeroes { .. })
    }
}

/// One guest buffer, mapped into this process: layout-compatible with
/// `struct iovec` so a slice of them can be handed to the kernel.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Iov {
    base: *mut u8,
    len: usize,
}

impl Iov {
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes for as long
    /// as this `Iov`, or a copy of it, is used: guest memory kept mapped by
    /// the request's memory snapshot, or a buffer that outlives the request.
    pub unsafe fn new(base: *mut u8, len: usize) -> Iov {
        Iov { base, len }
    }

    pub fn base(&self) -> *mut u8 {
        self.base
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The rest of this buffer after `skip` bytes (`skip < len`).
    pub fn skip(&self, skip: usize) -> Iov {
        assert!(skip < self.len);
        Iov {
            // SAFETY: skip < len, so the pointer stays inside the buffer.
            base: unsafe { self.base.add(skip) },
            len: self.len - skip,
        }
    }
}

// SAFETY: an Iov is a plain address range in guest memory that the queue
// worker owning the request uses; the mapping is kept alive by the guest
// memory snapshot the request holds.
unsafe impl Send for Iov {}

/// A buffer the storage layer uses instead of the guest's buffers: it writes
/// from it (a filter that transforms written data must never do it in guest
/// memory) or reads into it (a filter that transforms read data puts only
/// the result into guest memory).
#[derive(Debug, Default)]
pub struct Bounce {
    /// Aligned for direct I/O (`--cache none`).
    pub buf: AlignedBuf,
    /// The operation the filter turned into this write, restored on completion.
    pub replaces: Option<Op>,
}

impl Bounce {
    pub fn new(buf: AlignedBuf) -> Self {
        Bounce {
            buf,
            replaces: None,
        }
    }
}

/// A parsed, validated request, owned by a queue worker until completion.
#[derive(Debug)]
pub struct Request {
    pub op: Op,
    /// Byte offset on the virtual disk.
    pub offset: u64,
    /// Bytes of data (read/write) or of the range (discard/write-zeroes).
    pub len: u64,
    /// The guest's data buffers (empty for flush, discard, write-zeroes).
    pub iovs: Vec<Iov>,
    /// Set by a filter: the buffer storage reads into or writes from
    /// instead of `iovs`.
    pub bounce: Option<Bounce>,
    /// When the worker took the request from the queue.
    pub started: Instant,
    pub(crate) head: u16,
    pub(crate) status_addr: GuestAddress,
    /// Bytes written into guest buffers, reported in the used ring.
    pub(crate) written: u32,
    /// `op` was read from this chain's header (a refused chain may stop
    /// before it is).
    pub(crate) op_known: bool,
    /// The guest ranges the device writes through `iovs` (reads, GET_ID),
    /// logged as dirty while QEMU migrates.
    pub(crate) dirty: Vec<(GuestAddress, usize)>,
}

impl Default for Request {
    fn default() -> Self {
        Request {
            op: Op::Flush,
            offset: 0,
            len: 0,
            iovs: Vec::new(),
            bounce: None,
            started: Instant::now(),
            head: 0,
            status_addr: GuestAddress(0),
            written: 0,
            op_known: false,
            dirty: Vec::new(),
        }
    }
}

/// What the device tells the parser about itself.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    pub read_only: bool,
    /// Most data descriptors in one request.
    pub seg_max: u32,
    /// Largest data descriptor in bytes.
    pub size_max: u32,
    /// Largest discard range in bytes.
    pub max_discard: u64,
    /// Largest write-zeroes range in bytes.
    pub max_write_zeroes: u64,
}

/// Why a chain was not turned into a request.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The chain has no usable status byte: it can only be returned unused.
    #[error("descriptor chain is malformed: {0}")]
    Broken(&'static str),
    /// The chain is well-formed but the request is refused with `status`.
    #[error("request refused ({status:?}): {reason}")]
    Refused {
        status: Status,
        reason: &'static str,
    },
}

fn refuse(status: Status, reason: &'static str) -> ParseError {
    ParseError::Refused { status, reason }
}

/// A region of guest memory named by a descriptor.
#[derive(Clone, Copy)]
struct Region {
    addr: GuestAddress,
    len: u64,
    writable: bool,
}

/// Parses the descriptors of one chain into `req`, reusing its buffers:
/// the chain's regions, then its status byte and header, then the data or
/// range of the request's type.
///
/// `descs` yields the chain's descriptors in order (indirect tables already
/// followed); `head` is the chain's head index.
pub fn parse(
    mem: &GuestMem,
    head: u16,
    descs: impl Iterator<Item = Descriptor>,
    limits: &Limits,
    req: &mut Request,
) -> Result<(), ParseError> {
    req.head = head;
    req.iovs.clear();
    req.dirty.clear();
    req.bounce = None;
    req.written = 0;
    req.op_known = false;

    let regions = Regions::collect(descs, limits)?;
    let count = regions.count;
    req.status_addr = status_byte(mem, regions.get(count - 1))?;
    let (req_type, sector) = header(mem, regions.get(0), count)?;

    // Data: what lies between the header and the status byte.
    let data = (0..count).filter_map(|i| {
        let mut r = regions.get(i);
        if i == 0 {
            r.addr = GuestAddress(r.addr.0.wrapping_add(HEADER_LEN));
            r.len -= HEADER_LEN;
        }
        if i == count - 1 {
            r.len -= 1;
        }
        (r.len > 0).then_some(r)
    });

    req.op = match req_type {
        VIRTIO_BLK_T_IN => Op::Read,
        VIRTIO_BLK_T_OUT => Op::Write,
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        VIRTIO_BLK_T_GET_ID => Op::GetId,
        VIRTIO_BLK_T_DISCARD => Op::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => Op::WriteZeroes { unmap: false },
        _ => return Err(refuse(Status::Unsupp, "unsupported request type")),
    };
    req.op_known = true;
    if limits.read_only && req.op.is_write() {
        return Err(refuse(Status::IoErr, "write to a read-only disk"));
    }

    match req.op {
        Op::Read | Op::Write | Op::GetId => parse_data(mem, data, sector, limits, req),
        Op::Flush => {
            req.offset = 0;
            req.len = 0;
            Ok(())
        }
        Op::Discard | Op::WriteZeroes { .. } => parse_range(mem, data, limits, req),
    }
}

/// The regions of a chain's descriptors, the first few without allocating.
struct Regions {
    inline: [Region; 4],
    extra: Vec<Region>,
    count: usize,
}

impl Regions {
    /// Walks the chain. The chain iterator stops on loops and bad indexes,
    /// which shows as a last descriptor that still has NEXT set; more
    /// descriptors than a request may have stop the walk too.
    fn collect(
        descs: impl Iterator<Item = Descriptor>,
        limits: &Limits,
    ) -> Result<Regions, ParseError> {
        let mut regions = Regions {
            inline: [Region {
                addr: GuestAddress(0),
                len: 0,
                writable: false,
            }; 4],
            extra: Vec::new(),
            count: 0,
        };
        let mut last_has_next = false;
        let max_descs = limits.seg_max as usize + 2;
        for d in descs {
            if regions.count >= max_descs {
                return Err(ParseError::Broken("more descriptors than seg_max allows"));
            }
            let r = Region {
                addr: d.addr(),
                len: u64::from(d.len()),
                writable: d.is_write_only(),
            };
            if regions.count < regions.inline.len() {
                regions.inline[regions.count] = r;
            } else {
                regions.extra.push(r);
            }
            regions.count += 1;
            last_has_next = d.has_next();
        }
        if regions.count == 0 {
            return Err(ParseError::Broken("empty chain"));
        }
        if last_has_next {
            return Err(ParseError::Broken(
                "chain loops or points outside the table",
            ));
        }
        Ok(regions)
    }

    fn get(&self, i: usize) -> Region {
        if i < self.inline.len() {
            self.inline[i]
        } else {
            self.extra[i - self.inline.len()]
        }
    }
}

/// The status byte: the last byte of the last descriptor, device-writable.
fn status_byte(mem: &GuestMem, last: Region) -> Result<GuestAddress, ParseError> {
    if !last.writable || last.len == 0 {
        return Err(ParseError::Broken(
            "last descriptor is not a writable status byte",
        ));
    }
    let status_addr = last
        .addr
        .checked_add(last.len - 1)
        .ok_or(ParseError::Broken("status byte address overflows"))?;
    if mem.get_host_address(status_addr).is_err() {
        return Err(ParseError::Broken("status byte outside guest memory"));
    }
    Ok(status_addr)
}

/// The request header: the first 16 bytes of the first descriptor,
/// device-readable. Returns the type and the sector.
fn header(mem: &GuestMem, first: Region, count: usize) -> Result<(u32, u64), ParseError> {
    if first.writable || first.len < HEADER_LEN || (count == 1 && first.len < HEADER_LEN + 1) {
        return Err(refuse(Status::IoErr, "request header missing or too short"));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut header, first.addr)
        .map_err(|_| refuse(Status::IoErr, "request header outside guest memory"))?;
    let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    Ok((req_type, sector))
}

/// READ, WRITE and GET_ID: the data buffers, their direction and limits,
/// and the range on the disk.
fn parse_data(
    mem: &GuestMem,
    data: impl Iterator<Item = Region>,
    sector: u64,
    limits: &Limits,
    req: &mut Request,
) -> Result<(), ParseError> {
    let want_writable = req.op != Op::Write;
    let mut total: u64 = 0;
    let mut segs = 0u32;
    for r in data {
        if r.writable != want_writable {
            return Err(refuse(
                Status::IoErr,
                "data descriptor has the wrong direction",
            ));
        }
        segs += 1;
        if segs > limits.seg_max {
            return Err(refuse(Status::IoErr, "more data segments than seg_max"));
        }
        if r.len > u64::from(limits.size_max) {
            return Err(refuse(Status::IoErr, "data segment larger than size_max"));
        }
        map_region(mem, r, &mut req.iovs)?;
        if want_writable {
            req.dirty.push((r.addr, r.len as usize));
        }
        total += r.len;
    }
    req.len = total;
    if req.op == Op::GetId {
        req.offset = 0;
        return Ok(());
    }
    check_range(sector, total, limits)?;
    req.offset = sector << SECTOR_SHIFT;
    Ok(())
}

/// DISCARD and WRITE_ZEROES: one 16-byte range.
fn parse_range(
    mem: &GuestMem,
    data: impl Iterator<Item = Region>,
    limits: &Limits,
    req: &mut Request,
) -> Result<(), ParseError> {
    // One range (the device advertises max_discard_seg and
    // max_write_zeroes_seg = 1): le64 sector, le32 num_sectors,
    // le32 flags, 16 bytes that may be split over descriptors. More
    // ranges than advertised are UNSUPP, as QEMU answers; a short or
    // ragged range is IOERR.
    let mut seg = [0u8; DWZ_SEGMENT_LEN as usize];
    let mut got = 0u64;
    for r in data {
        if r.writable {
            return Err(refuse(
                Status::IoErr,
                "discard/write-zeroes range in a device-writable descriptor",
            ));
        }
        let end = got.saturating_add(r.len);
        if end > DWZ_SEGMENT_LEN {
            return Err(refuse(
                Status::Unsupp,
                "discard/write-zeroes with more than one range",
            ));
        }
        mem.read_slice(&mut seg[got as usize..end as usize], r.addr)
            .map_err(|_| refuse(Status::IoErr, "range outside guest memory"))?;
        got = end;
    }
    if got != DWZ_SEGMENT_LEN {
        return Err(refuse(
            Status::IoErr,
            "discard/write-zeroes range shorter than 16 bytes",
        ));
    }
    let start = u64::from_le_bytes(seg[0..8].try_into().unwrap());
    let sectors = u64::from(u32::from_le_bytes(seg[8..12].try_into().unwrap()));
    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
    let allowed = if req.op == Op::Discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    if flags & !allowed != 0 {
        return Err(refuse(Status::Unsupp, "unknown discard/write-zeroes flags"));
    }
    if let Op::WriteZeroes { unmap } = &mut req.op {
        *unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    }
    let len = sectors << SECTOR_SHIFT;
    let max = if req.op == Op::Discard {
        limits.max_discard
    } else {
        limits.max_write_zeroes
    };
    if len > max {
        return Err(refuse(
            Status::IoErr,
            "range larger than the advertised maximum",
        ));
    }
    check_range(start, len, limits)?;
    req.offset = start << SECTOR_SHIFT;
    req.len = len;
    Ok(())
}

/// Checks that `len` bytes from `sector` are whole logical blocks inside the disk.
fn check_range(sector: u64, len: u64, limits: &Limits) -> Result<(), ParseError> {
    let bs = u64::from(limits.block_size);
    if !len.is_multiple_of(bs) {
        return Err(refuse(
            Status::IoErr,
            "length is not a multiple of the block size",
        ));
    }
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(refuse(Status::IoErr, "sector out of range"))?;
    if !offset.is_multiple_of(bs) {
        return Err(refuse(
            Status::IoErr,
            "offset is not aligned to the block size",
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= limits.capacity => Ok(()),
        _ => Err(refuse(Status::IoErr, "request beyond the end of the disk")),
    }
}

/// Translates a guest region to host iovecs (several when it spans memory regions).
fn map_region(mem: &GuestMem, r: Region, iovs: &mut Vec<Iov>) -> Result<(), ParseError> {
    let outside = || refuse(Status::IoErr, "data buffer outside guest memory");
    let len = usize::try_from(r.len).map_err(|_| outside())?;
    let mut mapped = 0usize;
    for slice in mem.get_slices(r.addr, len) {
        let slice = slice.map_err(|_| outside())?;
        // SAFETY: the slice lies in guest memory, which the request's memory
        // snapshot keeps mapped until it completes.
        iovs.push(unsafe { Iov::new(slice.ptr_guard_mut().as_ptr(), slice.len()) });
        mapped += slice.len();
    }
    if mapped != len {
        return Err(outside());
    }
    Ok(())
}

pub mod chain;

#[cfg(test)]
mod tests;
