//! Streaming aggregation: each update is folded into a running sum as it
//! arrives, so memory is O(model) whatever the number of parties.

use cohort_core::NamedTensor;

use crate::FlError;
use crate::wire::Layout;

/// FedAvg over updates (deltas from the global model) weighted by sample count.
pub struct FedAvg {
    layout: Layout,
    sum: Vec<Vec<f64>>,
    total_weight: f64,
    updates: u32,
}

impl FedAvg {
    pub fn new(global: &[NamedTensor]) -> Self {
        Self {
            layout: Layout::of(global),
            sum: global.iter().map(|t| vec![0.0; t.data.len()]).collect(),
            total_weight: 0.0,
            updates: 0,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn updates(&self) -> u32 {
        self.updates
    }

    /// Adds `samples × delta`. The delta must have the global model's layout
    /// (any tensor order).
    pub fn fold(&mut self, delta: &[NamedTensor], samples: u64) -> Result<(), FlError> {
        if samples == 0 {
            return Err(FlError::ZeroWeight(samples));
        }
        if delta.len() != self.layout.tensors.len() {
            return Err(FlError::LayoutMismatch(format!(
                "{} tensors, expected {}",
                delta.len(),
                self.layout.tensors.len()
            )));
        }
        // Check everything before touching the sum: a bad update changes nothing.
        let mut order = Vec::with_capacity(delta.len());
        for (name, shape) in &self.layout.tensors {
            let t = delta
                .iter()
                .find(|t| &t.name == name)
                .ok_or_else(|| FlError::LayoutMismatch(format!("tensor {name:?} is missing")))?;
            if &t.shape != shape || t.data.len() != t.numel() {
                return Err(FlError::LayoutMismatch(format!(
                    "tensor {name:?} has shape {:?}, expected {shape:?}",
                    t.shape
                )));
            }
            if t.data.iter().any(|v| !v.is_finite()) {
                return Err(FlError::NonFinite {
                    tensor: name.clone(),
                });
            }
            order.push(t);
        }
        let w = samples as f64;
        for (acc, t) in self.sum.iter_mut().zip(order) {
            for (a, v) in acc.iter_mut().zip(&t.data) {
                *a += w * f64::from(*v);
            }
        }
        self.total_weight += w;
        self.updates += 1;
        Ok(())
    }

    /// The new global model: `global + Σ wᵢ·deltaᵢ / Σ wᵢ`.
    pub fn apply(&self, global: &[NamedTensor]) -> Result<Vec<NamedTensor>, FlError> {
        if self.updates == 0 {
            return Err(FlError::Empty);
        }
        if Layout::of(global) != self.layout {
            return Err(FlError::LayoutMismatch("global model changed".into()));
        }
        Ok(global
            .iter()
            .zip(&self.sum)
            .map(|(g, acc)| NamedTensor {
                name: g.name.clone(),
                shape: g.shape.clone(),
                data: g
                    .data
                    .iter()
                    .zip(acc)
                    .map(|(x, s)| (f64::from(*x) + s / self.total_weight) as f32)
                    .collect(),
            })
            .collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn t(name: &str, data: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            shape: vec![data.len()],
            data,
        }
    }

    #[test]
    fn weighted_average_of_deltas() {
        let global = vec![t("w", vec![1.0, 1.0]), t("b", vec![0.0])];
        let mut agg = FedAvg::new(&global);
        agg.fold(&[t("w", vec![1.0, 0.0]), t("b", vec![3.0])], 1)
            .unwrap();
        // Order of tensors in an update does not matter.
        agg.fold(&[t("b", vec![0.0]), t("w", vec![-1.0, 4.0])], 3)
            .unwrap();
        let new = agg.apply(&global).unwrap();
        assert_eq!(new[0].data, vec![1.0 + (1.0 - 3.0) / 4.0, 1.0 + 12.0 / 4.0]);
        assert_eq!(new[1].data, vec![0.75]);
        assert_eq!(agg.updates(), 2);
    }

    #[test]
    fn bad_updates_change_nothing() {
        let global = vec![t("w", vec![1.0, 1.0])];
        let mut agg = FedAvg::new(&global);
        assert!(agg.apply(&global).is_err(), "nothing folded yet");
        assert!(agg.fold(&[t("w", vec![1.0])], 1).is_err());
        assert!(agg.fold(&[t("v", vec![1.0, 2.0])], 1).is_err());
        assert!(agg.fold(&[t("w", vec![f32::INFINITY, 2.0])], 1).is_err());
        assert!(agg.fold(&[t("w", vec![1.0, 2.0])], 0).is_err());
        agg.fold(&[t("w", vec![2.0, 2.0])], 5).unwrap();
        assert_eq!(agg.apply(&global).unwrap()[0].data, vec![3.0, 3.0]);
    }
}
