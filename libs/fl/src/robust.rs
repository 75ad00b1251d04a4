//! Robust aggregation: rules that need every update of a round at once — the coordinate-wise
//! median, the trimmed mean (β of the values cut at each end) and (multi-)Krum (the m updates
//! closest to their n − f − 2 nearest neighbours, averaged). One party, or f of them, sending
//! arbitrary updates moves the result only within what the honest ones span.
//!
//! The updates stay where their caller keeps them (the coordinator: staged on disk, read by
//! range) and are read block by block: memory is the model plus one block per update, never
//! the updates themselves. Weights (sample counts) are not used: a party's claim about its
//! size is exactly what a robust rule must not trust.

use cohort_core::NamedTensor;

use crate::FlError;
use crate::aggregate::CheckedUpdate;

/// Elements of each update read at once.
const BLOCK: usize = 1 << 14;

/// How a round's updates become one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RobustRule {
    /// The coordinate-wise median (the mean of the two middle values for an even count).
    Median,
    /// The coordinate-wise mean of what is left when ⌊β·n⌋ values are cut at each end.
    TrimmedMean { beta: f64 },
    /// Multi-Krum: the `m` updates whose summed squared distances to their n − f − 2
    /// nearest neighbours are smallest, averaged (m = 1: Krum). Needs n ≥ 2f + 3 and
    /// m ≤ n − f.
    Krum { f: u32, m: u32 },
}

impl RobustRule {
    /// The fewest updates the rule can take: Krum's score needs n − f − 2 ≥ 1 neighbours
    /// and leaves m to choose from; the median and trimmed mean need one left after the cut.
    pub fn min_updates(self) -> usize {
        match self {
            // n − 2⌊βn⌋ ≥ 1 for every n ≥ 1 when β < 0.5.
            RobustRule::Median | RobustRule::TrimmedMean { .. } => 1,
            RobustRule::Krum { f, m } => (2 * f as usize + 3).max(m as usize + f as usize),
        }
    }
}

/// The new global model: `global` plus the rule's combination of `updates` (deltas, each
/// multiplied by its clipping scale). Refuses too few updates for the rule, and a result
/// that is not finite.
pub fn combine(
    global: &[NamedTensor],
    updates: &[CheckedUpdate],
    rule: RobustRule,
) -> Result<Vec<NamedTensor>, FlError> {
    let n = updates.len();
    if n == 0 {
        return Err(FlError::Empty);
    }
    if n < rule.min_updates() {
        return Err(FlError::Broken(format!(
            "{rule:?} needs at least {} updates, the round has {n}",
            rule.min_updates()
        )));
    }
    let combined = match rule {
        RobustRule::Median | RobustRule::TrimmedMean { .. } => {
            coordinate_wise(global, updates, rule)?
        }
        RobustRule::Krum { f, m } => {
            let chosen = krum_choice(global, updates, f as usize, m as usize)?;
            let picked: Vec<CheckedUpdate> = chosen.iter().map(|&i| updates[i].clone()).collect();
            mean_of(global, &picked)?
        }
    };
    for t in &combined {
        if !crate::wire::all_finite(&t.data) {
            return Err(FlError::NonFiniteAggregate {
                tensor: t.name.clone(),
            });
        }
    }
    Ok(combined)
}

/// Reads block `offset..offset + len` of tensor `t` of every update, scaled.
fn read_block(
    updates: &[CheckedUpdate],
    t: usize,
    offset: usize,
    len: usize,
    bufs: &mut [Vec<f32>],
) -> Result<(), FlError> {
    for (u, buf) in updates.iter().zip(bufs.iter_mut()) {
        buf.resize(len, 0.0);
        let mut scratch = vec![0.0f32; len];
        let values = u.values().read(t, offset, &mut scratch)?;
        let scale = u.scale() as f32;
        for (b, v) in buf.iter_mut().zip(values) {
            *b = v * scale;
        }
    }
    Ok(())
}

