//! A batch of byte strings stored back to back in one buffer, each with a small header: how
//! the threads of a scan (`verify`, `fold::replay`) hand records to each other without an
//! allocation per record, reusing the buffers batch after batch.

/// Byte strings back to back, each with its header `H`.
#[derive(Debug)]
pub(crate) struct ByteBatch<H> {
    bytes: Vec<u8>,
    /// Each entry's header and the end of its bytes in `bytes`.
    entries: Vec<(H, usize)>,
}

impl<H> Default for ByteBatch<H> {
    fn default() -> Self {
        ByteBatch { bytes: Vec::new(), entries: Vec::new() }
    }
}

impl<H> ByteBatch<H> {
    pub(crate) fn push(&mut self, header: H, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
        self.entries.push((header, self.bytes.len()));
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Empties the batch, keeping its buffers.
    pub(crate) fn clear(&mut self) {
        self.bytes.clear();
        self.entries.clear();
    }

    /// The entries in the order they were pushed.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&H, &[u8])> {
        let mut start = 0;
        self.entries.iter().map(move |(header, end)| {
            let bytes = &self.bytes[start..*end];
            start = *end;
            (header, bytes)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_in_order_with_their_own_bytes_and_clear_empties() {
        let mut batch = ByteBatch::default();
        batch.push(1u8, b"ab");
        batch.push(2, b"");
        batch.push(3, b"cde");
        let seen: Vec<(u8, Vec<u8>)> = batch.iter().map(|(h, b)| (*h, b.to_vec())).collect();
        assert_eq!(seen, vec![(1, b"ab".to_vec()), (2, Vec::new()), (3, b"cde".to_vec())]);
        assert_eq!(batch.len(), 3);
        batch.clear();
        assert!(batch.is_empty());
        assert_eq!(batch.iter().count(), 0);
    }
}
