//! Keys seen at one reading after another, with when each was first seen: those seen for long
//! enough are overdue. The collector's reclaim of closed sockets' entries and the deletion of
//! entries that never got their key both age their candidates this way.

use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

/// Candidates of the last reading, by key, and since when each has been one.
#[derive(Debug)]
pub struct Aging<K> {
    since: HashMap<K, Instant>,
}

impl<K> Default for Aging<K> {
    fn default() -> Self {
        Self {
            since: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq> Aging<K> {
    /// This reading's candidates (`items`, at time `at`), split into those that have been
    /// candidates for `after` or longer and the rest, which are remembered; a key missing from
    /// `items` is forgotten (it stopped being a candidate).
    pub fn split<T>(
        &mut self,
        items: Vec<T>,
        key: impl Fn(&T) -> K,
        at: Instant,
        after: Duration,
    ) -> (Vec<T>, Vec<T>) {
        let mut since = HashMap::with_capacity(items.len());
        let (mut overdue, mut kept) = (Vec::new(), Vec::new());
        for item in items {
            let k = key(&item);
            let first = self.since.get(&k).copied().unwrap_or(at);
            if at.duration_since(first) >= after {
                overdue.push(item);
            } else {
                since.insert(k, first);
                kept.push(item);
            }
        }
        self.since = since;
        (overdue, kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidate_for_long_is_overdue_and_a_new_one_is_kept() {
        let after = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut aging = Aging::default();
        assert_eq!(
            aging.split(vec![1, 2], |k| *k, t0, after),
            (vec![], vec![1, 2])
        );
        // Another reading right after (readers are concurrent) makes nothing overdue.
        assert_eq!(
            aging.split(vec![1, 2], |k| *k, t0, after),
            (vec![], vec![1, 2])
        );
        // 1 stopped being a candidate; 2 did not; 3 is new.
        let t1 = t0 + after;
        assert_eq!(
            aging.split(vec![2, 3], |k| *k, t1, after),
            (vec![2], vec![3])
        );
        // 1 comes back: its clock starts again.
        assert_eq!(
            aging.split(vec![1, 3], |k| *k, t1, after),
            (vec![], vec![1, 3])
        );
    }
}
