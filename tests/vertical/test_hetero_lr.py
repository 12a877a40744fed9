"""Hetero logistic regression (``atoll.vertical.hetero_lr``): the loss trajectory equals centralised
logistic regression on the joined table (float64) within the fixed-point bound; the passive party
gets only ciphertexts of the residuals, the active party only masked gradients; malformed messages
are refused naming the party and the field; the decryption-oracle attack of a malicious passive
party is capped at d_A residuals per step."""
import pytest
import torch

pytest.importorskip("phe")

from atoll.vertical.channel import PartyError  # noqa: E402
from atoll.vertical.hetero_lr import ActiveParty, HeteroLR, grad_tolerance  # noqa: E402
from atoll.vertical.split import batches  # noqa: E402

N, DA, DB, LR = 48, 3, 2, 0.5


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(N, DA, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64)
    xb = torch.randn(N, DB, generator=g, dtype=torch.float64)
    logit = xa[:, 0] - 0.4 * xa[:, 1] + xb[:, 0] + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)
    return xa, xb, (logit > 0.5).to(torch.float64)


def _central(xa, xb, y, plan):
    """The oracle: autograd on the joined table [X_A | X_B] with an intercept."""
    x = torch.cat([xa, xb], 1)
    w = torch.zeros(DA + DB, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    out, grads = [], []
    for rows in plan:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[rows] @ w + b, y[rows])
        gw, gb = torch.autograd.grad(loss, [w, b])
        with torch.no_grad():
            w -= LR * gw
            b -= LR * gb
        out.append(loss.item())
        grads.append(gw[:DA].clone())
    return out, grads, w.detach()


def _protocol(xa, xb, y, frac=32):
    return HeteroLR(ActiveParty(xb, y, LR, d_passive=DA, frac=frac), xa, frac=frac)


def test_loss_trajectory_equals_centralised_logistic_regression():
    xa, xb, y = _data()
    plan = batches(N, 16, epochs=2, seed=1)
    ref, _, w = _central(xa, xb, y, plan)
    proto = _protocol(xa, xb, y)
    got = proto.fit(plan)
    assert ref[-1] < 0.85 * ref[0]  # it learns
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-6  # the target
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-8  # what 32 fraction bits give here
    assert torch.allclose(torch.cat([proto.passive.w, proto.active.w]), w, rtol=0, atol=1e-8)
    bytes_ = dict(proto.channel.sent)
    assert bytes_[("active", "passive", "residuals")] == 6 * 16 * 256  # B ciphertexts of 2 x 1024 bits
    assert bytes_[("passive", "active", "logits")] == 6 * 16 * 8


@pytest.mark.parametrize("frac", [32, 8])
def test_passive_gradient_is_within_the_fixed_point_bound(frac):
    xa, xb, y = _data()
    rows = torch.arange(16)
    _, ref, _ = _central(xa, xb, y, [rows])
    proto = _protocol(xa, xb, y, frac=frac)
    a, p = proto.active, proto.passive
    enc, _ = a.residuals(rows, p.logits(rows))
    g = p.update(a.decrypt_masked(p.masked_gradient(enc)))
    err = (g - ref[0]).abs().max().item()
    bound = grad_tolerance(xa[rows].abs().max().item(), frac)
    assert err <= bound
    if frac == 8:
        assert err > 1e-6  # at 8 bits the rounding is visible: 1e-6 needs enough fraction bits


