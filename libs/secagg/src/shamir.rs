//! Shamir secret sharing of 32-byte secrets over the prime field of curve25519-dalek's
//! [`Scalar`] (order ℓ = 2^252 + 27742317777372353535851937790883648493; the audited
//! arithmetic of the dalek crates, no field code of ours).
//!
//! A secret is split into two 16-byte pieces, each a field element below 2^128 < ℓ, and each
//! piece gets its own random polynomial of degree t − 1 whose constant term is the piece; a
//! share is (index x ≠ 0, both polynomials at x). Any t shares give the pieces back by Lagrange
//! interpolation at 0; t − 1 shares give values independent of the secret (and almost surely
//! not below 2^128, which [`reconstruct`] refuses as [`ShamirError::NotASecret`]). More than t
//! shares are checked: every share past the first t must lie on the polynomial the first t
//! define, else the share is refused naming its index.

use curve25519_dalek::Scalar;
use rand::CryptoRng;
use zeroize::{Zeroize, Zeroizing};

use crate::error::ShamirError;

/// Bytes of a shared secret (an X25519 secret key or a mask seed).
pub const SECRET_LEN: usize = 32;
const PIECES: usize = 2;
const PIECE_LEN: usize = SECRET_LEN / PIECES;
/// Bytes of an encoded share: index (u32 little-endian) and two canonical scalars.
pub const SHARE_LEN: usize = 4 + PIECES * 32;

/// One party's share of one secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Share {
    index: u32,
    pieces: [Scalar; PIECES],
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.pieces.zeroize();
    }
}

impl Share {
    /// The evaluation point: the holder's 1-based position in the roster.
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn to_bytes(&self) -> Zeroizing<[u8; SHARE_LEN]> {
        let mut out = Zeroizing::new([0u8; SHARE_LEN]);
        out[..4].copy_from_slice(&self.index.to_le_bytes());
        for (i, piece) in self.pieces.iter().enumerate() {
            out[4 + 32 * i..4 + 32 * (i + 1)].copy_from_slice(piece.as_bytes());
        }
        out
    }

    /// Parses a share, refusing a wrong length, index 0 and non-canonical field elements.
    pub fn from_bytes(bytes: &[u8]) -> Result<Share, ShamirError> {
        if bytes.len() != SHARE_LEN {
            return Err(ShamirError::Malformed("a share is 68 bytes"));
        }
        let mut index = [0u8; 4];
        index.copy_from_slice(&bytes[..4]);
        let index = u32::from_le_bytes(index);
        if index == 0 {
            return Err(ShamirError::ZeroIndex);
        }
        let mut pieces = [Scalar::ZERO; PIECES];
        for (i, piece) in pieces.iter_mut().enumerate() {
            let mut b = Zeroizing::new([0u8; 32]);
            b.copy_from_slice(&bytes[4 + 32 * i..4 + 32 * (i + 1)]);
            *piece = Option::from(Scalar::from_canonical_bytes(*b))
                .ok_or(ShamirError::Malformed("a field element is not canonical"))?;
        }
        Ok(Share { index, pieces })
    }
}

fn random_scalar<R: CryptoRng + ?Sized>(rng: &mut R) -> Scalar {
    let mut wide = Zeroizing::new([0u8; 64]);
    rng.fill_bytes(&mut wide[..]);
    Scalar::from_bytes_mod_order_wide(&wide)
}

