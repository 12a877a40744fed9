"""A curious server against a deployed client's privacy noise.

The server knows everything a server knows: the config it sent (so the seed and every key
``rng.key(seed, round, client, purpose)``), the broadcast, and the client's upload with its
header. It regenerates the client's privacy noise from those keys, with the library's own code,
and subtracts it. The client's answer runs through the deployed client's code path
(``Client._setup`` from the config text, ``Client._answer``), without gRPC.

The recovery error is measured against the update the client really computed before its noise
(its clipped update, from its own data and its own Poisson sample). Before the fix the server
recovered it to float rounding (rms local 2.3e-8, laplace 2.3e-7, dp_sgd 2.4e-9) or, in intrinsic
mode, to the quantization error alone (0.076, the dither's 0.075); now it is at the noise scale.
"""
from __future__ import annotations

import math

import pytest
import torch

from atoll import codecs, config, rng
from atoll import tree as T
from atoll.client import params_of
from atoll.codecs.intrinsic import _uniform_sum
from atoll.deploy import client as deploy_client
from atoll.deploy.client import Client
from atoll.deploy.coordinator import downlink_bytes
from atoll.privacy.dpsgd import dp_inputs
from atoll.runtime.base import draw_work
from atoll.transport import wire

BASE = """
rounds = 2
[data]
name = "digits"
num_clients = 3
[model]
name = "logreg"
[client]
lr = 0.5
steps = 1
batch_size = 32
[eval]
federated = false
"""
MODES = {  # mode -> config lines
    "local": '[privacy]\nmode = "local"\nclip = 1.0\nnoise_multiplier = 0.5\n',
    "laplace": '[privacy]\nmode = "local"\nmechanism = "laplace"\nclip = 0.1\nnoise_multiplier = 1.0\n',
    "dp_sgd": '[privacy]\nmode = "dp_sgd"\nclip = 1.0\nnoise_multiplier = 1.0\nsample_rate = 0.2\n',
    "intrinsic": ('[privacy]\nmode = "intrinsic"\nclip = 0.5\nsample_rate = 0.2\nstep = 20.0\n'
                  'uniforms = 5\n'),
}


class Recorder:
    """The connection the client answers on: keeps the message and its header."""

    def submit(self, r, task_id, message, **head):
        self.message, self.head = message, head
        return True, ""


class Task:
    def __init__(self, r, data):
        self.round, self.task_id, self.data = r, "t", data


def deployed(text: str, monkeypatch):
    """(server's view, the client, the secrets the client drew): a client set up from the
    config text as ``atoll client`` is, answering round 1's broadcast."""
    drawn = []
    real = getattr(deploy_client, "secrets", None)
    if real is not None:  # record the client's secret draws: the test's oracle needs them
        monkeypatch.setattr(deploy_client, "secrets", _Recording(real, drawn))
    cfg = config.load(text=text)
    algorithm, model, fed, plan = config.build(cfg)
    state = algorithm.init(params_of(model))
    down = downlink_bytes(algorithm, state, plan.seed)
    cid = 1
    c = Client("unused:1", fed.clients[cid], token="t", insecure=True)
    c._setup({"config_toml": text, "n_features": fed.n_features, "n_classes": fed.n_classes,
              "num_clients": len(fed.clients), "client_id": cid, "name": f"client-{cid}"})
    conn = Recorder()
    c._answer(conn, Task(1, down))
    server = {"algorithm": algorithm, "plan": plan, "params": state.params, "down": down,
              "message": conn.message, "head": conn.head, "cid": cid, "round": 1}
    return server, c, drawn


class _Recording:
    def __init__(self, real, drawn):
        self.real, self.drawn = real, drawn

    def token_bytes(self, n):
        b = self.real.token_bytes(n)
        self.drawn.append(b)
        return b


def rms(a: dict, b: dict) -> float:
    diff = torch.cat([(a[k].double() - b[k].double()).reshape(-1) for k in a])
    return float(diff.pow(2).mean().sqrt())