fn coordinate_wise(
    global: &[NamedTensor],
    updates: &[CheckedUpdate],
    rule: RobustRule,
) -> Result<Vec<NamedTensor>, FlError> {
    let n = updates.len();
    let cut = match rule {
        RobustRule::TrimmedMean { beta } => ((beta * n as f64).floor() as usize).min((n - 1) / 2),
        _ => 0,
    };
    let mut bufs: Vec<Vec<f32>> = vec![Vec::with_capacity(BLOCK); n];
    let mut column = vec![0.0f32; n];
    let mut out = Vec::with_capacity(global.len());
    for (t, g) in global.iter().enumerate() {
        let mut data = g.data.clone();
        for offset in (0..g.data.len()).step_by(BLOCK) {
            let len = BLOCK.min(g.data.len() - offset);
            read_block(updates, t, offset, len, &mut bufs)?;
            for j in 0..len {
                for (c, b) in column.iter_mut().zip(&bufs) {
                    *c = b[j];
                }
                column.sort_unstable_by(f32::total_cmp);
                let value = match rule {
                    RobustRule::Median => {
                        if n % 2 == 1 {
                            column[n / 2]
                        } else {
                            (column[n / 2 - 1] + column[n / 2]) / 2.0
                        }
                    }
                    _ => {
                        let kept = &column[cut..n - cut];
                        (kept.iter().map(|v| f64::from(*v)).sum::<f64>() / kept.len() as f64) as f32
                    }
                };
                data[offset + j] += value;
            }
        }
        out.push(NamedTensor {
            name: g.name.clone(),
            shape: g.shape.clone(),
            data,
        });
    }
    Ok(out)
}

/// The indices Multi-Krum picks: the `m` lowest scores, where an update's score is the sum
/// of its squared distances to its n − f − 2 nearest other updates. Ties go to the earlier.
pub fn krum_choice(
    global: &[NamedTensor],
    updates: &[CheckedUpdate],
    f: usize,
    m: usize,
) -> Result<Vec<usize>, FlError> {
    let n = updates.len();
    let mut dist = vec![vec![0.0f64; n]; n];
    let mut bufs: Vec<Vec<f32>> = vec![Vec::with_capacity(BLOCK); n];
    for (t, g) in global.iter().enumerate() {
        for offset in (0..g.data.len()).step_by(BLOCK) {
            let len = BLOCK.min(g.data.len() - offset);
            read_block(updates, t, offset, len, &mut bufs)?;
            for i in 0..n {
                for k in i + 1..n {
                    let d: f64 = bufs[i]
                        .iter()
                        .zip(&bufs[k])
                        .map(|(a, b)| f64::from(a - b).powi(2))
                        .sum();
                    dist[i][k] += d;
                    dist[k][i] += d;
                }
            }
        }
    }
    let neighbours = n.saturating_sub(f + 2).max(1);
    let mut scores: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let mut others: Vec<f64> = (0..n).filter(|&k| k != i).map(|k| dist[i][k]).collect();
            others.sort_unstable_by(f64::total_cmp);
            (others.iter().take(neighbours).sum(), i)
        })
        .collect();
    scores.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    Ok(scores.iter().take(m.max(1)).map(|(_, i)| *i).collect())
}

