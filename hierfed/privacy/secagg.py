"""Secure aggregation with dropouts (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"), one aggregation of the clients under one edge (the server).

  0 advertise   client u: two X25519 key pairs, c (encrypts shares) and s (agrees mask seeds) -> pk's
  1 share       u: a self-mask seed b_u; t-of-n Shamir shares of b_u and of s_sk_u, each encrypted
                for its holder v with ChaCha20-Poly1305 under HKDF(X25519(c_sk_u, c_pk_v)); and a
                commitment SHA-256(b_u). The server routes the ciphertexts.
  2 mask        u: y_u = x_u + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv)  (mod 2^r: the ring
                of x_u's words, r = 32 for uint32, 16 for uint16; PRG's words have that width),
                s_uv = HKDF(X25519(s_sk_u, s_pk_v)); the pairwise masks cancel in Σ y.
  3 unmask      the server names the survivors; each survivor v reveals its shares of b_u for
                survivors u and of s_sk_u for clients that dropped after step 1. With t shares the
                server removes the self-masks and the dropped clients' pairwise masks.

A share that fails its AEAD tag is reported corrupt by its holder; a reconstructed secret that does
not match its commitment (SHA-256 of b_u, or the advertised s_pk_u) fails the aggregation, as do
fewer than t usable shares: `SecAggError`, never a silently wrong sum. Keys and seeds come from the
operating system's CSPRNG; the masks cancel exactly, so the sum (and a resumed run) is
deterministic. Messages here are plain Python values; hierfed.privacy.secagg_link moves them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hierfed.privacy import shamir
from hierfed.privacy.ring import prg

_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SecAggError(Exception):
    """The aggregation cannot be completed correctly (too few survivors or shares, a corrupt share)."""


def threshold(n: int, fraction: float) -> int:
    """t of n: strictly more than `fraction` of the clients (Bonawitz et al. need t > n/2 against a
    server that lies about who dropped), at least 1."""
    return min(n, int(fraction * n) + 1)


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW)


def _priv(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def pair_seed(s_sk: bytes, s_pk_other: bytes, tag: bytes) -> bytes:
    """The pairwise mask seed of two clients (the same from either side)."""
    shared = X25519PrivateKey.from_private_bytes(s_sk).exchange(X25519PublicKey.from_public_bytes(s_pk_other))
    return _kdf(shared, b"hierfed/secagg/mask/" + tag)


def pair_mask(seed: bytes, words: int, dtype: np.dtype | type = np.uint32) -> np.ndarray:
    return prg(seed, words, dtype=dtype)


@dataclass
class Advert:
    c_pk: bytes
    s_pk: bytes


class Client:
    """One client's side of one aggregation; `cid` its (global) client id, `tag` names the aggregation."""

    def __init__(self, cid: int, tag: bytes) -> None:
        self.cid, self.tag = cid, tag
        self._c, self._s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self._b = os.urandom(32)
        self.adverts: dict[int, Advert] = {}
        self.held: dict[int, tuple[bytes, bytes]] = {}  # holder's decrypted shares: owner -> (b share, s_sk share)
        self.corrupt: list[int] = []  # owners whose share to us failed its tag

    def advertise(self) -> Advert:
        return Advert(_pub(self._c), _pub(self._s))

    def _aead(self, other: int) -> ChaCha20Poly1305:
        shared = self._c.exchange(X25519PublicKey.from_public_bytes(self.adverts[other].c_pk))
        return ChaCha20Poly1305(_kdf(shared, b"hierfed/secagg/share/" + self.tag))

    def _ad(self, owner: int, holder: int) -> bytes:
        return self.tag + owner.to_bytes(8, "big") + holder.to_bytes(8, "big")

    def share(self, adverts: dict[int, Advert], t: int) -> tuple[dict[int, bytes], bytes]:
        """({holder: encrypted (b share, s_sk share)}, commitment SHA-256(b_u)) for every advertised client."""
        self.adverts = dict(adverts)
        ids = sorted(adverts)
        xs = {v: i + 1 for i, v in enumerate(ids)}  # Shamir points: position among the advertised clients
        b_sh = shamir.split(self._b, list(xs.values()), t)
        s_sh = shamir.split(_priv(self._s), list(xs.values()), t)
        out = {}
        for v in ids:
            plain = b_sh[xs[v]] + s_sh[xs[v]]
            out[v] = self._seal(v, plain)
        return out, hashlib.sha256(self._b).digest()

    def _seal(self, holder: int, plain: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead(holder).encrypt(nonce, plain, self._ad(self.cid, holder))

    def receive(self, sealed: dict[int, bytes]) -> None:
        """Shares addressed to this client, {owner: ciphertext}: decrypted and kept; a bad tag is noted."""
        for owner, blob in sealed.items():
            try:
                plain = self._aead(owner).decrypt(blob[:12], blob[12:], self._ad(owner, self.cid))
            except (InvalidTag, ValueError, KeyError):
                self.corrupt.append(owner)
                continue
            self.held[owner] = (plain[:66], plain[66:])

    def mask(self, x: np.ndarray, members: list[int]) -> np.ndarray:
        """y_u = x_u + PRG(b_u) + Σ ±PRG(s_uv) over the other members, in x's ring (uint32: mod 2^32, uint16: mod 2^16)."""
        y = x + prg(self._b, x.size, dtype=x.dtype)  # prg refuses any dtype but uint16/uint32
        for v in members:
            if v == self.cid:
                continue
            m = pair_mask(pair_seed(_priv(self._s), self.adverts[v].s_pk, self.tag), x.size, x.dtype)
            y = y + m if self.cid < v else y - m
        return y

    def reveal(self, survivors: list[int], dropped: list[int]) -> dict:
        """Step 3: shares of b_u (survivors) and of s_sk_u (dropped) this client holds; and the owners
        whose share failed its tag. A client never reveals both for the same owner."""
        if set(survivors) & set(dropped):
            raise SecAggError("the server named a client both surviving and dropped")
        return {"b": {u: self.held[u][0] for u in survivors if u in self.held},
                "s": {u: self.held[u][1] for u in dropped if u in self.held},
                "corrupt": [u for u in self.corrupt if u in survivors or u in dropped]}


class Server:
    """The edge's side: routes shares, then removes what is left of the masks from the sum."""

    def __init__(self, tag: bytes, fraction: float) -> None:
        self.tag, self.fraction = tag, fraction
        self.adverts: dict[int, Advert] = {}
        self.commit: dict[int, bytes] = {}
        self.t = 0

    def collect_adverts(self, adverts: dict[int, Advert]) -> dict[int, Advert]:
        self.adverts = dict(adverts)
        self.t = threshold(len(adverts), self.fraction)
        return self.adverts

    def route(self, sealed: dict[int, dict[int, bytes]], commitments: dict[int, bytes]) -> dict[int, dict[int, bytes]]:
        """{owner: {holder: ct}} -> {holder: {owner: ct}}; the members are the owners that shared."""
        self.commit = dict(commitments)
        out: dict[int, dict[int, bytes]] = {v: {} for v in self.adverts}
        for owner, cts in sealed.items():
            for holder, ct in cts.items():
                if holder in out:
                    out[holder][owner] = ct
        return out

    @property
    def members(self) -> list[int]:
        """The clients whose masks are in play: those that shared their seeds."""
        return sorted(self.commit)

    def unmask(self, total: np.ndarray, survivors: list[int], reveals: dict[int, dict]) -> np.ndarray:
        """Σ_{survivors} x_u from Σ_{survivors} y_u (uint32 or uint16: the ring the clients masked in), given the survivors' reveals."""
        dropped = [u for u in self.members if u not in survivors]
        if len(survivors) < self.t:
            raise SecAggError(f"{len(survivors)} of {len(self.members)} clients survived, fewer than the threshold t={self.t}")
        corrupt = sorted({u for r in reveals.values() for u in r["corrupt"]})
        if corrupt:
            raise SecAggError(f"shares of client(s) {corrupt} failed authentication (tampered or corrupt)")
        xs = {v: i + 1 for i, v in enumerate(sorted(self.adverts))}
        out = total.copy()
        for u in survivors:
            b = self._recover(u, "b", reveals, xs)
            if hashlib.sha256(b).digest() != self.commit[u]:
                raise SecAggError(f"client {u}'s self-mask seed, rebuilt from its shares, does not match its commitment (corrupt share)")
            out -= prg(b, out.size, dtype=out.dtype)
        for u in dropped:
            s_sk = self._recover(u, "s", reveals, xs)
            try:
                ok = _pub(X25519PrivateKey.from_private_bytes(s_sk)) == self.adverts[u].s_pk
            except ValueError:
                ok = False
            if not ok:
                raise SecAggError(f"dropped client {u}'s key, rebuilt from its shares, does not match its public key (corrupt share)")
            for v in survivors:  # v added +PRG(s_vu) if v < u, else −PRG(s_vu): take it back out
                m = pair_mask(pair_seed(s_sk, self.adverts[v].s_pk, self.tag), out.size, out.dtype)
                out = out - m if v < u else out + m
        return out

    def _recover(self, owner: int, kind: str, reveals: dict[int, dict], xs: dict[int, int]) -> bytes:
        shares = {xs[v]: r[kind][owner] for v, r in reveals.items() if owner in r[kind]}
        if len(shares) < self.t:
            raise SecAggError(f"{len(shares)} shares of client {owner}'s seed arrived, fewer than the threshold t={self.t}")
        return shamir.combine(dict(list(shares.items())[: self.t]))
