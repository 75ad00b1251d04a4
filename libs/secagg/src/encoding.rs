//! Fixed-point encoding of clipped f32 updates into the ring Z/2^32 (u32, wrapping).
//!
//! A party's update is clipped to L2 norm `clip` = C, so every element lies in [−C, C]
//! (|x_i| ≤ ‖x‖₂ ≤ C; anything outside, e.g. noise added after clipping, is clamped and
//! counted). With n = the roster's size, each element is encoded as
//!
//! ```text
//!   M     = floor((2^31 − 1) / n)        the largest level one party may use
//!   scale = M / C                        (real-valued, f64)
//!   q     = round_half_away(clamp(x, −C, C) · scale)  ∈ [−M, M]  → two's complement in u32
//! ```
//!
//! so the sum of any n ≤ roster parties lies in [−n·M, n·M] ⊆ [−(2^31 − 1), 2^31 − 1]: it never
//! wraps, and read back as i32 it is the exact integer sum Σ q. Decoding divides by `scale`.
//!
//! Error bound (deterministic rounding to nearest, no stochastic rounding needed at this
//! resolution): per element and party |q/scale − x| ≤ 1/(2·scale) = C/(2M) ≈ n·C/2^32. For the
//! sum of k parties the decoded value (in f64) is within k/(2·scale); the mean within
//! 1/(2·scale). Decoding to f32 adds half an ulp of the result, at most |v|·2^−24 (≤ k·C·2^−24
//! for the sum, ≤ C·2^−24 for the mean), plus f64 rounding (≤ 2^−50 relative, counted in).
//! [`Encoding::sum_error_bound`] and [`Encoding::mean_error_bound`] give these numbers; for n = 5
//! and C = 1 the mean is within 1.2e−9 + 6.0e−8: f32 rounding dominates, quantisation is
//! negligible.

use crate::error::{Result, SecAggError};

/// The f32 elements in one 1 MiB chunk of the wire: the unit the parties and the server mask,
/// sum and unmask at a time.
pub const CHUNK_ELEMENTS: usize = 262_144;

/// The fixed-point encoding of a round: derived from `clip` and the roster's size alone, so the
/// parties and the server agree on it without exchanging it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Encoding {
    clip: f32,
    parties: usize,
    max_level: u32,
    scale: f64,
}

const F32_HALF_ULP: f64 = 1.0 / (1u64 << 24) as f64;
const F64_SLACK: f64 = 1.0 / (1u64 << 50) as f64;

impl Encoding {
    /// The encoding for a roster of `parties` and clip norm `clip` (> 0, finite).
    pub fn new(clip: f32, parties: usize) -> Result<Self> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(SecAggError::InvalidParams(format!(
                "clip must be a finite number > 0, got {clip}"
            )));
        }
        if parties == 0 || parties > (i32::MAX as usize) / 2 {
            return Err(SecAggError::InvalidParams(format!(
                "the roster must have between 1 and 2^30 parties, got {parties}"
            )));
        }
        let max_level = (i32::MAX as u64 / parties as u64) as u32;
        Ok(Encoding {
            clip,
            parties,
            max_level,
            scale: f64::from(max_level) / f64::from(clip),
        })
    }

    pub fn clip(&self) -> f32 {
        self.clip
    }

    /// The roster size the encoding is built for: the most parties whose sum cannot wrap.
    pub fn parties(&self) -> usize {
        self.parties
    }

    /// M: the largest |q| of one party's element.
    pub fn max_level(&self) -> u32 {
        self.max_level
    }

    /// Ring units per unit of the update.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// One element to the ring (NaN maps to 0; [`Encoding::encode`] refuses it first).
    fn encode_value(&self, x: f32) -> (u32, bool) {
        let c = f64::from(self.clip);
        let x = f64::from(x);
        let clamped = x.clamp(-c, c);
        let m = f64::from(self.max_level);
        let q = (clamped * self.scale).round().clamp(-m, m) as i32;
        (q as u32, clamped != x)
    }

    /// Encodes `values` (elements `[offset, offset + len)` of the update, `offset` only for the
    /// error) into `out` (same length). Returns how many elements were clamped to [−C, C];
    /// refuses non-finite values naming the element.
    pub fn encode(&self, offset: u64, values: &[f32], out: &mut [u32]) -> Result<usize> {
        if values.len() != out.len() {
            return Err(SecAggError::InvalidParams(format!(
                "encode: {} values into {} ring elements",
                values.len(),
                out.len()
            )));
        }
        let mut clamped = 0;
        for (i, (x, o)) in values.iter().zip(out.iter_mut()).enumerate() {
            if !x.is_finite() {
                return Err(SecAggError::NotFinite {
                    index: offset + i as u64,
                });
            }
            let (q, was_clamped) = self.encode_value(*x);
            *o = q;
            clamped += usize::from(was_clamped);
        }
        Ok(clamped)
    }

    /// A ring element holding the sum of at most `parties` encoded values, as a real number.
    pub fn decode_sum_value(&self, ring: u32) -> f64 {
        f64::from(ring as i32) / self.scale
    }

    /// Decodes ring sums into f32 sums (`out` as long as `ring`).
    pub fn decode_sum_into(&self, ring: &[u32], out: &mut [f32]) {
        for (r, o) in ring.iter().zip(out.iter_mut()) {
            *o = self.decode_sum_value(*r) as f32;
        }
    }

    /// Decodes ring sums of `count` parties into their f32 mean.
    pub fn decode_mean_into(&self, ring: &[u32], count: usize, out: &mut [f32]) {
        let k = count.max(1) as f64;
        for (r, o) in ring.iter().zip(out.iter_mut()) {
            *o = (self.decode_sum_value(*r) / k) as f32;
        }
    }

    /// Per element and party: the most an encoded value differs from the clipped input,
    /// 1/(2·scale).
    pub fn quantisation_error(&self) -> f64 {
        0.5 / self.scale
    }

    /// The most a decoded f32 sum of `count` parties differs, per element, from the exact sum
    /// of their clipped f32 inputs: count/(2·scale) + count·C·2^−24 (f32 rounding of the
    /// result) + f64 slack.
    pub fn sum_error_bound(&self, count: usize) -> f64 {
        let k = count as f64;
        let c = f64::from(self.clip);
        k * self.quantisation_error() + k * c * (F32_HALF_ULP + F64_SLACK)
    }

    /// The most a decoded f32 mean differs, per element, from the exact mean of the clipped
    /// f32 inputs: 1/(2·scale) + C·2^−24 + f64 slack.
    pub fn mean_error_bound(&self) -> f64 {
        let c = f64::from(self.clip);
        self.quantisation_error() + c * (F32_HALF_ULP + F64_SLACK)
    }
}

