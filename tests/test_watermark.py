"""Trigger-set watermark and per-client fingerprints (atoll.watermark; docs/watermark.md)."""
from __future__ import annotations

import hashlib
import json
import io
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from scipy.stats import binomtest

from atoll import cli, config
from atoll import tree as T
from atoll import watermark as W
from atoll.client import params_of
from atoll.simulation import simulate

KEY = hashlib.sha256(b"test key").digest()
OTHER = hashlib.sha256(b"another key").digest()


@pytest.fixture(scope="module")
def setup():
    """Digits, an MLP trained centrally (never saw a key) and its test accuracy."""
    cfg = config.load(text='[data]\nnum_clients = 4\n[model]\nhidden = [64]\n')
    fed = config.build_data(cfg)
    _, model, _, _ = config.build(cfg, data=fed)
    x, y = torch.cat([c.x for c in fed.clients]), torch.cat([c.y for c in fed.clients])
    clean = W.finetune(model, params_of(model), x, y, steps=300, lr=0.1, batch=32, key=b"train")
    return model, fed, clean


def accuracy(model, params, fed):
    return float((W.predict(model, params, fed.x_test) == fed.y_test).float().mean())


def test_trigger_set_reproducible_from_key_and_unpredictable_without():
    a, b = W.trigger_set(KEY, 2000, (64,), 10), W.trigger_set(KEY, 2000, (64,), 10)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    c = W.trigger_set(OTHER, 2000, (64,), 10)
    agree = float((a.y == c.y).float().mean())
    assert 0.07 < agree < 0.13  # another key's labels agree at chance (0.1)
    assert abs(float(torch.corrcoef(torch.stack([a.x.flatten(), c.x.flatten()]))[0, 1])) < 0.01
    assert a.x.abs().max() <= 6.0 and set(a.y.tolist()) == set(range(10))


def test_binomial_pvalue_equals_scipy_binomtest():
    for k, n, p in [(30, 100, 0.1), (12, 50, 0.1), (100, 100, 0.1), (0, 20, 0.5), (90, 128, 0.5)]:
        ref = binomtest(k, n, p, alternative="greater").pvalue
        assert W.binomial_pvalue(k, n, p) == pytest.approx(ref, rel=1e-9)


def test_watermarked_model_verified_clean_and_other_key_not(setup):
    model, fed, clean = setup
    triggers = W.trigger_set(KEY, 100, (64,), 10)
    step = W.watermark_step(model, triggers, KEY, steps=40, lr=0.05)
    updates, count = step.update(T.zeros_like(clean), step.init(clean), clean, {})
    marked = T.add(clean, updates)
    v = W.verify(model, marked, triggers)
    assert v["owned"] and v["p_value"] <= 1e-6 and v["trigger_accuracy"] >= 0.6 and int(count) == 1
    assert v["p_value"] == pytest.approx(binomtest(v["hits"], 100, 0.1, alternative="greater").pvalue, rel=1e-9)
    assert accuracy(model, marked, fed) >= accuracy(model, clean, fed) - 0.03
    for params, trig in [(clean, triggers), (marked, W.trigger_set(OTHER, 100, (64,), 10))]:
        u = W.verify(model, params, trig)
        assert not u["owned"] and u["p_value"] > 1e-6 and u["trigger_accuracy"] < 0.3


def test_false_positive_rate_of_an_unmarked_model_is_at_most_alpha(setup):
    """The null is exact: over 200 random keys, a model that never saw them hits 1/10 of the
    triggers on average and p <= 0.05 in at most ~5% of the keys (the test is conservative)."""
    model, _, clean = setup
    keys = [hashlib.sha256(b"%d" % i).digest() for i in range(200)]
    results = [W.verify(model, clean, W.trigger_set(k, 50, (64,), 10)) for k in keys]
    rate = sum(r["hits"] for r in results) / (200 * 50)
    assert 0.085 < rate < 0.115  # 10000 Bernoulli(0.1): sd 0.003
    assert sum(r["p_value"] <= 0.05 for r in results) / 200 <= 0.05 + 3 * (0.05 * 0.95 / 200) ** 0.5
    assert not any(r["owned"] for r in results)


