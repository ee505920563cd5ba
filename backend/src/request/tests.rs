//! Request parsing against chains built with `virtio_queue::mock`.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MEM_SIZE: u64 = 0x10_0000;
const HDR: u64 = 0x8000;
const DATA: u64 = 0x9000;
const STATUS: u64 = 0x20000;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn limits() -> Limits {
    Limits {
        capacity: 1 << 20,
        block_size: 512,
        read_only: false,
        seg_max: 4,
        size_max: 1 << 16,
        max_discard: 1 << 20,
        max_write_zeroes: 1 << 16,
    }
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(mem: &GuestMem, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

/// Builds `descs` as one chain and parses it.
fn parse_chain(
    mem: &GuestMem,
    descs: &[RawDescriptor],
    limits: &Limits,
) -> (Result<(), ParseError>, Request) {
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    let mut req = Request::default();
    let head = chain.head_index();
    let r = parse(mem, head, chain, limits, &mut req);
    (r, req)
}

fn refused(status: Status) -> impl Fn(&Result<(), ParseError>) -> bool {
    move |r| matches!(r, Err(ParseError::Refused { status: s, .. }) if *s == status)
}

#[test]
fn read_with_two_segments() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 8);
    let (r, req) = parse_chain(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, W),
            desc(DATA + 4096, 1024, W),
            desc(STATUS, 1, W),
        ],
        &limits(),
    );
    r.unwrap();
    assert_eq!(req.op, Op::Read);
    assert_eq!(req.offset, 8 * 512);
    assert_eq!(req.len, 1536);
    assert_eq!(req.iovs.len(), 2);
    assert_eq!(req.status_addr, GuestAddress(STATUS));
}

#[test]
fn write_with_header_and_data_in_one_descriptor() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let (r, req) = parse_chain(&m, &[desc(HDR, 16 + 512, 0), desc(STATUS, 1, W)], &limits());
    r.unwrap();
    assert_eq!((req.op, req.len, req.iovs.len()), (Op::Write, 512, 1));
}

#[test]
fn indirect_chains_are_followed() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let table = GuestAddress(0x30000);
    let entries = [
        SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(DATA, 4096, W | VRING_DESC_F_NEXT as u16, 2),
        SplitDescriptor::new(STATUS, 1, W, 0),
    ];
    for (i, d) in entries.iter().enumerate() {
        m.write_obj(RawDescriptor::from(*d), table.unchecked_add(16 * i as u64))
            .unwrap();
    }
    let flags = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
    let (r, req) = parse_chain(&m, &[desc(table.0, 48, flags)], &limits());
    r.unwrap();
    assert_eq!((req.op, req.len), (Op::Read, 4096));
}

#[test]
fn malformed_chains_are_broken_or_refused() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let l = limits();
    type Check = fn(&Result<(), ParseError>) -> bool;
    let cases: Vec<(&str, Vec<RawDescriptor>, Check)> = vec![
        (
            "status not writable",
            vec![desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, 0)],
            |r| matches!(r, Err(ParseError::Broken(_))),
        ),
        (
            "status outside memory",
            vec![
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(MEM_SIZE + 10, 1, W),
            ],
            |r| matches!(r, Err(ParseError::Broken(_))),
        ),
        (
            "header too short",
            vec![desc(HDR, 8, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
            |r| refused(Status::IoErr)(r),
        ),
        (
            "header writable",
            vec![desc(HDR, 16, W), desc(DATA, 512, W), desc(STATUS, 1, W)],
            |r| refused(Status::IoErr)(r),
        ),
        // One writable descriptor: a status byte, but the header is in a
        // device-writable buffer.
        ("header alone", vec![desc(HDR, 16, W)], |r| {
            refused(Status::IoErr)(r)
        }),
        (
            "data wrong direction",
            vec![desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
            |r| refused(Status::IoErr)(r),
        ),
        (
            "data outside memory",
            vec![
                desc(HDR, 16, 0),
                desc(MEM_SIZE - 256, 512, W),
                desc(STATUS, 1, W),
            ],
            |r| refused(Status::IoErr)(r),
        ),
        (
            "data address overflows",
            vec![
                desc(HDR, 16, 0),
                desc(u64::MAX - 100, 512, W),
                desc(STATUS, 1, W),
            ],
            |r| refused(Status::IoErr)(r),
        ),
        (
            "not a multiple of 512",
            vec![desc(HDR, 16, 0), desc(DATA, 100, W), desc(STATUS, 1, W)],
            |r| refused(Status::IoErr)(r),
        ),
        (
            "segment over size_max",
            vec![desc(HDR, 16, 0), desc(DATA, 1 << 17, W), desc(STATUS, 1, W)],
            |r| refused(Status::IoErr)(r),
        ),
        (
            "too many segments",
            vec![
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(DATA, 512, W),
                desc(DATA, 512, W),
                desc(DATA, 512, W),
                desc(DATA, 512, W),
                desc(STATUS, 1, W),
            ],
            // Collection stops past seg_max + 2 descriptors (bounded work).
            |r| matches!(r, Err(ParseError::Broken(_))),
        ),
    ];
    for (name, descs, ok) in cases {
        let (r, _) = parse_chain(&m, &descs, &l);
        assert!(ok(&r), "{name}: {r:?}");
    }
}

#[test]
fn descriptor_loops_are_broken() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&m, 16);
    let next = VRING_DESC_F_NEXT as u16;
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 512, W | next, 0)),
    ];
    let chain = vq.build_multiple_desc_chains(&descs).unwrap();
    let mut req = Request::default();
    let r = parse(&m, chain.head_index(), chain, &limits(), &mut req);
    assert!(matches!(r, Err(ParseError::Broken(_))), "{r:?}");
}

