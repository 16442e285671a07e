//! Secure aggregation after Bonawitz et al. 2017 ("Practical Secure
//! Aggregation for Privacy-Preserving Machine Learning"), with the sparse
//! neighbourhoods of SecAgg+ (Bell et al. 2020): the hub learns the sum of
//! the surviving clients' vectors and nothing else about any one of them.
//!
//! A round runs in four steps over a [`Roster`], the clients that advertised
//! [`PublicKeys`], in one fixed order, plus the round's context bytes:
//!
//! 1. Each client calls [`share_keys`]: it Shamir-shares its mask key and
//!    its self-mask seed among its *holders* (itself and its neighbours in
//!    the masking graph) and encrypts each holder's pair of shares for that
//!    holder. The hub forwards the [`EncryptedShare`]s; the clients whose
//!    shares arrived form U2.
//! 2. Each client in U2 calls [`mask_input`]: its encoded vector plus a
//!    self-mask and plus or minus one pairwise mask per neighbour in U2. The
//!    hub feeds the masked vectors to an [`Aggregator`]; the clients whose
//!    vectors arrived form U3.
//! 3. Each client in U3 calls [`unmask`] with U2, U3 and the shares
//!    addressed to it: for every client whose shares it holds it reveals the
//!    self-mask seed share if that client survived and the mask key share if
//!    it dropped, never both.
//! 4. [`Aggregator::finish`] reconstructs the survivors' self-mask seeds and
//!    the dropped clients' mask keys from the [`RevealedShare`]s, removes
//!    the masks that do not cancel, and decodes the [`SecAggSum`].
//!
//! The masking graph is circulant: client `i` masks with the `k/2` clients
//! either side of it in roster order, or with everyone when `k >= n - 1`,
//! which is plain Bonawitz. A client's secrets are reconstructed from a
//! majority, `t = floor(h/2) + 1`, of its `h` holders, so a round survives
//! as long as no neighbourhood loses half of its clients. `k` is sized from
//! the roster and the dropout rate the task expects
//! ([`SecAggParams::neighbours_for`]): with a third of the clients dropping
//! at random, a round of 1,000 fails with probability below 1e-6 at 312
//! neighbours each, where the complete graph would need 999.
//!
//! The hub is assumed honest but curious: it follows the protocol, so the
//! round-3 consistency signatures of the paper are left out, but clients
//! still refuse requests that are inconsistent on their face. Every key
//! derivation and every ciphertext is bound to a digest of the roster (the
//! context, the parameters and every client's keys), so messages from one
//! round are useless in another.
//!
//! Masks are ChaCha20 streams of `u32` words added in the ring of integers
//! modulo 2^32, the ring of the [`FixedPoint`] encoding.

mod client;
mod roster;
mod server;
pub mod shamir;
#[cfg(test)]
mod tests;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

pub use client::{ClientSecrets, mask_input, share_keys, unmask};
pub use roster::Roster;
pub use server::{Aggregator, SecAggSum};
pub use shamir::Share;

use crate::fixed::FixedPoint;
use crate::{Error, Result};

/// The secure-aggregation settings of a task. Every client and the hub use
/// the same values; they are bound into the roster digest.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggParams {
    /// The fraction of a round's clients that may drop out, independently
    /// at random, between sharing keys and unmasking, with the sum still
    /// recovered: it sizes the masking neighbourhoods when
    /// [`neighbours`](SecAggParams::neighbours) is not set. At least 0 and
    /// below 1/2; 1/3 by default.
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// How many other clients each client masks with (`k`): `k/2` either
    /// side in roster order, an odd `k` rounding up; at least 1, and any
    /// value of at least `n - 1` means every client masks with every other.
    /// Unset, the smallest `k` that survives
    /// [`dropout`](SecAggParams::dropout) (see
    /// [`neighbours_for`](SecAggParams::neighbours_for)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbours: Option<usize>,
    /// The fixed-point encoding of the vectors.
    pub fixed: FixedPoint,
}

fn default_dropout() -> f64 {
    SecAggParams::DEFAULT_DROPOUT
}

