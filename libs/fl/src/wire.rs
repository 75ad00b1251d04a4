//! Tensors on the wire (`TensorChunk`) and in files (safetensors).

use std::collections::HashMap;
use std::sync::Arc;

use cohort_core::NamedTensor;
use cohort_proto::v1::TensorChunk;

use crate::FlError;

/// Splits tensors into chunks of at most `chunk_bytes` bytes of data each.
pub fn chunk_tensors(
    tensors: &[NamedTensor],
    chunk_bytes: usize,
) -> impl Iterator<Item = TensorChunk> + '_ {
    let per_chunk = (chunk_bytes / 4).max(1);
    tensors
        .iter()
        .flat_map(move |t| (0..pieces(t, per_chunk)).map(move |i| chunk_of(t, i, per_chunk)))
}

/// [`chunk_tensors`] over shared tensors: the chunks are made as they are taken, and the
/// iterator may outlive the caller (a stream sent in the background). On little-endian
/// machines a chunk's bytes are the tensor's own memory, shared, not a copy: every party's
/// fetch of one global model sends from the same memory.
pub fn chunk_tensors_shared(
    tensors: Arc<Vec<NamedTensor>>,
    chunk_bytes: usize,
) -> impl Iterator<Item = TensorChunk> + Send + 'static {
    let per_chunk = (chunk_bytes / 4).max(1);
    let places: Vec<(usize, usize)> = tensors
        .iter()
        .enumerate()
        .flat_map(|(ti, t)| (0..pieces(t, per_chunk)).map(move |i| (ti, i)))
        .collect();
    places.into_iter().map(move |(ti, i)| {
        let t = &tensors[ti];
        let (start, end) = chunk_range(t, i, per_chunk);
        tensor_chunk(
            &t.name,
            &t.shape,
            start,
            shared_le_bytes(&tensors, ti, start, end),
        )
    })
}

/// Elements `start..end` of tensor `tensor` as little-endian bytes: on little-endian
/// machines the tensor's own memory, shared (it stays alive as long as the bytes do), else
/// a copy.
fn shared_le_bytes(
    tensors: &Arc<Vec<NamedTensor>>,
    tensor: usize,
    start: usize,
    end: usize,
) -> bytes::Bytes {
    if cfg!(target_endian = "little") {
        bytes::Bytes::from_owner(SharedValues {
            tensors: tensors.clone(),
            tensor,
            start,
            end,
        })
    } else {
        le_bytes(&tensors[tensor].data[start..end]).into()
    }
}

/// Elements `start..end` of one of `tensors`, as the bytes of their memory (little-endian
/// machines only).
struct SharedValues {
    tensors: Arc<Vec<NamedTensor>>,
    tensor: usize,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for SharedValues {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.tensors[self.tensor].data[self.start..self.end])
    }
}

fn pieces(t: &NamedTensor, per_chunk: usize) -> usize {
    t.data.len().div_ceil(per_chunk).max(1)
}