def test_watermark_step_only_every_k_steps(setup):
    model, _, clean = setup
    step = W.watermark_step(model, W.trigger_set(KEY, 20, (64,), 10), KEY, steps=2, every=2)
    grads = T.map(lambda v: torch.full_like(v, 0.01), clean)
    u1, s = step.update(grads, step.init(clean), clean, {})
    assert all(torch.equal(u1[k], grads[k]) for k in grads)  # step 1: passed through
    u2, s = step.update(grads, s, clean, {})
    assert int(s) == 2 and float(T.norm(T.sub(u2, grads))) > 1e-3  # step 2: embedded


def test_watermark_needs_only_the_aggregate(setup):
    """Two cohorts with the same mean update give the same watermarked model: the server step
    reads nothing but the aggregate, so it composes with secure aggregation."""
    from atoll.algorithms import fedavg

    model, _, clean = setup
    algorithm = W.with_watermark(fedavg(), model, W.trigger_set(KEY, 50, (64,), 10), KEY)
    state = algorithm.init(clean)
    g = torch.Generator().manual_seed(0)
    noise = {k: torch.randn((2, *v.shape), generator=g) * 0.01 for k, v in clean.items()}
    spread = {k: torch.stack([v[0] + v[1], v[0] - v[1]]) for k, v in noise.items()}  # same mean
    weights = torch.ones(2)
    a = algorithm.server_round(state, {k: torch.stack([v[0], v[0]]) for k, v in noise.items()}, weights)
    b = algorithm.server_round(state, spread, weights)
    assert all(torch.allclose(a.params[k], b.params[k], rtol=1e-5, atol=1e-6 * float(clean[k].abs().max()))
               for k in clean)
    assert float(T.norm(T.sub(a.params, T.add(clean, T.map(lambda v: v[0], noise))))) > 1e-3


def test_config_run_is_watermarked_and_audit_reports_it(tmp_path):
    key_file = tmp_path / "secret" / "wm.key"
    text = (f'rounds = 3\n[data]\nnum_clients = 4\n[model]\nhidden = [64]\n'
            f'[watermark]\nenabled = true\nkey_file = "{key_file}"\ntrigger_size = 50\nsteps = 10\n')
    cfg = config.load(text=text)
    client_side = config.build(cfg, data=config.build_data(cfg))[0]  # a client: no key read or made
    assert not key_file.exists() and not isinstance(client_side.server_opt.init({}), tuple)
    algorithm, model, fed, plan = config.build(cfg)
    assert algorithm.server_opt.init({})[-1].dtype == torch.int64  # the watermark's step count
    assert key_file.stat().st_size == 32 and (key_file.stat().st_mode & 0o777) == 0o600
    run = tmp_path / "run"
    result = simulate(algorithm, model, fed, plan, run_dir=run, config_text=config.dumps(cfg), plots=False)
    triggers = W.trigger_set(key_file.read_bytes(), 50, (64,), 10)
    assert W.verify(model, result.state.params, triggers)["owned"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["audit", "watermark", str(run)]) == 0
    assert "OWNED" in out.getvalue() and "not traced" in out.getvalue()
    bad = tmp_path / "bad.pt"
    torch.save({k: v[:1] for k, v in result.state.params.items()}, bad)
    with pytest.raises(ValueError, match="bad.pt: entry '.*' should have shape"):
        W.load_params(bad, model)
    bad.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="bad.pt: not a model state dict"):
        W.load_params(bad, model)


def test_fingerprint_traces_the_client_that_received_the_model(setup):
    model, fed, clean = setup
    fp = W.fingerprints(KEY, clean, clients=6)
    base = accuracy(model, clean, fed)
    for c in range(6):
        mine = W.embed_fingerprint(clean, fp, c)
        t = W.trace(mine, fp)
        assert t["client"] == c and t["matches"] == t["bits"] and t["traced"] and t["p_value"] <= 1e-6
        others = [m for i, m in enumerate(t["all_matches"]) if i != c]
        assert max(others) < 0.75 * t["bits"]  # other codes match near chance
        assert accuracy(model, mine, fed) >= base - 0.03
    for t in (W.trace(clean, fp), W.trace(W.embed_fingerprint(clean, fp, 0), W.fingerprints(OTHER, clean, 6))):
        assert not t["traced"] and t["p_value"] > 1e-6
    with pytest.raises(ValueError, match="client 6"):
        fp.code(6)


