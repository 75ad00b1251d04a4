//! Deterministic dataset splits: train/test, IID and Dirichlet label-skew partitions.
//! Every function returns sorted index lists and gives the same answer for the same seed.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Gamma};

/// Redraws before [`partition_dirichlet`] falls back to moving samples.
const DIRICHLET_TRIES: usize = 100;

/// Sample indices of each class, classes in ascending order (stable iteration for seeding).
fn by_class(labels: &[u32]) -> BTreeMap<u32, Vec<usize>> {
    let mut classes: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        classes.entry(l).or_default().push(i);
    }
    classes
}

/// Stratified split: each class contributes `round(count × test_fraction)` samples to the test
/// set. Returns `(train, test)`; `test_fraction` is clamped to [0, 1].
pub fn split_train_test(labels: &[u32], test_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let fraction = if test_fraction.is_nan() {
        0.0
    } else {
        test_fraction.clamp(0.0, 1.0)
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (_, mut idx) in by_class(labels) {
        idx.shuffle(&mut rng);
        let k = ((idx.len() as f64) * fraction).round() as usize;
        test.extend_from_slice(&idx[..k]);
        train.extend_from_slice(&idx[k..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

/// Shuffles `0..n` and deals it into `parties` parts whose sizes differ by at most one.
pub fn partition_iid(n: usize, parties: usize, seed: u64) -> Vec<Vec<usize>> {
    if parties == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    let (base, extra) = (n / parties, n % parties);
    let mut out = Vec::with_capacity(parties);
    let mut start = 0;
    for p in 0..parties {
        let len = base + usize::from(p < extra);
        let mut part = idx[start..start + len].to_vec();
        part.sort_unstable();
        out.push(part);
        start += len;
    }
    out
}

/// Dirichlet(alpha) label skew: for each class, draws proportions ~ Dir(alpha) over the
/// parties and deals that class's samples accordingly. Small alpha gives each party few
/// classes; large alpha approaches IID.
///
/// Every party gets at least `max(min_per_party, 1)` samples (capped at `n / parties`):
/// the draw is repeated a bounded number of times, then samples are moved from the largest
/// party. `alpha` is clamped to [1e-3, 1e6] (NaN counts as 1).
pub fn partition_dirichlet(
    labels: &[u32],
    parties: usize,
    alpha: f64,
    min_per_party: usize,
    seed: u64,
) -> Vec<Vec<usize>> {
    if parties == 0 {
        return Vec::new();
    }
    let alpha = if alpha.is_nan() {
        1.0
    } else {
        alpha.clamp(1e-3, 1e6)
    };
    let min = min_per_party.max(1).min(labels.len() / parties);
    let classes = by_class(labels);
    let mut rng = StdRng::seed_from_u64(seed);
    // Dir(alpha) is a vector of independent Gamma(alpha, 1) draws, normalised.
    let gamma = Gamma::new(alpha, 1.0).ok();

    let mut parts = vec![Vec::new(); parties];
    for _ in 0..DIRICHLET_TRIES {
        parts = vec![Vec::new(); parties];
        for idx in classes.values() {
            let mut idx = idx.clone();
            idx.shuffle(&mut rng);
            let mut p: Vec<f64> = (0..parties)
                .map(|_| gamma.as_ref().map_or(1.0, |g| g.sample(&mut rng)))
                .collect();
            let sum: f64 = p.iter().sum();
            if sum > 0.0 && sum.is_finite() {
                p.iter_mut().for_each(|v| *v /= sum);
            } else {
                // Every draw underflowed (tiny alpha): the limit is one party taking all.
                let winner = rng.random_range(0..parties);
                p = (0..parties)
                    .map(|i| f64::from(u8::from(i == winner)))
                    .collect();
            }
            let mut start = 0;
            let mut cum = 0.0;
            for (party, share) in p.iter().enumerate() {
                cum += share;
                let end = if party + 1 == parties {
                    idx.len()
                } else {
                    ((cum * idx.len() as f64) as usize).clamp(start, idx.len())
                };
                parts[party].extend_from_slice(&idx[start..end]);
                start = end;
            }
        }
        if parts.iter().all(|p| p.len() >= min) {
            break;
        }
    }

    // Fallback: top up small parties from the largest one.
    while let Some(small) = parts.iter().position(|p| p.len() < min) {
        let Some(largest) = (0..parties).max_by_key(|&i| (parts[i].len(), usize::MAX - i)) else {
            break;
        };
        if parts[largest].len() <= min {
            break; // cannot happen while min ≤ n / parties; guards against looping forever
        }
        if let Some(moved) = parts[largest].pop() {
            parts[small].push(moved);
        }
    }
    for p in &mut parts {
        p.sort_unstable();
    }
    parts
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn labels(n: usize, classes: u32) -> Vec<u32> {
        (0..n).map(|i| (i as u32 * 7) % classes).collect()
    }

    fn assert_covers(parts: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn split_is_stratified_and_deterministic() {
        let y = labels(1000, 10);
        let (train, test) = split_train_test(&y, 0.2, 7);
        assert_covers(&[train.clone(), test.clone()], 1000);
        assert_eq!(test.len(), 200);
        for c in 0..10 {
            let in_test = test.iter().filter(|&&i| y[i] == c).count();
            assert_eq!(in_test, 20, "class {c}");
        }
        assert_eq!(split_train_test(&y, 0.2, 7), (train.clone(), test));
        assert_ne!(split_train_test(&y, 0.2, 8).0, train);
    }

    #[test]
    fn iid_covers_everything_evenly() {
        let parts = partition_iid(103, 4, 1);
        assert_covers(&parts, 103);
        let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![26, 26, 26, 25]);
        assert_eq!(partition_iid(103, 4, 1), parts);
        assert_ne!(partition_iid(103, 4, 2), parts);
        assert!(partition_iid(5, 0, 1).is_empty());
    }

    #[test]
    fn dirichlet_is_skewed_complete_and_has_no_empty_party() {
        let y = labels(1800, 10);
        let parts = partition_dirichlet(&y, 10, 0.1, 10, 3);
        assert_covers(&parts, 1800);
        assert_eq!(partition_dirichlet(&y, 10, 0.1, 10, 3), parts);
        assert_ne!(partition_dirichlet(&y, 10, 0.1, 10, 4), parts);
        let mut best_share: f64 = 0.0;
        for p in &parts {
            assert!(p.len() >= 10, "party of {} samples", p.len());
            let mut counts = [0usize; 10];
            p.iter().for_each(|&i| counts[y[i] as usize] += 1);
            let majority = counts.iter().copied().max().unwrap_or(0);
            best_share = best_share.max(majority as f64 / p.len() as f64);
        }
        assert!(best_share > 0.5, "max majority share {best_share}");
    }

    #[test]
    fn dirichlet_fallback_fills_every_party() {
        // 2 classes over 8 parties at tiny alpha: redraws alone rarely satisfy min 20.
        let y = labels(200, 2);
        let parts = partition_dirichlet(&y, 8, 0.001, 20, 5);
        assert_covers(&parts, 200);
        assert!(
            parts.iter().all(|p| p.len() >= 20),
            "{:?}",
            parts.iter().map(Vec::len).collect::<Vec<_>>()
        );
        // More parties than samples: everything still dealt, no panic.
        let parts = partition_dirichlet(&[0, 1, 0], 5, 0.5, 1, 5);
        assert_covers(&parts, 3);
    }
}
