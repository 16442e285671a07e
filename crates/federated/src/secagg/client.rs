//! The client's side of a round: its secrets and its three messages.

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce};
use rand::CryptoRng;
use x25519_dalek::{PublicKey, StaticSecret};

use super::shamir::{self, ELEMENTS, Share};
use super::{
    EncryptedShare, LABEL_CIPHER, LABEL_PAIRWISE, LABEL_SELF, NONCE_LEN, PublicKeys, RevealedShare,
    Roster, SHARE_CIPHERTEXT_LEN, SHARE_PAIR_LEN, ShareKind, Sign, apply_mask, derive, member_set,
    share_x,
};
use crate::{Error, Result};

/// A client's secrets for one round: two X25519 keys and the seed of its
/// self-mask. Fresh for every round, held in memory from [`share_keys`] to
/// [`unmask`], never sent anywhere except as shares.
pub struct ClientSecrets {
    cipher_sk: StaticSecret,
    mask_sk: StaticSecret,
    self_seed: [u8; 32],
    public: PublicKeys,
}

impl std::fmt::Debug for ClientSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only the public half: secrets must not reach logs.
        f.debug_struct("ClientSecrets")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl ClientSecrets {
    /// Draws fresh secrets from `rng`.
    pub fn generate(rng: &mut (impl CryptoRng + ?Sized)) -> ClientSecrets {
        let mut draw = || {
            let mut bytes = [0u8; 32];
            rng.fill_bytes(&mut bytes);
            bytes
        };
        let cipher_sk = StaticSecret::from(draw());
        let mask_sk = StaticSecret::from(draw());
        let self_seed = draw();
        let public = PublicKeys {
            cipher_pk: PublicKey::from(&cipher_sk).to_bytes(),
            mask_pk: PublicKey::from(&mask_sk).to_bytes(),
        };
        ClientSecrets {
            cipher_sk,
            mask_sk,
            self_seed,
            public,
        }
    }

    /// The keys the client advertises for the round.
    pub fn public_keys(&self) -> PublicKeys {
        self.public
    }
}

/// X25519 between one of our keys and a peer's, refusing a peer key of
/// small order, which would make the shared secret public.
fn agree(secret: &StaticSecret, peer: &[u8; 32], peer_index: usize) -> Result<[u8; 32]> {
    let shared = secret.diffie_hellman(&PublicKey::from(*peer));
    if !shared.was_contributory() {
        return Err(Error::SecAgg(format!(
            "client {peer_index} advertised a public key of small order"
        )));
    }
    Ok(shared.to_bytes())
}

/// The pairwise mask seed of two clients, the same from either side.
pub(super) fn pairwise_seed(
    roster: &Roster,
    mask_sk: &StaticSecret,
    peer: usize,
) -> Result<[u8; 32]> {
    let shared = agree(mask_sk, &roster.keys(peer).mask_pk, peer)?;
    Ok(derive(LABEL_PAIRWISE, &shared, roster.digest()))
}

/// The self-mask seed actually expanded: the client's seed bound to the
/// round.
pub(super) fn self_mask_seed(roster: &Roster, self_seed: &[u8; 32]) -> [u8; 32] {
    derive(LABEL_SELF, self_seed, roster.digest())
}

/// The AEAD for shares between `me` and `peer`. The key is the same in both
/// directions; the associated data (which names sender and recipient) and
/// the random nonce tell the two apart.
fn share_cipher(secrets: &ClientSecrets, roster: &Roster, peer: usize) -> Result<ChaCha20Poly1305> {
    let shared = agree(&secrets.cipher_sk, &roster.keys(peer).cipher_pk, peer)?;
    let key = derive(LABEL_CIPHER, &shared, roster.digest());
    Ok(ChaCha20Poly1305::new(Key::from_slice(&key)))
}

fn associated_data(roster: &Roster, from: usize, to: usize) -> [u8; 40] {
    let mut ad = [0u8; 40];
    ad[..32].copy_from_slice(roster.digest());
    ad[32..36].copy_from_slice(&(from as u32).to_le_bytes());
    ad[36..].copy_from_slice(&(to as u32).to_le_bytes());
    ad
}

/// Refuses a roster index that is out of range or whose advertised keys are
/// not this client's: the roster is not the one the client joined.
fn check_me(secrets: &ClientSecrets, roster: &Roster, me: usize) -> Result<()> {
    if me >= roster.len() {
        return Err(Error::SecAgg(format!(
            "client index {me} is outside the roster of {}",
            roster.len()
        )));
    }
    if *roster.keys(me) != secrets.public {
        return Err(Error::SecAgg(format!(
            "roster entry {me} does not hold this client's public keys"
        )));
    }
    Ok(())
}