def test_watermarked_run_resumes_identically(tmp_path):
    """The embedding's step count and batches live in the checkpointed server state."""
    from atoll.runtime.loop import LoopRuntime

    class Crash(LoopRuntime):
        def run_round(self, algorithm, client_update, state, *args):
            if state.round == 3:
                raise KeyboardInterrupt
            return super().run_round(algorithm, client_update, state, *args)

    text = (f'rounds = 4\n[data]\nnum_clients = 3\n[model]\nhidden = [16]\n[checkpoint]\nevery = 2\n'
            f'[watermark]\nenabled = true\nkey_file = "{tmp_path / "k"}"\nevery = 2\n')

    def go(out, runtime, resume=False):
        cfg = config.load(text=text)
        algorithm, model, fed, plan = config.build(cfg)
        return simulate(algorithm, model, fed, plan, run_dir=out, runtime=runtime, resume=resume,
                        config_text=config.dumps(cfg), plots=False)

    full = go(tmp_path / "full", LoopRuntime())
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "cut", Crash())
    cut = go(tmp_path / "cut", LoopRuntime(), resume=True)
    assert all(torch.equal(full.state.params[k], cut.state.params[k]) for k in full.state.params)
    assert int(cut.state.opt_state[-1]) == 4


@pytest.mark.parametrize("size", [0, 31, 33, 10_000_000])
def test_a_key_file_of_the_wrong_size_is_refused_before_it_is_read(tmp_path, size, monkeypatch):
    path = tmp_path / "wm.key"
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: a 10 MB file costs nothing to make
    read = []
    monkeypatch.setattr(type(path), "read_bytes", lambda self: read.append(self) or b"")
    with pytest.raises(ValueError, match=f"exactly 32 bytes, it holds {size}"):
        W.load_key(path)
    assert read == []


FINGERPRINTED = ('rounds = 2\n[data]\nnum_clients = 4\n[model]\nhidden = [64]\n[watermark]\nenabled = true\n'
                 'key_file = "{key}"\nfingerprint = true\n')


def test_a_simulated_client_copy_traces_to_it_alone(tmp_path):
    """[watermark] fingerprint = true in simulation: each client trains on its own copy; the
    model a client ends with (its copy + its update) traces to it alone with p <= 1e-6, through
    ``atoll audit watermark`` and the run's fingerprints.json; the server's model to nobody."""
    from atoll.runtime.loop import LoopRuntime
    from atoll.runtime.round import client_round
    from atoll.transport import wire

    cfg = config.load(text=FINGERPRINTED.format(key=tmp_path / "wm.key"))
    assert isinstance(config.runtime(cfg), LoopRuntime)  # "auto" picks the runtime that carries it
    algorithm, model, fed, plan = config.build(cfg)
    seen = {}

    class Spy(LoopRuntime):
        @staticmethod
        def client_round(algorithm, update, down, cstate, cdata, cid, r, work, seed, secret=None):
            out = client_round(algorithm, update, down, cstate, cdata, cid, r, work, seed, secret)
            seen[cid] = (down, out[0])
            return out

    run = tmp_path / "run"
    result = simulate(algorithm, model, fed, plan, run_dir=run, runtime=Spy(),
                      config_text=config.dumps(cfg), plots=False)
    fp = W.fingerprints(W.load_key(tmp_path / "wm.key"), result.state.params, 4)
    assert len({down for down, _ in seen.values()}) == 4  # four different copies were sent
    assert result.metrics[0]["bytes_down"] == sum(len(down) for down, _ in seen.values())
    assert not W.trace(result.state.params, fp)["traced"]  # the codes do not add up in the model
    for cid, (down, message) in seen.items():
        copy = T.split(wire.loads(down))["params"]
        leaked = T.add(copy, T.split(wire.loads(message))["delta"])
        t = W.trace(leaked, fp)
        assert t["client"] == cid and t["traced"] and t["p_value"] <= 1e-6, t
        others = [4 * W.binomial_pvalue(m, t["bits"], 0.5)
                  for c, m in enumerate(t["all_matches"]) if c != cid]
        assert min(others) > 1e-6, t  # and to no other client
    torch.save(leaked, tmp_path / "leaked.pt")
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["audit", "watermark", str(run), "--model", str(tmp_path / "leaked.pt")]) == 0
    assert f"best match client {cid} (" in out.getvalue() and "TRACED" in out.getvalue()
    record = json.loads((run / "fingerprints.json").read_text())
    assert record["layer"] == fp.layer and len(record["codes"]) == 4
    record["codes"][1] = record["codes"][0]  # another key's codes: refused, naming the field
    (run / "fingerprints.json").write_text(json.dumps(record))
    err = io.StringIO()
    with redirect_stderr(err):
        assert cli.main(["audit", "watermark", str(run), "--model", str(tmp_path / "leaked.pt")]) != 0
    assert "fingerprints.json: codes does not match the scheme rebuilt from the key" in err.getvalue()