def test_each_party_sees_only_ciphertexts_or_masked_values():
    xa, xb, y = _data()
    rows = torch.arange(16)
    seen = []
    for _ in range(2):
        proto = _protocol(xa, xb, y)
        a, p = proto.active, proto.passive
        enc, _ = a.residuals(rows, p.logits(rows))
        plain = a.decrypt_masked(p.masked_gradient(enc))
        seen.append((enc, plain, p.update(plain), a))
    (enc0, plain0, g0, a0), (enc1, plain1, g1, _) = seen
    r = torch.sigmoid(xb[rows] @ torch.zeros(DB, dtype=torch.float64)) - y[rows]
    cts = [int.from_bytes(enc0[i:i + 256], "big") for i in range(0, len(enc0), 256)]
    dec = [a0._priv.raw_decrypt(c) for c in cts]
    dec = [(v - a0.n if v > a0.n // 2 else v) / 2.0 ** 32 for v in dec]
    assert torch.allclose(torch.tensor(dec, dtype=torch.float64), r, atol=2.0 ** -32)  # [[r]] under the key
    assert len(set(cts)) == len(cts)  # equal residuals encrypt differently (probabilistic)
    assert torch.allclose(g0, g1, atol=1e-12)  # same gradient ...
    assert plain0 != plain1  # ... but what the active party decrypted differs: the fresh mask
    vals = [int.from_bytes(plain0[i:i + 128], "big") for i in range(0, len(plain0), 128)]
    assert min(vals) > a0.n // 2 ** 40  # a masked value, not a small fixed-point gradient


def _step_until_residuals(proto, rows):
    a, p = proto.active, proto.passive
    return a.residuals(rows, p.logits(rows))[0]


@pytest.mark.parametrize("bad, words", [
    (lambda z: z.clone().fill_(float("nan")), "NaN"), (lambda z: z[:3], "shape"),
    (lambda z: z.float(), "dtype"),
])
def test_malformed_logits_are_refused(bad, words):
    xa, xb, y = _data()
    proto = _protocol(xa, xb, y)
    rows = torch.arange(8)
    w0 = proto.active.w.clone()
    with pytest.raises(PartyError, match=rf"party 'passive': field 'logits'.*{words}"):
        proto.active.residuals(rows, bad(proto.passive.logits(rows)))
    assert torch.equal(proto.active.w, w0)


def test_malformed_ciphertexts_and_replays_are_refused():
    xa, xb, y = _data()
    proto = _protocol(xa, xb, y)
    a, p, rows = proto.active, proto.passive, torch.arange(8)
    enc = _step_until_residuals(proto, rows)
    with pytest.raises(PartyError, match="party 'active': field 'residuals' has 100 bytes"):
        p.masked_gradient(enc[:100])
    with pytest.raises(PartyError, match="party 'active': field 'residuals' holds a non-unit"):
        p.masked_gradient(bytes(256) + enc[256:])
    with pytest.raises(PartyError, match="party 'active': field 'residuals' holds a value out of range"):
        p.masked_gradient(b"\xff" * 256 + enc[256:])
    masked = p.masked_gradient(enc)
    with pytest.raises(PartyError, match="party 'passive': field 'masked_gradient' has"):
        a.decrypt_masked(masked + b"\x01")
    plain = a.decrypt_masked(masked)
    with pytest.raises(PartyError, match="party 'passive': field 'masked_gradient' sent twice"):
        a.decrypt_masked(masked)
    with pytest.raises(PartyError, match="party 'active': field 'gradient_plus_mask' has"):
        p.update(plain[:-1])
    w0 = p.w.clone()
    p.update(plain)
    assert not torch.equal(p.w, w0)
    with pytest.raises(PartyError, match="no step outstanding"):
        p.update(plain)


def test_weak_public_key_is_refused():
    from atoll.vertical.hetero_lr import PassiveParty
    xa, _, _ = _data()
    with pytest.raises(PartyError, match="party 'active': field 'public_key'"):
        PassiveParty(xa, LR, (2 ** 511 + 1).to_bytes(64, "big"))
    with pytest.raises(PartyError, match="party 'active': field 'public_key' is not an odd"):
        PassiveParty(xa, LR, (2 ** 1023).to_bytes(128, "big"))


def test_malicious_passive_decryption_oracle_is_capped_at_d_a_residuals_per_step():
    """The attack: send the active party's own [[r_i]] (re-randomised) back as the 'masked
    gradient'. It works for d_A residuals (documented limit of the semi-honest protocol); asking
    for more values, or asking twice in a step, is refused."""
    xa, xb, y = _data()
    proto = _protocol(xa, xb, y)
    a, p, rows = proto.active, proto.passive, torch.arange(8)
    enc = _step_until_residuals(proto, rows)
    cts = [int.from_bytes(enc[i:i + 256], "big") for i in range(0, len(enc), 256)]
    rerand = [c * p.pub.raw_encrypt(0) % p.n2 for c in cts]
    blob = b"".join(c.to_bytes(256, "big") for c in rerand)
    with pytest.raises(PartyError, match="has 2048 bytes, expected 3 x 256"):
        a.decrypt_masked(blob)
    plain = a.decrypt_masked(blob[: 3 * 256])
    got = [int.from_bytes(plain[i:i + 128], "big") for i in range(0, 3 * 128, 128)]
    leaked = torch.tensor([(v - p.n if v > p.n // 2 else v) / 2.0 ** 32 for v in got])
    r = torch.sigmoid(torch.zeros(3, dtype=torch.float64)) - y[:3]
    assert torch.allclose(leaked.double(), r, atol=1e-9)  # 3 = d_A residuals leak in one step
    with pytest.raises(PartyError, match="sent twice"):
        a.decrypt_masked(blob[3 * 256: 6 * 256])


def test_small_batches_let_the_passive_party_solve_for_residuals_and_are_refused():
    """The attack: with B <= d_A rows, the passive party's own gradient X_A^T r / B is a square
    system; solving it gives r, and sign(r) the labels. Allowed with min_batch=1, refused by
    default (min_batch = 2 d_A)."""
    xa, xb, y = _data()
    rows = torch.arange(3)  # B = d_A = 3
    proto = HeteroLR(ActiveParty(xb, y, LR, d_passive=DA, min_batch=1), xa)
    proto.step(rows)
    p = proto.passive
    g = -(p.w - torch.zeros(DA, dtype=torch.float64)) / LR  # what it stepped by: X_A^T r / B
    r = torch.linalg.solve(xa[rows].T, g * len(rows))
    assert torch.equal((r < 0).double(), y[rows])  # every label of the batch recovered
    safe = _protocol(xa, xb, y)
    with pytest.raises(ValueError, match="batch of 3 rows < min_batch 6"):
        safe.step(rows)