/// Splits `secret` with threshold `threshold` into one share per index in `indices` (distinct,
/// non-zero; in Cohort a party's 1-based roster position).
pub fn split<R: CryptoRng + ?Sized>(
    secret: &[u8; SECRET_LEN],
    threshold: usize,
    indices: &[u32],
    rng: &mut R,
) -> Result<Vec<Share>, ShamirError> {
    if threshold == 0 || threshold > indices.len() {
        return Err(ShamirError::InvalidThreshold {
            threshold,
            parties: indices.len(),
        });
    }
    check_indices(indices.iter().copied())?;
    // coefficients[p][k]: coefficient of x^k of piece p's polynomial.
    let mut coefficients: Vec<[Scalar; PIECES]> = Vec::with_capacity(threshold);
    let mut constant = [Scalar::ZERO; PIECES];
    for (p, c) in constant.iter_mut().enumerate() {
        let mut b = Zeroizing::new([0u8; 32]);
        b[..PIECE_LEN].copy_from_slice(&secret[p * PIECE_LEN..(p + 1) * PIECE_LEN]);
        *c = Scalar::from_bytes_mod_order(*b);
    }
    coefficients.push(constant);
    for _ in 1..threshold {
        coefficients.push([random_scalar(rng), random_scalar(rng)]);
    }
    let shares = indices
        .iter()
        .map(|&index| {
            let x = Scalar::from(index);
            let mut pieces = [Scalar::ZERO; PIECES];
            for (p, piece) in pieces.iter_mut().enumerate() {
                // Horner from the highest coefficient.
                *piece = coefficients
                    .iter()
                    .rev()
                    .fold(Scalar::ZERO, |acc, c| acc * x + c[p]);
            }
            Share { index, pieces }
        })
        .collect();
    coefficients.zeroize();
    Ok(shares)
}

fn check_indices(indices: impl Iterator<Item = u32>) -> Result<(), ShamirError> {
    let mut seen = std::collections::BTreeSet::new();
    for index in indices {
        if index == 0 {
            return Err(ShamirError::ZeroIndex);
        }
        if !seen.insert(index) {
            return Err(ShamirError::DuplicateIndex(index));
        }
    }
    Ok(())
}

/// The value at `x` of the polynomial through `points` (Lagrange), for each piece.
fn interpolate(points: &[&Share], x: Scalar) -> [Scalar; PIECES] {
    let mut out = [Scalar::ZERO; PIECES];
    for (i, pi) in points.iter().enumerate() {
        let xi = Scalar::from(pi.index);
        let mut num = Scalar::ONE;
        let mut den = Scalar::ONE;
        for (j, pj) in points.iter().enumerate() {
            if i != j {
                let xj = Scalar::from(pj.index);
                num *= x - xj;
                den *= xi - xj;
            }
        }
        // Indices are distinct and below ℓ, so den ≠ 0.
        let lambda = num * den.invert();
        for (o, piece) in out.iter_mut().zip(pi.pieces.iter()) {
            *o += lambda * piece;
        }
    }
    out
}

