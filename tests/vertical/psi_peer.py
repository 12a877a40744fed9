"""A scripted PSI peer for the tests: it speaks the protocol by hand with a scalar it knows,
so a test can check what a party reveals and can send what an honest party never would."""
import hashlib
import secrets
import threading

from atoll.vertical import psi
from atoll.vertical.psi import Message, QueueChannel

P = 2**255 - 19
ORDER8 = 325606250916557431795983626356110631294008115727848805560023387167927233504


def u_bytes(u: int) -> bytes:
    return u.to_bytes(32, "little")


class Party:
    """Runs ``psi.run_psi`` on one end of a channel in a thread; ``.result`` or ``.error``."""

    def __init__(self, items, **kw):
        self.mine, theirs = QueueChannel.pair()
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(theirs, items, kw), daemon=True)
        self.thread.start()

    def _run(self, ch, items, kw):
        try:
            self.result = psi.run_psi(ch, items, **{"timeout": 5.0, **kw})
        except Exception as exc:  # noqa: BLE001
            self.error = exc
        finally:
            ch.close()

    def join(self):
        self.thread.join(20)
        assert not self.thread.is_alive(), "the party under test hung"
        return self


class Script:
    """The hand-driven peer of a ``Party``."""

    def __init__(self, party: Party, items=(), learn="intersection", reveal="intersection", count=None,
                 nonce=None, scalar=None):
        self.ch, self.party = party.mine, party
        self.scalar = scalar or secrets.token_bytes(32)
        self.items = [psi.encode(x) for x in items]
        self.nonce = nonce or secrets.token_bytes(32)
        self.hello = Message("hello", nonce=self.nonce, count=len(self.items) if count is None else count,
                             learn=learn, reveal=reveal, version=psi.VERSION)
        self.ch.send(self.hello)
        self.theirs = self.ch.recv(5)
        assert self.theirs.kind == "hello"
        self.session = hashlib.sha256(psi.VERSION.encode() + b"".join(
            sorted([psi._hello_bytes(self.hello), psi._hello_bytes(self.theirs)]))).digest()

    def blinded(self) -> bytes:
        return psi.exponentiate(self.scalar, psi.hash_to_group(self.items, self.session))

    def send(self, kind, data: bytes, session=None):
        self.ch.send(Message(kind, session=self.session if session is None else session, data=data))

    def receive(self, kind, count) -> bytes:
        out = bytearray()
        while len(out) < 32 * count:
            m = self.ch.recv(5)
            assert m is not None and m.kind == kind, m
            out += m.data
        return bytes(out)

    def messages(self) -> list:
        """Everything the party sends until it closes its end."""
        out = []
        while (m := self.ch.recv(5)) is not None:
            out.append(m)
        return out
