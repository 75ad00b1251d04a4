//! Compression of updates on the wire (the job's `compression`): 8- and 4-bit stochastic
//! quantisation with one scale per chunk, and top-k sparsification with error feedback.
//!
//! A compressed update is still a sequence of [`TensorChunk`]s, tensor after tensor, each
//! chunk covering elements `offset..offset + n` of its tensor: the coordinator turns each
//! chunk back into f32 values ([`UpdateDecoder`]) and checks and stages it as it does an
//! uncompressed one. The layouts of `data` (little endian; also in `common.proto`):
//! - `q8`: u32 n, f32 scale, then n × i8 q in [-127, 127]; value = q · scale.
//! - `q4`: u32 n, f32 scale, then ⌈n/2⌉ bytes of two 4-bit two's-complement q in [-7, 7],
//!   the lower nibble first (an odd n leaves the last high nibble 0); value = q · scale.
//! - `topk`: u32 n, u32 k, then k × u32 index (from `offset`, strictly increasing, < n),
//!   then k × f32 value; the other elements of the chunk are 0.
//!
//! Quantisation is unbiased: x/scale is rounded up with probability equal to its fractional
//! part, so E[q · scale] = x; a seeded generator makes it repeatable. Top-k keeps the
//! largest values of each tensor and is biased; error feedback makes up for it: the party
//! keeps what it did not send (the residual) and adds it to its next update. No I/O here:
//! the party keeps the residual where it likes.

use std::collections::HashMap;

use cohort_core::NamedTensor;
use cohort_core::spec::Compression;
use cohort_proto::v1::TensorChunk;

use crate::FlError;
use crate::corrupt::SplitMix64;
use crate::wire::{Layout, le_bytes};

/// Elements per quantised chunk, each with its own scale: a small block keeps one large
/// value from coarsening the steps of all the others.
pub const QUANTIZE_BLOCK: usize = 2048;
/// Elements per top-k chunk: even with every value sent (8 bytes each) a chunk stays
/// within [`crate::CHUNK_BYTES`].
pub const TOP_K_RANGE: usize = crate::CHUNK_BYTES / 8;
/// The most elements one encoded chunk may cover, as many as an f32 chunk carries: what
/// one chunk can make the decoder allocate is bounded as for f32.
pub const MAX_CHUNK_ELEMENTS: usize = crate::CHUNK_BYTES / 4;
/// u32 n, then f32 scale (quantised) or u32 k (top-k).
const HEADER_BYTES: usize = 8;

/// The wire dtype of a compressed update's chunks.
pub fn wire_dtype(method: Compression) -> &'static str {
    match Kind::of(method) {
        Kind::Quantize { levels: Q8_LEVELS } => "q8",
        Kind::Quantize { .. } => "q4",
        Kind::TopK(_) => "topk",
    }
}

/// The spec's words for a method, for messages.
pub fn describe(method: Compression) -> String {
    match method {
        Compression::Quantize { bits } => format!("compression.quantize_bits: {bits}"),
        Compression::TopK { fraction } => format!("compression.top_k: {fraction}"),
    }
}

const Q8_LEVELS: i32 = 127;
const Q4_LEVELS: i32 = 7;

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Values q in [-levels, levels].
    Quantize {
        levels: i32,
    },
    TopK(f64),
}

impl Kind {
    /// A validated spec has 8 or 4 bits; anything below 8 is taken as 4.
    fn of(method: Compression) -> Kind {
        match method {
            Compression::Quantize { bits } if bits >= 8 => Kind::Quantize { levels: Q8_LEVELS },
            Compression::Quantize { .. } => Kind::Quantize { levels: Q4_LEVELS },
            Compression::TopK { fraction } => Kind::TopK(fraction),
        }
    }
}

/// An update encoded for the wire, and what the party keeps for its next one.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// In the update's tensor order, ready to send.
    pub chunks: Vec<TensorChunk>,
    /// Top-k: the values not sent (the update plus the previous residual, less what was
    /// sent), to be added to the next update. None for quantisation.
    pub residual: Option<Vec<NamedTensor>>,
}

impl Encoded {
    /// The bytes of tensor data the chunks carry.
    pub fn wire_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.data.len()).sum()
    }
}