/// Reconstructs a secret from at least `threshold` shares of it: the first `threshold` are
/// interpolated at 0, every further share must agree with them.
pub fn reconstruct(
    shares: &[Share],
    threshold: usize,
) -> Result<Zeroizing<[u8; SECRET_LEN]>, ShamirError> {
    if threshold == 0 {
        return Err(ShamirError::InvalidThreshold {
            threshold,
            parties: shares.len(),
        });
    }
    if shares.len() < threshold {
        return Err(ShamirError::TooFewShares {
            have: shares.len(),
            threshold,
        });
    }
    check_indices(shares.iter().map(|s| s.index))?;
    let basis: Vec<&Share> = shares[..threshold].iter().collect();
    for extra in &shares[threshold..] {
        if interpolate(&basis, Scalar::from(extra.index)) != extra.pieces {
            return Err(ShamirError::Inconsistent { index: extra.index });
        }
    }
    let mut pieces = interpolate(&basis, Scalar::ZERO);
    let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
    let mut result = Ok(());
    for (p, piece) in pieces.iter().enumerate() {
        let bytes = piece.as_bytes();
        if bytes[PIECE_LEN..].iter().any(|b| *b != 0) {
            result = Err(ShamirError::NotASecret);
        }
        secret[p * PIECE_LEN..(p + 1) * PIECE_LEN].copy_from_slice(&bytes[..PIECE_LEN]);
    }
    pieces.zeroize();
    result.map(|()| secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn secret(seed: u8) -> [u8; 32] {
        std::array::from_fn(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 0x80)
    }

    fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
        (0u32..(1 << n))
            .filter(|m| m.count_ones() as usize == k)
            .map(|m| (0..n).filter(|i| m & (1 << i) != 0).collect())
            .collect()
    }

    #[test]
    fn any_t_of_n_reconstruct_and_t_minus_one_do_not() {
        let mut rng = StdRng::seed_from_u64(1);
        let s = secret(9);
        let indices = [1, 2, 3, 4, 5];
        let shares = split(&s, 3, &indices, &mut rng).expect("split");
        for subset in subsets(5, 3) {
            let picked: Vec<Share> = subset.iter().map(|&i| shares[i].clone()).collect();
            assert_eq!(
                *reconstruct(&picked, 3).expect("reconstruct"),
                s,
                "{subset:?}"
            );
        }
        // All five agree too (the extra two are checked against the first three).
        assert_eq!(*reconstruct(&shares, 3).expect("all"), s);
        for subset in subsets(5, 2) {
            let picked: Vec<Share> = subset.iter().map(|&i| shares[i].clone()).collect();
            assert_eq!(
                reconstruct(&picked, 3).expect_err("too few"),
                ShamirError::TooFewShares {
                    have: 2,
                    threshold: 3
                }
            );
            // Interpolating the two as if they were enough gives something else.
            match reconstruct(&picked, 2) {
                Ok(v) => assert_ne!(*v, s, "{subset:?}"),
                Err(e) => assert_eq!(e, ShamirError::NotASecret),
            }
        }
    }

    #[test]
    fn shares_survive_their_encoding_and_bad_bytes_are_refused() {
        let mut rng = StdRng::seed_from_u64(2);
        let s = secret(1);
        let shares = split(&s, 2, &[1, 2, 3], &mut rng).expect("split");
        let decoded: Vec<Share> = shares
            .iter()
            .map(|sh| Share::from_bytes(&sh.to_bytes()[..]).expect("decode"))
            .collect();
        assert_eq!(decoded, shares);
        let bytes = shares[0].to_bytes();
        assert!(matches!(
            Share::from_bytes(&bytes[..SHARE_LEN - 1]),
            Err(ShamirError::Malformed(_))
        ));
        let mut zero = *bytes;
        zero[..4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(Share::from_bytes(&zero), Err(ShamirError::ZeroIndex));
        let mut non_canonical = *bytes;
        non_canonical[4..36].copy_from_slice(&[0xff; 32]);
        assert!(matches!(
            Share::from_bytes(&non_canonical),
            Err(ShamirError::Malformed(_))
        ));
    }

    #[test]
    fn duplicate_and_inconsistent_shares_are_refused() {
        let mut rng = StdRng::seed_from_u64(3);
        let s = secret(5);
        let shares = split(&s, 3, &[1, 2, 3, 4, 5], &mut rng).expect("split");
        let dup = vec![shares[0].clone(), shares[1].clone(), shares[0].clone()];
        assert_eq!(
            reconstruct(&dup, 3).expect_err("duplicate"),
            ShamirError::DuplicateIndex(1)
        );
        // A share of another secret at index 4, given beyond the threshold, is caught.
        let other = split(&secret(6), 3, &[1, 2, 3, 4, 5], &mut rng).expect("split");
        let mixed = vec![
            shares[0].clone(),
            shares[1].clone(),
            shares[2].clone(),
            other[3].clone(),
        ];
        assert_eq!(
            reconstruct(&mixed, 3).expect_err("inconsistent"),
            ShamirError::Inconsistent { index: 4 }
        );
        assert!(matches!(
            split(&s, 0, &[1, 2], &mut rng),
            Err(ShamirError::InvalidThreshold { .. })
        ));
        assert!(matches!(
            split(&s, 3, &[1, 2], &mut rng),
            Err(ShamirError::InvalidThreshold { .. })
        ));
        assert_eq!(
            split(&s, 2, &[1, 1, 2], &mut rng).expect_err("dup index"),
            ShamirError::DuplicateIndex(1)
        );
        assert_eq!(
            split(&s, 2, &[0, 1], &mut rng).expect_err("zero index"),
            ShamirError::ZeroIndex
        );
    }

    #[test]
    fn a_secret_with_every_bit_set_round_trips() {
        let mut rng = StdRng::seed_from_u64(4);
        for s in [[0u8; 32], [0xff; 32]] {
            let shares = split(&s, 1, &[7], &mut rng).expect("split");
            assert_eq!(*reconstruct(&shares, 1).expect("reconstruct"), s);
        }
    }
}
