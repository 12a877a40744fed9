"""A client trusts its server only as far as its own policy says: a malicious server that turns
privacy off, names code or paths, or sends oversized tasks is refused before anything happens.

``Malicious`` below is everything a server controls: the join reply and the bytes of each task."""
import builtins
import importlib
import math
import os
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

from atoll import config, data
from atoll import tree as T
from atoll.client import params_of
from atoll.deploy import local
from atoll.deploy.client import Client
from atoll.deploy.coordinator import downlink_bytes
from atoll.deploy.policy import Policy, PolicyError, load
from atoll.deploy.server import Server
from atoll.privacy import events as ev
from atoll.privacy.accountant import Accountant
from atoll.transport import wire
from atoll.transport.grpc.client import TransportError

from .conftest import small_config

FED = data.build(data.load("digits"), num_clients=4, seed=0)
BASE = 'rounds = 3\n[model]\nname = "logreg"\n[client]\nlr = 1.0\n'
ATTACK = BASE + "batch_size = 1\nsteps = 1\n"  # privacy off (the default), batch 1, one step
LOCAL = BASE + 'batch_size = 16\nsteps = 5\n[privacy]\nmode = "local"\nnoise_multiplier = 2.0\n'
STRICT = {"privacy": {"modes": ["local", "dp_sgd"], "max_epsilon": 8.0},
          "training": {"min_batch_size": 16, "min_steps": 5}}


class Malicious:
    def __init__(self, text, num_clients=4, **info):
        cfg = config.load(text=text)
        shape = SimpleNamespace(n_features=FED.n_features, n_classes=FED.n_classes,
                                clients=[None] * 4)
        algorithm, model, _, plan = config.build(cfg, data=shape)
        self.down = downlink_bytes(algorithm, algorithm.init(params_of(model)), cfg.seed)
        self.info = {"client_id": 0, "name": "victim", "config_toml": text, "num_clients": num_clients,
                     "n_features": FED.n_features, "n_classes": FED.n_classes, **info}
        self.sent = []

    def submit(self, r, task_id, message, **head):
        self.sent.append(message)
        return True, ""

    def task(self, r):
        return SimpleNamespace(round=r, task_id="t", data=self.down)


def client(policy=None, **kw):
    return Client("unused:1", FED.clients[0], token="t", insecure=True, policy=policy, **kw)


def recovered_row_error(message) -> float:
    """The attack: with batch 1 and one SGD step, logreg's update is -lr (p - y) [x, 1], so any
    class's weight row divided by its bias gives the training row x exactly."""
    delta = T.split(wire.loads(message))["delta"]
    j = int(delta["bias"].abs().argmax())
    x = delta["weight"][j] / delta["bias"][j]
    rows = FED.clients[0].x
    return float(((rows - x).abs().amax(1) / rows.abs().amax(1)).min())


def test_a_client_without_policy_obeys_and_a_policy_refuses_the_attack():
    server = Malicious(ATTACK)
    c = client()  # no privacy floor: this client does what the server says (and logs a warning)
    c._setup(server.info)
    c._answer(server, server.task(1))
    assert recovered_row_error(server.sent[0]) < 1e-5  # a training row, recovered exactly
    strict = Malicious(ATTACK)
    with pytest.raises(PolicyError, match=r"privacy.mode = 'none' is not in privacy.modes"):
        client(STRICT)._setup(strict.info)
    with pytest.raises(PolicyError, match=r"client.batch_size = 1 is below training.min_batch_size = 16"):
        client({"training": {"min_batch_size": 16}})._setup(strict.info)
    c = client({"training": {"min_steps": 5}})
    c._setup(strict.info)
    with pytest.raises(PolicyError, match=r"round 1 local steps = 1 are below training.min_steps = 5"):
        c._answer(strict, strict.task(1))
    with pytest.raises(PolicyError, match=r"gives no protection within privacy.max_epsilon = 8"):
        client({"privacy": {"max_epsilon": 8.0}})._setup(strict.info)
    assert strict.sent == []