/// The factor that scales an update of L2 norm `norm` to at most `clip` (1 when it is already
/// inside): multiply every element by it before masking.
pub fn clip_factor(norm: f64, clip: f32) -> f64 {
    let c = f64::from(clip);
    if norm > c && norm.is_finite() {
        c / norm
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_scale_follow_the_documented_formula() {
        let e = Encoding::new(2.0, 5).expect("encoding");
        assert_eq!(e.max_level(), 429_496_729);
        assert_eq!(e.scale(), 429_496_729.0 / 2.0);
        assert!(Encoding::new(0.0, 5).is_err());
        assert!(Encoding::new(f32::NAN, 5).is_err());
        assert!(Encoding::new(1.0, 0).is_err());
    }

    #[test]
    fn extremes_of_a_full_roster_never_wrap() {
        for n in [1usize, 2, 3, 5, 7, 20, 1000] {
            let e = Encoding::new(0.75, n).expect("encoding");
            for x in [e.clip(), -e.clip()] {
                let mut q = [0u32];
                e.encode(0, &[x], &mut q).expect("encode");
                let sum = (0..n).fold(0u32, |acc, _| acc.wrapping_add(q[0]));
                let decoded = e.decode_sum_value(sum);
                let exact = f64::from(x) * n as f64;
                assert!(
                    (decoded - exact).abs() <= e.sum_error_bound(n),
                    "n={n} x={x}: {decoded} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn roundtrip_within_the_quantisation_error_and_clamps_outside() {
        let e = Encoding::new(1.0, 5).expect("encoding");
        let values: Vec<f32> = (0..2001).map(|i| (i as f32 - 1000.0) / 1000.0).collect();
        let mut ring = vec![0u32; values.len()];
        assert_eq!(e.encode(0, &values, &mut ring).expect("encode"), 0);
        for (x, r) in values.iter().zip(&ring) {
            assert!((e.decode_sum_value(*r) - f64::from(*x)).abs() <= e.quantisation_error());
        }
        let mut ring = [0u32; 2];
        assert_eq!(e.encode(0, &[3.0, -7.5], &mut ring).expect("encode"), 2);
        assert_eq!(ring[0] as i32, e.max_level() as i32);
        assert_eq!(ring[1] as i32, -(e.max_level() as i32));
    }

    #[test]
    fn non_finite_values_are_refused_naming_the_element() {
        let e = Encoding::new(1.0, 3).expect("encoding");
        let mut ring = [0u32; 3];
        let err = e
            .encode(100, &[0.0, f32::INFINITY, 0.0], &mut ring)
            .expect_err("infinite");
        assert_eq!(err, SecAggError::NotFinite { index: 101 });
    }

    #[test]
    fn clip_factor_scales_only_long_updates() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(4.0, 1.0), 0.25);
    }
}