/// Encodes `update` with `method`. Quantisation draws its rounding from `seed` (the same
/// seed, the same chunks) and ignores `residual`; top-k first adds `residual` (which must
/// have the update's tensors, names and shapes, in its order) and returns the new one.
pub fn encode(
    method: Compression,
    update: Vec<NamedTensor>,
    residual: Option<&[NamedTensor]>,
    seed: u64,
) -> Result<Encoded, FlError> {
    for t in &update {
        if t.data.len() != t.numel() {
            return Err(FlError::LayoutMismatch(format!(
                "tensor {:?} has {} values for shape {:?}",
                t.name,
                t.data.len(),
                t.shape
            )));
        }
        if !crate::wire::all_finite(&t.data) {
            return Err(FlError::NonFinite {
                tensor: t.name.clone(),
            });
        }
        // Top-k's indices are u32.
        if u32::try_from(t.data.len()).is_err() {
            return Err(FlError::BadChunk {
                tensor: t.name.clone(),
                message: format!("{} values are too many to encode", t.data.len()),
            });
        }
    }
    let dtype = wire_dtype(method);
    match Kind::of(method) {
        Kind::Quantize { levels } => {
            let mut rng = SplitMix64(seed ^ 0x51_7cc1_b727_220a);
            let chunks = update
                .iter()
                .flat_map(|t| {
                    blocks(t.data.len(), QUANTIZE_BLOCK).map(move |(start, end)| (t, start, end))
                })
                .map(|(t, start, end)| {
                    let data = quantize(&t.data[start..end], levels, &mut rng);
                    encoded_chunk(t, dtype, start, data)
                })
                .collect();
            Ok(Encoded {
                chunks,
                residual: None,
            })
        }
        Kind::TopK(fraction) => {
            let mut sum = update;
            if let Some(residual) = residual {
                add_residual(&mut sum, residual)?;
            }
            let mut chunks = Vec::new();
            for t in &mut sum {
                let sent = top_k_indices(&t.data, fraction);
                let mut at = 0;
                for (start, end) in blocks(t.data.len(), TOP_K_RANGE) {
                    let from = at;
                    while at < sent.len() && (sent[at] as usize) < end {
                        at += 1;
                    }
                    let picked = &sent[from..at];
                    let mut data = Vec::with_capacity(HEADER_BYTES + 8 * picked.len());
                    data.extend_from_slice(&((end - start) as u32).to_le_bytes());
                    data.extend_from_slice(&(picked.len() as u32).to_le_bytes());
                    for &i in picked {
                        data.extend_from_slice(&(i - start as u32).to_le_bytes());
                    }
                    for &i in picked {
                        data.extend_from_slice(&t.data[i as usize].to_le_bytes());
                    }
                    chunks.push(encoded_chunk(t, dtype, start, data));
                }
                // What was sent leaves the residual.
                for &i in &sent {
                    t.data[i as usize] = 0.0;
                }
            }
            Ok(Encoded {
                chunks,
                residual: Some(sum),
            })
        }
    }
}

/// `update += residual`, tensor by tensor.
fn add_residual(update: &mut [NamedTensor], residual: &[NamedTensor]) -> Result<(), FlError> {
    if residual.len() != update.len() {
        return Err(FlError::LayoutMismatch(format!(
            "the residual has {} tensors, the update {}",
            residual.len(),
            update.len()
        )));
    }
    for (u, r) in update.iter_mut().zip(residual) {
        if u.name != r.name || u.shape != r.shape || r.data.len() != u.data.len() {
            return Err(FlError::LayoutMismatch(format!(
                "the residual's tensor {:?} {:?} is not the update's {:?} {:?}",
                r.name, r.shape, u.name, u.shape
            )));
        }
        if !crate::wire::all_finite(&r.data) {
            return Err(FlError::NonFinite {
                tensor: r.name.clone(),
            });
        }
        for (u, r) in u.data.iter_mut().zip(&r.data) {
            *u += r;
        }
    }
    Ok(())
}

/// The `⌈fraction · n⌉` (at least one) indices of the largest |values|, ascending; ties go
/// to the lower index, so the choice is repeatable.
fn top_k_indices(values: &[f32], fraction: f64) -> Vec<u32> {
    let n = values.len();
    if n == 0 {
        return Vec::new();
    }
    let k = ((fraction * n as f64).ceil() as usize).clamp(1, n);
    let mut order: Vec<u32> = (0..n as u32).collect();
    if k < n {
        // Finite values (checked), so the order is total.
        let larger_first = |a: &u32, b: &u32| {
            let (x, y) = (values[*a as usize].abs(), values[*b as usize].abs());
            y.total_cmp(&x).then(a.cmp(b))
        };
        order.select_nth_unstable_by(k - 1, larger_first);
        order.truncate(k);
    }
    order.sort_unstable();
    order
}