def test_every_weakened_privacy_setting_is_refused_with_field_value_and_bound():
    weak = {
        "noise": (LOCAL.replace("noise_multiplier = 2.0", "noise_multiplier = 0.3"),
                  r"privacy.noise_multiplier = 0.3 is below privacy.min_noise_multiplier = 0.5"),
        "calibrated": (LOCAL.replace("noise_multiplier = 2.0",
                                     'accountant = "rdp"\ntarget_epsilon = 50.0'),
                       r"privacy.noise_multiplier = [\d.e-]+ is below privacy.min_noise_multiplier"),
        "rounds": (LOCAL.replace("rounds = 3", "rounds = 5000"),
                   r"its 5000 rounds spend epsilon [\d.]+ at delta 1e-05"),
        "server noise": (BASE + 'batch_size = 16\n[sampling]\nmethod = "poisson"\nrate = 0.5\n'
                         '[privacy]\nmode = "dp_fedavg"\nnoise_multiplier = 5.0\n',
                         r"added by this client \(dp_fedavg: none\) = 0.0 is below"),
        "poisson batch": (BASE + 'batch_size = 16\n[privacy]\nmode = "dp_sgd"\nsample_rate = 0.001\n'
                          'noise_multiplier = 5.0\n', r"privacy.sample_rate \(0.001\) x this client's"),
        "stragglers": (LOCAL.replace("steps = 5", "steps = 5\nstragglers = 1.0"),
                       r"round 1 local steps = [1-4] are below training.min_steps = 5"),
    }
    policy = {"privacy": {"max_epsilon": 8.0, "min_noise_multiplier": 0.5},
              "training": {"min_batch_size": 16, "min_steps": 5}}
    for name, (text, message) in weak.items():
        server = Malicious(text)
        with pytest.raises(PolicyError, match=message):
            c = client(policy)
            c._setup(server.info)
            c._answer(server, server.task(1))
        assert server.sent == [], name
    intrinsic = Malicious(BASE + 'batch_size = 16\n[privacy]\nmode = "intrinsic"\nsample_rate = 0.5\n'
                          'step = 10.0\nuniforms = 5\n')  # Irwin-Hall events: rdp falls back to pld
    with pytest.raises(PolicyError, match=r"its 3 rounds spend epsilon [\d.]+ at delta 1e-05"):
        client({"privacy": {"max_epsilon": 8.0}})._setup(intrinsic.info)
    fedavg = Malicious(weak["server noise"][0])
    with pytest.raises(PolicyError, match=r"the server sees the update without noise"):
        client({"privacy": {"max_epsilon": 8.0}})._setup(fedavg.info)
    ok = Malicious(LOCAL)
    c = client(policy)
    c._setup(ok.info)
    c._answer(ok, ok.task(1))
    assert len(ok.sent) == 1
    # the client's epsilon is its own: the server's delta does not enter it
    other = client(policy)
    other._setup(Malicious(LOCAL.replace("noise_multiplier", "delta = 0.5\nnoise_multiplier")).info)
    assert other.guard.epsilon(3) == c.guard.epsilon(3) == _epsilon(2.0, 3)


def _epsilon(z, n, delta=1e-5):
    acc = Accountant("rdp")
    acc.step(ev.gaussian(z), n)
    return acc.epsilon(delta)


def test_the_ledger_refuses_the_task_past_the_budget_even_after_a_restart(tmp_path):
    bound = (_epsilon(2.0, 3) + _epsilon(2.0, 4)) / 2  # the 3 rounds fit, a 4th answer does not
    server = Malicious(LOCAL)
    policy = {"privacy": {"max_epsilon": bound}}
    c = client(policy, state_path=tmp_path / "me.state.pt")
    c._setup(server.info)
    with pytest.raises(PolicyError, match=r"task round = 4 is outside the run's rounds 1..3"):
        c._answer(server, server.task(4))
    for r in (1, 2, 3):
        c._answer(server, server.task(r))
    with pytest.raises(PolicyError, match=r"answer 4' would take this client past privacy.max_epsilon"):
        c._answer(server, server.task(3))  # "the server restarted": the same round again
    assert len(server.sent) == 3
    again = client(policy, state_path=tmp_path / "me.state.pt")  # the ledger outlives the process
    again._setup(server.info)
    assert again.guard.answered == 3
    with pytest.raises(PolicyError, match="past privacy.max_epsilon"):
        again._answer(server, server.task(1))
    changed = Malicious(LOCAL.replace("lr = 1.0", "lr = 0.5"))  # a new config: a new budget?
    with pytest.raises(PolicyError, match="the server now sends another config"):
        again._setup(changed.info)


