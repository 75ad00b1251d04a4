//! The synthetic workload (`model.arch: synthetic`, `cohort bench`): a model of `params`
//! float32 parameters in `layers` tensors, starting from zeros, and the update party `c`
//! (0-based) sends in round `r` (1-based): at element `k` of layer `l`,
//! `1e-3 * ((((k % 1024) * 7 + c * 13 + r * 31 + l * 17) % 1024) / 1024 - 0.5)`, weighed
//! `100 + c`. It moves real bytes through the real federation without training, and its
//! exact average is known, so the aggregate can be checked.

use cohort_core::NamedTensor;
use cohort_proto::v1::TensorChunk;

/// The shape of a synthetic model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticModel {
    pub params: u64,
    pub layers: u32,
}

impl SyntheticModel {
    /// Element counts of the tensors: `params / layers` each, the last taking the
    /// remainder (fewer tensors when there are fewer parameters than layers).
    pub fn sizes(&self) -> Vec<usize> {
        let layers = u64::from(self.layers.max(1)).min(self.params.max(1));
        let each = self.params / layers;
        (0..layers)
            .map(|l| {
                let n = if l + 1 == layers {
                    self.params - each * (layers - 1)
                } else {
                    each
                };
                usize::try_from(n).unwrap_or(usize::MAX)
            })
            .collect()
    }

    /// Tensor names sort in layer order (the order models are stored in).
    pub fn tensor_name(layer: usize) -> String {
        format!("layer{layer:04}")
    }

    /// The starting model: every parameter zero.
    pub fn zeros(&self) -> Vec<NamedTensor> {
        self.sizes()
            .iter()
            .enumerate()
            .map(|(l, &n)| NamedTensor {
                name: Self::tensor_name(l),
                shape: vec![n],
                data: vec![0.0; n],
            })
            .collect()
    }

    /// The synthetic model a job's `model` section describes, if it describes one.
    pub fn of(spec: &cohort_core::spec::ModelSpec) -> Option<SyntheticModel> {
        spec.synthetic()
            .map(|(params, layers)| SyntheticModel { params, layers })
    }

    /// Does `tensors` have this model's layout?
    pub fn fits(&self, tensors: &[NamedTensor]) -> bool {
        let sizes = self.sizes();
        tensors.len() == sizes.len()
            && tensors
                .iter()
                .zip(sizes.iter().enumerate())
                .all(|(t, (l, &n))| t.name == Self::tensor_name(l) && t.shape == [n])
    }

    /// Party `party`'s update of round `round`, whole (secure aggregation masks it whole).
    pub fn update(&self, party: u64, round: u64) -> Vec<NamedTensor> {
        self.sizes()
            .into_iter()
            .enumerate()
            .map(|(layer, n)| NamedTensor {
                name: Self::tensor_name(layer),
                shape: vec![n],
                data: (0..n as u64)
                    .map(|k| delta(k, party, round, layer as u64))
                    .collect(),
            })
            .collect()
    }

    /// Party `party`'s update of round `round` as wire chunks of at most `chunk_bytes`,
    /// made as they are taken: the update is never whole in memory.
    pub fn update_chunks(
        &self,
        party: u64,
        round: u64,
        chunk_bytes: usize,
    ) -> impl Iterator<Item = TensorChunk> + Send + use<> {
        let per_chunk = (chunk_bytes / 4).max(1);
        self.sizes()
            .into_iter()
            .enumerate()
            .flat_map(move |(layer, n)| {
                let pieces = n.div_ceil(per_chunk).max(1);
                // The update repeats every 1024 elements: made once per tensor, then copied.
                let period: Vec<f32> = (0..PERIOD as u64)
                    .map(|k| delta(k, party, round, layer as u64))
                    .collect();
                (0..pieces).map(move |i| {
                    let start = i * per_chunk;
                    let end = (start + per_chunk).min(n);
                    let mut data = Vec::with_capacity((end - start) * 4);
                    let mut k = start;
                    while k < end {
                        let from = k % PERIOD;
                        let take = (PERIOD - from).min(end - k);
                        crate::wire::extend_le_bytes(&mut data, &period[from..from + take]);
                        k += take;
                    }
                    crate::wire::tensor_chunk(&Self::tensor_name(layer), &[n], start, data.into())
                })
            })
    }