/// The element ranges of a tensor of `n` values in pieces of `per_chunk`; one empty piece
/// for an empty tensor, so that every tensor is sent.
fn blocks(n: usize, per_chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n.div_ceil(per_chunk).max(1)).map(move |i| (i * per_chunk, ((i + 1) * per_chunk).min(n)))
}

/// One block quantised: u32 n, f32 scale, the values.
fn quantize(values: &[f32], levels: i32, rng: &mut SplitMix64) -> Vec<u8> {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = max / levels as f32;
    let top = levels as f32;
    let mut q = values.iter().map(|&v| {
        if scale == 0.0 {
            return 0i8;
        }
        let x = v / scale;
        let low = x.floor();
        // Up with probability x − ⌊x⌋: E[q] = x.
        let up = rng.unit_f32() < x - low;
        (low + f32::from(u8::from(up))).clamp(-top, top) as i8
    });
    let n = values.len();
    let body = if levels == Q8_LEVELS {
        n
    } else {
        n.div_ceil(2)
    };
    let mut data = Vec::with_capacity(HEADER_BYTES + body);
    data.extend_from_slice(&(n as u32).to_le_bytes());
    data.extend_from_slice(&scale.to_le_bytes());
    if levels == Q8_LEVELS {
        data.extend(q.map(|q| q as u8));
    } else {
        while let Some(low) = q.next() {
            let high = q.next().unwrap_or(0);
            data.push((low as u8 & 0x0f) | ((high as u8 & 0x0f) << 4));
        }
    }
    data
}

/// A chunk of an encoded tensor: the dtype on every chunk, the shape on the first.
fn encoded_chunk(t: &NamedTensor, dtype: &str, offset: usize, data: Vec<u8>) -> TensorChunk {
    TensorChunk {
        tensor: t.name.clone(),
        dtype: dtype.to_string(),
        shape: if offset == 0 {
            t.shape.iter().map(|&d| d as u64).collect()
        } else {
            Vec::new()
        },
        offset: offset as u64,
        data: data.into(),
    }
}

/// Turns an update's chunks back into f32 chunks for the coordinator's check
/// ([`crate::UpdateStream`]), after checking that they are in the dtype the job's spec
/// asks for: a party cannot choose its own compression, nor send uncompressed what the
/// spec compresses. Everything is validated before a value is made: the header, the
/// length against it, the elements against the tensor's size, the scale, every quantised
/// value and every index (in bounds, strictly increasing); errors name the tensor.
#[derive(Debug)]
pub struct UpdateDecoder {
    method: Option<Compression>,
    numel: HashMap<String, usize>,
}

impl UpdateDecoder {
    /// For updates to a model of `layout` in a job compressed with `method` (None: f32).
    pub fn new(method: Option<Compression>, layout: &Layout) -> UpdateDecoder {
        UpdateDecoder {
            method,
            numel: layout
                .tensors
                .iter()
                .map(|(name, shape)| (name.clone(), shape.iter().product()))
                .collect(),
        }
    }

    /// `chunk` as f32 values, its tensor, offset and shape kept. An uncompressed job's f32
    /// chunks pass as they are.
    pub fn decode(&self, chunk: TensorChunk) -> Result<TensorChunk, FlError> {
        let bad = |message: String| FlError::BadChunk {
            tensor: chunk.tensor.clone(),
            message,
        };
        let Some(method) = self.method else {
            if !chunk.dtype.is_empty() && chunk.dtype != "f32" {
                return Err(bad(format!(
                    "dtype {:?}: this job's spec asks for no compression, and a party cannot \
                     choose its own; send \"f32\"",
                    chunk.dtype
                )));
            }
            return Ok(chunk);
        };
        let dtype = wire_dtype(method);
        if chunk.dtype != dtype && !(chunk.dtype.is_empty() && chunk.offset != 0) {
            return Err(bad(format!(
                "dtype {:?}: this job's spec asks for {}, so every chunk must be {dtype:?}",
                chunk.dtype,
                describe(method)
            )));
        }
        let Some(&numel) = self.numel.get(&chunk.tensor) else {
            return Err(FlError::LayoutMismatch(format!(
                "unexpected tensor {:?}",
                chunk.tensor
            )));
        };
        let data = &chunk.data[..];
        if data.len() < HEADER_BYTES {
            return Err(bad(format!(
                "{} bytes, shorter than the {HEADER_BYTES}-byte header of a {dtype:?} chunk",
                data.len()
            )));
        }
        let word = |at: usize| [data[at], data[at + 1], data[at + 2], data[at + 3]];
        let n = u32::from_le_bytes(word(0)) as usize;
        if n > MAX_CHUNK_ELEMENTS {
            return Err(bad(format!(
                "a chunk of {n} elements; at most {MAX_CHUNK_ELEMENTS} are allowed"
            )));
        }
        let end = chunk.offset.saturating_add(n as u64);
        if end > numel as u64 {
            return Err(bad(format!(
                "elements {}..{end} are past the tensor's {numel}",
                chunk.offset
            )));
        }
        let values = match Kind::of(method) {
            Kind::Quantize { levels } => {
                let scale = f32::from_le_bytes(word(4));
                dequantize(&data[HEADER_BYTES..], n, scale, levels).map_err(bad)?
            }
            Kind::TopK(_) => {
                let k = u32::from_le_bytes(word(4)) as usize;
                densify(&data[HEADER_BYTES..], n, k).map_err(bad)?
            }
        };
        Ok(TensorChunk {
            dtype: if chunk.offset == 0 {
                "f32".into()
            } else {
                String::new()
            },
            data: le_bytes(&values).into(),
            ..chunk
        })
    }
}