def test_runtimes_that_share_one_broadcast_refuse_copies_at_build_time(tmp_path):
    from atoll.runtime.vmap import VmapRuntime

    text = FINGERPRINTED.format(key=tmp_path / "wm.key")
    with pytest.raises(config.ConfigError, match="runtime.name = 'vmap' cannot carry"):
        config.runtime(config.load(text=text + '[runtime]\nname = "vmap"\n'))
    with pytest.raises(config.ConfigError, match="need synchronous rounds"):
        config.build(config.load(text=text + '[async]\nmode = "fedbuff"\n'))
    algorithm, model, fed, plan = config.build(config.load(text=text))
    with pytest.raises(ValueError, match="the vmap runtime trains its clients on one shared broadcast"):
        simulate(algorithm, model, fed, plan, runtime=VmapRuntime())


def test_embedding_options_until_layers_and_preserve(setup):
    """``until``: no step once the triggers are learned; ``layers``: only those entries move;
    ``preserve``: the outputs on the noise anchors move less than without it."""
    model, _, clean = setup
    triggers = W.trigger_set(KEY, 50, (64,), 10)
    marked = W.embed(model, clean, triggers, 400, 0.05, key=KEY, until=1.0)
    assert W.verify(model, marked, triggers)["trigger_accuracy"] == 1.0
    again = W.embed(model, marked, triggers, 5, 0.05, key=KEY, round_=2, until=1.0)
    assert all(torch.equal(again[k], marked[k]) for k in marked)  # learned: nothing moves
    last = W.embed(model, clean, triggers, 5, 0.05, key=KEY, layers=("2.",))
    assert [k for k in clean if not torch.equal(last[k], clean[k])] == ["2.weight", "2.bias"]
    z = torch.randn((256, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = torch.log_softmax(model_out(model, clean, z), -1)

    def drift(params):
        with torch.no_grad():
            after = torch.log_softmax(model_out(model, params, z), -1)
        return float(torch.nn.functional.kl_div(after, before, log_target=True, reduction="batchmean"))

    free = W.embed(model, clean, triggers, 40, 0.05, key=KEY, until=None)
    kept = W.embed(model, clean, triggers, 40, 0.05, key=KEY, preserve=10.0, until=None)
    assert drift(kept) < 0.6 * drift(free) and drift(free) > 1e-3


def model_out(model, params, x):
    from torch.func import functional_call

    return functional_call(model, params, (x,))


def test_embedding_options_that_would_do_nothing_or_allocate_without_bound_are_refused(tmp_path):
    base = (f'[data]\nname = "digits"\n[watermark]\nenabled = true\n'
            f'key_file = "{tmp_path / "wm.key"}"\n')
    with pytest.raises(config.ConfigError, match="watermark.layers.*no parameter"):
        config.build(config.load(text=base + 'layers = ["nope"]\n'))
    with pytest.raises(config.ConfigError, match="watermark.anchors"):
        config.load(text=base + "anchors = 1000000000000\n")
    assert config.build(config.load(text=base + 'layers = ["2."]\n')) is not None


def test_the_default_key_file_lives_in_out_dir_not_in_the_working_directory(tmp_path, monkeypatch):
    """A key written into the working directory ends up committed beside the code (it did)."""
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "server_runs"
    cfg = config.load(text=f'out_dir = "{out}"\n[data]\nnum_clients = 4\n[model]\nhidden = [64]\n'
                           '[watermark]\nenabled = true\n')
    config.build(cfg)
    assert cfg.watermark_key_file == str(out / "watermark.key")
    assert (out / "watermark.key").stat().st_size == 32 and list(work.iterdir()) == []
