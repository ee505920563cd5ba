//! Walking a descriptor chain from its head index, for requests that are
//! resubmitted after a restart: those are not popped from the available
//! ring again, so virtio-queue's iterator (which only comes from a pop) is
//! not available for them.
//!
//! Behaves like virtio-queue's `DescriptorChain`: it follows one level of
//! indirect table, stops after as many descriptors as the table has (a loop)
//! or at an index outside the table, and [`parse`](super::parse) sees such a
//! stop as a last descriptor that still has NEXT set.

use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMem;

const DESC_LEN: u64 = 16;

/// The descriptors of the chain starting at `head`.
pub struct Chain<'a> {
    mem: &'a GuestMem,
    table: GuestAddress,
    table_len: u16,
    next: u16,
    /// Descriptors left before the walk counts as a loop.
    ttl: u16,
    indirect: bool,
}

impl<'a> Chain<'a> {
    pub fn new(mem: &'a GuestMem, desc_table: GuestAddress, queue_size: u16, head: u16) -> Self {
        Chain {
            mem,
            table: desc_table,
            table_len: queue_size,
            next: head,
            ttl: queue_size,
            indirect: false,
        }
    }

    fn read(&self, index: u16) -> Option<Descriptor> {
        let addr = self
            .table
            .0
            .checked_add(u64::from(index) * DESC_LEN)
            .map(GuestAddress)?;
        let raw: RawDescriptor = self.mem.read_obj(addr).ok()?;
        Some(Descriptor::from(raw))
    }
}

impl Iterator for Chain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.table_len {
            return None;
        }
        let desc = self.read(self.next)?;
        if desc.flags() & VRING_DESC_F_INDIRECT as u16 != 0 {
            // An indirect table: only from the main table, a whole number
            // of descriptors, at most 2^16 of them.
            if self.indirect || !u64::from(desc.len()).is_multiple_of(DESC_LEN) {
                return None;
            }
            let n = u64::from(desc.len()) / DESC_LEN;
            self.table_len = u16::try_from(n).ok()?;
            self.table = desc.addr();
            self.next = 0;
            self.ttl = self.table_len;
            self.indirect = true;
            return self.next();
        }
        if desc.has_next() {
            self.next = desc.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(desc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn store(m: &GuestMem, table: u64, i: u16, d: Descriptor) {
        m.write_obj(
            RawDescriptor::from(d),
            GuestAddress(table + 16 * u64::from(i)),
        )
        .unwrap();
    }

    const N: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    #[test]
    fn walks_the_same_chain_as_a_pop() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [
            Descriptor::new(0x8000, 16, 0, 0),
            Descriptor::new(0x9000, 4096, W, 0),
            Descriptor::new(0xa000, 1, W, 0),
        ]
        .map(RawDescriptor::from);
        let chain = vq.build_desc_chain(&descs).unwrap();
        let head = chain.head_index();
        let popped: Vec<_> = chain.map(|d| (d.addr(), d.len(), d.flags())).collect();
        let walked: Vec<_> = Chain::new(&m, vq.desc_table_addr(), 16, head)
            .map(|d| (d.addr(), d.len(), d.flags()))
            .collect();
        assert_eq!(popped, walked);
        assert_eq!(walked.len(), 3);
    }

    #[test]
    fn follows_an_indirect_table() {
        let m = mem();
        store(
            &m,
            0x1000,
            0,
            Descriptor::new(0x2000, 48, VRING_DESC_F_INDIRECT as u16, 0),
        );
        store(&m, 0x2000, 0, Descriptor::new(0x8000, 16, N, 1));
        store(&m, 0x2000, 1, Descriptor::new(0x9000, 512, W | N, 2));
        store(&m, 0x2000, 2, Descriptor::new(0xa000, 1, W, 0));
        let lens: Vec<u32> = Chain::new(&m, GuestAddress(0x1000), 4, 0)
            .map(|d| d.len())
            .collect();
        assert_eq!(lens, [16, 512, 1]);
    }

    #[test]
    fn stops_on_loops_and_bad_indexes() {
        let m = mem();
        // 0 -> 1 -> 0 -> ...
        store(&m, 0x1000, 0, Descriptor::new(0x8000, 16, N, 1));
        store(&m, 0x1000, 1, Descriptor::new(0x9000, 16, N, 0));
        let walked: Vec<_> = Chain::new(&m, GuestAddress(0x1000), 4, 0).collect();
        assert_eq!(walked.len(), 4);
        assert!(walked.last().unwrap().has_next());
        // next index outside the table
        store(&m, 0x1000, 2, Descriptor::new(0x8000, 16, N, 9));
        let walked: Vec<_> = Chain::new(&m, GuestAddress(0x1000), 4, 2).collect();
        assert_eq!(walked.len(), 1);
        assert!(walked[0].has_next());
        // head outside the table; table outside memory
        assert_eq!(Chain::new(&m, GuestAddress(0x1000), 4, 4).count(), 0);
        assert_eq!(Chain::new(&m, GuestAddress(u64::MAX - 8), 4, 0).count(), 0);
        // nested indirect
        store(
            &m,
            0x1000,
            3,
            Descriptor::new(0x2000, 16, VRING_DESC_F_INDIRECT as u16, 0),
        );
        store(
            &m,
            0x2000,
            0,
            Descriptor::new(0x3000, 16, VRING_DESC_F_INDIRECT as u16, 0),
        );
        assert_eq!(Chain::new(&m, GuestAddress(0x1000), 4, 3).count(), 0);
    }
}