/// The n values of a quantised chunk's body.
fn dequantize(body: &[u8], n: usize, scale: f32, levels: i32) -> Result<Vec<f32>, String> {
    if !(scale.is_finite() && scale >= 0.0) {
        return Err(format!("scale {scale} is not finite and at least 0"));
    }
    let want = if levels == Q8_LEVELS {
        n
    } else {
        n.div_ceil(2)
    };
    if body.len() != want {
        return Err(format!(
            "{} bytes of values for {n} elements, expected {want}",
            body.len()
        ));
    }
    let check = |q: i32, at: usize| {
        if q.abs() > levels {
            Err(format!(
                "value {q} at element {at} is outside [-{levels}, {levels}]"
            ))
        } else {
            Ok(q as f32 * scale)
        }
    };
    if levels == Q8_LEVELS {
        return body
            .iter()
            .enumerate()
            .map(|(at, &b)| check(i32::from(b as i8), at))
            .collect();
    }
    let mut out = Vec::with_capacity(n);
    for (i, &b) in body.iter().enumerate() {
        // Sign-extend each nibble.
        let low = i32::from(((b << 4) as i8) >> 4);
        let high = i32::from((b as i8) >> 4);
        out.push(check(low, 2 * i)?);
        if out.len() < n {
            out.push(check(high, 2 * i + 1)?);
        } else if high != 0 {
            return Err(format!("the padding after element {} is not 0", n - 1));
        }
    }
    Ok(out)
}

