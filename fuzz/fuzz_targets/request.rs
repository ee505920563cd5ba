//! Descriptor chains as a hostile guest may lay them out: any descriptor
//! table (loops, indirect tables, addresses outside memory, wrong
//! directions), any request header, any limits. Both ways vmcrypt walks a
//! chain are fed to the request parser: virtio-queue's pop (new requests)
//! and vmcrypt's own walker from a head index (requests resubmitted after a
//! restart). Neither may panic, loop or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmcrypt::request::chain::Chain;
use vmcrypt::request::{parse, Limits, Request};

const MEM: usize = 0x10000;
const QSIZE: u16 = 16;
/// Guest data lives above the queue's own structures.
const DATA: u64 = 0x1000;

fuzz_target!(|data: &[u8]| {
    // 8 bytes of limits, 16 descriptors of 8 bytes, then guest memory.
    if data.len() < 8 + 16 * 8 {
        return;
    }
    let (lim, rest) = data.split_at(8);
    let (descs, memory) = rest.split_at(16 * 8);
    let limits = Limits {
        capacity: u64::from(u16::from_le_bytes([lim[0], lim[1]])) << 9,
        block_size: if lim[2] & 1 == 0 { 512 } else { 4096 },
        read_only: lim[2] & 2 != 0,
        seg_max: u32::from(lim[3] % 8) + 1,
        size_max: u32::from(u16::from_le_bytes([lim[4], lim[5]])) + 1,
        max_discard: u64::from(lim[6]) << 12,
        max_write_zeroes: u64::from(lim[7]) << 12,
    };
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let n = memory.len().min(MEM - DATA as usize);
    mem.write_slice(&memory[..n], GuestAddress(DATA)).unwrap();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    for (i, d) in descs.chunks_exact(8).enumerate() {
        // addr (16 bits, from DATA; may run past memory), len, flags, next
        let addr = DATA + u64::from(u16::from_le_bytes([d[0], d[1]]));
        let len = u32::from(u16::from_le_bytes([d[2], d[3]]));
        let flags = u16::from_le_bytes([d[4], d[5]]) & 0x7;
        let next = u16::from_le_bytes([d[6], d[7]]);
        let raw = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        if vq.desc_table().store(i as u16, raw).is_err() {
            return;
        }
    }
    let head = u16::from(lim[0] % 16);
    // The avail ring offers `head`.
    let avail = vq.avail_addr();
    mem.write_obj(head, avail.unchecked_add(4)).unwrap();
    mem.write_obj(1u16, avail.unchecked_add(2)).unwrap();

    let mut req = Request::default();
    if let Ok(mut q) = vq.create_queue::<Queue>() {
        if let Some(chain) = q.pop_descriptor_chain(&mem) {
            let _ = parse(&mem, chain.head_index(), chain, &limits, &mut req);
        }
    }
    let chain = Chain::new(&mem, vq.desc_table_addr(), QSIZE, head);
    let _ = parse(&mem, head, chain, &limits, &mut req);
});
