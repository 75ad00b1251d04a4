//! Model weights as plain data, shared by training, aggregation and the wire.

/// One named f32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl NamedTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Total number of elements in a set of tensors.
pub fn total_elements(tensors: &[NamedTensor]) -> usize {
    tensors.iter().map(|t| t.data.len()).sum()
}