/// Refuses to go on when fewer than `threshold` of `me`'s holders are in
/// `set`: `me`'s secrets could then not be reconstructed, and the round is
/// lost whatever the client sends.
fn check_holders_in(roster: &Roster, me: usize, set: &[bool], what: &'static str) -> Result<()> {
    let have = roster.holders(me).filter(|&j| set[j]).count();
    if have < roster.threshold() {
        return Err(Error::TooFew {
            what,
            need: roster.threshold(),
            have,
        });
    }
    Ok(())
}

/// Round 1: Shamir-shares this client's mask key and self-mask seed among
/// its holders, `t` of them to reconstruct, and encrypts each holder's pair
/// of shares for that holder. The result has one [`EncryptedShare`] per
/// holder, including one addressed to this client itself, which the hub
/// hands back with the others (or the client keeps) for [`unmask`].
pub fn share_keys(
    secrets: &ClientSecrets,
    roster: &Roster,
    me: usize,
    rng: &mut (impl CryptoRng + ?Sized),
) -> Result<Vec<EncryptedShare>> {
    check_me(secrets, roster, me)?;
    let holders: Vec<usize> = roster.holders(me).collect();
    let xs: Vec<u32> = holders.iter().map(|&j| share_x(j)).collect();
    let t = roster.threshold();
    let mask_shares = shamir::split(&secrets.mask_sk.to_bytes(), &xs, t, rng)?;
    let seed_shares = shamir::split(&secrets.self_seed, &xs, t, rng)?;
    holders
        .iter()
        .zip(mask_shares.iter().zip(&seed_shares))
        .map(|(&to, (mask_share, seed_share))| {
            let mut plaintext = [0u8; SHARE_PAIR_LEN];
            let values = mask_share.y.iter().chain(&seed_share.y);
            for (chunk, v) in plaintext.chunks_exact_mut(8).zip(values) {
                chunk.copy_from_slice(&v.to_le_bytes());
            }
            let mut nonce = [0u8; NONCE_LEN];
            rng.fill_bytes(&mut nonce);
            let aad = associated_data(roster, me, to);
            let sealed = share_cipher(secrets, roster, to)?
                .encrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: &plaintext,
                        aad: &aad,
                    },
                )
                .map_err(|_| {
                    Error::SecAgg(format!("encrypting the share for client {to} failed"))
                })?;
            let mut ciphertext = Vec::with_capacity(SHARE_CIPHERTEXT_LEN);
            ciphertext.extend_from_slice(&nonce);
            ciphertext.extend_from_slice(&sealed);
            Ok(EncryptedShare {
                from: me as u32,
                to: to as u32,
                ciphertext,
            })
        })
        .collect()
}

/// Round 2: the client's masked input,
/// `encode(x) + PRG(self seed) + Σ_{v ∈ U2 ∩ N(me)} ±PRG(s_{me,v})` modulo
/// 2^32, the pairwise mask added when `me < v` and subtracted otherwise so
/// that each pair's masks cancel in the sum.
///
/// `u2` lists the roster indices whose shares were delivered; it must
/// include `me` and at least `t` of `me`'s holders. `x` must have `dim`
/// finite values.
pub fn mask_input(
    secrets: &ClientSecrets,
    roster: &Roster,
    me: usize,
    u2: &[usize],
    x: &[f32],
    dim: usize,
) -> Result<Vec<u32>> {
    check_me(secrets, roster, me)?;
    if x.len() != dim {
        return Err(Error::Shape {
            what: "update",
            expected: dim,
            got: x.len(),
        });
    }
    if let Some(j) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::Invalid {
            what: "update",
            reason: format!("value {j} is not finite"),
        });
    }
    let u2 = member_set(roster.len(), u2, "the set of clients that shared keys")?;
    if !u2[me] {
        return Err(Error::SecAgg(format!(
            "client {me} is asked for its input but is not in the set of clients that shared keys"
        )));
    }
    check_holders_in(
        roster,
        me,
        &u2,
        "holders of this client's shares that received them",
    )?;

    let mut y = vec![0u32; dim];
    roster.params().fixed.encode_into(x, &mut y);
    apply_mask(
        &mut y,
        self_mask_seed(roster, &secrets.self_seed),
        Sign::Plus,
    );
    for v in roster.neighbours(me).filter(|&v| u2[v]) {
        let seed = pairwise_seed(roster, &secrets.mask_sk, v)?;
        let sign = if me < v { Sign::Plus } else { Sign::Minus };
        apply_mask(&mut y, seed, sign);
    }
    Ok(y)
}

