"""Hetero logistic regression between two parties (Hardy et al. 2017, "Private federated learning
on vertically partitioned data via entity resolution and additively homomorphic encryption";
Yang et al. 2019, the two-party form without a coordinator, as in FATE's hetero LR).

The active party holds the labels ``y``, its features ``X_B``, weights ``w_B``, the intercept and
a Paillier key pair; the passive party holds ``X_A`` and ``w_A``. One mini-batch step:

1. active -> passive: the batch's row positions (``rows``);
2. passive -> active: its partial logits ``z_A = X_A w_A`` (``logits``, float64);
3. the active party computes ``r = sigmoid(z_A + X_B w_B + b) - y``, the loss, its own gradient
   and step, and sends ``[[r]]`` (``residuals``: fixed point, ``frac`` bits, under its key);
4. passive: ``[[X_A^T r + m]]`` homomorphically (plaintext features as exponents, ``m`` a fresh
   mask uniform mod n, from the passive party's own randomness) -> active (``masked_gradient``);
5. active: decrypts exactly ``d_A`` such values, once per step -> passive (``gradient_plus_mask``);
6. passive: removes ``m``, decodes, steps ``w_A -= lr * X_A^T r / B``.

Exactness: the same steps as centralised mini-batch gradient descent on ``[X_A | X_B]`` with the
true logistic loss; the only difference is fixed-point rounding of ``x`` and ``r`` in the passive
gradient, at most ``grad_tolerance(max|x|, frac)`` per coordinate per step (2^-33 (max|x|+1) at
the default ``frac = 32``).

What each party learns (semi-honest): the passive party sees the row positions, ciphertexts and
its own gradient ``X_A^T r / B`` (``d_A`` linear combinations of ``B`` residuals per step: with
``B <= d_A`` it solves for ``r``, so batches below ``min_batch``, default ``2 d_A``, are refused),
never ``y`` or ``r``. The active party sees ``z_A``
(a projection of the passive features, new each step: over many steps it learns ``X_A X_A^T r``
for residuals it chose) and ``X_A^T r + m`` (uniform), never ``X_A`` or ``w_A``. Not covered: a
malicious passive party can send back its ``[[r_i]]`` (re-randomised) as a "masked gradient" and
learn ``r_i`` in clear; the once-per-step, ``d_A``-values decryption rule caps that at ``d_A``
residuals per step, it does not prevent it (closing it needs zero-knowledge proofs).
"""
from __future__ import annotations

import math
import secrets

import numpy as np
import torch

from atoll.secure.he_schemes import _need
from atoll.vertical.channel import Channel, PartyError, check_rows, check_tensor

MAX_ABS_X = 2.0 ** 20  # features beyond this are refused (the fixed-point integers stay small)


def grad_tolerance(max_abs_x: float, frac: int) -> float:
    """Bound on |protocol gradient - float gradient| per coordinate, one step, |r| < 1:
    each product x r carries rounding (|x| + |r|) 2^-(frac+1) + 2^-(2 frac+2)."""
    return (max_abs_x + 1.0) * 2.0 ** -(frac + 1) + 2.0 ** -(2 * frac + 2)


def _fixed(x: np.ndarray, frac: int) -> list[int]:
    return [int(v) for v in np.rint(np.asarray(x, dtype=np.float64) * 2.0 ** frac)]


def _parse(data, party: str, name: str, count: int, width: int, bound: int, unit_mod: int = 0) -> list[int]:
    """``count`` big-endian integers of ``width`` bytes, each in [0, bound) (and a unit mod
    ``unit_mod`` if given: a Paillier ciphertext): PartyError if not."""
    if not isinstance(data, bytes) or len(data) != count * width:
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise PartyError(f"party {party!r}: field {name!r} has {size} bytes, expected {count} x {width}")
    vals = [int.from_bytes(data[i:i + width], "big") for i in range(0, len(data), width)]
    if any(not 0 <= v < bound for v in vals):
        raise PartyError(f"party {party!r}: field {name!r} holds a value out of range")
    if unit_mod and any(math.gcd(v, unit_mod) != 1 for v in vals):
        raise PartyError(f"party {party!r}: field {name!r} holds a non-unit ciphertext")
    return vals


