//! Key agreement, key derivation and share encryption.
//!
//! - X25519 (`x25519-dalek`): every party makes two key pairs per round, `c` to agree the keys
//!   that encrypt its shares, `s` to agree its pairwise mask seeds. A key agreement whose output
//!   is all zero (the peer sent a low-order point) is refused naming the peer.
//! - HKDF-SHA256 (`hkdf`, `sha2`) turns a DH output into a key, with a salt naming this protocol
//!   and an info string binding the purpose, the round (job and number) and the parties:
//!   the pairwise mask seed binds the unordered pair (both ends derive the same seed), the share
//!   key binds the direction (sender, recipient).
//! - ChaCha20-Poly1305 (`chacha20poly1305`) encrypts a share with a random 12-byte nonce sent in
//!   front of the ciphertext, and associated data binding (round, sender, recipient): a share
//!   replayed into another round or re-addressed fails authentication.
//! - The self-mask seed b is committed to in the advertisement (SHA-256 of the round, the party
//!   and b), so the server checks what it reconstructs.

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use hkdf::Hkdf;
use rand::CryptoRng;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::error::{Result, SecAggError};
use crate::messages::RoundId;

const SALT: &[u8] = b"cohort-secagg v1";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Appends a length-prefixed field, so that no two different field lists encode alike.
fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u64).to_le_bytes());
    out.extend_from_slice(field);
}

fn binding(purpose: &[u8], round: &RoundId, parties: [&str; 2]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put(&mut out, purpose);
    put(&mut out, round.job.as_bytes());
    put(&mut out, &round.round.to_le_bytes());
    for p in parties {
        put(&mut out, p.as_bytes());
    }
    out
}

/// A party's place-drawing key on the round's ring (see [`crate::graph`]): SHA-256 of the
/// round, the party and its mask public key.
pub(crate) fn ring_key(round: &RoundId, party: &str, s_pk: &[u8; 32]) -> [u8; 32] {
    let mut input = binding(b"ring order", round, [party, ""]);
    put(&mut input, s_pk);
    Sha256::digest(&input).into()
}

/// An X25519 key pair of one party for one round.
pub(crate) struct KeyPair {
    secret: StaticSecret,
    public: [u8; 32],
}

impl KeyPair {
    pub(crate) fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> KeyPair {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut bytes[..]);
        KeyPair::from_secret(*bytes)
    }

    pub(crate) fn from_secret(bytes: [u8; 32]) -> KeyPair {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        KeyPair { secret, public }
    }

    pub(crate) fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The secret's bytes, to be Shamir-shared.
    pub(crate) fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// X25519 with `peer`'s public key; refused when the result is all zero.
    fn agree(&self, peer_public: &[u8; 32], peer: &str) -> Result<Zeroizing<[u8; 32]>> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer_public));
        if !shared.was_contributory() {
            return Err(SecAggError::NonContributoryKey {
                party: peer.to_string(),
            });
        }
        Ok(Zeroizing::new(shared.to_bytes()))
    }

    fn derive(
        &self,
        peer_public: &[u8; 32],
        peer: &str,
        info: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>> {
        let ikm = self.agree(peer_public, peer)?;
        let mut okm = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(SALT), &ikm[..])
            .expand(info, &mut okm[..])
            .map_err(|_| SecAggError::InvalidParams("HKDF output length".into()))?;
        Ok(okm)
    }

    /// The pairwise mask seed s_uv of `me` and `peer` (this pair is `me`'s s key pair): the
    /// same seed at both ends.
    pub(crate) fn mask_seed(
        &self,
        round: &RoundId,
        me: &str,
        peer: &str,
        peer_public: &[u8; 32],
    ) -> Result<Zeroizing<[u8; 32]>> {
        let pair = if me < peer { [me, peer] } else { [peer, me] };
        self.derive(peer_public, peer, &binding(b"pairwise mask", round, pair))
    }

    /// The key that encrypts shares from `sender` to `recipient` (this pair is one end's c key
    /// pair, `peer_public` the other end's).
    pub(crate) fn share_key(
        &self,
        round: &RoundId,
        sender: &str,
        recipient: &str,
        peer: &str,
        peer_public: &[u8; 32],
    ) -> Result<ShareKey> {
        let key = self.derive(
            peer_public,
            peer,
            &binding(b"share encryption", round, [sender, recipient]),
        )?;
        Ok(ShareKey {
            cipher: ChaCha20Poly1305::new(&(*key).into()),
            aad: binding(b"share", round, [sender, recipient]),
        })
    }
}

/// The AEAD key and associated data of one (round, sender, recipient).
pub(crate) struct ShareKey {
    cipher: ChaCha20Poly1305,
    aad: Vec<u8>,
}

/// Bytes of a sealed message around a plaintext of `len` bytes.
pub(crate) const fn sealed_len(len: usize) -> usize {
    NONCE_LEN + len + TAG_LEN
}

