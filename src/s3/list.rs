//! Listings: one folder level or every key under a prefix, following
//! continuation tokens so they are complete however many objects there are;
//! key pages that resume after a key; unfinished multipart uploads.

use super::error::classify;
use super::{to_chrono, xml_char, KeyPage, Listing, ObjectSummary, S3Error, MAX_KEY_BYTES, S3};

pub(super) fn summary(object: &aws_sdk_s3::types::Object) -> Option<ObjectSummary> {
    Some(ObjectSummary {
        key: url_decoded(object.key()?),
        size: object.size().unwrap_or(0).max(0) as u64,
        last_modified: object.last_modified().and_then(to_chrono),
        etag: object.e_tag().map(str::to_owned),
    })
}

/// The `StartAfter` that resumes a delimited listing after `after`. A key is
/// its own; a folder (a common prefix, longer than the listing's prefix and
/// ending with `/`) is followed by the greatest key S3 allows under it, since
/// every key under it would roll up into that folder again.
pub(super) fn past_folder(prefix: &str, after: &str) -> String {
    if after.len() <= prefix.len() || !after.ends_with('/') {
        return after.to_owned();
    }
    // U+10FFFF is the greatest UTF-8 sequence (F4 8F BF BF); U+07FF (DF BF) the
    // greatest of two bytes, U+007F of one. Of three, U+FFFD: XML cannot carry
    // U+FFFE and U+FFFF, and a store may echo StartAfter. (A key of exactly
    // 1,024 bytes ending in either is the one a page could skip.) Keys are at
    // most 1,024 bytes.
    let mut last = after.to_owned();
    while last.len() + 4 <= MAX_KEY_BYTES {
        last.push('\u{10FFFF}');
    }
    let tail = match MAX_KEY_BYTES - last.len() {
        3 => Some('\u{FFFD}'),
        2 => Some('\u{07FF}'),
        1 => Some('\u{7F}'),
        _ => None,
    };
    last.extend(tail);
    last
}

