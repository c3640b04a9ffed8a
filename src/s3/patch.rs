//! Patching an object: the new bytes (pure), and for large objects the plan of
//! multipart parts that rebuilds it server-side.
//!
//! Guarantees (pure, no I/O): the parts of a [`plan`], in order, produce exactly
//! `splice(old, data, offset)`; every part but the last is at least `min_part`
//! bytes (S3's rule); a copied range never exceeds `max_copy` bytes; unchanged
//! ranges are copied, not downloaded, except for what is needed to bring a part
//! next to the new data up to `min_part`.
//!
//! [`S3::patch_object`] carries a plan out (the only I/O here), conditional on
//! the ETag read at its start.

use bytes::{Bytes, BytesMut};

use super::multipart::Multipart;
use super::object::conflict_on_precondition;
use super::{Condition, ObjectInfo, S3Error, MIN_PART, S3};

/// Part of a built (uploaded) part: old bytes to fetch or bytes of the new data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Bytes `start..end` of the old object.
    Old { start: u64, end: u64 },
    /// Bytes `start..end` of the patch data.
    New { start: u64, end: u64 },
}

/// One part of the multipart upload that rebuilds the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// A server-side copy of bytes `start..end` of the old object.
    Copy { start: u64, end: u64 },
    /// An uploaded part made of pieces.
    Build(Vec<Piece>),
}

/// `old` with `data` written at `offset` (extending it when `data` runs past its
/// end). `offset` must not exceed `old.len()`.
pub fn splice(old: &[u8], data: &[u8], offset: usize) -> Vec<u8> {
    debug_assert!(offset <= old.len());
    let end = offset + data.len();
    let mut out = Vec::with_capacity(old.len().max(end));
    out.extend_from_slice(&old[..offset]);
    out.extend_from_slice(data);
    if end < old.len() {
        out.extend_from_slice(&old[end..]);
    }
    out
}

/// The parts that turn an object of `size` bytes into one with `len` bytes
/// replaced at `offset` (`offset <= size`).
pub fn plan(size: u64, offset: u64, len: u64, min_part: u64, max_copy: u64) -> Vec<Part> {
    debug_assert!(offset <= size && min_part > 0 && max_copy >= 2 * min_part);
    let mut parts = Vec::new();
    let mut build: Vec<Piece> = Vec::new();
    let build_len = |pieces: &[Piece]| -> u64 {
        pieces
            .iter()
            .map(|p| match *p {
                Piece::Old { start, end } | Piece::New { start, end } => end - start,
            })
            .sum()
    };
    // The unchanged head: copied when it can stand as parts of its own.
    if offset >= min_part {
        copy_parts(&mut parts, 0, offset, min_part, max_copy);
    } else if offset > 0 {
        build.push(Piece::Old { start: 0, end: offset });
    }
    if len > 0 {
        build.push(Piece::New { start: 0, end: len });
    }
    let mut tail = (offset + len).min(size);
    if tail < size {
        // The part holding the new data must reach the minimum unless it is last.
        let missing = min_part.saturating_sub(build_len(&build));
        if missing > 0 {
            let borrowed = missing.min(size - tail);
            build.push(Piece::Old {
                start: tail,
                end: tail + borrowed,
            });
            tail += borrowed;
        }
    }
    if !build.is_empty() {
        parts.push(Part::Build(build));
    }
    if tail < size {
        copy_parts(&mut parts, tail, size, min_part, max_copy);
    }
    parts
}

/// Copies `start..end` in parts of at most `max_copy` bytes, none shorter than
/// `min_part` except possibly the last (callers only pass short ranges last).
fn copy_parts(parts: &mut Vec<Part>, start: u64, end: u64, min_part: u64, max_copy: u64) {
    let total = end - start;
    let count = total.div_ceil(max_copy).max(1);
    let size = total.div_ceil(count);
    let mut at = start;
    while at < end {
        let next = (at + size).min(end);
        parts.push(Part::Copy { start: at, end: next });
        at = next;
    }
    debug_assert!(count == 1 || size >= min_part);
}

impl S3 {
    /// Replaces the bytes of `key` from `offset` with `data`, extending the object
    /// when `offset + data.len()` passes its end. `offset` past the end is refused.
    /// The write is conditional on the ETag read at the start (or `expected_etag`):
    /// a concurrent change is reported as [`S3Error::Conflict`], not overwritten.
    /// Objects over the multipart threshold are never downloaded whole: unchanged
    /// ranges are copied server-side.
    pub async fn patch_object(
        &self,
        key: &str,
        data: Bytes,
        offset: u64,
        expected_etag: Option<&str>,
    ) -> Result<ObjectInfo, S3Error> {
        let info = self.object_info(key).await?;
        let etag = info.etag.clone().unwrap_or_default();
        if let Some(expected) = expected_etag {
            if expected != etag {
                return Err(S3Error::Conflict { key: key.to_owned() });
            }
        }
        if offset > info.size {
            return Err(S3Error::PastTheEnd {
                key: key.to_owned(),
                offset,
                size: info.size,
            });
        }
        let metadata: Vec<(&str, String)> = info.metadata.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let content_type = info.content_type.as_deref();
        if info.size <= self.multipart_threshold {
            let current = self.get_range_or_empty(key, info.size, &etag).await?;
            let patched = splice(&current, &data, offset as usize);
            self.put_whole(key, patched.into(), content_type, &metadata, Condition::Matches(&etag))
                .await
                .map_err(|e| conflict_on_precondition(e, key))?;
        } else {
            let plan = plan(info.size, offset, data.len() as u64, MIN_PART, 5 * 1024 * 1024 * 1024);
            let mut upload = Multipart::start(self, key, content_type, &metadata).await?;
            let result = self.run_plan(&mut upload, key, &etag, &plan, &data).await;
            match result {
                Ok(()) => {
                    // The last guard on stores that ignore If-Match on completion.
                    let now = self.object_info(key).await?;
                    if now.etag.as_deref() != Some(etag.as_str()) {
                        upload.abort().await;
                        return Err(S3Error::Conflict { key: key.to_owned() });
                    }
                    upload
                        .complete(Condition::Matches(&etag))
                        .await
                        .map_err(|e| conflict_on_precondition(e, key))?;
                }
                Err(e) => {
                    upload.abort().await;
                    return Err(conflict_on_precondition(e, key));
                }
            }
        }
        self.object_info(key).await
    }

