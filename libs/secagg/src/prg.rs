//! The mask PRG: a 32-byte seed expanded per element with the ChaCha20 keystream (RFC 8439,
//! `chacha20` crate; key = seed, nonce = 0, block counter from 0). Element i of a mask is the
//! little-endian u32 at keystream byte 4·i, so any range [offset, offset + len) is produced by
//! seeking, without generating the prefix. The 32-bit block counter bounds a mask to just
//! under 2^36 elements ([`MAX_MASK_ELEMENTS`]). Every seed is used for one vector only (pairwise seeds are bound to the round
//! and the pair; self-mask seeds are fresh per round), so the zero nonce never repeats a
//! keystream across vectors.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};

use crate::error::{Result, SecAggError};

/// The most elements a mask has: the 2^32 − 1 ChaCha20 blocks the crate's 32-bit counter allows
/// (it keeps the last one from wrapping), 16 u32 each; just under 2^36.
pub const MAX_MASK_ELEMENTS: u64 = (u32::MAX as u64) * 16;

/// Writes elements `[offset, offset + out.len())` of the mask expanded from `seed` into `out`.
pub fn mask_range(seed: &[u8; 32], offset: u64, out: &mut [u32]) -> Result<()> {
    let len = out.len() as u64;
    let in_range = offset
        .checked_add(len)
        .is_some_and(|end| end <= MAX_MASK_ELEMENTS);
    if !in_range {
        return Err(SecAggError::MaskRange { offset, len });
    }
    let mut cipher = ChaCha20::new(&(*seed).into(), &[0u8; 12].into());
    let range_error = |_| SecAggError::MaskRange { offset, len };
    cipher.try_seek(offset * 4).map_err(range_error)?;
    out.fill(0);
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
    cipher.try_apply_keystream(bytes).map_err(range_error)?;
    for word in out.iter_mut() {
        *word = u32::from_le(*word);
    }
    Ok(())
}

/// Whether a mask is added to or subtracted from a vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    Add,
    Subtract,
}

impl Sign {
    pub fn opposite(self) -> Sign {
        match self {
            Sign::Add => Sign::Subtract,
            Sign::Subtract => Sign::Add,
        }
    }
}

const BLOCK: usize = 4096;

/// Adds (or subtracts) the mask of `seed` over elements `[offset, offset + acc.len())` to `acc`
/// in wrapping arithmetic, a block at a time (no allocation).
pub fn apply_mask(seed: &[u8; 32], offset: u64, acc: &mut [u32], sign: Sign) -> Result<()> {
    let mut block = [0u32; BLOCK];
    let mut at = offset;
    for part in acc.chunks_mut(BLOCK) {
        let mask = &mut block[..part.len()];
        mask_range(seed, at, mask)?;
        match sign {
            Sign::Add => part
                .iter_mut()
                .zip(mask.iter())
                .for_each(|(a, m)| *a = a.wrapping_add(*m)),
            Sign::Subtract => part
                .iter_mut()
                .zip(mask.iter())
                .for_each(|(a, m)| *a = a.wrapping_sub(*m)),
        }
        at += part.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_rfc_8439_keystream() {
        // RFC 8439 A.1, test vector #1: key 0, nonce 0, block 0 starts 76 b8 e0 ad a0 f1 3d 90.
        let mut out = [0u32; 2];
        mask_range(&[0u8; 32], 0, &mut out).expect("mask");
        assert_eq!(out, [0xade0_b876, 0x903d_f1a0]);
    }

    #[test]
    fn ranges_at_offsets_equal_the_whole_mask() {
        let seed = [7u8; 32];
        let mut whole = vec![0u32; 10_000];
        mask_range(&seed, 0, &mut whole).expect("mask");
        for (offset, len) in [(0usize, 1usize), (1, 15), (16, 16), (17, 100), (4095, 4097)] {
            let mut part = vec![0u32; len];
            mask_range(&seed, offset as u64, &mut part).expect("mask");
            assert_eq!(part, whole[offset..offset + len], "offset {offset}");
        }
        let mut other = vec![0u32; 16];
        mask_range(&[8u8; 32], 0, &mut other).expect("mask");
        assert_ne!(other, whole[..16]);
    }

    #[test]
    fn apply_then_remove_is_identity() {
        let seed = [3u8; 32];
        let original: Vec<u32> = (0..9000).collect();
        let mut v = original.clone();
        apply_mask(&seed, 123, &mut v, Sign::Add).expect("add");
        assert_ne!(v, original);
        apply_mask(&seed, 123, &mut v, Sign::Add.opposite()).expect("sub");
        assert_eq!(v, original);
    }

    #[test]
    fn past_the_counter_is_refused() {
        let mut out = [0u32; 16];
        assert!(mask_range(&[0; 32], MAX_MASK_ELEMENTS - 16, &mut out).is_ok());
        assert!(matches!(
            mask_range(&[0; 32], MAX_MASK_ELEMENTS - 15, &mut out),
            Err(SecAggError::MaskRange { .. })
        ));
        assert!(mask_range(&[0; 32], u64::MAX, &mut out).is_err());
    }
}