def test_a_server_never_names_code_the_client_imports(tmp_path, monkeypatch):
    (tmp_path / "atoll_probe_model.py").write_text(
        "import torch\nclass Probe(torch.nn.Linear):\n"
        "    def __init__(self, n_features, n_classes):\n        super().__init__(n_features, n_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ran, imported = [], []
    monkeypatch.setattr(os, "system", lambda *a, **k: ran.append((a, k)) or 0)
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda n, *a: imported.append(n) or real(n, *a))
    command = BASE + 'batch_size = 16\n[model]\nname = "os:system"\nkwargs = {command = "echo pwned"}\n'
    command = command.replace('[model]\nname = "logreg"\n', "")
    with pytest.raises(PolicyError, match=r"model.name = 'os:system' is not in models.allow"):
        client()._setup(_info(command))
    probe = BASE.replace('"logreg"', '"atoll_probe_model:Probe"')
    with pytest.raises(PolicyError, match="is not in models.allow"):
        client({"models": {"allow": ["logreg", "atoll_probe_model:Other"]}})._setup(_info(probe))
    assert ran == [] and imported == [] and "atoll_probe_model" not in sys.modules
    c = client({"models": {"allow": ["atoll_probe_model:Probe"]}})  # the owner's own choice
    c._setup(_info(probe))
    assert set(imported) == {"atoll_probe_model"}  # the meta-device size check, then the build


def _info(text):
    return {"client_id": 0, "name": "victim", "config_toml": text, "num_clients": 4,
            "n_features": FED.n_features, "n_classes": FED.n_classes}


def test_no_server_named_path_is_opened_and_sizes_are_bounded_before_allocation(tmp_path, monkeypatch):
    secret = tmp_path / "secret.csv"
    secret.write_text("client,speed,up,down\n" + "".join(f"{i},1,1,1\n" for i in range(4)))
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    text = BASE + f'batch_size = 16\n[devices]\nprofile = "csv"\ncsv = "{secret}"\n'
    with pytest.raises(PolicyError, match=r"devices.csv = '.*secret.csv' is a path"):
        client()._setup(_info(text))
    assert str(secret) not in opened
    huge = BASE.replace('"logreg"', '"mlp"\nhidden = [100000, 100000]')  # 1e10 parameters
    with pytest.raises(PolicyError,
                       match=r"model = '40\d+ bytes of parameters' exceeds limits.max_task_mb = 256"):
        client()._setup(_info(huge))
    with pytest.raises(PolicyError, match=r"num_clients = 2147483647 is outside \[1, limits.max_clients"):
        client()._setup({**_info(BASE), "num_clients": 2**31 - 1})  # [None] * n would be 16 GiB
    with pytest.raises(PolicyError, match=r"config text = '\d+ bytes' exceeds limits.max_config_kb = 256"):
        client()._setup(_info(BASE + "#" * 300_000))


def test_an_oversized_task_stops_the_client(tmp_path):
    cfg = small_config(tmp_path, clients=1)
    enrolled = local.prepare(cfg, tmp_path, tokens=True)
    server = Server(cfg, run_dir=tmp_path / "run", certs_dir=tmp_path / "certs", host="localhost",
                    port=0, insecure=True, plots=False)
    server.grpc.start()
    params = sum(p.numel() for p in server.coordinator.model.parameters()) * 4
    try:
        e = enrolled[0]
        c = Client(f"localhost:{server.port}", e["data"], token=e["token"], insecure=True,
                   policy={"limits": {"max_task_mb": params / 2**20}}, give_up_s=10)
        runner = threading.Thread(target=server.coordinator.run, daemon=True)
        runner.start()
        with pytest.raises(TransportError) as err:
            c.run()
        assert err.value.code == "RESOURCE_EXHAUSTED" and not err.value.retryable
        assert f"exceeds this client's limit of {params} bytes" in err.value.details
        assert c.counts["answered"] == 0
    finally:
        server.stop()
        server.grpc.stop(0)


