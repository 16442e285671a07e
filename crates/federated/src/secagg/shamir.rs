//! Shamir secret sharing of 32-byte secrets over the prime field of order
//! p = 2^61 - 1.
//!
//! A secret is cut into [`ELEMENTS`] little-endian chunks of at most seven
//! bytes, each below 2^56 and so a field element, and each chunk is shared
//! with its own random polynomial of degree `threshold - 1`. A share is the
//! holder's x coordinate and the five polynomial values there. Any
//! `threshold` shares give the secret back by Lagrange interpolation at zero;
//! fewer reveal nothing about it.
//!
//! The field is small enough for `u64` values with `u128` products and
//! large enough that x coordinates (roster positions plus one) never repeat.

use rand::CryptoRng;

use crate::{Error, Result};

/// The field's prime, the Mersenne prime 2^61 - 1.
pub const P: u64 = (1 << 61) - 1;

/// How many field elements one 32-byte secret takes.
pub const ELEMENTS: usize = 5;

/// Bytes of the secret per field element (the last element takes four).
const CHUNK_BYTES: usize = 7;

/// One holder's share of a 32-byte secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    /// The holder's x coordinate, never zero (zero is where the secret
    /// sits).
    pub x: u32,
    /// The sharing polynomials' values at `x`, one per chunk of the secret.
    pub y: [u64; ELEMENTS],
}

/// Reduces a product of two field elements modulo p.
fn reduce(v: u128) -> u64 {
    // 2^61 ≡ 1 (mod p), so the high bits fold onto the low bits. `v` is
    // below p^2 < 2^122, so two folds and one subtraction suffice.
    let folded = (v as u64 & P) + (v >> 61) as u64;
    let folded = (folded & P) + (folded >> 61);
    if folded >= P { folded - P } else { folded }
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) * u128::from(b))
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P { s - P } else { s }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

/// The inverse of a non-zero element, by Fermat: a^(p-2).
fn inv(a: u64) -> u64 {
    debug_assert!(a != 0, "zero has no inverse");
    let mut result = 1;
    let mut base = a;
    let mut e = P - 2;
    while e > 0 {
        if e & 1 == 1 {
            result = mul(result, base);
        }
        base = mul(base, base);
        e >>= 1;
    }
    result
}

/// A uniform field element: 61 random bits, redrawn in the one case (all
/// ones) that is not below p.
fn random_element(rng: &mut (impl CryptoRng + ?Sized)) -> u64 {
    loop {
        let v = rng.next_u64() & P;
        if v < P {
            return v;
        }
    }
}

fn to_elements(secret: &[u8; 32]) -> [u64; ELEMENTS] {
    let mut out = [0; ELEMENTS];
    for (e, chunk) in out.iter_mut().zip(secret.chunks(CHUNK_BYTES)) {
        let mut bytes = [0u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *e = u64::from_le_bytes(bytes);
    }
    out
}

/// The secret whose chunks are `elements`, or `None` when an element does
/// not fit its chunk, which happens (with probability 1 - 2^-49 or so) when
/// the shares interpolated were not all shares of one secret.
fn from_elements(elements: &[u64; ELEMENTS]) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    for (&e, chunk) in elements.iter().zip(out.chunks_mut(CHUNK_BYTES)) {
        if e >> (8 * chunk.len()) != 0 {
            return None;
        }
        chunk.copy_from_slice(&e.to_le_bytes()[..chunk.len()]);
    }
    Some(out)
}

/// Refuses x coordinates that are zero or repeated, which would make the
/// sharing leak the secret or the interpolation divide by zero.
fn check_coordinates(xs: &[u32]) -> Result<()> {
    let mut sorted = xs.to_vec();
    sorted.sort_unstable();
    if sorted.first() == Some(&0) {
        return Err(Error::SecAgg(
            "a share has x coordinate 0, where the secret sits".into(),
        ));
    }
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::SecAgg(format!(
            "two shares have x coordinate {}",
            w[0]
        )));
    }
    Ok(())
}