/// Appends `values` to `out` as little-endian bytes (one copy on little-endian machines).
pub fn extend_le_bytes(out: &mut Vec<u8>, values: &[f32]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Appends the f32 values of little-endian `bytes` (a whole number of f32) to `out`.
pub fn extend_from_le_bytes(out: &mut Vec<f32>, bytes: &[u8]) {
    let start = out.len();
    out.resize(start + bytes.len() / 4, 0.0);
    let dest = &mut out[start..];
    if cfg!(target_endian = "little") {
        let len = dest.len() * 4;
        bytemuck::cast_slice_mut::<f32, u8>(dest).copy_from_slice(&bytes[..len]);
    } else {
        for (d, b) in dest.iter_mut().zip(bytes.chunks_exact(4)) {
            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
}

/// Fills `values` from little-endian bytes that `fill` writes into the values' own memory
/// (no copy on little-endian machines).
pub fn fill_from_le<E>(
    values: &mut [f32],
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<(), E> {
    fill(bytemuck::cast_slice_mut(values))?;
    if cfg!(target_endian = "big") {
        for v in values.iter_mut() {
            *v = f32::from_bits(u32::from_le(v.to_bits()));
        }
    }
    Ok(())
}

/// `values` as a new vector of little-endian bytes.
pub fn le_bytes(values: &[f32]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    extend_le_bytes(&mut bytes, values);
    bytes
}

/// The elements `start..end` of chunk `i` of `t`.
fn chunk_range(t: &NamedTensor, i: usize, per_chunk: usize) -> (usize, usize) {
    let start = (i * per_chunk).min(t.data.len());
    (start, (start + per_chunk).min(t.data.len()))
}

/// Chunk `i` of `t`: its shape and dtype ride on the first.
fn chunk_of(t: &NamedTensor, i: usize, per_chunk: usize) -> TensorChunk {
    let (start, end) = chunk_range(t, i, per_chunk);
    tensor_chunk(
        &t.name,
        &t.shape,
        start,
        le_bytes(&t.data[start..end]).into(),
    )
}

/// The chunk of tensor `name` (of `shape`) holding `data` from element `offset`: the shape
/// and dtype ride on a tensor's first chunk only.
pub fn tensor_chunk(name: &str, shape: &[usize], offset: usize, data: bytes::Bytes) -> TensorChunk {
    let first = offset == 0;
    TensorChunk {
        tensor: name.to_string(),
        dtype: if first { "f32".into() } else { String::new() },
        shape: if first {
            shape.iter().map(|&d| d as u64).collect()
        } else {
            Vec::new()
        },
        offset: offset as u64,
        data,
    }
}

/// A chunk carries a whole number of f32 values.
pub(crate) fn check_whole_f32(chunk: &TensorChunk) -> Result<(), FlError> {
    if chunk.data.len().is_multiple_of(4) {
        return Ok(());
    }
    Err(FlError::BadChunk {
        tensor: chunk.tensor.clone(),
        message: format!(
            "{} data bytes is not a whole number of f32",
            chunk.data.len()
        ),
    })
}

/// A tensor's first chunk starts at offset 0 and says its dtype, f32.
pub(crate) fn check_first_chunk(chunk: &TensorChunk) -> Result<(), FlError> {
    let bad = |message: String| FlError::BadChunk {
        tensor: chunk.tensor.clone(),
        message,
    };
    if chunk.offset != 0 {
        return Err(bad(format!(
            "first chunk at offset {}, expected 0",
            chunk.offset
        )));
    }
    if chunk.dtype != "f32" {
        return Err(bad(format!(
            "dtype {:?} is not supported (f32 only)",
            chunk.dtype
        )));
    }
    Ok(())
}

/// Are all values finite? Branch-free, so it vectorises.
pub fn all_finite(values: &[f32]) -> bool {
    values.iter().fold(true, |ok, v| ok & v.is_finite())
}

/// The expected names and shapes of a set of tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub tensors: Vec<(String, Vec<usize>)>,
}

impl Layout {
    pub fn of(tensors: &[NamedTensor]) -> Layout {
        Layout {
            tensors: tensors
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect(),
        }
    }
}

/// Rebuilds tensors from chunks, checking order, sizes and (optionally) that
/// they match an expected layout, so a malformed stream is refused early.
pub struct TensorAssembler {
    expected: Option<HashMap<String, Vec<usize>>>,
    max_elements: usize,
    total_elements: usize,
    done: Vec<NamedTensor>,
    current: Option<NamedTensor>,
}

impl TensorAssembler {
    /// `max_elements` bounds what a peer can make us allocate.
    pub fn new(expected: Option<&Layout>, max_elements: usize) -> Self {
        Self {
            expected: expected.map(|l| l.tensors.iter().cloned().collect()),
            max_elements,
            total_elements: 0,
            done: Vec::new(),
            current: None,
        }
    }

    pub fn push(&mut self, chunk: TensorChunk) -> Result<(), FlError> {
        let bad = |m: String| FlError::BadChunk {
            tensor: chunk.tensor.clone(),
            message: m,
        };
        check_whole_f32(&chunk)?;
        let starts_new = self.current.as_ref().is_none_or(|c| c.name != chunk.tensor);
        if starts_new {
            self.finish_current()?;
            check_first_chunk(&chunk)?;
            if self.done.iter().any(|t| t.name == chunk.tensor) {
                return Err(bad("sent twice".into()));
            }
            let shape: Vec<usize> = chunk.shape.iter().map(|&d| d as usize).collect();
            let numel = shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad("shape overflows".into()))?;
            if let Some(expected) = &self.expected {
                match expected.get(&chunk.tensor) {
                    None => {
                        return Err(FlError::LayoutMismatch(format!(
                            "unexpected tensor {:?}",
                            chunk.tensor
                        )));
                    }
                    Some(s) if *s != shape => {
                        return Err(FlError::LayoutMismatch(format!(
                            "tensor {:?} has shape {shape:?}, expected {s:?}",
                            chunk.tensor
                        )));
                    }
                    Some(_) => {}
                }
            }
            self.total_elements = self.total_elements.saturating_add(numel);
            if self.total_elements > self.max_elements {
                return Err(bad(format!(
                    "model exceeds the limit of {} elements",
                    self.max_elements
                )));
            }
            self.current = Some(NamedTensor {
                name: chunk.tensor.clone(),
                shape,
                data: Vec::with_capacity(numel),
            });
        }
        let Some(cur) = self.current.as_mut() else {
            return Err(bad("no tensor in progress".into()));
        };
        if chunk.offset as usize != cur.data.len() {
            return Err(bad(format!(
                "chunk at offset {}, expected {}",
                chunk.offset,
                cur.data.len()
            )));
        }
        let values = chunk.data.len() / 4;
        if cur.data.len() + values > cur.numel() {
            return Err(bad(format!("more data than shape {:?} holds", cur.shape)));
        }
        let start = cur.data.len();
        extend_from_le_bytes(&mut cur.data, &chunk.data);
        if !all_finite(&cur.data[start..]) {
            return Err(FlError::NonFinite {
                tensor: chunk.tensor.clone(),
            });
        }
        Ok(())
    }

    fn finish_current(&mut self) -> Result<(), FlError> {
        if let Some(t) = self.current.take() {
            if t.data.len() != t.numel() {
                return Err(FlError::BadChunk {
                    tensor: t.name.clone(),
                    message: format!("got {} of {} elements", t.data.len(), t.numel()),
                });
            }
            self.done.push(t);
        }
        Ok(())
    }

    /// All tensors, in the order they arrived. Every expected tensor must be present.
    pub fn finish(mut self) -> Result<Vec<NamedTensor>, FlError> {
        self.finish_current()?;
        if let Some(expected) = &self.expected {
            for name in expected.keys() {
                if !self.done.iter().any(|t| &t.name == name) {
                    return Err(FlError::LayoutMismatch(format!(
                        "tensor {name:?} is missing"
                    )));
                }
            }
        }
        if self.done.is_empty() {
            return Err(FlError::Empty);
        }
        Ok(self.done)
    }
}

/// Encodes tensors as one safetensors file (f32, tensors in name order).
pub fn to_safetensors(tensors: &[NamedTensor]) -> Result<Vec<u8>, FlError> {
    let (header, order, total) = safetensors_header(tensors)?;
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    out.extend_from_slice(&header);
    for i in order {
        extend_le_bytes(&mut out, &tensors[i].data);
    }
    Ok(out)
}

/// The safetensors encoding of `tensors` (f32, in name order) as pieces of at most
/// `chunk_bytes` after the header, made as they are taken and sharing the tensors' memory
/// (little-endian): a model is sent or hashed without a copy of it. Returns the file's
/// length with the pieces.
pub fn safetensors_stream(
    tensors: Arc<Vec<NamedTensor>>,
    chunk_bytes: usize,
) -> Result<(u64, impl Iterator<Item = bytes::Bytes> + Send + 'static), FlError> {
    let (header, order, total) = safetensors_header(&tensors)?;
    let per_chunk = (chunk_bytes / 4).max(1);
    let pieces: Vec<(usize, usize)> = order
        .iter()
        .flat_map(|&i| (0..tensors[i].data.len().div_ceil(per_chunk)).map(move |k| (i, k)))
        .collect();
    let data = pieces.into_iter().map(move |(i, k)| {
        let (start, end) = chunk_range(&tensors[i], k, per_chunk);
        shared_le_bytes(&tensors, i, start, end)
    });
    Ok((total, std::iter::once(header.into()).chain(data)))
}

/// A safetensors file's header (its length, then the JSON, padded so the data starts
/// 8-byte aligned), the order the tensors' data follows it in (by name), and the file's
/// whole length.
fn safetensors_header(tensors: &[NamedTensor]) -> Result<(Vec<u8>, Vec<usize>, u64), FlError> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|a, b| tensors[*a].name.cmp(&tensors[*b].name));
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for &i in &order {
        let t = &tensors[i];
        if t.data.len() != t.numel() {
            return Err(FlError::Safetensors(format!(
                "{}: {} values for shape {:?}",
                t.name,
                t.data.len(),
                t.shape
            )));
        }
        let end = offset + t.data.len() as u64 * 4;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| FlError::Safetensors(e.to_string()))?;
    while (json.len() + 8) % 8 != 0 {
        json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    let total = bytes.len() as u64 + offset;
    Ok((bytes, order, total))
}

/// Decodes a safetensors file of f32 tensors, sorted by name.
pub fn from_safetensors(data: &[u8]) -> Result<Vec<NamedTensor>, FlError> {
    let st = safetensors::SafeTensors::deserialize(data)
        .map_err(|e| FlError::Safetensors(e.to_string()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(FlError::Safetensors(format!(
                "tensor {name:?} is {:?}, expected F32",
                view.dtype()
            )));
        }
        let mut data = Vec::new();
        extend_from_le_bytes(&mut data, view.data());
        out.push(NamedTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_streamed_encoding_is_a_safetensors_file_in_small_pieces() {
        let mut tensors = model();
        tensors.reverse();
        let (len, pieces) = safetensors_stream(Arc::new(tensors.clone()), 8).unwrap();
        let pieces: Vec<bytes::Bytes> = pieces.collect();
        assert!(pieces[1..].iter().all(|p| p.len() <= 8 && !p.is_empty()));
        let bytes = pieces.concat();
        assert_eq!(bytes.len() as u64, len);
        // The reference reader takes it, and the data starts 8-byte aligned.
        let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(parsed.len(), tensors.len());
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(header % 8, 0);
        let mut back = from_safetensors(&bytes).unwrap();
        back.sort_by(|a, b| a.name.cmp(&b.name));
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(back, tensors);
        assert_eq!(to_safetensors(&tensors).unwrap(), bytes);
    }

    fn model() -> Vec<NamedTensor> {
        vec![
            NamedTensor {
                name: "a".into(),
                shape: vec![3, 5],
                data: (0..15).map(|i| i as f32 * 0.5).collect(),
            },
            NamedTensor {
                name: "b".into(),
                shape: vec![7],
                data: (0..7).map(|i| -(i as f32)).collect(),
            },
        ]
    }

    #[test]
    fn chunks_round_trip_with_small_chunks() {
        let m = model();
        let chunks: Vec<_> = chunk_tensors(&m, 8).collect();
        assert_eq!(chunks.len(), 8 + 4, "15 elements in 2s, 7 in 2s");
        let mut asm = TensorAssembler::new(Some(&Layout::of(&m)), 1000);
        for c in chunks {
            asm.push(c).unwrap();
        }
        assert_eq!(asm.finish().unwrap(), m);
    }

    #[test]
    fn shared_chunks_are_the_same_bytes_from_the_model_s_memory() {
        let m = Arc::new(model());
        let copied: Vec<_> = chunk_tensors(&m, 8).collect();
        let shared: Vec<_> = chunk_tensors_shared(m.clone(), 8).collect();
        assert_eq!(shared, copied);
        if cfg!(target_endian = "little") {
            // The first chunk of the first tensor starts where its values do.
            assert_eq!(shared[0].data.as_ptr(), m[0].data.as_ptr().cast::<u8>());
        }
        // The chunks keep the model alive after every other owner is gone.
        drop(m);
        let mut asm = TensorAssembler::new(None, 1000);
        for c in shared {
            asm.push(c).unwrap();
        }
        assert_eq!(asm.finish().unwrap(), model());
    }

    #[test]
    fn malformed_streams_are_refused() {
        let m = model();
        let chunks: Vec<_> = chunk_tensors(&m, 8).collect();
        // A gap.
        let mut asm = TensorAssembler::new(None, 1000);
        asm.push(chunks[0].clone()).unwrap();
        assert!(asm.push(chunks[2].clone()).is_err());
        // A missing tensor.
        let mut asm = TensorAssembler::new(Some(&Layout::of(&m)), 1000);
        for c in chunks.iter().take(8) {
            asm.push(c.clone()).unwrap();
        }
        assert!(matches!(asm.finish(), Err(FlError::LayoutMismatch(_))));
        // A wrong shape.
        let mut other = m.clone();
        other[1].shape = vec![1, 7];
        let mut asm = TensorAssembler::new(Some(&Layout::of(&other)), 1000);
        let r: Result<(), _> = chunks.iter().try_for_each(|c| asm.push(c.clone()));
        assert!(matches!(r, Err(FlError::LayoutMismatch(_))));
        // Too large.
        let mut asm = TensorAssembler::new(None, 10);
        assert!(asm.push(chunks[0].clone()).is_err());
        // Non-finite values.
        let mut nan = m.clone();
        nan[1].data[3] = f32::NAN;
        let mut asm = TensorAssembler::new(None, 1000);
        let r: Result<(), _> = chunk_tensors(&nan, 1 << 20).try_for_each(|c| asm.push(c));
        assert!(matches!(r, Err(FlError::NonFinite { .. })));
    }

    #[test]
    fn safetensors_round_trip() {
        let m = model();
        let bytes = to_safetensors(&m).unwrap();
        assert_eq!(from_safetensors(&bytes).unwrap(), m);
        assert!(from_safetensors(b"not a model").is_err());
    }
}