#[test]
fn ranges_are_checked_against_capacity() {
    let m = mem();
    let l = limits();
    for (sector, len, ok) in [
        (0u64, 512u32, true),
        ((1 << 20) / 512 - 1, 512, true),
        ((1 << 20) / 512, 512, false),
        ((1 << 20) / 512 - 1, 1024, false),
        (u64::MAX / 512 + 1, 512, false),
        (u64::MAX, 512, false),
    ] {
        header(&m, VIRTIO_BLK_T_OUT, sector);
        let (r, _) = parse_chain(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, len, 0), desc(STATUS, 1, W)],
            &l,
        );
        assert_eq!(r.is_ok(), ok, "sector {sector} len {len}: {r:?}");
    }
}

#[test]
fn logical_block_size_4k_requires_aligned_requests() {
    let m = mem();
    let l = Limits {
        block_size: 4096,
        ..limits()
    };
    header(&m, VIRTIO_BLK_T_IN, 1);
    let (r, _) = parse_chain(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 4096, W), desc(STATUS, 1, W)],
        &l,
    );
    assert!(refused(Status::IoErr)(&r));
    header(&m, VIRTIO_BLK_T_IN, 8);
    let (r, _) = parse_chain(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
        &l,
    );
    assert!(refused(Status::IoErr)(&r));
    let (r, _) = parse_chain(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 4096, W), desc(STATUS, 1, W)],
        &l,
    );
    r.unwrap();
}

#[test]
fn unknown_types_are_unsupported() {
    let m = mem();
    header(&m, 99, 0);
    let (r, _) = parse_chain(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)], &limits());
    assert!(refused(Status::Unsupp)(&r), "{r:?}");
}

#[test]
fn read_only_refuses_writes_but_not_reads_or_flushes() {
    let m = mem();
    let l = Limits {
        read_only: true,
        ..limits()
    };
    for (ty, data_flags, ok) in [
        (VIRTIO_BLK_T_OUT, 0, false),
        (VIRTIO_BLK_T_IN, W, true),
        (VIRTIO_BLK_T_FLUSH, W, true),
        (VIRTIO_BLK_T_DISCARD, 0, false),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0, false),
    ] {
        header(&m, ty, 0);
        let len = if ty == VIRTIO_BLK_T_DISCARD || ty == VIRTIO_BLK_T_WRITE_ZEROES {
            16
        } else {
            512
        };
        let (r, _) = parse_chain(
            &m,
            &[
                desc(HDR, 16, 0),
                desc(DATA, len, data_flags),
                desc(STATUS, 1, W),
            ],
            &l,
        );
        assert_eq!(r.is_ok(), ok, "type {ty}: {r:?}");
    }
}

fn range(m: &GuestMem, sector: u64, sectors: u32, flags: u32) {
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg[12..16].copy_from_slice(&flags.to_le_bytes());
    m.write_slice(&seg, GuestAddress(DATA)).unwrap();
}

#[test]
fn discard_and_write_zeroes_ranges() {
    let m = mem();
    let l = limits();
    let chain = [desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)];
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    range(&m, 8, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let (r, req) = parse_chain(&m, &chain, &l);
    r.unwrap();
    assert_eq!(
        (req.op, req.offset, req.len),
        (Op::WriteZeroes { unmap: true }, 4096, 8192)
    );
    range(&m, 8, 16, 0x80);
    assert!(refused(Status::Unsupp)(&parse_chain(&m, &chain, &l).0));
    range(&m, 0, 1 << 10, 0); // 512 KiB, over max_write_zeroes
    assert!(refused(Status::IoErr)(&parse_chain(&m, &chain, &l).0));

    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    range(&m, 2040, 16, 0); // straddles the end
    assert!(refused(Status::IoErr)(&parse_chain(&m, &chain, &l).0));
    range(&m, 0, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP); // no flags for discard
    assert!(refused(Status::Unsupp)(&parse_chain(&m, &chain, &l).0));
    range(&m, 0, 16, 0);
    let (r, req) = parse_chain(&m, &chain, &l);
    r.unwrap();
    assert_eq!((req.op, req.len), (Op::Discard, 8192));
    // A range split over two descriptors is one range.
    let (r, req) = parse_chain(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 10, 0),
            desc(DATA + 10, 6, 0),
            desc(STATUS, 1, W),
        ],
        &l,
    );
    r.unwrap();
    assert_eq!((req.op, req.len), (Op::Discard, 8192));
    // Two ranges where one is advertised: UNSUPP, as QEMU answers (its
    // vhost-user-blk qtest checks this).
    let (r, _) = parse_chain(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 32, 0), desc(STATUS, 1, W)],
        &l,
    );
    assert!(refused(Status::Unsupp)(&r));
    // A truncated range, or one in a device-writable buffer: IOERR.
    let (r, _) = parse_chain(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 8, 0), desc(STATUS, 1, W)],
        &l,
    );
    assert!(refused(Status::IoErr)(&r));
    let (r, _) = parse_chain(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)], &l);
    assert!(refused(Status::IoErr)(&r));
    let (r, _) = parse_chain(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 16, W), desc(STATUS, 1, W)],
        &l,
    );
    assert!(refused(Status::IoErr)(&r));
}

#[test]
fn get_id_and_flush() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let (r, req) = parse_chain(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 20, W), desc(STATUS, 1, W)],
        &limits(),
    );
    r.unwrap();
    assert_eq!((req.op, req.len), (Op::GetId, 20));
    header(&m, VIRTIO_BLK_T_FLUSH, 12345);
    let (r, req) = parse_chain(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)], &limits());
    r.unwrap();
    assert_eq!(req.op, Op::Flush);
}