impl Default for SecAggParams {
    /// Neighbourhoods sized for a third of the clients dropping out, and
    /// the default fixed-point encoding.
    fn default() -> Self {
        SecAggParams {
            dropout: Self::DEFAULT_DROPOUT,
            neighbours: None,
            fixed: FixedPoint::default(),
        }
    }
}

impl SecAggParams {
    /// The dropout rate rounds are sized for unless a task says otherwise.
    pub const DEFAULT_DROPOUT: f64 = 1.0 / 3.0;

    /// The largest probability, with clients dropping out independently at
    /// rate [`dropout`](SecAggParams::dropout), that some client keeps fewer
    /// than [`Roster::threshold`] of its holders, which would fail the round.
    pub const FAILURE_BOUND: f64 = 1e-6;

    /// Refuses a dropout rate outside `[0, 1/2)`: a majority of every
    /// neighbourhood must survive (see [`Roster::threshold`]).
    pub fn check(&self) -> Result<()> {
        if !(0.0..0.5).contains(&self.dropout) {
            return Err(Error::Invalid {
                what: "secure aggregation dropout",
                reason: format!(
                    "{} is not at least 0 and below 0.5: a majority of each neighbourhood must survive",
                    self.dropout
                ),
            });
        }
        if self.neighbours == Some(0) {
            return Err(Error::Invalid {
                what: "secure aggregation neighbours",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// How many other clients each of `n` clients masks with: the explicit
    /// [`neighbours`](SecAggParams::neighbours), or else the smallest even
    /// `k` for which `n` times the probability that a client keeps at most
    /// half of its `k` neighbours, each surviving independently with
    /// probability `1 - dropout`, is at most [`Self::FAILURE_BOUND`]; `n - 1`
    /// (every client masks with every other) when no smaller `k` does.
    ///
    /// For a third dropping out that is 312 at 1,000 clients and 350 at
    /// 10,000; for a tenth, 38 and 42.
    pub fn neighbours_for(&self, n: usize) -> usize {
        if let Some(k) = self.neighbours {
            return k;
        }
        let complete = n.saturating_sub(1).max(2);
        let fails = |k: usize| {
            // A client keeps its secrets while more than half of its k
            // neighbours survive (the threshold of its k + 1 holders).
            n as f64 * binomial_at_most(k, 1.0 - self.dropout, k / 2) > Self::FAILURE_BOUND
        };
        // The tail shrinks as k grows (over even k), so bisect over even k.
        let (mut lo, mut hi) = (1usize, complete.div_ceil(2));
        if fails(2 * hi) {
            return complete;
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if fails(2 * mid) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (2 * lo).min(complete)
    }

    /// These settings with the neighbourhood size fixed for `n` clients:
    /// what the hub sends the clients of a round once it knows its roster,
    /// so that every client builds the same graph.
    pub fn resolved(&self, n: usize) -> SecAggParams {
        SecAggParams {
            neighbours: Some(self.neighbours_for(n)),
            ..*self
        }
    }
}

/// `P[X <= m]` for `X ~ Binomial(k, p)`, summed in the log domain so that
/// large `k` neither underflows nor overflows.
fn binomial_at_most(k: usize, p: f64, m: usize) -> f64 {
    if p >= 1.0 {
        return if m >= k { 1.0 } else { 0.0 };
    }
    if p <= 0.0 {
        return 1.0;
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    // ln C(k, i) p^i q^(k-i), by the ratio of consecutive terms, summed as
    // a running log-sum-exp: `sum` is the total divided by e^top.
    let mut term = k as f64 * lq;
    let (mut top, mut sum) = (term, 1.0f64);
    for i in 1..=m.min(k) {
        term += ((k - i + 1) as f64 / i as f64).ln() + lp - lq;
        if term > top {
            sum = sum * (top - term).exp() + 1.0;
            top = term;
        } else {
            sum += (term - top).exp();
        }
    }
    (top + sum.ln()).exp().min(1.0)
}

/// What a client advertises before a round: two X25519 public keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeys {
    /// Key agreement for the channel that carries shares to this client.
    pub cipher_pk: [u8; 32],
    /// Key agreement for the pairwise masks.
    pub mask_pk: [u8; 32],
}

/// One client's shares (of its mask key and of its self-mask seed) for one
/// holder, encrypted and authenticated for that holder. The hub only
/// forwards it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptedShare {
    /// Roster index of the client whose secrets are shared.
    pub from: u32,
    /// Roster index of the holder it is for.
    pub to: u32,
    /// A random 12-byte nonce followed by the ChaCha20-Poly1305 ciphertext
    /// and tag, [`SHARE_CIPHERTEXT_LEN`] bytes in all.
    pub ciphertext: Vec<u8>,
}

/// Which of a client's two secrets a revealed share is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareKind {
    /// The self-mask seed, revealed when the client's masked input arrived.
    SelfSeed,
    /// The mask key, revealed when the client dropped after sharing keys.
    MaskKey,
}

/// A share a holder hands the hub in the unmasking step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevealedShare {
    /// Roster index of the client whose secret this is a share of.
    pub of: u32,
    /// Roster index of the holder revealing it.
    pub holder: u32,
    /// Which secret it is a share of.
    pub kind: ShareKind,
    /// The share; its x coordinate is `holder + 1`.
    pub share: Share,
}

/// Length of the nonce prefixed to each [`EncryptedShare`] ciphertext.
const NONCE_LEN: usize = 12;
/// Length of the Poly1305 tag.
const TAG_LEN: usize = 16;
/// Length of a plaintext pair of shares: two shares' field elements, eight
/// bytes each. The x coordinate is implied by the recipient.
const SHARE_PAIR_LEN: usize = 2 * shamir::ELEMENTS * 8;

/// The length of every [`EncryptedShare::ciphertext`], for byte accounting.
pub const SHARE_CIPHERTEXT_LEN: usize = NONCE_LEN + SHARE_PAIR_LEN + TAG_LEN;

// Domain-separation labels, one per derived key, so that no derived value
// can stand in for another.
const LABEL_ROSTER: &[u8] = b"strata secagg v1 roster\0";
const LABEL_CIPHER: &[u8] = b"strata secagg v1 share cipher\0";
const LABEL_PAIRWISE: &[u8] = b"strata secagg v1 pairwise mask\0";
const LABEL_SELF: &[u8] = b"strata secagg v1 self mask\0";

/// SHA-256 of `label || secret || roster digest`: every key the protocol
/// derives, bound to the round.
fn derive(label: &[u8], secret: &[u8; 32], roster_digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(label);
    h.update(secret);
    h.update(roster_digest);
    h.finalize().into()
}

/// The x coordinate of a roster index's shares: its index plus one, since
/// zero is where the secret sits.
fn share_x(index: usize) -> u32 {
    // `Roster::new` refuses rosters whose indices plus one overflow `u32`.
    (index + 1) as u32
}

/// Whether a mask is added or subtracted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sign {
    Plus,
    Minus,
}

/// Adds (or subtracts) to `acc` the ChaCha20 stream seeded by `seed`, read
/// as little-endian `u32` words, with wrapping arithmetic.
fn apply_mask(acc: &mut [u32], seed: [u8; 32], sign: Sign) {
    let mut prg = ChaCha20Rng::from_seed(seed);
    // A stack buffer keeps the stream expansion in cache and the memory
    // O(1) beyond the accumulator; the cipher fills whole blocks into it.
    let mut words = [0u32; 1024];
    for chunk in acc.chunks_mut(words.len()) {
        let words = &mut words[..chunk.len()];
        prg.fill(words);
        match sign {
            Sign::Plus => {
                for (a, w) in chunk.iter_mut().zip(words.iter()) {
                    *a = a.wrapping_add(*w);
                }
            }
            Sign::Minus => {
                for (a, w) in chunk.iter_mut().zip(words.iter()) {
                    *a = a.wrapping_sub(*w);
                }
            }
        }
    }
}

/// A set of roster indices as a membership table, refusing indices outside
/// the roster. Repeated indices are harmless and ignored.
fn member_set(n: usize, indices: &[usize], what: &str) -> Result<Vec<bool>> {
    let mut set = vec![false; n];
    for &i in indices {
        *set.get_mut(i).ok_or_else(|| {
            Error::SecAgg(format!(
                "{what} lists client {i}, but the roster has {n} clients"
            ))
        })? = true;
    }
    Ok(set)
}