/// The n dense values of a top-k chunk's body of k indices and k values.
fn densify(body: &[u8], n: usize, k: usize) -> Result<Vec<f32>, String> {
    if k > n {
        return Err(format!("{k} values for a chunk of {n} elements"));
    }
    if body.len() as u64 != 8 * k as u64 {
        return Err(format!(
            "{} bytes for {k} indices and values, expected {}",
            body.len(),
            8 * k as u64
        ));
    }
    let (indices, values) = body.split_at(4 * k);
    let mut out = vec![0f32; n];
    let mut last: Option<u32> = None;
    for (i, (index, value)) in indices
        .chunks_exact(4)
        .zip(values.chunks_exact(4))
        .enumerate()
    {
        let index = u32::from_le_bytes([index[0], index[1], index[2], index[3]]);
        let value = f32::from_le_bytes([value[0], value[1], value[2], value[3]]);
        if index as usize >= n {
            return Err(format!(
                "index {index} (entry {i}) is past the chunk's {n} elements"
            ));
        }
        if last.is_some_and(|l| index <= l) {
            return Err(format!(
                "index {index} (entry {i}) does not follow {}: indices must be strictly \
                 increasing",
                last.unwrap_or(0)
            ));
        }
        if !value.is_finite() {
            return Err(format!("the value at index {index} is not finite"));
        }
        out[index as usize] = value;
        last = Some(index);
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::wire::extend_from_le_bytes;
    use crate::{AggregationRules, UpdateCheck};
    use std::sync::Arc;

    const Q8: Compression = Compression::Quantize { bits: 8 };
    const Q4: Compression = Compression::Quantize { bits: 4 };

    fn tensor(name: &str, data: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            shape: vec![data.len()],
            data,
        }
    }

    /// Values of several sizes and signs, one outlier, a zero block and an empty tensor.
    fn update() -> Vec<NamedTensor> {
        let wave: Vec<f32> = (0..5000)
            .map(|i| ((i as f32) * 0.37).sin() * 0.01 * (1.0 + (i % 7) as f32))
            .collect();
        let mut spiky = wave[..300].to_vec();
        spiky[17] = 3.0;
        vec![
            tensor("w", wave),
            tensor("spiky", spiky),
            tensor("zeros", vec![0.0; 3000]),
            tensor("odd", vec![0.5, -0.25, 0.125]),
            NamedTensor {
                name: "empty".into(),
                shape: vec![0, 4],
                data: Vec::new(),
            },
        ]
    }

    fn decoder(method: Option<Compression>, of: &[NamedTensor]) -> UpdateDecoder {
        UpdateDecoder::new(method, &Layout::of(of))
    }

    /// The decoded update, tensor by tensor (chunks in order).
    fn decode_all(
        method: Compression,
        of: &[NamedTensor],
        chunks: &[TensorChunk],
    ) -> Vec<Vec<f32>> {
        let d = decoder(Some(method), of);
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); of.len()];
        for c in chunks {
            let t = of.iter().position(|t| t.name == c.tensor).unwrap();
            let back = d.decode(c.clone()).unwrap();
            assert_eq!(back.offset as usize, out[t].len(), "chunks in order");
            assert_eq!(back.dtype, if back.offset == 0 { "f32" } else { "" });
            extend_from_le_bytes(&mut out[t], &back.data);
        }
        out
    }

    #[test]
    fn quantised_values_are_within_one_step_of_the_truth() {
        let u = update();
        for (method, levels) in [(Q8, 127.0f32), (Q4, 7.0)] {
            let encoded = encode(method, u.clone(), None, 1).unwrap();
            assert!(encoded.residual.is_none());
            let back = decode_all(method, &u, &encoded.chunks);
            for (t, values) in u.iter().zip(&back) {
                assert_eq!(values.len(), t.data.len(), "{}", t.name);
                for (block, got) in t
                    .data
                    .chunks(QUANTIZE_BLOCK)
                    .zip(values.chunks(QUANTIZE_BLOCK))
                {
                    let step = block.iter().fold(0f32, |m, v| m.max(v.abs())) / levels;
                    for (x, y) in block.iter().zip(got) {
                        assert!(
                            (x - y).abs() <= step * 1.0001,
                            "{}: {x} → {y}, step {step}",
                            t.name
                        );
                        // Rounded to a neighbour: never across zero.
                        assert!(x * y >= 0.0, "{x} → {y}");
                    }
                }
            }
            // Zeros stay exactly zero; the outlier is exact (it sets the scale).
            assert!(back[2].iter().all(|v| *v == 0.0));
            assert!((back[1][17] - 3.0).abs() < 1e-6, "{}", back[1][17]);
        }
    }

    #[test]
    fn quantisation_is_unbiased_over_many_draws() {
        let u = vec![tensor(
            "w",
            (0..256).map(|i| ((i as f32) * 1.3).cos() * 0.02).collect(),
        )];
        for (method, levels) in [(Q8, 127.0f64), (Q4, 7.0)] {
            let draws = 4000;
            let mut sums = vec![0f64; 256];
            for seed in 0..draws {
                let encoded = encode(method, u.clone(), None, seed).unwrap();
                let back = decode_all(method, &u, &encoded.chunks);
                for (s, v) in sums.iter_mut().zip(&back[0]) {
                    *s += f64::from(*v);
                }
            }
            let step = f64::from(u[0].data.iter().fold(0f32, |m, v| m.max(v.abs()))) / levels;
            // One draw's error has a standard deviation of at most step/2.
            let bound = 5.0 * step / 2.0 / (draws as f64).sqrt();
            let mut worst = 0f64;
            for (s, x) in sums.iter().zip(&u[0].data) {
                let bias = s / draws as f64 - f64::from(*x);
                worst = worst.max(bias.abs());
            }
            assert!(worst <= bound, "{method:?}: bias {worst:e} > {bound:e}");
            // Deterministic rounding would be off by up to step/2 for some value.
            assert!(worst < step / 10.0);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_chunks() {
        let a = encode(Q4, update(), None, 9).unwrap();
        let b = encode(Q4, update(), None, 9).unwrap();
        let c = encode(Q4, update(), None, 10).unwrap();
        assert_eq!(a.chunks, b.chunks);
        assert_ne!(a.chunks, c.chunks);
    }

    #[test]
    fn encoded_sizes_are_as_documented() {
        let u = update();
        let n: Vec<usize> = u.iter().map(|t| t.data.len()).collect();
        let blocks_of = |n: usize, per: usize| n.div_ceil(per).max(1);
        let q8 = encode(Q8, u.clone(), None, 1).unwrap();
        let q8_want: usize = n
            .iter()
            .map(|&n| n + 8 * blocks_of(n, QUANTIZE_BLOCK))
            .sum();
        assert_eq!(q8.wire_bytes(), q8_want);
        assert_eq!(q8.chunks.len(), 3 + 1 + 2 + 1 + 1);
        let q4 = encode(Q4, u.clone(), None, 1).unwrap();
        let q4_want: usize = q4
            .chunks
            .iter()
            .map(|c| 8 + (u32::from_le_bytes(c.data[..4].try_into().unwrap()) as usize).div_ceil(2))
            .sum();
        assert_eq!(q4.wire_bytes(), q4_want);
        let dense: usize = n.iter().sum::<usize>() * 4;
        assert!(
            q8.wire_bytes() * 100 <= dense * 26,
            "{} of {dense}",
            q8.wire_bytes()
        );
        assert!(
            q4.wire_bytes() * 100 <= dense * 14,
            "{} of {dense}",
            q4.wire_bytes()
        );
        // Top-k at 1%: ⌈n/100⌉ (at least 1) of every non-empty tensor, 8 bytes each.
        let top = encode(Compression::TopK { fraction: 0.01 }, u.clone(), None, 1).unwrap();
        let k: usize = n
            .iter()
            .map(|&n| if n == 0 { 0 } else { n.div_ceil(100) })
            .sum();
        assert_eq!(top.wire_bytes(), 8 * u.len() + 8 * k);
        assert!(
            top.wire_bytes() * 100 <= dense * 3,
            "{} of {dense}",
            top.wire_bytes()
        );
        // Every chunk of every method fits the wire's chunk size.
        let big = vec![tensor("big", vec![1.0; TOP_K_RANGE * 2 + 5])];
        let all = encode(Compression::TopK { fraction: 1.0 }, big.clone(), None, 1).unwrap();
        assert_eq!(all.chunks.len(), 3);
        assert!(
            all.chunks
                .iter()
                .all(|c| c.data.len() <= crate::CHUNK_BYTES + 8)
        );
        assert_eq!(
            decode_all(Compression::TopK { fraction: 1.0 }, &big, &all.chunks)[0],
            big[0].data
        );
    }

    #[test]
    fn top_k_sends_the_largest_and_keeps_the_rest() {
        let u = vec![
            tensor(
                "a",
                vec![0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, 0.05, -0.01, 0.0],
            ),
            tensor("b", vec![1.0, 1.0, 1.0]),
        ];
        let method = Compression::TopK { fraction: 0.3 };
        let encoded = encode(method, u.clone(), None, 0).unwrap();
        let back = decode_all(method, &u, &encoded.chunks);
        assert_eq!(
            back[0],
            vec![0.0, -5.0, 0.0, 3.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0]
        );
        // ⌈0.9⌉ = 1, the first of equals.
        assert_eq!(back[1], vec![1.0, 0.0, 0.0]);
        let residual = encoded.residual.unwrap();
        for ((t, sent), kept) in u.iter().zip(&back).zip(&residual) {
            for ((x, s), r) in t.data.iter().zip(sent).zip(&kept.data) {
                assert_eq!(s + r, *x, "sent + kept = the update");
            }
        }
    }

    #[test]
    fn error_feedback_sends_everything_in_the_end() {
        // Every round the same small update; 1% sent, the rest carried over.
        let n = 1000;
        let update = vec![tensor(
            "w",
            (0..n).map(|i| 0.001 * ((i % 13) as f32 - 6.0)).collect(),
        )];
        let method = Compression::TopK { fraction: 0.01 };
        let mut residual: Option<Vec<NamedTensor>> = None;
        let mut sent_total = vec![0f64; n];
        let rounds = 400;
        for round in 0..rounds {
            let encoded = encode(method, update.clone(), residual.as_deref(), round).unwrap();
            let back = decode_all(method, &update, &encoded.chunks);
            for (s, v) in sent_total.iter_mut().zip(&back[0]) {
                *s += f64::from(*v);
            }
            residual = encoded.residual;
        }
        // What was sent plus what is kept is everything, and what is kept stays small.
        let kept = &residual.unwrap()[0].data;
        let mut worst = 0f64;
        for ((s, k), x) in sent_total.iter().zip(kept).zip(&update[0].data) {
            let total = f64::from(*x) * rounds as f64;
            assert!(
                (s + f64::from(*k) - total).abs() < 1e-3,
                "{s} + {k} vs {total}"
            );
            worst = worst.max((s - total).abs() / (f64::from(x.abs()) * rounds as f64).max(1e-9));
        }
        // Without feedback 99% of every round would be lost; with it, little is.
        let sent: f64 = sent_total.iter().map(|v| v.abs()).sum();
        let all: f64 = update[0]
            .data
            .iter()
            .map(|v| f64::from(v.abs()) * rounds as f64)
            .sum();
        assert!(
            sent / all > 0.7,
            "sent {sent} of {all} (worst element {worst})"
        );
    }

    #[test]
    fn a_residual_of_another_layout_is_refused() {
        let u = update();
        let mut other = u.clone();
        other[0].name = "x".into();
        let method = Compression::TopK { fraction: 0.1 };
        assert!(matches!(
            encode(method, u.clone(), Some(&other), 0),
            Err(FlError::LayoutMismatch(_))
        ));
        assert!(encode(method, u.clone(), Some(&u[..1]), 0).is_err());
        let mut nan = u.clone();
        nan[0].data[3] = f32::NAN;
        assert!(matches!(
            encode(Q8, nan, None, 0),
            Err(FlError::NonFinite { .. })
        ));
    }

    #[test]
    fn decoded_chunks_pass_the_streaming_check() {
        let u = update();
        let global = Arc::new(
            u.iter()
                .map(|t| NamedTensor {
                    data: vec![1.0; t.data.len()],
                    ..t.clone()
                })
                .collect::<Vec<_>>(),
        );
        for method in [Q8, Q4, Compression::TopK { fraction: 0.05 }] {
            let check = Arc::new(UpdateCheck::new(
                global.clone(),
                AggregationRules::default(),
            ));
            let d = UpdateDecoder::new(Some(method), check.layout());
            let mut stream = check.stream();
            for c in encode(method, u.clone(), None, 3).unwrap().chunks {
                stream.push(&d.decode(c).unwrap()).unwrap();
            }
            struct Nothing;
            impl crate::UpdateValues for Nothing {
                fn read<'a>(
                    &'a self,
                    _: usize,
                    _: usize,
                    buf: &'a mut [f32],
                ) -> Result<&'a [f32], FlError> {
                    Ok(buf)
                }
            }
            stream.finish(Box::new(Nothing)).unwrap();
        }
    }

    /// A q8 chunk of tensor "w" (8 elements) from raw parts.
    fn raw(dtype: &str, offset: u64, data: Vec<u8>) -> TensorChunk {
        TensorChunk {
            tensor: "w".into(),
            dtype: dtype.into(),
            shape: if offset == 0 { vec![8] } else { Vec::new() },
            offset,
            data: data.into(),
        }
    }

    fn header(n: u32, second: [u8; 4]) -> Vec<u8> {
        let mut d = n.to_le_bytes().to_vec();
        d.extend_from_slice(&second);
        d
    }

    #[test]
    fn malformed_chunks_are_refused_naming_the_tensor() {
        let layout = vec![tensor("w", vec![0.0; 8])];
        let one = 1f32.to_le_bytes();
        let q8 = decoder(Some(Q8), &layout);
        let q4 = decoder(Some(Q4), &layout);
        let top = decoder(Some(Compression::TopK { fraction: 0.5 }), &layout);
        let with = |mut h: Vec<u8>, body: &[u8]| {
            h.extend_from_slice(body);
            h
        };
        let topk = |n: u32, idx: &[u32], vals: &[f32]| {
            let mut d = header(n, (idx.len() as u32).to_le_bytes());
            idx.iter()
                .for_each(|i| d.extend_from_slice(&i.to_le_bytes()));
            vals.iter()
                .for_each(|v| d.extend_from_slice(&v.to_le_bytes()));
            d
        };
        // Well formed, for contrast.
        assert!(
            q8.decode(raw("q8", 0, with(header(8, one), &[1; 8])))
                .is_ok()
        );
        assert!(
            q4.decode(raw("q4", 0, with(header(3, one), &[0x11, 0x01])))
                .is_ok()
        );
        assert!(
            top.decode(raw("topk", 0, topk(8, &[1, 5], &[0.5, -1.0])))
                .is_ok()
        );
        assert!(
            top.decode(raw("", 4, topk(4, &[], &[]))).is_ok(),
            "a later chunk may leave the dtype out"
        );
        let cases: Vec<(&UpdateDecoder, TensorChunk, &str)> = vec![
            (
                &q8,
                raw("q8", 0, vec![1, 2, 3]),
                "shorter than the 8-byte header",
            ),
            (
                &q8,
                raw("q8", 0, with(header(8, one), &[1; 7])),
                "7 bytes of values for 8 elements",
            ),
            (
                &q8,
                raw("q8", 0, with(header(9, one), &[1; 9])),
                "past the tensor's 8",
            ),
            (
                &q8,
                raw("q8", 4, with(header(5, one), &[1; 5])),
                "elements 4..9",
            ),
            (
                &q8,
                raw("q8", 0, with(header(u32::MAX, one), &[])),
                "at most",
            ),
            (
                &q8,
                raw("q8", 0, with(header(2, f32::NAN.to_le_bytes()), &[1, 1])),
                "scale NaN",
            ),
            (
                &q8,
                raw(
                    "q8",
                    0,
                    with(header(2, f32::INFINITY.to_le_bytes()), &[1, 1]),
                ),
                "scale inf",
            ),
            (
                &q8,
                raw("q8", 0, with(header(2, (-1f32).to_le_bytes()), &[1, 1])),
                "scale -1",
            ),
            (
                &q8,
                raw("q8", 0, with(header(2, one), &[0x80, 1])),
                "value -128",
            ),
            (&q4, raw("q4", 0, with(header(2, one), &[0x08])), "value -8"),
            (
                &q4,
                raw("q4", 0, with(header(3, one), &[0x11, 0x11])),
                "padding",
            ),
            (
                &q4,
                raw("q4", 0, with(header(3, one), &[0x11])),
                "1 bytes of values for 3",
            ),
            (
                &top,
                raw("topk", 0, topk(8, &[5, 1], &[1.0, 1.0])),
                "strictly increasing",
            ),
            (
                &top,
                raw("topk", 0, topk(8, &[1, 1], &[1.0, 1.0])),
                "strictly increasing",
            ),
            (
                &top,
                raw("topk", 0, topk(8, &[8], &[1.0])),
                "index 8 (entry 0) is past",
            ),
            (
                &top,
                raw("topk", 0, topk(2, &[0, 1, 1], &[1.0, 1.0, 1.0])),
                "3 values for a chunk of 2",
            ),
            (
                &top,
                raw("topk", 0, topk(8, &[1], &[f32::INFINITY])),
                "not finite",
            ),
            (
                &top,
                raw("topk", 0, with(topk(8, &[1], &[1.0]), &[0])),
                "expected 8",
            ),
            (&top, raw("topk", 6, topk(4, &[], &[])), "elements 6..10"),
            // The dtype the spec asks for, and only it.
            (
                &q8,
                raw("q4", 0, with(header(8, one), &[1; 8])),
                "asks for compression.quantize_bits: 8",
            ),
            (
                &q8,
                raw("f32", 0, vec![0; 32]),
                "every chunk must be \"q8\"",
            ),
            (
                &q8,
                raw("", 0, with(header(8, one), &[1; 8])),
                "every chunk must be \"q8\"",
            ),
            (
                &top,
                raw("q8", 0, with(header(8, one), &[1; 8])),
                "compression.top_k: 0.5",
            ),
        ];
        for (d, chunk, why) in cases {
            let err = d.decode(chunk).unwrap_err().to_string();
            assert!(err.contains("\"w\""), "the tensor is named: {err}");
            assert!(err.contains(why), "{why:?} in {err}");
        }
        // An uncompressed job takes f32 only.
        let plain = decoder(None, &layout);
        let f32_chunk = raw("f32", 0, vec![0; 32]);
        assert_eq!(plain.decode(f32_chunk.clone()).unwrap(), f32_chunk);
        let err = plain
            .decode(raw("q8", 0, with(header(8, one), &[1; 8])))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("asks for no compression") && err.contains("\"w\""),
            "{err}"
        );
        // A tensor the model does not have.
        let mut stranger = raw("q8", 0, with(header(8, one), &[1; 8]));
        stranger.tensor = "x".into();
        assert!(
            matches!(q8.decode(stranger), Err(FlError::LayoutMismatch(m)) if m.contains("\"x\""))
        );
    }
}
