//! Splitting a batch into statements bounded by rows and bytes.
//!
//! Guarantees: every chunk is non-empty, holds at most `max_rows` rows and at most
//! `max_bytes` bytes, and the chunks cover the input in order. A single row larger
//! than `max_bytes` cannot be placed; callers reject such rows before they get here.

use std::ops::Range;

/// Greedy chunking of rows with the given sizes.
pub fn plan(
    sizes: impl IntoIterator<Item = usize>,
    max_rows: usize,
    max_bytes: usize,
) -> Result<Vec<Range<usize>>, Oversized> {
    debug_assert!(max_rows > 0 && max_bytes > 0);
    let mut chunks = Vec::new();
    let (mut start, mut rows, mut bytes) = (0, 0, 0);
    let mut end = 0;
    for (i, size) in sizes.into_iter().enumerate() {
        if size > max_bytes {
            return Err(Oversized {
                index: i,
                size,
                limit: max_bytes,
            });
        }
        if rows == max_rows || bytes + size > max_bytes {
            chunks.push(start..i);
            (start, rows, bytes) = (i, 0, 0);
        }
        rows += 1;
        bytes += size;
        end = i + 1;
    }
    if end > start {
        chunks.push(start..end);
    }
    Ok(chunks)
}

/// A row that does not fit in any statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("record {index} is {size} bytes, over the {limit}-byte statement limit")]
pub struct Oversized {
    pub index: usize,
    pub size: usize,
    pub limit: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_bound_chunks() {
        assert_eq!(
            plan(vec![1; 2500], 1000, usize::MAX),
            Ok(vec![0..1000, 1000..2000, 2000..2500])
        );
        assert_eq!(plan(vec![1; 1500], 1000, usize::MAX).map(|c| c.len()), Ok(2));
        assert_eq!(plan(vec![1; 1000], 1000, usize::MAX).map(|c| c.len()), Ok(1));
        assert_eq!(plan(Vec::<usize>::new(), 10, 10), Ok(vec![]));
    }

    #[test]
    fn bytes_bound_chunks() {
        assert_eq!(plan([4, 4, 4, 4, 4], 100, 10), Ok(vec![0..2, 2..4, 4..5]));
        assert_eq!(plan([10, 10], 100, 10), Ok(vec![0..1, 1..2]));
        assert_eq!(plan([3, 7, 1], 100, 10), Ok(vec![0..2, 2..3]));
    }

    #[test]
    fn an_oversized_row_is_named() {
        assert_eq!(
            plan([1, 11, 1], 100, 10),
            Err(Oversized {
                index: 1,
                size: 11,
                limit: 10
            })
        );
    }

    #[test]
    fn chunks_respect_both_limits_and_cover_everything() {
        let sizes: Vec<usize> = (0..997).map(|i| (i * 7919) % 300 + 1).collect();
        for (max_rows, max_bytes) in [(1, 300), (7, 1000), (100, 301), (1000, 100_000)] {
            let chunks = plan(sizes.iter().copied(), max_rows, max_bytes).expect("fits");
            let mut next = 0;
            for c in &chunks {
                assert_eq!(c.start, next);
                assert!(!c.is_empty() && c.len() <= max_rows);
                assert!(sizes[c.clone()].iter().sum::<usize>() <= max_bytes);
                next = c.end;
            }
            assert_eq!(next, sizes.len());
        }
    }
}