/// A key as `encoding-type=url` lists it: percent-encoded, a space as `+` (AWS) or
/// `%20` (others); a literal `+` always comes as `%2B`.
pub(super) fn url_decoded(encoded: &str) -> String {
    percent_encoding::percent_decode_str(&encoded.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

impl S3 {
    /// The objects directly under `prefix` (not in deeper folders), newest first
    /// (ties by key), and the folders one level down. Follows continuations
    /// until `scan_limit` entries (objects and folders) are read, so memory and
    /// LIST requests stay bounded; beyond it the listing is `truncated`.
    pub async fn list_objects(&self, prefix: &str, scan_limit: usize) -> Result<Listing, S3Error> {
        let mut listing = self.list(prefix, Some("/"), scan_limit).await?;
        listing
            .objects
            .sort_by(|a, b| b.last_modified.cmp(&a.last_modified).then_with(|| a.key.cmp(&b.key)));
        Ok(listing)
    }

    /// Every object under `prefix`, at any depth, by key.
    pub async fn list_all(&self, prefix: &str) -> Result<Vec<ObjectSummary>, S3Error> {
        let mut objects = self.list(prefix, None, usize::MAX).await?.objects;
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn list(&self, prefix: &str, delimiter: Option<&str>, scan_limit: usize) -> Result<Listing, S3Error> {
        let mut listing = Listing::default();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_delimiter(delimiter.map(str::to_owned))
            // Keys may hold characters XML 1.0 cannot carry (control characters):
            // the store sends them percent-encoded.
            .encoding_type(aws_sdk_s3::types::EncodingType::Url)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify(e, &self.bucket, prefix))?;
            listing.objects.extend(page.contents().iter().filter_map(summary));
            listing.folders.extend(
                page.common_prefixes()
                    .iter()
                    .filter_map(|p| p.prefix().map(url_decoded)),
            );
            if listing.objects.len() + listing.folders.len() >= scan_limit && page.is_truncated() == Some(true) {
                listing.truncated = true;
                break;
            }
        }
        Ok(listing)
    }

    /// Up to `limit` objects and folders directly under `prefix`, in key order,
    /// after `after` (a key, or a folder as a previous page's `next_after`
    /// gave it): one LIST request, whatever the prefix holds.
    ///
    /// A store may echo `StartAfter` into its XML answer unencoded (moto does),
    /// and XML cannot carry control characters: a start holding one goes as its
    /// part before that character, and the few keys between are skipped here,
    /// following the store's continuation tokens.
    pub async fn list_page(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<KeyPage, S3Error> {
        let start = after.map(|after| past_folder(prefix, after));
        let (start_after, skip_to) = match start {
            Some(start) => match start.find(|c| !xml_char(c)) {
                Some(unsafe_at) => (Some(start[..unsafe_at].to_owned()), Some(start)),
                None => (Some(start), None),
            },
            None => (None, None),
        };
        let mut page = KeyPage::default();
        let mut entries = 0;
        let mut token: Option<String> = None;
        loop {
            let request = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .delimiter("/")
                .max_keys(i32::try_from(limit.max(1)).unwrap_or(i32::MAX))
                .set_start_after(start_after.clone().filter(|_| token.is_none()))
                .set_continuation_token(token.take())
                .encoding_type(aws_sdk_s3::types::EncodingType::Url);
            let response = self.sent(prefix, request.send()).await?;
            let mut objects = response.contents().iter().filter_map(summary).peekable();
            let mut folders = response
                .common_prefixes()
                .iter()
                .filter_map(|p| p.prefix().map(url_decoded))
                .peekable();
            // The answer's objects and folders, merged in key order, past the start.
            let past = |name: &str| skip_to.as_deref().is_none_or(|skip| name > skip);
            let mut full = false;
            loop {
                let object_first = match (objects.peek(), folders.peek()) {
                    (Some(o), Some(f)) => o.key < *f,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => break,
                };
                if entries == limit {
                    full = true;
                    break;
                }
                let name = if object_first {
                    let object = objects.next().expect("peeked");
                    let name = object.key.clone();
                    if past(&name) {
                        page.objects.push(object);
                    }
                    name
                } else {
                    let folder = folders.next().expect("peeked");
                    let name = folder.clone();
                    if past(&name) {
                        page.folders.push(folder);
                    }
                    name
                };
                if past(&name) {
                    entries += 1;
                    page.next_after = Some(name);
                }
            }
            let more = response.is_truncated() == Some(true);
            token = response.next_continuation_token().map(str::to_owned);
            if full || !more || token.is_none() {
                if !(full || more) {
                    page.next_after = None;
                }
                return Ok(page);
            }
            if entries == limit {
                return Ok(page);
            }
        }
    }

    /// Keys with multipart uploads started and neither completed nor aborted
    /// (their parts are stored, and billed, until then).
    pub async fn unfinished_uploads(&self, prefix: &str) -> Result<Vec<String>, S3Error> {
        let response = self
            .sent(
                prefix,
                self.client
                    .list_multipart_uploads()
                    .bucket(&self.bucket)
                    .prefix(prefix)
                    .send(),
            )
            .await?;
        Ok(response
            .uploads()
            .iter()
            .filter_map(|u| u.key().map(str::to_owned))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_resumes_past_every_key_of_a_folder_and_at_a_key() {
        // A key, and the prefix itself (an object named like its folder), are their own.
        assert_eq!(past_folder("logs/", "logs/a.csv"), "logs/a.csv");
        assert_eq!(past_folder("logs/", "logs/"), "logs/");
        for (prefix, folder) in [("", "a/"), ("logs/", "logs/2024/"), ("", &"x/".repeat(300)[..599])] {
            let folder = if folder.ends_with('/') {
                folder.to_owned()
            } else {
                format!("{folder}/")
            };
            let after = past_folder(prefix, &folder);
            assert!(after.len() <= MAX_KEY_BYTES, "{} bytes", after.len());
            assert!(after.starts_with(&folder));
            // Greater than the longest and greatest keys under the folder…
            let room = MAX_KEY_BYTES - folder.len();
            let greatest = |unit: char| {
                let mut key = folder.clone();
                while key.len() + unit.len_utf8() <= folder.len() + room {
                    key.push(unit);
                }
                key
            };
            for unit in ['\u{7F}', '\u{07FF}', '\u{FFFD}', '\u{10FFFF}', 'z'] {
                let key = greatest(unit);
                assert!(key.as_bytes() <= after.as_bytes(), "{unit:?} under {folder}");
            }
            // …and below the first key past it.
            let mut next = folder[..folder.len() - 1].to_owned();
            next.push('0');
            assert!(after.as_bytes() < next.as_bytes());
        }
    }
}
