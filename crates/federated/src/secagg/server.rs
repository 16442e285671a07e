//! The hub's side of a round: summing masked inputs as they arrive and
//! removing the masks at the end.

use std::collections::HashMap;

use x25519_dalek::{PublicKey, StaticSecret};

use super::client::{pairwise_seed, self_mask_seed};
use super::shamir::{self, Share};
use super::{RevealedShare, Roster, ShareKind, Sign, apply_mask, member_set, share_x};
use crate::{Error, Result};

/// The result of a secure-aggregation round.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SecAggSum {
    /// The sum (not the mean) of the surviving clients' clamped vectors,
    /// to within the fixed-point resolution per client.
    pub sum: Vec<f32>,
    /// How many clients' vectors are in the sum, `|U3|`.
    pub count: usize,
    /// Roster indices whose vectors are not in the sum, in increasing
    /// order: clients that dropped before sharing keys or before sending
    /// their masked input.
    pub dropped: Vec<usize>,
}

/// The hub's accumulator for one round: the wrapping sum of the masked
/// inputs, so memory is O(dim) whatever the number of clients.
#[derive(Debug)]
pub struct Aggregator {
    roster: Roster,
    acc: Vec<u32>,
    added: Vec<bool>,
    count: usize,
}

impl Aggregator {
    /// An empty accumulator for vectors of `dim` values.
    pub fn new(roster: &Roster, dim: usize) -> Result<Aggregator> {
        if dim == 0 {
            return Err(Error::Invalid {
                what: "secure aggregation dimension",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Aggregator {
            roster: roster.clone(),
            acc: vec![0; dim],
            added: vec![false; roster.len()],
            count: 0,
        })
    }

    /// Adds client `from`'s masked input. Refuses an index outside the
    /// roster, a second input from one client and a vector of the wrong
    /// length.
    pub fn add_masked(&mut self, from: usize, y: &[u32]) -> Result<()> {
        let added = self.added.get_mut(from).ok_or_else(|| {
            Error::SecAgg(format!(
                "masked input from client {from}, outside the roster of {}",
                self.roster.len()
            ))
        })?;
        if *added {
            return Err(Error::SecAgg(format!(
                "a second masked input from client {from}"
            )));
        }
        if y.len() != self.acc.len() {
            return Err(Error::Shape {
                what: "masked input",
                expected: self.acc.len(),
                got: y.len(),
            });
        }
        *added = true;
        self.count += 1;
        for (a, &v) in self.acc.iter_mut().zip(y) {
            *a = a.wrapping_add(v);
        }
        Ok(())
    }

    /// How many masked inputs have been added.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The clients whose masked inputs have been added, U3, in increasing
    /// order: what the hub sends the clients for [`unmask`](super::unmask).
    pub fn survivors(&self) -> Vec<usize> {
        (0..self.added.len()).filter(|&i| self.added[i]).collect()
    }

    /// Removes the masks and decodes the sum. `u2` is the set the clients
    /// were given in the masking step; U3 is the set of clients added, and
    /// must be a subset of it. `revealed` holds the shares the survivors
    /// returned from [`unmask`](super::unmask).
    ///
    /// Reconstructs every survivor's self-mask seed and every dropped
    /// client's (in U2, not in U3) mask key from `t` shares each, subtracts
    /// the self-masks and the dropped clients' pairwise masks with their
    /// surviving neighbours. [`Error::TooFew`] when some client has fewer
    /// than `t` shares; [`Error::SecAgg`] when a share is inconsistent with
    /// the round or the shares of a mask key do not reconstruct the key the
    /// client advertised.
    pub fn finish(self, u2: &[usize], revealed: &[RevealedShare]) -> Result<SecAggSum> {
        let roster = &self.roster;
        let n = roster.len();
        let u2 = member_set(n, u2, "the set of clients that shared keys")?;
        let survived = &self.added;
        if let Some(v) = (0..n).find(|&v| survived[v] && !u2[v]) {
            return Err(Error::SecAgg(format!(
                "client {v} sent a masked input but is not in the set of clients that shared keys"
            )));
        }
        if self.count == 0 {
            return Err(Error::TooFew {
                what: "masked inputs",
                need: 1,
                have: 0,
            });
        }

        // Group the shares by the client they are of, as indices into
        // `revealed`, after checking each against the round.
        let mut by_client: Vec<Vec<u32>> = vec![Vec::new(); n];
        for (k, r) in revealed.iter().enumerate() {
            let (of, holder) = (r.of as usize, r.holder as usize);
            if of >= n || !u2[of] {
                return Err(Error::SecAgg(format!(
                    "a share of client {of}, which is not in the set of clients that shared keys"
                )));
            }
            if !roster.holds(holder, of) || !survived[holder] {
                return Err(Error::SecAgg(format!(
                    "a share of client {of} from client {holder}, which is not a surviving holder of its shares"
                )));
            }
            if r.share.x != share_x(holder) {
                return Err(Error::SecAgg(format!(
                    "the share of client {of} from client {holder} has x coordinate {}",
                    r.share.x
                )));
            }
            let expected = if survived[of] {
                ShareKind::SelfSeed
            } else {
                ShareKind::MaskKey
            };
            if r.kind != expected {
                return Err(Error::SecAgg(format!(
                    "client {holder} revealed the wrong kind of share of client {of}"
                )));
            }
            by_client[of].push(k as u32);
        }

        // Reconstruct every secret before expanding any mask, so that a
        // round that cannot finish fails fast.
        let t = roster.threshold();
        let mut coefficients: HashMap<Vec<u32>, Vec<u64>> = HashMap::new();
        let mut self_seeds = Vec::with_capacity(self.count);
        let mut mask_keys = Vec::new();
        for (v, shares) in by_client.iter_mut().enumerate().filter(|&(v, _)| u2[v]) {
            if shares.len() < t {
                return Err(Error::TooFew {
                    what: if survived[v] {
                        "shares of a surviving client's self-mask seed"
                    } else {
                        "shares of a dropped client's mask key"
                    },
                    need: t,
                    have: shares.len(),
                });
            }
            shares.sort_unstable_by_key(|&k| revealed[k as usize].share.x);
            if let Some(w) = shares
                .windows(2)
                .find(|w| revealed[w[0] as usize].share.x == revealed[w[1] as usize].share.x)
            {
                return Err(Error::SecAgg(format!(
                    "two shares of client {v} from client {}",
                    revealed[w[0] as usize].holder
                )));
            }
            // The lowest t holders: with the complete graph every client's
            // shares come from the same survivors, so the Lagrange
            // coefficients are computed once and reused.
            let used: Vec<&Share> = shares[..t]
                .iter()
                .map(|&k| &revealed[k as usize].share)
                .collect();
            let xs: Vec<u32> = used.iter().map(|s| s.x).collect();
            let lambdas = match coefficients.get(&xs) {
                Some(c) => c,
                None => {
                    let c = shamir::lagrange_at_zero(&xs)?;
                    coefficients.entry(xs).or_insert(c)
                }
            };
            let secret = shamir::combine(used, lambdas).ok_or_else(|| {
                Error::SecAgg(format!(
                    "the shares of client {v} do not reconstruct a well-formed secret"
                ))
            })?;
            if survived[v] {
                self_seeds.push(self_mask_seed(roster, &secret));
            } else {
                let key = StaticSecret::from(secret);
                // The advertised key is a commitment to the mask key, which
                // catches a corrupt share before it corrupts the sum.
                if PublicKey::from(&key).to_bytes() != roster.keys(v).mask_pk {
                    return Err(Error::SecAgg(format!(
                        "the mask key reconstructed for client {v} does not match its public key"
                    )));
                }
                mask_keys.push((v, key));
            }
        }

        let mut acc = self.acc;
        for seed in self_seeds {
            apply_mask(&mut acc, seed, Sign::Minus);
        }
        for (u, key) in &mask_keys {
            // Survivor v added +PRG(s_vu) when v < u and -PRG(s_vu)
            // otherwise; u's input, which would have cancelled it, never
            // came, so take it out.
            for v in roster.neighbours(*u).filter(|&v| survived[v]) {
                let seed = pairwise_seed(roster, key, v)?;
                let sign = if v < *u { Sign::Minus } else { Sign::Plus };
                apply_mask(&mut acc, seed, sign);
            }
        }
        Ok(SecAggSum {
            sum: roster.params().fixed.decode_sum(&acc),
            count: self.count,
            dropped: (0..n).filter(|&v| !survived[v]).collect(),
        })
    }
}