class ActiveParty:
    """Labels, ``X_B``, ``w_B``, the intercept and the Paillier secret key."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, lr: float, d_passive: int,
                 key_bits: int = 1024, frac: int = 32, min_batch: int | None = None):
        phe = _need("phe")
        self.x, self.y, self.lr, self.d_a, self.frac = x, y.to(torch.float64), lr, d_passive, frac
        self.w, self.b = torch.zeros(x.shape[1], dtype=torch.float64), 0.0
        self.min_batch = 2 * d_passive if min_batch is None else min_batch  # see "learns" above
        self.pub, self._priv = phe.generate_paillier_keypair(n_length=key_bits)
        self.n, self.n2, self.width = self.pub.n, self.pub.nsquare, 2 * key_bits // 8
        self._may_decrypt = False

    def public_key(self) -> bytes:
        return self.n.to_bytes(self.width // 2, "big")

    def residuals(self, rows: torch.Tensor, z_a) -> tuple[bytes, float]:
        """Check ``z_A``, compute the residuals, step the own weights: ``([[r]], loss)``."""
        if len(rows) < self.min_batch:
            raise ValueError(f"hetero_lr: batch of {len(rows)} rows < min_batch {self.min_batch}")
        check_tensor(z_a, "passive", "logits", (len(rows),), torch.float64)
        xb, y = self.x[rows], self.y[rows]
        z = z_a + xb @ self.w + self.b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y).item()
        r = torch.sigmoid(z) - y
        self._next = (self.w - self.lr * (xb.T @ r) / len(rows), self.b - self.lr * r.mean().item())
        enc = [self.pub.raw_encrypt(v % self.n) for v in _fixed(r.numpy(), self.frac)]
        self._may_decrypt = True
        return b"".join(c.to_bytes(self.width, "big") for c in enc), loss

    def commit(self) -> None:
        """Take the step computed in ``residuals`` (once the passive party took its own: a step
        that fails half-way leaves the weights as of the last complete step)."""
        self.w, self.b = self._next

    def decrypt_masked(self, data) -> bytes:
        """Decrypt the passive party's ``d_A`` masked gradient values, once per step."""
        if not self._may_decrypt:
            raise PartyError("party 'passive': field 'masked_gradient' sent twice in one step")
        cts = _parse(data, "passive", "masked_gradient", self.d_a, self.width, self.n2, self.n)
        self._may_decrypt = False
        return b"".join(self._priv.raw_decrypt(c).to_bytes(self.width // 2, "big") for c in cts)


class PassiveParty:
    """``X_A`` and ``w_A``; holds only the active party's public key."""

    def __init__(self, x: torch.Tensor, lr: float, public_key, frac: int = 32,
                 max_batch: int = 65536, min_key_bits: int = 1024):
        phe = _need("phe")
        if not isinstance(public_key, bytes) or len(public_key) * 8 < min_key_bits:
            raise PartyError(f"party 'active': field 'public_key' must be >= {min_key_bits} bits")
        n = int.from_bytes(public_key, "big")
        if n.bit_length() < min_key_bits or n % 2 == 0:
            raise PartyError("party 'active': field 'public_key' is not an odd modulus of enough bits")
        if not bool((x.abs() < MAX_ABS_X).all()):
            raise ValueError(f"hetero_lr: passive features must be finite and below {MAX_ABS_X} in size")
        self.x, self.lr, self.frac, self.max_batch = x.to(torch.float64), lr, frac, max_batch
        self.pub = phe.PaillierPublicKey(n)
        self.n, self.n2, self.width = n, n * n, len(public_key) * 2
        self.w = torch.zeros(x.shape[1], dtype=torch.float64)
        self._rows, self._mask = None, None

    def logits(self, rows) -> torch.Tensor:
        self._rows = check_rows(rows, "active", len(self.x), self.max_batch)
        return self.x[self._rows] @ self.w

    def score(self, rows) -> torch.Tensor:
        """``X_A w_A`` for rows outside a training step (held-out rows)."""
        return self.x[check_rows(rows, "active", len(self.x), self.max_batch)] @ self.w

    def masked_gradient(self, data) -> bytes:
        """``[[X_A^T r + m]]`` from ``[[r]]``: plaintext features as (signed) exponents."""
        if self._rows is None:
            raise PartyError("party 'active': field 'residuals' arrived with no batch outstanding")
        cts = _parse(data, "active", "residuals", len(self._rows), self.width, self.n2, self.n)
        xs = self.x[self._rows].T.numpy()  # (d_A, B)
        self._mask = [secrets.randbelow(self.n) for _ in range(len(xs))]
        out = []
        for col, m in zip(xs, self._mask):
            pos, neg = 1, 1
            for c, e in zip(cts, _fixed(col, self.frac)):
                if e > 0:
                    pos = pos * pow(c, e, self.n2) % self.n2
                elif e < 0:
                    neg = neg * pow(c, -e, self.n2) % self.n2
            out.append(pos * pow(neg, -1, self.n2) * self.pub.raw_encrypt(m) % self.n2)
        return b"".join(c.to_bytes(self.width, "big") for c in out)

    def update(self, data) -> torch.Tensor:
        """Unmask, decode and step: the gradient ``X_A^T r / B`` it used."""
        if self._mask is None:
            raise PartyError("party 'active': field 'gradient_plus_mask' arrived with no step outstanding")
        vals = _parse(data, "active", "gradient_plus_mask", len(self._mask), self.width // 2, self.n)
        sums = [(v - m) % self.n for v, m in zip(vals, self._mask)]
        sums = [s - self.n if s > self.n // 2 else s for s in sums]
        g = torch.tensor([s / 2.0 ** (2 * self.frac) for s in sums], dtype=torch.float64) / len(self._rows)
        self.w = self.w - self.lr * g
        self._rows, self._mask = None, None
        return g


class PassiveEndpoint:
    """The passive party's end of ``Channel.ask``: ``public_key`` creates its ``PassiveParty``,
    then ``rows`` -> ``logits``, ``residuals`` -> ``masked_gradient``, ``gradient_plus_mask``."""

    def __init__(self, x: torch.Tensor, lr: float, frac: int = 32, **options):
        self.x, self.lr, self.frac, self.options, self.party = x, lr, frac, options, None

    def on(self, name: str, msg, sender: str):
        if name == "public_key":
            if self.party is not None:
                raise PartyError(f"party {sender!r}: field 'public_key' sent twice")
            self.party = PassiveParty(self.x, self.lr, msg, frac=self.frac, **self.options)
            return None
        p = self.party
        handler = None if p is None else {"rows": p.logits, "residuals": p.masked_gradient,
                                          "gradient_plus_mask": p.update, "eval_rows": p.score}.get(name)
        if handler is None:
            raise PartyError(f"party {sender!r}: field {name!r} is not expected here")
        out = handler(msg)
        return None if name == "gradient_plus_mask" else out


class HeteroLR:
    """The protocol between ``active`` and the passive party, every message through ``channel``;
    ``passive_x`` None: the passive party is the channel's endpoint ``passive`` (another process)."""

    def __init__(self, active: ActiveParty, passive_x: torch.Tensor | None, frac: int = 32,
                 channel: Channel | None = None, passive: str = "passive"):
        self.channel, self.active, self.peer = channel or Channel(), active, passive
        if passive_x is not None:
            self.channel.attach(passive, PassiveEndpoint(passive_x, active.lr, frac))
        self.channel.ask("active", passive, "public_key", active.public_key())

    @property
    def passive(self) -> PassiveParty | None:
        """The passive party when it runs in this process."""
        return getattr(self.channel.parties.get(self.peer), "party", None)

    def step(self, rows: torch.Tensor) -> float:
        ask, a, p = self.channel.ask, self.active, self.peer
        self.channel.begin_step()
        enc, loss = a.residuals(rows, ask("active", p, "rows", rows, "logits"))
        masked = ask("active", p, "residuals", enc, "masked_gradient")
        ask("active", p, "gradient_plus_mask", a.decrypt_masked(masked))
        a.commit()
        return loss

    def fit(self, batches) -> list[float]:
        return [self.step(rows) for rows in batches]
