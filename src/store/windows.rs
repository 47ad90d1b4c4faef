//! Reading the store in due order across both segment tiers, for listing.

use super::{
    BUCKET_MS, FAR_BUCKET_MS, RawSegment, SegmentKey, Store, StoreError, Tier, bucket_of,
    far_bucket_of,
};
use crate::time::UnixMs;

/// The segments holding every schedule due in `start..end` (see [`Store::windows_from`]).
pub struct Window {
    pub start: UnixMs,
    pub end: UnixMs,
    /// The encoded segments, each with its key (which names it if it turns out corrupt).
    pub segments: Vec<(SegmentKey, RawSegment)>,
}

impl Store {
    /// Every stored schedule due at or after `due`, as the encoded segments of consecutive
    /// time windows (in time order) that together hold every schedule due in the window:
    /// a fine bucket, or a far bucket together with the fine buckets it spans. Nothing is
    /// decoded (see [`super::segment::entries`]), and it is read lazily: a caller that stops early
    /// pays only for what it took. (A window may also hold schedules due before `due`.)
    pub fn windows_from(
        &self,
        due: UnixMs,
    ) -> impl Iterator<Item = Result<Window, StoreError>> + use<> {
        let mut fine = self
            .buckets(SegmentKey::start_of(bucket_of(due)))
            .peekable();
        let mut far = self
            .buckets(SegmentKey::far(far_bucket_of(due), 0))
            .peekable();
        fn start(next: Option<&Result<Window, StoreError>>) -> Option<UnixMs> {
            match next {
                Some(Ok(window)) => Some(window.start),
                Some(Err(_)) | None => None,
            }
        }
        std::iter::from_fn(move || {
            // Errors come out first, in whichever iterator they are.
            if matches!(fine.peek(), Some(Err(_))) {
                return fine.next();
            }
            if matches!(far.peek(), Some(Err(_))) {
                return far.next();
            }
            match (start(fine.peek()), start(far.peek())) {
                (None, None) => None,
                (Some(f), c) if c.is_none_or(|c| f < c) => fine.next(),
                _ => {
                    let Some(Ok(mut window)) = far.next() else {
                        unreachable!("peeked a far window")
                    };
                    window.end = window.start.saturating_add(FAR_BUCKET_MS);
                    while start(fine.peek()).is_some_and(|f| f < window.end) {
                        let Some(Ok(inner)) = fine.next() else {
                            unreachable!("peeked a fine window")
                        };
                        window.segments.extend(inner.segments);
                    }
                    Some(Ok(window))
                }
            }
        })
    }

    /// The segments of `from`'s tier from `from` on, one bucket at a time, lazily.
    fn buckets(
        &self,
        from: SegmentKey,
    ) -> impl Iterator<Item = Result<Window, StoreError>> + use<> {
        let width = match from.tier {
            Tier::Far => FAR_BUCKET_MS,
            Tier::Fine => BUCKET_MS,
        };
        let last = SegmentKey {
            bucket: UnixMs::MAX,
            seq: u64::MAX,
            ..from
        };
        let (mut range, mut failed) = match self.db() {
            Ok(db) => (
                Some(db.range(from.to_bytes()..=last.to_bytes()).peekable()),
                None,
            ),
            Err(err) => (None, Some(err)),
        };
        std::iter::from_fn(move || {
            if let Some(err) = failed.take() {
                return Some(Err(err));
            }
            let range = range.as_mut()?;
            let mut current: Option<Window> = None;
            loop {
                let next_bucket = match range.peek() {
                    Some(Ok((key, _))) => SegmentKey::from_bytes(key).map(|k| k.bucket),
                    Some(Err(_)) => {
                        let err = range.next().expect("peeked").expect_err("peeked an error");
                        return Some(Err(err.into()));
                    }
                    None => None,
                };
                match (next_bucket, &current) {
                    // Past the segment keys, or on to the next bucket: this one is done.
                    (None, _) => return current.map(Ok),
                    (Some(b), Some(c)) if b != c.start => return current.map(Ok),
                    _ => {}
                }
                let (key, value) = range.next().expect("peeked").expect("peeked ok");
                let key = SegmentKey::from_bytes(&key).expect("checked above");
                current
                    .get_or_insert_with(|| Window {
                        start: key.bucket,
                        end: key.bucket.saturating_add(width),
                        segments: Vec::new(),
                    })
                    .segments
                    .push((key, RawSegment(value)));
            }
        })
    }
}
