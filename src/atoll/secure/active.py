"""SecAgg+ against a malicious server (``[secure] malicious = true``): Bonawitz et al. (CCS 2017,
section 6, "active adversary"), as Bell et al. (CCS 2020) run it on a neighbourhood graph.

Two additions to ``atoll.secure.secagg``'s semi-honest protocol, each stopping one attack:

* signed key advertisements: each client signs ``(session, round, its id, c_pk, s_pk)`` with a
  long-term identity key and sends the signature with its credential; a client uses a
  neighbour's keys only after checking the credential belongs to that neighbour (``pki``) and the
  signature verifies (``SignatureError`` otherwise). A server that advertises its own keys in
  place of a neighbour's (and then opens the shares and strips the masks) is refused.
* the consistency check, a stage between the masked input and the unmasking: the server sends
  each survivor the set U3 of clients whose masked input it received; each signs ``(session,
  round, U3)`` once; the server forwards the signatures, and a client reveals shares only when at
  least ``threshold`` distinct neighbours signed the same U3 as it did and the request agrees with
  it (survivors inside U3, dropped clients outside). A server that tells some clients that ``v``
  survived and others that it dropped, to get shares of both ``b_v`` and ``s_v``, is refused
  (``ConsistencyError``).

Identities: in deployment the client's enrolment certificate (``atoll.deploy.certs``; the id
it was enrolled with is in the certificate) checked against the deployment's CA
(``CertificatePKI``); in simulation a key seeded by the client id (``Simulated``). Signatures are
ECDSA P-256 over SHA-256, 64 bytes ``r || s``. What a malicious server can still do is in
docs/secure-aggregation.md.
"""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import struct
import time
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import NameOID

from atoll.secure import secagg
from atoll.secure.setup import SecAggError

SIG = 64     # an ECDSA P-256 signature, r || s
CRED = 1024  # the largest credential a message carries (a client certificate, DER)
_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # of P-256


class SignatureError(SecAggError):
    """A key advertisement whose credential or signature is not its claimed client's."""


