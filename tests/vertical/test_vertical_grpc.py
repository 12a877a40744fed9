"""Vertical training over gRPC with TLS and tokens on loopback: the same loss trajectory as in one
process (bit for bit) and as centralised training; the feature party in a thread of this process
(the two-process run is in test_vertical_cli.py)."""
import copy
import threading

import pytest
import torch
from torch import nn

from atoll.deploy import certs
from atoll.transport.grpc.vertical import VerticalServer, dial, run_party
from atoll.vertical.channel import PartyError
from atoll.vertical.split import BottomParty, JoinedModel, LabelParty, SplitNN, batches

N = 64


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    certs.init(d, hosts=("localhost", "127.0.0.1"))
    secret = open(certs.issue(d, "telecom", token=True)["token"]).read().strip()
    other = open(certs.issue(d, "eve", token=True)["token"]).read().strip()
    tls = {k: (d / f).read_bytes() for k, f in (("key", "server.key"), ("cert", "server.pem"),
                                                  ("ca", "ca.pem"))}
    registry = certs.load_registry(d)

    def identify(kind, value):
        name = certs.by_token(registry, value) if kind == "token" else None
        return (name, name) if name else None

    return {"tls": tls, "identify": identify, "creds": {"ca": tls["ca"], "token": secret},
            "eve": {"ca": tls["ca"], "token": other}}


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 7, generator=g, dtype=torch.float64)
    y = ((x[:, 0] - x[:, 5] + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)) > 0.3)
    return x[:, :4], x[:, 4:], y.to(torch.float64).unsqueeze(1)


def models(seed=0):
    torch.manual_seed(seed)
    return (nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double(),
            nn.Sequential(nn.Linear(3, 2), nn.Tanh()).double(),
            nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1)).double())


def adam(ps):
    return torch.optim.Adam(ps, lr=0.02)


def label_party(y, top):
    return LabelParty("bank", top, y, nn.functional.binary_cross_entropy_with_logits, adam,
                      {"bank": 3, "telecom": 2})


def label_side(xb, y, bank, top, channel):
    return SplitNN([BottomParty("bank", bank, xb, adam)], label_party(y, top), channel)


class PartyThread(threading.Thread):
    """The feature party: dials, serves ``endpoint`` until bye; keeps its error."""

    def __init__(self, port, endpoint, creds, **kw):
        super().__init__(daemon=True)
        self.port, self.endpoint, self.creds, self.kw = port, endpoint, creds, kw
        self.error, self.steps = None, None

    def run(self):
        try:
            with dial(f"localhost:{self.port}", **self.creds, **self.kw) as link:
                self.steps = run_party(link, self.endpoint, "bank")
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc


def serve(pki, **kw):
    server = VerticalServer(["telecom"], pki["identify"], tls=pki["tls"], timeout=10.0, **kw)
    return server, server.start()


def test_split_over_grpc_equals_in_process_bit_for_bit_and_centralised(pki):
    xb, xt, y = data()
    plan = batches(N, 16, epochs=3, seed=1)
    bank, tel, top = models()
    local = SplitNN([BottomParty("bank", copy.deepcopy(bank), xb, adam),
                     BottomParty("telecom", copy.deepcopy(tel), xt, adam)],
                    label_party(y, copy.deepcopy(top)))
    central = JoinedModel([copy.deepcopy(bank), copy.deepcopy(tel)], [slice(0, 4), slice(4, 7)],
                          copy.deepcopy(top))
    bank2, tel2, top2 = models()
    server, port = serve(pki)
    party = BottomParty("telecom", tel2, xt, adam)
    thread = PartyThread(port, party, pki["creds"])
    thread.start()
    try:
        channel = server.accept(timeout=20)
        remote = label_side(xb, y, bank2, top2, channel)
        got = remote.fit(plan)
        pred = remote.predict(torch.arange(N))
        channel.close()
        thread.join(20)
    finally:
        server.stop()
    assert thread.error is None and thread.steps == len(plan) == 12
    want = local.fit(plan)
    assert got == want  # bit for bit
    opt, x = adam(central.parameters()), torch.cat([xb, xt], 1)
    ref = []
    for rows in plan:
        loss = nn.functional.binary_cross_entropy_with_logits(central(x[rows]), y[rows])
        opt.zero_grad(), loss.backward(), opt.step()
        ref.append(loss.item())
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-6 * max(1.0, max(ref))
    assert torch.equal(pred, local.predict(torch.arange(N)))
    assert all(torch.equal(a, b) for a, b in zip(party.model.parameters(), local.parties[1].model.parameters()))
    # the bytes counted are the payloads, as in one process
    assert channel.sent[("telecom", "bank", "embedding")] == local.channel.sent[("telecom", "bank", "embedding")]
    assert channel.sent[("bank", "telecom", "gradient")] == 12 * 16 * 2 * 8