    async fn get_range_or_empty(&self, key: &str, size: u64, etag: &str) -> Result<Bytes, S3Error> {
        if size == 0 {
            return Ok(Bytes::new());
        }
        self.get_range(key, 0, size, etag)
            .await
            .map_err(|e| conflict_on_precondition(e, key))
    }

    async fn run_plan(
        &self,
        upload: &mut Multipart<'_>,
        key: &str,
        etag: &str,
        plan: &[Part],
        data: &Bytes,
    ) -> Result<(), S3Error> {
        for part in plan {
            match part {
                Part::Copy { start, end } => upload.copy(key, etag, *start, *end).await?,
                Part::Build(pieces) => {
                    let mut buffer = BytesMut::new();
                    for piece in pieces {
                        match piece {
                            Piece::Old { start, end } => {
                                buffer.extend_from_slice(&self.get_range(key, *start, *end, etag).await?)
                            }
                            Piece::New { start, end } => {
                                buffer.extend_from_slice(&data[*start as usize..*end as usize])
                            }
                        }
                    }
                    upload.upload(buffer.freeze()).await?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rebuild(old: &[u8], data: &[u8], parts: &[Part]) -> Vec<u8> {
        let mut out = Vec::new();
        for part in parts {
            match part {
                Part::Copy { start, end } => out.extend_from_slice(&old[*start as usize..*end as usize]),
                Part::Build(pieces) => {
                    for piece in pieces {
                        match *piece {
                            Piece::Old { start, end } => out.extend_from_slice(&old[start as usize..end as usize]),
                            Piece::New { start, end } => out.extend_from_slice(&data[start as usize..end as usize]),
                        }
                    }
                }
            }
        }
        out
    }

    fn part_len(part: &Part) -> u64 {
        match part {
            Part::Copy { start, end } => end - start,
            Part::Build(pieces) => pieces
                .iter()
                .map(|p| match *p {
                    Piece::Old { start, end } | Piece::New { start, end } => end - start,
                })
                .sum(),
        }
    }

    #[test]
    fn splice_replaces_inside_at_the_end_and_past_the_end() {
        assert_eq!(splice(b"abcdef", b"XY", 2), b"abXYef");
        assert_eq!(splice(b"abcdef", b"XY", 4), b"abcdXY");
        assert_eq!(splice(b"abcdef", b"XYZ", 5), b"abcdeXYZ");
        assert_eq!(splice(b"abcdef", b"XY", 6), b"abcdefXY");
        assert_eq!(splice(b"", b"XY", 0), b"XY");
        assert_eq!(splice(b"abc", b"", 1), b"abc");
    }

    #[test]
    fn plans_rebuild_the_spliced_object_with_valid_part_sizes() {
        let (min_part, max_copy) = (5u64, 12u64);
        for size in 0..40u64 {
            let old: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
            for offset in 0..=size {
                for len in [0u64, 1, 3, 5, 7, 13, 30] {
                    let data: Vec<u8> = (0..len).map(|i| b'0' + (i % 10) as u8).collect();
                    let parts = plan(size, offset, len, min_part, max_copy);
                    let expected = splice(&old, &data, offset as usize);
                    assert_eq!(
                        rebuild(&old, &data, &parts),
                        expected,
                        "size {size} offset {offset} len {len}"
                    );
                    for (i, part) in parts.iter().enumerate() {
                        let last = i + 1 == parts.len();
                        assert!(
                            last || part_len(part) >= min_part,
                            "size {size} offset {offset} len {len}: part {i} too small: {parts:?}"
                        );
                        assert!(part_len(part) > 0, "no empty parts: {parts:?}");
                        if let Part::Copy { start, end } = part {
                            assert!(end - start <= max_copy, "copy too large: {parts:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn large_objects_are_mostly_copied() {
        const MIB: u64 = 1024 * 1024;
        let parts = plan(100 * MIB, 40 * MIB, 10, 5 * MIB, 5 * 1024 * MIB);
        let downloaded: u64 = parts
            .iter()
            .map(|p| match p {
                Part::Build(pieces) => pieces
                    .iter()
                    .map(|piece| match *piece {
                        Piece::Old { start, end } => end - start,
                        Piece::New { .. } => 0,
                    })
                    .sum(),
                Part::Copy { .. } => 0,
            })
            .sum();
        assert!(
            downloaded <= 5 * MIB,
            "only what fills the new data's part is fetched: {downloaded}"
        );
        assert!(matches!(parts[0], Part::Copy { start: 0, end } if end == 40 * MIB));
    }
}