/// Round 3: decrypts the shares addressed to this client and reveals, for
/// every client `v` in U2 whose shares it holds, the share of `v`'s
/// self-mask seed if `v` is in U3 (its masked input arrived) and the share
/// of `v`'s mask key otherwise. Never both kinds for one client: the kind
/// follows from U3 alone.
///
/// Refuses ([`Error::SecAgg`]) when U3 is not a subset of U2, when this
/// client is not in U3, when a share is missing, misaddressed, repeated or
/// from a client it does not hold shares of, and when a ciphertext does not
/// authenticate (tampered, or from another round). Refuses
/// ([`Error::TooFew`]) when fewer than `t` of its holders survived, since
/// its own self-mask could then not be removed.
pub fn unmask(
    secrets: &ClientSecrets,
    roster: &Roster,
    me: usize,
    u2: &[usize],
    u3: &[usize],
    received: &[EncryptedShare],
) -> Result<Vec<RevealedShare>> {
    check_me(secrets, roster, me)?;
    let n = roster.len();
    let u2 = member_set(n, u2, "the set of clients that shared keys")?;
    let u3 = member_set(n, u3, "the set of surviving clients")?;
    if let Some(v) = (0..n).find(|&v| u3[v] && !u2[v]) {
        return Err(Error::SecAgg(format!(
            "client {v} is in the set of surviving clients but not in the set of clients that shared keys"
        )));
    }
    if !u3[me] {
        return Err(Error::SecAgg(format!(
            "client {me} is asked to unmask but is not in the set of surviving clients"
        )));
    }
    check_holders_in(roster, me, &u3, "surviving holders of this client's shares")?;

    let mut by_sender: Vec<Option<&EncryptedShare>> = vec![None; n];
    for share in received {
        let (from, to) = (share.from as usize, share.to as usize);
        if to != me {
            return Err(Error::SecAgg(format!(
                "client {me} was handed a share addressed to client {to}"
            )));
        }
        if !roster.holds(me, from) {
            return Err(Error::SecAgg(format!(
                "client {me} was handed a share from client {from}, which it does not hold shares of"
            )));
        }
        if !u2[from] {
            return Err(Error::SecAgg(format!(
                "client {me} was handed a share from client {from}, which is not in the set of clients that shared keys"
            )));
        }
        if by_sender[from].replace(share).is_some() {
            return Err(Error::SecAgg(format!(
                "client {me} was handed two shares from client {from}"
            )));
        }
    }

    let x = share_x(me);
    roster
        .holders(me)
        .filter(|&v| u2[v])
        .map(|v| {
            let sealed = by_sender[v].ok_or_else(|| {
                Error::SecAgg(format!(
                    "client {me} has no share from client {v}, which is in the set of clients that shared keys"
                ))
            })?;
            let (mask_share, seed_share) = open(secrets, roster, me, v, x, &sealed.ciphertext)?;
            let (kind, share) = if u3[v] {
                (ShareKind::SelfSeed, seed_share)
            } else {
                (ShareKind::MaskKey, mask_share)
            };
            Ok(RevealedShare {
                of: v as u32,
                holder: me as u32,
                kind,
                share,
            })
        })
        .collect()
}

/// Decrypts the pair of shares `from` sent to `me`.
fn open(
    secrets: &ClientSecrets,
    roster: &Roster,
    me: usize,
    from: usize,
    x: u32,
    ciphertext: &[u8],
) -> Result<(Share, Share)> {
    let refused = || {
        Error::SecAgg(format!(
            "the share from client {from} to client {me} does not authenticate"
        ))
    };
    if ciphertext.len() != SHARE_CIPHERTEXT_LEN {
        return Err(refused());
    }
    let (nonce, sealed) = ciphertext.split_at(NONCE_LEN);
    let aad = associated_data(roster, from, me);
    let plaintext = share_cipher(secrets, roster, from)?
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: sealed,
                aad: &aad,
            },
        )
        .map_err(|_| refused())?;
    let mut values = plaintext
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("chunks of eight bytes")));
    let mut next_share = || -> Result<Share> {
        let mut y = [0u64; ELEMENTS];
        for e in &mut y {
            // Only an authenticated plaintext gets here, so values out of the
            // field mean the sender is broken rather than the channel.
            *e = values.next().filter(|&v| v < shamir::P).ok_or_else(|| {
                Error::SecAgg(format!(
                    "the share from client {from} is not a field element"
                ))
            })?;
        }
        Ok(Share { x, y })
    };
    let mask_share = next_share()?;
    let seed_share = next_share()?;
    Ok((mask_share, seed_share))
}
