//! Recycled buffers. At a gigabyte a second, a fresh allocation per chunk read from a
//! socket (and per batch of records read from a pool connection) costs more than the
//! AEAD: the allocator hands memory back to the kernel and the next read faults it in
//! again, page by page. A [`BufPool`] keeps a bounded number of buffers of one size;
//! a buffer frozen into [`Bytes`] comes back to the pool when its last slice is
//! dropped (after the chunk is acknowledged, or the record's frames are delivered).

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Buffers of one capacity, at most `keep` of them idle.
#[derive(Debug)]
pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    size: usize,
    keep: usize,
}

impl BufPool {
    pub fn new(size: usize, keep: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            free: Mutex::new(Vec::new()),
            size,
            keep,
        })
    }

    /// The capacity of every buffer of this pool.
    pub fn size(&self) -> usize {
        self.size
    }

    /// An empty buffer of `size()` capacity: an idle one, or a new one.
    pub fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .expect("buffer pool lock")
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.size))
    }

    /// Freezes `buf` into shared bytes that return it to the pool once dropped.
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() != self.size {
            return;
        }
        buf.clear();
        let mut free = self.free.lock().expect("buffer pool lock");
        if free.len() < self.keep {
            free.push(buf);
        }
    }

    /// Idle buffers now (for tests and metrics).
    pub fn idle(&self) -> usize {
        self.free.lock().expect("buffer pool lock").len()
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_when_its_last_slice_is_dropped() {
        let pool = BufPool::new(1024, 2);
        let mut b = pool.take();
        assert_eq!(b.capacity(), 1024);
        b.extend_from_slice(b"hello world");
        let bytes = pool.freeze(b);
        let hello = bytes.slice(0..5);
        drop(bytes);
        assert_eq!(pool.idle(), 0, "a slice still holds it");
        assert_eq!(&hello[..], b"hello");
        drop(hello);
        assert_eq!(pool.idle(), 1);
        let again = pool.take();
        assert!(again.is_empty() && again.capacity() == 1024);
    }

    #[test]
    fn the_pool_keeps_at_most_keep_idle_buffers() {
        let pool = BufPool::new(64, 2);
        let held: Vec<Bytes> = (0..5).map(|_| pool.freeze(pool.take())).collect();
        drop(held);
        assert_eq!(pool.idle(), 2);
        // A buffer that grew past the pool's size is not kept.
        let mut big = pool.take();
        big.extend_from_slice(&[0u8; 100]);
        drop(pool.freeze(big));
        assert_eq!(pool.idle(), 1);
    }
}