class ConsistencyError(SecAggError):
    """A survivor set (U3) that the client's neighbours did not sign, or a request against it."""


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def verifies(public: ec.EllipticCurvePublicKey, message: bytes, sig: bytes) -> bool:
    if len(sig) != SIG:
        return False
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        public.verify(der, message, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


def keys_message(st, u: int, c_pk: bytes, s_pk: bytes) -> bytes:
    return b"atoll-secagg/keys" + st.session + struct.pack("<qq", st.round, u) + c_pk + s_pk


def view_message(st, view) -> bytes:
    ids = b"".join(struct.pack("<I", v) for v in sorted(view))
    return b"atoll-secagg/u3" + st.session + struct.pack("<q", st.round) + ids


@dataclass(frozen=True)
class Identity:
    key: ec.EllipticCurvePrivateKey
    credential: bytes  # a peer checks it: a DER certificate (deployment), the public point (simulation)

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def simulated(cid: int, seed: int = 0) -> "Identity":
        """Client ``cid``'s identity in simulation: a P-256 key seeded by its id."""
        h = hashlib.sha256(b"atoll-secagg-identity" + struct.pack("<qq", seed, cid)).digest()
        key = ec.derive_private_key(int.from_bytes(h, "big") % (_ORDER - 1) + 1, ec.SECP256R1())
        return Identity(key, _point(key.public_key()))

    @staticmethod
    def enrolled(cert_pem: bytes, key_pem: bytes) -> "Identity":
        """A deployed client's identity: its enrolment certificate and key (PEM)."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not (isinstance(key, ec.EllipticCurvePrivateKey)
                and _point(key.public_key()) == _point(cert.public_key())):
            raise ValueError("secure.malicious: the client key is not the P-256 key of its certificate")
        der = cert.public_bytes(serialization.Encoding.DER)
        if len(der) > CRED:
            raise ValueError(f"secure.malicious: the client certificate is {len(der)} bytes, over {CRED}")
        return Identity(key, der)


@functools.lru_cache(maxsize=8)
def _ca(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _point(public) -> bytes:
    return public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


@dataclass(frozen=True)
class Simulated:
    """The malicious-server protocol in one process: seeded identities, their table as the PKI."""
    seed: int = 0

    def public(self, v: int, credential: bytes) -> ec.EllipticCurvePublicKey:
        if credential != Identity.simulated(v, self.seed).credential:
            raise SignatureError(f"the credential given for client {v} is not client {v}'s identity")
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), credential)

    def client(self, setup, u: int) -> "ActiveClient":
        return ActiveClient(setup, u, identity=Identity.simulated(u, self.seed), pki=self)

    def server(self, setup) -> "ActiveServer":
        return ActiveServer(setup, pki=self)


@dataclass(frozen=True)
class CertificatePKI:
    """Deployment: a credential is a client certificate signed by the deployment's CA (``ca``,
    PEM) that carries the claimed id (``atoll.deploy.certs``: its USER_ID attribute)."""
    ca: bytes

    def public(self, v: int, credential: bytes) -> ec.EllipticCurvePublicKey:
        if not 0 < len(credential) <= CRED:
            raise SignatureError(f"the certificate given for client {v} is {len(credential)} bytes, "
                                 f"not in [1, {CRED}]")
        ca = _ca(self.ca)
        try:
            cert = x509.load_der_x509_certificate(credential)
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise SignatureError(f"the certificate given for client {v} is not one this "
                                 "deployment's CA signed") from None
        now = dt.datetime.now(dt.timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SignatureError(f"the certificate given for client {v} is expired or not yet valid")
        ids = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.USER_ID)]
        if ids != [str(v)]:
            raise SignatureError(f"the certificate given for client {v} is enrolled as client "
                                 f"{ids[0] if ids else '(no id: re-issue it)'}")
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
            raise SignatureError(f"the certificate given for client {v} has no P-256 key")
        return public


@dataclass
class ActiveClient(secagg.Client):
    identity: Identity | None = None
    pki: object = None
    ids: dict = field(default_factory=dict)  # v -> v's verified identity key (my neighbours)
    view: frozenset | None = None            # the survivor set U3 I signed

    def advertise(self) -> tuple[bytes, bytes, bytes, bytes]:
        c_pk, s_pk = super().advertise()
        t0 = time.perf_counter()
        sig = sign(self.identity.key, keys_message(self.setup, self.me, c_pk, s_pk))
        self.seconds += time.perf_counter() - t0
        return c_pk, s_pk, sig, self.identity.credential

    def share(self, keys: dict) -> dict[int, bytes]:
        """``share`` after checking every neighbour's advertisement is signed by its identity."""
        t0, st = time.perf_counter(), self.setup
        mine = st.graph()[self.me]
        for v, (c_pk, s_pk, sig, credential) in sorted(keys.items()):
            if v not in mine:
                continue
            try:
                public = self.pki.public(v, credential)
            except SignatureError as exc:
                raise SignatureError(f"client {self.me}: refused: {exc}") from None
            if not verifies(public, keys_message(st, v, c_pk, s_pk), sig):
                raise SignatureError(f"client {self.me}: refused: the keys advertised for client {v} "
                                     f"are not signed by client {v}'s identity")
            self.ids[v] = public
        self.seconds += time.perf_counter() - t0
        return super().share(keys)

    def check(self, view) -> bytes:
        """The consistency check: sign the survivor set U3 the server sent, once a round."""
        view, st = frozenset(view), self.setup
        if self.view is not None:
            raise ConsistencyError(f"client {self.me}: refused: a second survivor set to sign")
        if self.me not in view or not view <= set(st.clients) or len(view) < st.threshold:
            raise ConsistencyError(f"client {self.me}: refused: a survivor set without this client, "
                                   f"outside the cohort or smaller than the threshold {st.threshold}")
        t0 = time.perf_counter()
        self.view = view
        sig = sign(self.identity.key, view_message(st, view))
        self.seconds += time.perf_counter() - t0
        return sig

    def unmask(self, survivors, dropped, signatures: dict | None = None) -> dict:
        """``unmask`` once ``threshold`` distinct neighbours signed the U3 this client signed,
        and the request agrees with it."""
        t0, st = time.perf_counter(), self.setup
        if self.view is None:
            raise ConsistencyError(f"client {self.me}: refused: no survivor set was signed")
        off = sorted((set(survivors) - self.view) | (set(dropped) & self.view))
        if off:
            raise ConsistencyError(f"client {self.me}: refused: the request names {off} otherwise "
                                   "than the survivor set it signed")
        msg = view_message(st, self.view)
        good = [v for v, sig in (signatures or {}).items()
                if v in self.ids and verifies(self.ids[v], msg, sig)]
        self.seconds += time.perf_counter() - t0
        if len(good) < st.threshold:
            raise ConsistencyError(f"client {self.me}: refused: {len(good)} neighbours signed its "
                                   f"survivor set, fewer than the threshold {st.threshold}")
        return super().unmask(survivors, dropped)


@dataclass
class ActiveServer(secagg.Server):
    pki: object = None
    signed: dict = field(default_factory=dict)  # u -> u's signature on U3

    def collect_keys(self, keys: dict) -> dict[int, dict]:
        """Forwards only advertisements that verify (a bad one would make its neighbours refuse)."""
        t0, good = time.perf_counter(), {}
        for u, (c_pk, s_pk, sig, credential) in keys.items():
            try:
                public = self.pki.public(u, credential)
            except SignatureError:
                continue
            if verifies(public, keys_message(self.setup, u, c_pk, s_pk), sig):
                good[u] = (c_pk, s_pk, sig, credential)
        self.seconds += time.perf_counter() - t0
        return super().collect_keys(good)

    def view(self) -> frozenset:
        """U3, the clients whose masked input came (after ``collect_inputs``)."""
        return frozenset(self.inputs)

    def collect_views(self, signed: dict[int, bytes], requests: dict) -> dict[int, tuple]:
        """U4's signatures on U3; returns each signer's unmask request with its neighbours'."""
        self.signed = {u: s for u, s in signed.items() if u in self.inputs}
        return {u: (*requests[u], {v: self.signed[v] for v in self.graph[u] if v in self.signed})
                for u in self.signed}