/// `global` plus the unweighted mean of `updates`.
fn mean_of(global: &[NamedTensor], updates: &[CheckedUpdate]) -> Result<Vec<NamedTensor>, FlError> {
    let n = updates.len() as f64;
    let mut bufs: Vec<Vec<f32>> = vec![Vec::with_capacity(BLOCK); updates.len()];
    let mut out = Vec::with_capacity(global.len());
    for (t, g) in global.iter().enumerate() {
        let mut data = g.data.clone();
        for offset in (0..g.data.len()).step_by(BLOCK) {
            let len = BLOCK.min(g.data.len() - offset);
            read_block(updates, t, offset, len, &mut bufs)?;
            for j in 0..len {
                let sum: f64 = bufs.iter().map(|b| f64::from(b[j])).sum();
                data[offset + j] += (sum / n) as f32;
            }
        }
        out.push(NamedTensor {
            name: g.name.clone(),
            shape: g.shape.clone(),
            data,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::aggregate::{AggregationRules, UpdateCheck};

    fn tensor(name: &str, data: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            shape: vec![data.len()],
            data,
        }
    }

    fn global() -> Arc<Vec<NamedTensor>> {
        Arc::new(vec![tensor("a", vec![1.0, 2.0]), tensor("b", vec![0.0])])
    }

    fn updates(deltas: &[[f32; 3]]) -> Vec<CheckedUpdate> {
        let check = UpdateCheck::new(global(), AggregationRules::default());
        deltas
            .iter()
            .map(|d| {
                check
                    .check(vec![tensor("a", vec![d[0], d[1]]), tensor("b", vec![d[2]])])
                    .expect("checked")
            })
            .collect()
    }

    fn flat(model: &[NamedTensor]) -> Vec<f32> {
        model.iter().flat_map(|t| t.data.clone()).collect()
    }

    #[test]
    fn the_median_and_the_trimmed_mean_ignore_an_outlier() {
        let honest = [[0.1, -0.1, 0.2], [0.2, -0.2, 0.1], [0.3, 0.0, 0.3]];
        let mut all = honest.to_vec();
        all.push([1000.0, -1000.0, 1000.0]);
        let ups = updates(&all);
        let median = combine(&global(), &ups, RobustRule::Median).expect("median");
        // Of four values the mean of the middle two.
        assert_eq!(flat(&median), vec![1.0 + 0.25, 2.0 - 0.15, 0.25]);
        let trimmed =
            combine(&global(), &ups, RobustRule::TrimmedMean { beta: 0.25 }).expect("trimmed");
        let want = [
            1.0 + (0.2 + 0.3) / 2.0,
            2.0 + (-0.2 - 0.1) / 2.0,
            (0.2 + 0.3) / 2.0,
        ];
        for (got, want) in flat(&trimmed).iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        // β = 0: the plain mean, outlier included.
        let mean = combine(&global(), &ups, RobustRule::TrimmedMean { beta: 0.0 }).expect("mean");
        assert!(flat(&mean)[0] > 200.0);
    }

    #[test]
    fn krum_picks_the_update_closest_to_its_neighbours() {
        let deltas = [
            [0.1, 0.1, 0.1],
            [0.12, 0.1, 0.09],
            [0.11, 0.09, 0.1],
            [0.1, 0.11, 0.12],
            [-50.0, 40.0, 9.0],
        ];
        let ups = updates(&deltas);
        let chosen = krum_choice(&global(), &ups, 1, 1).expect("krum");
        // Scores over n − f − 2 = 2 nearest: the third is nearest its two closest.
        let dist = |a: &[f32; 3], b: &[f32; 3]| -> f64 {
            a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
        };
        let scores: Vec<f64> = (0..5)
            .map(|i| {
                let mut d: Vec<f64> = (0..5)
                    .filter(|&k| k != i)
                    .map(|k| dist(&deltas[i], &deltas[k]))
                    .collect();
                d.sort_by(f64::total_cmp);
                d[..2].iter().sum()
            })
            .collect();
        let best = (0..5)
            .min_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .expect("a best");
        assert_eq!(chosen, vec![best]);
        let one = combine(&global(), &ups, RobustRule::Krum { f: 1, m: 1 }).expect("krum");
        let d = deltas[best];
        assert_eq!(flat(&one), vec![1.0 + d[0], 2.0 + d[1], d[2]]);
        // Multi-Krum averages the m best; the outlier is never among them.
        let three = krum_choice(&global(), &ups, 1, 3).expect("multi-krum");
        assert_eq!(three.len(), 3);
        assert!(!three.contains(&4), "{three:?}");
        let multi = combine(&global(), &ups, RobustRule::Krum { f: 1, m: 3 }).expect("multi");
        assert!(flat(&multi).iter().all(|v| v.abs() < 3.0), "{multi:?}");
    }

    #[test]
    fn too_few_updates_for_the_rule_are_refused() {
        let ups = updates(&[[0.0; 3], [0.1; 3], [0.2; 3], [0.3; 3]]);
        let err = combine(&global(), &ups, RobustRule::Krum { f: 1, m: 1 }).expect_err("n < 5");
        assert!(err.to_string().contains("at least 5"), "{err}");
        assert!(matches!(
            combine(&global(), &[], RobustRule::Median),
            Err(FlError::Empty)
        ));
    }

    #[test]
    fn blocks_cover_large_tensors_exactly() {
        let len = BLOCK * 2 + 7;
        let g = Arc::new(vec![tensor("w", vec![0.0; len])]);
        let check = UpdateCheck::new(g.clone(), AggregationRules::default());
        let ups: Vec<CheckedUpdate> = (0..3)
            .map(|k| {
                let data: Vec<f32> = (0..len)
                    .map(|i| (i % 97) as f32 * 0.001 + k as f32)
                    .collect();
                check.check(vec![tensor("w", data)]).expect("checked")
            })
            .collect();
        let median = combine(&g, &ups, RobustRule::Median).expect("median");
        for (i, v) in median[0].data.iter().enumerate() {
            let want = (i % 97) as f32 * 0.001 + 1.0;
            assert!((v - want).abs() < 1e-6, "{i}: {v} vs {want}");
        }
    }
}