def test_policy_file_and_flags(tmp_path, capsys):
    from atoll.cli import main

    f = tmp_path / "policy.toml"
    f.write_text('[privacy]\nmodes = ["local"]\nmax_epsilon = 4.0\n[models]\nallow = ["logreg"]\n')
    p = load(f, {"privacy.max_epsilon": 2.0, "training.min_steps": None})
    assert (p.privacy.modes, p.privacy.max_epsilon, p.models.allow) == (["local"], 2.0, ["logreg"])
    assert Policy().models.allow == ["logreg", "mlp", "cnn", "lstm_lm"]
    assert math.isclose(Policy().max_task_bytes, 256 * 2**20)
    f.write_text("[privacy]\nmax_epsilom = 4.0\n")
    with pytest.raises(ValueError, match="privacy.max_epsilom: Extra inputs"):
        load(f)
    cfg = small_config(tmp_path, clients=1)
    e = local.prepare(cfg, tmp_path, tokens=True)[0]
    server = Server(cfg, run_dir=tmp_path / "run", certs_dir=tmp_path / "certs", host="localhost",
                    port=0, insecure=True, plots=False)
    server.grpc.start()
    try:
        code = main(["client", "--server", f"localhost:{server.port}", "--data", str(e["data"]),
                     "--token", str(e["token"]), "--insecure", "--privacy-mode", "local",
                     "--allow-model", "mypkg:Net"])
    finally:
        server.grpc.stop(0)
    assert code == 2  # final: the client stops instead of retrying
    assert "the server's privacy.mode = 'none' is not in privacy.modes = ['local']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["client", "--server", "x:1", "--data", "d.npz", "--token", "t", "--allow-custom-models"])


def test_a_task_stream_longer_than_announced_is_cut_off():
    from atoll.transport.grpc import messages as M
    from atoll.transport.grpc.client import Connection

    read, mb = [], b"\0" * 2**20

    class Stream:  # a server that announces 1 KiB and then streams 100 MiB
        def __init__(self):
            self.chunks = iter([M.TaskChunk(kind="TASK", round=1, task_id="t", total_bytes=1024,
                                            data=b"\0" * 512)] + [None] * 100)

        def __iter__(self):
            return self

        def __next__(self):
            c = next(self.chunks)
            read.append(c)
            return c if c is not None else M.TaskChunk(data=mb)

        def cancel(self):
            read.append("cancelled")

    conn = Connection("localhost:1", token="t", insecure=True, max_task_bytes=2**20)
    conn.stubs["GetTask"] = lambda *a, **k: Stream()
    with pytest.raises(TransportError, match="DATA_LOSS"):
        conn.get_task(1)
    assert len(read) == 3 and read[-1] == "cancelled"  # the head, one chunk too many, cancel
    big = M.TaskChunk(kind="TASK", round=1, task_id="t", total_bytes=2**20 + 1)
    conn.stubs["GetTask"] = lambda *a, **k: _Once(big)
    with pytest.raises(TransportError, match="exceeds this client's limit of 1048576 bytes"):
        conn.get_task(1)
    conn.close()


class _Once:
    def __init__(self, head):
        self.head, self.cancelled = head, False

    def __iter__(self):
        return self

    def __next__(self):
        head, self.head = self.head, None
        if head is None:
            raise AssertionError("read past a head announcing too many bytes")
        return head

    def cancel(self):
        self.cancelled = True


def test_the_ledger_accounts_distributed_dp_whatever_accountant_the_policy_names():
    """Distributed DP's Skellam rounds are zCDP events, which PLD cannot compose. Before: the
    guard retried with PLD and raised ValueError; now it falls back to RDP."""
    from atoll.deploy.policy import Guard

    guard = Guard(Policy(privacy={"accountant": "pld"}))
    guard.events = ((ev.zcdp(0.05, 0.001), 1),)
    acc = Accountant("rdp")
    acc.step(ev.zcdp(0.05, 0.001), 7)
    assert guard.epsilon(7) == pytest.approx(acc.epsilon(1e-5), rel=1e-12)