def own_draw(c: Client, s: dict, drawn: list):
    """What the client really used: its batches, from its own secret (the oracle's knowledge,
    not the server's)."""
    secret = drawn[-1] if drawn else None
    kw = {"secret": secret} if secret is not None else {}
    batches, mask, _ = draw_work(c.algorithm.draw, c.cdata, s["cid"], s["round"], s["plan"].seed,
                                 c.work, s["params"], **kw)
    return batches, mask


def public_key(s: dict, purpose: str) -> int:
    return rng.key(s["plan"].seed, s["round"], s["cid"], purpose)


def uplink_delta(s: dict) -> dict:
    return s["algorithm"].uplink.decode(T.split(wire.loads(s["message"]))["delta"])


def own_key(s: dict, purpose: str, drawn: list) -> int:
    """The key the client really used (the oracle's: it knows the client's secret)."""
    assert len(drawn) == 1, "the client drew one secret for its answer"
    return rng.private_key(s["plan"].seed, s["round"], s["cid"], purpose, drawn[0])


def attack_uplink_noise(s: dict, key: int) -> dict:
    """local / laplace: the noise codecs are additive, so encoding zeros with the client's
    uplink key yields exactly its noise; the update minus it."""
    alg, params = s["algorithm"], s["params"]
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    noise, _ = alg.uplink.encode(zeros, alg.uplink.init(zeros), key)
    got = uplink_delta(s)
    return {k: got[k] - noise[k] for k in got}


def truth_uplink(c: Client, s: dict, drawn: list, clip) -> dict:
    """The client's update before its noise: local training, then the codec's clip."""
    batches, mask = own_draw(c, s, drawn)
    received = T.split(wire.loads(s["down"]))
    res = c.client_update(s["params"], s["algorithm"].new_client_state(s["params"]), received,
                          batches, mask, 0)
    return clip.encode(res.delta, (), 0)[0]


@pytest.mark.parametrize("mode", ["local", "laplace"])
def test_server_cannot_subtract_local_noise(mode, monkeypatch):
    s, c, drawn = deployed(BASE + MODES[mode], monkeypatch)
    recovered = attack_uplink_noise(s, public_key(s, "uplink"))
    if mode == "local":
        truth, std = truth_uplink(c, s, drawn, codecs.clip_l2(1.0)), 0.5 * 2 * 1.0
        attack_std = math.sqrt(2) * std  # the attacker subtracts an independent draw
    else:
        truth, std = truth_uplink(c, s, drawn, codecs.clip_l1(0.1)), math.sqrt(2) * 1.0 * 2 * 0.1
        attack_std = math.sqrt(2) * std
    assert T.norm(truth) > 0
    # the oracle is right: with the client's own key the noise comes off to float rounding
    assert rms(attack_uplink_noise(s, own_key(s, "uplink", drawn)), truth) < 1e-6 * std
    err = rms(recovered, truth)
    print(f"{mode}: recovery error {err:.3g} (noise std {std:.3g})")
    assert 0.7 * attack_std < err < 1.4 * attack_std


def test_server_cannot_subtract_dp_sgd_noise(monkeypatch):
    """One DP-SGD step: ``delta = -lr (G + std xi) / (q n)``; the server knows lr, std, q and
    n (``num_examples``) and regenerates ``xi`` from the client key."""
    s, c, drawn = deployed(BASE + MODES["dp_sgd"], monkeypatch)
    q, lr, std = 0.2, 0.5, 1.0 * 1.0
    n = s["head"]["num_examples"]
    xi = dp_inputs({"y": torch.zeros(1, 1)}, s["params"], public_key(s, "client"))
    got = uplink_delta(s)
    recovered = {k: got[k] + lr * std * xi["noise/" + k][0] / (q * n) for k in got}
    batches, mask = own_draw(c, s, drawn)  # the oracle: the client's own sample, noise zeroed
    batches = {k: torch.zeros_like(v) if k.startswith("noise/") else v
               for k, v in batches.items()}
    received = T.split(wire.loads(s["down"]))
    truth = c.client_update(s["params"], {}, received, batches, mask, 0).delta
    assert T.norm(truth) > 0
    err, scale = rms(recovered, truth), lr * std / (q * n)
    own = dp_inputs({"y": torch.zeros(1, 1)}, s["params"], own_key(s, "client", drawn))
    exact = {k: got[k] + lr * std * own["noise/" + k][0] / (q * n) for k in got}
    assert rms(exact, truth) < 1e-4 * scale  # the oracle is right (float32 rounding)
    print(f"dp_sgd: recovery error {err:.3g} (noise std in the update {scale:.3g})")
    assert 0.7 * math.sqrt(2) * scale < err < 1.4 * math.sqrt(2) * scale


