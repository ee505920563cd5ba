//! Request parsing against virtio_queue::mock.