impl ShareKey {
    pub(crate) fn seal<R: CryptoRng + ?Sized>(
        &self,
        plaintext: &[u8],
        rng: &mut R,
    ) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let mut out = nonce.to_vec();
        // Encryption fails only for messages past ChaCha20's 256 GiB; ours are 132 bytes.
        let sealed = self
            .cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: plaintext,
                    aad: &self.aad,
                },
            )
            .map_err(|_| SecAggError::InvalidParams("share encryption failed".into()))?;
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The plaintext, or `None` when the message does not authenticate under this key and
    /// associated data.
    pub(crate) fn open(&self, sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(nonce);
        self.cipher
            .decrypt(
                &n.into(),
                Payload {
                    msg: ciphertext,
                    aad: &self.aad,
                },
            )
            .ok()
            .map(Zeroizing::new)
    }
}

/// The public key of an X25519 secret (to check a reconstructed mask key against the
/// advertised one).
pub(crate) fn public_of(secret: &[u8; 32]) -> [u8; 32] {
    KeyPair::from_secret(*secret).public
}

/// The commitment to a self-mask seed published in the advertisement.
pub(crate) fn commit_self_mask(round: &RoundId, party: &str, seed: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(binding(b"self-mask commitment", round, [party, ""]));
    h.update(seed);
    h.finalize().into()
}

/// The mask seed of `me` and `peer` computed by the server from `me`'s reconstructed secret.
pub(crate) fn mask_seed_from_secret(
    secret: &[u8; 32],
    round: &RoundId,
    me: &str,
    peer: &str,
    peer_public: &[u8; 32],
) -> Result<Zeroizing<[u8; 32]>> {
    KeyPair::from_secret(*secret).mask_seed(round, me, peer, peer_public)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn round(n: u64) -> RoundId {
        RoundId::new("job-1", n)
    }

    #[test]
    fn both_ends_agree_the_same_seeds_and_keys() {
        let mut rng = StdRng::seed_from_u64(1);
        let (a, b) = (KeyPair::generate(&mut rng), KeyPair::generate(&mut rng));
        let r = round(3);
        let ab = a.mask_seed(&r, "a", "b", &b.public()).expect("seed");
        let ba = b.mask_seed(&r, "b", "a", &a.public()).expect("seed");
        assert_eq!(*ab, *ba);
        assert_ne!(
            *ab,
            *a.mask_seed(&round(4), "a", "b", &b.public()).expect("seed")
        );

        let to_b = a.share_key(&r, "a", "b", "b", &b.public()).expect("key");
        let at_b = b.share_key(&r, "a", "b", "a", &a.public()).expect("key");
        let sealed = to_b.seal(b"hello", &mut rng).expect("seal");
        assert_eq!(sealed.len(), sealed_len(5));
        assert_eq!(&at_b.open(&sealed).expect("opens")[..], b"hello");
    }

    #[test]
    fn another_round_direction_or_tampering_fails_authentication() {
        let mut rng = StdRng::seed_from_u64(2);
        let (a, b) = (KeyPair::generate(&mut rng), KeyPair::generate(&mut rng));
        let sealed = a
            .share_key(&round(1), "a", "b", "b", &b.public())
            .expect("key")
            .seal(b"share", &mut rng)
            .expect("seal");
        let other_round = b.share_key(&round(2), "a", "b", "a", &a.public());
        assert!(other_round.expect("key").open(&sealed).is_none());
        let reversed = b.share_key(&round(1), "b", "a", "a", &a.public());
        assert!(reversed.expect("key").open(&sealed).is_none());
        let right = b
            .share_key(&round(1), "a", "b", "a", &a.public())
            .expect("key");
        let mut tampered = sealed.clone();
        tampered[20] ^= 1;
        assert!(right.open(&tampered).is_none());
        assert!(right.open(&sealed[..10]).is_none());
        assert!(right.open(&sealed).is_some());
    }

    #[test]
    fn a_low_order_public_key_is_refused_naming_its_party() {
        let mut rng = StdRng::seed_from_u64(3);
        let a = KeyPair::generate(&mut rng);
        let err = a
            .mask_seed(&round(1), "a", "mallory", &[0u8; 32])
            .expect_err("zero point");
        assert_eq!(
            err,
            SecAggError::NonContributoryKey {
                party: "mallory".into()
            }
        );
    }

    #[test]
    fn reconstructed_secrets_give_the_same_public_key_and_seed() {
        let mut rng = StdRng::seed_from_u64(4);
        let (a, b) = (KeyPair::generate(&mut rng), KeyPair::generate(&mut rng));
        let secret = a.secret_bytes();
        assert_eq!(public_of(&secret), a.public());
        let r = round(1);
        let seed = mask_seed_from_secret(&secret, &r, "a", "b", &b.public()).expect("seed");
        assert_eq!(
            *seed,
            *b.mask_seed(&r, "b", "a", &a.public()).expect("seed")
        );
    }
}