def test_server_cannot_subtract_intrinsic_privacy_noise_but_keeps_the_dither(monkeypatch):
    """The server reads the integers ``m``, the dither seed and ``N_k`` from the payload:
    ``m D_k - v = g + n + e``. Knowing the noise key it would subtract ``n`` and be left with
    the quantization error ``e`` alone (std ``D_k / sqrt 12``); without it, its error is at
    least that of ``n + e`` (std ``D_k sqrt((Z + 1) / 12)``)."""
    s, c, drawn = deployed(BASE + MODES["intrinsic"], monkeypatch)
    payload = T.split(wire.loads(s["message"]))["delta"]
    n_k, seed = float(payload["count"][0]), int(payload["seed"][0])
    assert n_k == pytest.approx(0.2 * c.cdata.n, rel=1e-12)  # the public normaliser q n
    assert seed == rng.key(s["plan"].seed, 1, s["cid"], "dither")  # the dither stays public
    step, z = 20.0 / n_k, 5
    m = torch.cat([v.reshape(-1) for v in uplink_delta(s).values()]).double()  # integers
    d = m.numel()
    dither = _uniform_sum(seed, d, 1) * step
    noise = _uniform_sum(rng.fold(public_key(s, "uplink"), "noise"), d, z) * step
    recovered = m * step - dither - noise
    batches, mask = own_draw(c, s, drawn)
    received = T.split(wire.loads(s["down"]))
    mean = c.client_update(s["params"], {}, received, batches, mask, 0).delta
    truth = torch.cat([mean[k].reshape(-1) for k in s["params"]]).double().clamp(-0.5, 0.5)
    err = float((recovered - truth).pow(2).mean().sqrt())
    own = _uniform_sum(rng.fold(own_key(s, "uplink", drawn), "noise"), d, z) * step
    exact = float((m * step - dither - own - truth).abs().max())
    assert exact <= step / 2 * (1 + 1e-6)  # oracle: only the quantization error |e| <= D_k / 2
    floor = step * math.sqrt((z + 1) / 12)  # n + e: no subtraction at all
    print(f"intrinsic: recovery error {err:.3g} (dither alone {step / math.sqrt(12):.3g}, "
          f"noise + dither {floor:.3g})")
    assert err > 0.8 * floor


@pytest.mark.parametrize("mode", ["local", "dp_sgd", "intrinsic"])
def test_private_header_carries_no_loss_or_realised_sample_count(mode, monkeypatch):
    """The header's ``num_examples`` (n_k, public: see docs/privacy.md) stays; the loss and the
    realised number of sampled records are data the DP guarantee does not cover: not sent."""
    s, c, _ = deployed(BASE + MODES[mode], monkeypatch)
    assert s["head"]["num_examples"] == c.cdata.n
    assert s["head"]["loss"] == 0.0 and s["head"]["samples"] == 0.0


def test_each_private_answer_draws_fresh_noise_and_public_runs_stay_reproducible(monkeypatch):
    s, c, drawn = deployed(BASE + MODES["local"], monkeypatch)
    conn = Recorder()
    c._answer(conn, Task(1, s["down"]))
    assert len(drawn) == 2 and drawn[0] != drawn[1]
    assert conn.message != s["message"]  # the same task again: independent noise
    plain, c, drawn = deployed(BASE, monkeypatch)  # no privacy noise: keys from the run seed
    c._answer(conn, Task(1, plain["down"]))
    assert conn.message == plain["message"] and drawn == []