    /// The largest difference between `model` and the exact result of `rounds` rounds of
    /// FedAvg from zeros over parties `0..parties`, each weighed `weight(c)`: computed in
    /// f64 apart from any fold. The expected value depends only on (layer, k mod 1024).
    /// A model of another layout is infinitely wrong.
    pub fn max_abs_error(&self, model: &[NamedTensor], parties: u64, rounds: u64) -> f64 {
        self.max_abs_error_weighted(model, parties, rounds, weight)
    }

    /// [`SyntheticModel::max_abs_error`] against the mean with every party weighing the same:
    /// what secure aggregation computes (its masked sum has no weights).
    pub fn max_abs_error_equal_weights(
        &self,
        model: &[NamedTensor],
        parties: u64,
        rounds: u64,
    ) -> f64 {
        self.max_abs_error_weighted(model, parties, rounds, |_| 1)
    }

    fn max_abs_error_weighted(
        &self,
        model: &[NamedTensor],
        parties: u64,
        rounds: u64,
        weight: impl Fn(u64) -> u64,
    ) -> f64 {
        if !self.fits(model) {
            return f64::INFINITY;
        }
        let total: f64 = (0..parties).map(|c| weight(c) as f64).sum();
        let mut worst = 0.0f64;
        for (layer, t) in model.iter().enumerate() {
            let expected: Vec<f64> = (0..1024u64)
                .map(|k| {
                    (1..=rounds)
                        .map(|r| {
                            (0..parties)
                                .map(|c| weight(c) as f64 * f64::from(delta(k, c, r, layer as u64)))
                                .sum::<f64>()
                                / total
                        })
                        .sum()
                })
                .collect();
            for (k, v) in t.data.iter().enumerate() {
                worst = worst.max((f64::from(*v) - expected[k % 1024]).abs());
            }
        }
        worst
    }
}

/// The update's period in elements.
const PERIOD: usize = 1024;

/// Party `party`'s (0-based) update in round `round` (1-based) at element `k` of layer
/// `layer`: small values in [-5e-4, 5e-4).
pub fn delta(k: u64, party: u64, round: u64, layer: u64) -> f32 {
    let step = ((k % 1024) * 7 + party * 13 + round * 31 + layer * 17) % 1024;
    (1e-3 * (step as f64 / 1024.0 - 0.5)) as f32
}

/// The weight of party `party`'s update.
pub fn weight(party: u64) -> u64 {
    100 + party
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{AggregationRules, FedAvg, TensorAssembler};

    fn model(params: u64, layers: u32) -> SyntheticModel {
        SyntheticModel { params, layers }
    }

    #[test]
    fn layers_split_the_parameters_the_last_taking_the_remainder() {
        assert_eq!(model(10, 4).sizes(), vec![2, 2, 2, 4]);
        assert_eq!(model(3, 4).sizes(), vec![1, 1, 1]);
        assert_eq!(model(25_000_000, 4).sizes(), vec![6_250_000; 4]);
        let z = model(10, 4).zeros();
        assert!(model(10, 4).fits(&z));
        assert!(!model(11, 4).fits(&z));
    }

    #[test]
    fn chunks_carry_the_update_in_order() {
        let m = model(3000, 3);
        let mut asm = TensorAssembler::new(None, 3000);
        for c in m.update_chunks(2, 5, 400) {
            assert!(c.data.len() <= 400);
            asm.push(c).unwrap();
        }
        let update = asm.finish().unwrap();
        assert!(m.fits(&update));
        assert_eq!(update[1].data[7], delta(7, 2, 5, 1));
        assert_eq!(update[2].data[900], delta(900, 2, 5, 2));
    }

    #[test]
    fn the_error_is_measured_against_the_exact_average_over_rounds() {
        let m = model(5000, 3);
        let mut global = m.zeros();
        for round in 1..=2 {
            let mut fedavg = FedAvg::new(std::sync::Arc::new(global), AggregationRules::default());
            for party in 0..3 {
                let mut asm = TensorAssembler::new(None, 5000);
                for c in m.update_chunks(party, round, 1 << 12) {
                    asm.push(c).unwrap();
                }
                fedavg.fold(&asm.finish().unwrap(), weight(party)).unwrap();
            }
            global = fedavg.finish().unwrap();
        }
        assert!(m.max_abs_error(&global, 3, 2) < 1e-7);
        // A wrong element, one round too few, or another cohort is seen.
        assert!(m.max_abs_error(&global, 3, 1) > 1e-5);
        assert!(m.max_abs_error(&global, 2, 2) > 1e-6);
        global[1].data[7] += 1e-4;
        assert!(m.max_abs_error(&global, 3, 2) > 9e-5);
        assert!(m.max_abs_error(&global[..2], 3, 2).is_infinite());
    }
}
