//! The round's participants and its masking graph.

use sha2::{Digest, Sha256};

use super::{LABEL_ROSTER, PublicKeys, SecAggParams};
use crate::{Error, Result};

/// The clients of one secure-aggregation round in roster order (index
/// `0..n`), their keys, and the circulant masking graph over them. Both the
/// hub and every client build it from the same parameters, context and keys.
#[derive(Debug, Clone)]
pub struct Roster {
    params: SecAggParams,
    keys: Vec<PublicKeys>,
    /// Neighbours either side; meaningless when `complete`.
    half: usize,
    /// Every client masks with every other (plain Bonawitz).
    complete: bool,
    /// Size of each closed neighbourhood (a client and its neighbours).
    holders_len: usize,
    threshold: usize,
    digest: [u8; 32],
}

impl Roster {
    /// Builds the roster of a round. `context` identifies the round (task
    /// and round number) and is bound, with the parameters and every key,
    /// into a digest that every derived key and ciphertext depends on.
    ///
    /// Refuses fewer than three clients, zero neighbours, a dropout rate
    /// outside `[0, 1/2)`, a fixed-point encoding that could overflow with
    /// this many clients, and a key advertised twice.
    pub fn new(params: &SecAggParams, context: &[u8], keys: Vec<PublicKeys>) -> Result<Roster> {
        let n = keys.len();
        if n < 3 {
            return Err(Error::Invalid {
                what: "secure aggregation roster",
                reason: format!(
                    "too few clients for secure aggregation, need at least 3, have {n}"
                ),
            });
        }
        // Share x coordinates are indices plus one and messages carry
        // indices as `u32`.
        if n >= u32::MAX as usize {
            return Err(Error::Invalid {
                what: "secure aggregation roster",
                reason: format!("{n} clients do not fit 32-bit indices"),
            });
        }
        params.check()?;
        params.fixed.check(n)?;
        let mut seen: Vec<[u8; 32]> = keys.iter().flat_map(|k| [k.cipher_pk, k.mask_pk]).collect();
        seen.sort_unstable();
        if seen.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::Invalid {
                what: "secure aggregation roster",
                reason: "a public key is advertised twice".into(),
            });
        }

        let neighbours = params.neighbours_for(n);
        let half = neighbours.div_ceil(2);
        let complete = half.saturating_mul(2) >= n - 1;
        let holders_len = if complete { n } else { 2 * half + 1 };
        if holders_len < 3 {
            return Err(Error::Invalid {
                what: "secure aggregation roster",
                reason: format!(
                    "too few clients for secure aggregation, need at least 3 holders per client, have {holders_len}"
                ),
            });
        }
        // A majority threshold is what keeps the hub from collecting both
        // kinds of share of one client from disjoint sets of holders, and
        // the smallest that does lets the most holders drop.
        let threshold = holders_len / 2 + 1;

        let mut h = Sha256::new();
        h.update(LABEL_ROSTER);
        h.update((context.len() as u64).to_le_bytes());
        h.update(context);
        h.update((neighbours as u64).to_le_bytes());
        h.update(params.fixed.scale_bits.to_le_bytes());
        h.update(params.fixed.clip.to_bits().to_le_bytes());
        h.update((n as u64).to_le_bytes());
        for k in &keys {
            h.update(k.cipher_pk);
            h.update(k.mask_pk);
        }
        Ok(Roster {
            params: *params,
            keys,
            half,
            complete,
            holders_len,
            threshold,
            digest: h.finalize().into(),
        })
    }

    /// The number of clients, `n`.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a roster has at least three clients.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The parameters the roster was built with.
    pub fn params(&self) -> &SecAggParams {
        &self.params
    }

    /// The keys of the client at roster index `i`.
    ///
    /// # Panics
    ///
    /// When `i` is not below [`len`](Roster::len).
    pub fn keys(&self, i: usize) -> &PublicKeys {
        &self.keys[i]
    }

    /// Every client's keys in roster order.
    pub fn all_keys(&self) -> &[PublicKeys] {
        &self.keys
    }

    /// Whether every client masks with every other (plain Bonawitz).
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The digest of context, parameters and keys that every derived key and
    /// ciphertext of the round is bound to.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The clients `i` masks with, nearest first in roster order
    /// (`i+1, i-1, i+2, i-2, …` modulo `n`); `i` itself is not among them.
    pub fn neighbours(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        let n = self.len();
        debug_assert!(i < n);
        // Offsets +1, -1, +2, -2, … give the circulant graph directly and,
        // cut at n - 1 of them, every other client of the complete graph.
        (1..self.holders_len).map(move |m| {
            let d = m.div_ceil(2);
            if m % 2 == 1 {
                (i + d) % n
            } else {
                (i + n - d) % n
            }
        })
    }

    /// The clients that hold shares of `i`'s secrets: `i` itself first,
    /// then its [`neighbours`](Roster::neighbours).
    pub fn holders(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        std::iter::once(i).chain(self.neighbours(i))
    }

    /// Whether `i` and `j` mask with each other. The graph is symmetric.
    pub fn is_neighbour(&self, i: usize, j: usize) -> bool {
        let n = self.len();
        if i >= n || j >= n || i == j {
            return false;
        }
        let d = i.abs_diff(j);
        self.complete || d.min(n - d) <= self.half
    }

    /// Whether `holder` holds shares of `of`'s secrets: it is `of` or one of
    /// its neighbours.
    pub fn holds(&self, holder: usize, of: usize) -> bool {
        (holder == of && of < self.len()) || self.is_neighbour(holder, of)
    }

    /// The number of holders per client, `h`: `k + 1` for a circulant graph
    /// (`k` rounded up to even), `n` for the complete one.
    pub fn holders_len(&self) -> usize {
        self.holders_len
    }

    /// How many of a client's holders must reveal a share to reconstruct
    /// its secret: a majority, `t = floor(h/2) + 1`, so a round survives as
    /// long as no client loses half of its holders between sharing keys and
    /// unmasking. An honest holder reveals one kind of share of a client,
    /// never both, and two disjoint sets of `t` holders do not fit in `h`,
    /// so the hub never gets both secrets of one client.
    ///
    /// With dropouts at random, at rate `r`, a client keeps too few holders
    /// with the binomial tail probability `P[Bin(h - 1, 1 - r) < t]`, and a
    /// round fails if any client does; [`SecAggParams::neighbours_for`]
    /// sizes `h` so that this stays below [`SecAggParams::FAILURE_BOUND`].
    pub fn threshold(&self) -> usize {
        self.threshold
    }
}
