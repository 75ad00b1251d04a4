//! Per-tensor state buffers of a server strategy (momentum, moments, control variates),
//! laid out as the model and named `<prefix><tensor name>` in checkpoints.

use cohort_core::NamedTensor;

use crate::FlError;

/// One buffer per model tensor, named `<prefix><tensor name>` in checkpoints.
#[derive(Debug, Clone)]
pub(crate) struct Buffers {
    prefix: &'static str,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    pub(crate) data: Vec<Vec<f32>>,
}

impl Buffers {
    /// Every buffer `value`, shaped as `model`'s tensors.
    pub(crate) fn filled(model: &[NamedTensor], prefix: &'static str, value: f32) -> Self {
        Buffers {
            prefix,
            names: model.iter().map(|t| t.name.clone()).collect(),
            shapes: model.iter().map(|t| t.shape.clone()).collect(),
            data: model.iter().map(|t| vec![value; t.data.len()]).collect(),
        }
    }

    pub(crate) fn zeros(model: &[NamedTensor], prefix: &'static str) -> Self {
        Buffers::filled(model, prefix, 0.0)
    }

    pub(crate) fn to_tensors(&self) -> Vec<NamedTensor> {
        self.names
            .iter()
            .zip(&self.shapes)
            .zip(&self.data)
            .map(|((name, shape), data)| NamedTensor {
                name: format!("{}{name}", self.prefix),
                shape: shape.clone(),
                data: data.clone(),
            })
            .collect()
    }

    /// Takes every buffer from `state` (by name), all or none.
    pub(crate) fn restore(&mut self, state: &[NamedTensor]) -> Result<(), FlError> {
        self.data = self.read(state)?;
        Ok(())
    }

    /// Every buffer's values in `state` (by name), checked against this layout.
    pub(crate) fn read(&self, state: &[NamedTensor]) -> Result<Vec<Vec<f32>>, FlError> {
        let mut restored = Vec::with_capacity(self.names.len());
        for (i, name) in self.names.iter().enumerate() {
            let name = format!("{}{name}", self.prefix);
            let t = state.iter().find(|t| t.name == name).ok_or_else(|| {
                FlError::LayoutMismatch(format!("server state: tensor {name:?} is missing"))
            })?;
            if t.shape != self.shapes[i] || t.data.len() != self.data[i].len() {
                return Err(FlError::LayoutMismatch(format!(
                    "server state: tensor {name:?} has shape {:?}, the model's is {:?}",
                    t.shape, self.shapes[i]
                )));
            }
            if !crate::wire::all_finite(&t.data) {
                return Err(FlError::NonFinite { tensor: name });
            }
            restored.push(t.data.clone());
        }
        Ok(restored)
    }

    pub(crate) fn check_layout(&self, tensors: &[NamedTensor], what: &str) -> Result<(), FlError> {
        let same = tensors.len() == self.names.len()
            && tensors
                .iter()
                .zip(&self.names)
                .zip(&self.data)
                .all(|((t, name), d)| t.name.ends_with(name.as_str()) && t.data.len() == d.len());
        if same {
            Ok(())
        } else {
            Err(FlError::LayoutMismatch(format!(
                "{what} is not laid out as the server's model"
            )))
        }
    }
}