/// Splits `secret` into one share per x coordinate in `xs` (distinct, not
/// zero) such that any `threshold` of them reconstruct it.
pub fn split(
    secret: &[u8; 32],
    xs: &[u32],
    threshold: usize,
    rng: &mut (impl CryptoRng + ?Sized),
) -> Result<Vec<Share>> {
    if threshold == 0 || threshold > xs.len() {
        return Err(Error::Invalid {
            what: "secret sharing threshold",
            reason: format!("{threshold} is not between 1 and the {} holders", xs.len()),
        });
    }
    check_coordinates(xs)?;
    // coefficients[d][e] is the degree-d coefficient of chunk e's
    // polynomial; degree 0 is the chunk itself.
    let mut coefficients = vec![to_elements(secret)];
    for _ in 1..threshold {
        coefficients.push(std::array::from_fn(|_| random_element(rng)));
    }
    let shares = xs
        .iter()
        .map(|&x| {
            let xf = u64::from(x);
            let y = std::array::from_fn(|e| {
                // Horner's rule from the highest degree down.
                coefficients
                    .iter()
                    .rev()
                    .fold(0, |acc, c| add(mul(acc, xf), c[e]))
            });
            Share { x, y }
        })
        .collect();
    Ok(shares)
}

/// The Lagrange coefficients that interpolate a polynomial through points at
/// `xs` (distinct, not zero) and evaluate it at zero:
/// `λ_j = Π_{m≠j} x_m / (x_m - x_j)`.
pub fn lagrange_at_zero(xs: &[u32]) -> Result<Vec<u64>> {
    check_coordinates(xs)?;
    let xs: Vec<u64> = xs.iter().map(|&x| u64::from(x)).collect();
    let numerator = xs.iter().fold(1, |acc, &x| mul(acc, x));
    // λ_j = (Π_m x_m) / (x_j · Π_{m≠j} (x_m - x_j)); the denominators are
    // inverted together (Montgomery's trick) so that the O(t^2) products,
    // not t exponentiations, dominate.
    let denominators: Vec<u64> = xs
        .iter()
        .enumerate()
        .map(|(j, &xj)| {
            xs.iter()
                .enumerate()
                .filter(|&(m, _)| m != j)
                .fold(xj, |acc, (_, &xm)| mul(acc, sub(xm, xj)))
        })
        .collect();
    let mut prefix = Vec::with_capacity(denominators.len());
    let mut running = 1;
    for &d in &denominators {
        prefix.push(running);
        running = mul(running, d);
    }
    let mut inverse = inv(running);
    let mut out = vec![0; xs.len()];
    for j in (0..xs.len()).rev() {
        // `inverse` is 1 / (d_0 · … · d_j) here.
        out[j] = mul(numerator, mul(inverse, prefix[j]));
        inverse = mul(inverse, denominators[j]);
    }
    Ok(out)
}

/// Interpolates the secret from shares and their Lagrange coefficients
/// (from [`lagrange_at_zero`] over the same x coordinates, in order).
pub(crate) fn combine<'a>(
    shares: impl IntoIterator<Item = &'a Share>,
    coefficients: &[u64],
) -> Option<[u8; 32]> {
    let mut elements = [0u64; ELEMENTS];
    for (share, &lambda) in shares.into_iter().zip(coefficients) {
        for (e, &y) in elements.iter_mut().zip(&share.y) {
            *e = add(*e, mul(lambda, y));
        }
    }
    from_elements(&elements)
}

/// Reconstructs a secret from the first `threshold` of `shares`. Fewer
/// shares than that is [`Error::TooFew`]; shares that do not interpolate to
/// a well-formed secret are [`Error::SecAgg`].
pub fn reconstruct(shares: &[Share], threshold: usize) -> Result<[u8; 32]> {
    if threshold == 0 || shares.len() < threshold {
        return Err(Error::TooFew {
            what: "shares to reconstruct a secret",
            need: threshold.max(1),
            have: shares.len(),
        });
    }
    let used = &shares[..threshold];
    let xs: Vec<u32> = used.iter().map(|s| s.x).collect();
    let coefficients = lagrange_at_zero(&xs)?;
    combine(used, &coefficients).ok_or_else(|| {
        Error::SecAgg("the shares do not interpolate to a well-formed secret".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn field_arithmetic_matches_u128_reference() {
        let samples = [0, 1, 2, P - 1, P - 2, 1 << 60, (1 << 61) - 3, 123_456_789];
        for &a in &samples {
            for &b in &samples {
                let expected = (u128::from(a) * u128::from(b) % u128::from(P)) as u64;
                assert_eq!(mul(a, b), expected, "{a} * {b}");
                assert_eq!(
                    add(a, b),
                    ((u128::from(a) + u128::from(b)) % u128::from(P)) as u64
                );
                assert_eq!(add(sub(a, b), b), a);
            }
            if a != 0 {
                assert_eq!(mul(a, inv(a)), 1, "inverse of {a}");
            }
        }
    }

    #[test]
    fn secret_chunks_round_trip_and_refuse_overflowing_elements() {
        let secret: [u8; 32] = std::array::from_fn(|i| 255 - i as u8);
        let elements = to_elements(&secret);
        assert!(elements[..4].iter().all(|&e| e < 1 << 56));
        assert!(elements[4] < 1 << 32);
        assert_eq!(from_elements(&elements), Some(secret));
        let mut bad = elements;
        bad[4] = 1 << 32;
        assert_eq!(from_elements(&bad), None);
        bad = elements;
        bad[0] = 1 << 56;
        assert_eq!(from_elements(&bad), None);
    }

    #[test]
    fn fewer_than_threshold_shares_are_refused_or_wrong() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let secret = [42u8; 32];
        let xs: Vec<u32> = (1..=9).collect();
        let shares = split(&secret, &xs, 6, &mut rng).unwrap();
        assert!(matches!(
            reconstruct(&shares[..5], 6),
            Err(Error::TooFew {
                need: 6,
                have: 5,
                ..
            })
        ));
        // Interpolating five shares of a degree-5 polynomial as if it were
        // degree 4 does not give the secret back.
        assert_ne!(reconstruct(&shares[..5], 5).ok(), Some(secret));
    }

    #[test]
    fn split_refuses_bad_coordinates_and_thresholds() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let s = [1u8; 32];
        assert!(matches!(
            split(&s, &[1, 0, 2], 2, &mut rng),
            Err(Error::SecAgg(_))
        ));
        assert!(matches!(
            split(&s, &[1, 3, 3], 2, &mut rng),
            Err(Error::SecAgg(_))
        ));
        assert!(matches!(
            split(&s, &[1, 2, 3], 0, &mut rng),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(
            split(&s, &[1, 2, 3], 4, &mut rng),
            Err(Error::Invalid { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn any_threshold_subset_reconstructs(
            secret in prop::array::uniform32(any::<u8>()),
            holders in 1usize..=40,
            threshold_fraction in 0.0f64..=1.0,
            seed in any::<u64>(),
            order in prop::collection::vec(any::<u32>(), 40),
        ) {
            let threshold = 1 + ((holders - 1) as f64 * threshold_fraction) as usize;
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            // Spread-out, non-consecutive coordinates as in a circulant roster.
            let xs: Vec<u32> = (0..holders as u32).map(|i| 3 * i + 1 + (i % 2) * 1_000).collect();
            let shares = split(&secret, &xs, threshold, &mut rng).unwrap();
            // A random subset of `threshold` shares in a random order.
            let mut picked: Vec<(u32, Share)> =
                shares.iter().zip(&order).map(|(s, &k)| (k, *s)).collect();
            picked.sort_by_key(|&(k, s)| (k, s.x));
            let subset: Vec<Share> = picked.into_iter().take(threshold).map(|(_, s)| s).collect();
            prop_assert_eq!(reconstruct(&subset, threshold).unwrap(), secret);
        }
    }
}
