"""Device profiles, availability, step schedules and the simulated clock of synchronous rounds."""
import json
import math

import pytest
import torch

from atoll import config
from atoll.devices import Availability, StepSchedule, make_devices, make_schedule
from atoll.runtime.base import client_work
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime
from atoll.simulation import simulate

from .test_async import BASE

N = 200


@pytest.mark.parametrize("profile", ["uniform", "lognormal", "extreme"])
def test_profiles_are_seeded(profile):
    a, b = make_devices(N, 3, profile), make_devices(N, 3, profile)
    c = make_devices(N, 4, profile)
    for f in ("speed", "up", "down"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.speed, c.speed)


def test_profile_shapes():
    u = make_devices(N, 0, "uniform", speed=10.0, spread=0.5)
    assert 5.0 <= float(u.speed.min()) and float(u.speed.max()) <= 15.0
    assert abs(float(u.speed.mean()) - 10.0) < 0.5
    ln = make_devices(4000, 0, "lognormal", speed=10.0, spread=1.0)
    assert abs(float(ln.speed.median()) - 10.0) < 0.6
    assert abs(float(ln.speed.log().std()) - 1.0) < 0.05
    ex = make_devices(N, 0, "extreme", speed=10.0, up=1e6, slowdown=50.0, slow=2)
    slow = torch.nonzero(ex.speed < 10.0).flatten().tolist()
    assert len(slow) == 2 and torch.allclose(ex.speed[slow], torch.tensor(0.2, dtype=torch.float64))
    assert torch.allclose(ex.up[slow], torch.tensor(2e4, dtype=torch.float64))
    assert int((ex.speed == 10.0).sum()) == N - 2


def test_csv_profile_and_errors(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text("client,speed,up,down,steps\n0,2,100,1000,5\n1,4,200,2000,9\n")
    d = make_devices(2, 0, "csv", csv_path=str(path))
    assert d.speed.tolist() == [2.0, 4.0] and d.fixed_steps == (5, 9)
    assert make_schedule(d, 2, 0, "fixed")(1, 7, 0, 0) == 9
    path.write_text("client,speed,up\n0,2,100\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['down'\]"):
        make_devices(2, 0, "csv", csv_path=str(path))
    path.write_text("client,speed,up,down\n5,2,100,3\n")
    with pytest.raises(ValueError, match="client 5 is not in"):
        make_devices(2, 0, "csv", csv_path=str(path))
    with pytest.raises(ValueError, match="does not exist"):
        make_devices(2, 0, "csv", csv_path=str(tmp_path / "nope.csv"))


def test_client_time_uses_bytes_and_steps():
    d = make_devices(3, 0, "extreme", speed=10.0, up=100.0, down=1000.0, slowdown=10.0, slow=0)
    assert d.client_time(1, 20, 500, 300) == pytest.approx(0.5 + 2.0 + 3.0)
    assert d.round_time([0, 2], [10, 30], 1000, {0: 100, 2: 100}) == pytest.approx(1 + 3 + 1)


def test_random_availability_is_seeded_order_free_and_has_the_right_duty_cycle():
    a, b = Availability("random", on_s=30.0, off_s=10.0, seed=1), Availability("random", on_s=30.0, off_s=10.0, seed=1)
    ts = [7.0 * i for i in range(2000)]
    forward = [a.online(3, t) for t in ts]
    backward = [b.online(3, t) for t in reversed(ts)][::-1]
    assert forward == backward
    assert abs(sum(forward) / len(forward) - 0.75) < 0.05
    assert [a.online(c, 100.0) for c in range(50)] != [a.online(3, 100.0)] * 50
    t = next(t for t, on in zip(ts, forward) if not on)
    nxt = a.next_online(3, t)
    assert nxt > t and a.online(3, nxt) and not a.online(3, (t + nxt) / 2)


def test_trace_availability(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("client,start,end\n0,10,20\n0,30,40\n")
    d = make_devices(2, 0, "uniform", availability="trace", trace_path=str(path))
    av = d.availability
    assert not av.online(0, 5) and av.online(0, 10) and not av.online(0, 25)
    assert av.next_online(0, 25) == 30 and av.next_online(0, 45) == math.inf
    assert av.online(1, 1e9)  # not in the trace: always online


def test_step_schedules():
    normal = StepSchedule("normal", 50.0, 30.0)
    draws = [normal(c, r, 0, 0) for c in range(50) for r in range(40)]
    assert draws == [normal(c, r, 0, 0) for c in range(50) for r in range(40)]
    expected = 30 * math.sqrt(2 / math.pi) * math.exp(-50**2 / 1800) + 50 * math.erf(50 / (30 * math.sqrt(2)))
    assert abs(sum(draws) / len(draws) - expected) < 2.0 and min(draws) >= 1
    assert normal(0, 1, 0, 0) != normal(0, 2, 0, 0) or normal(0, 3, 0, 0) != normal(0, 4, 0, 0)
    fixed = make_schedule(None, 10, 0, "fixed")
    assert all(fixed(c, 1, 0, 0) == fixed(c, 9, 0, 0) for c in range(10))
    d = make_devices(3, 0, "extreme", speed=10.0, up=100.0, down=1000.0, slowdown=10.0, slow=0)
    dl = make_schedule(d, 3, 0, "deadline", deadline=5.0, message_bytes=100)
    assert dl(0, 1, 0, 0) == math.floor((5.0 - 0.1 - 1.0) * 10.0)
    with pytest.raises(ValueError, match="deadline_s"):
        StepSchedule("deadline")


def test_schedule_drives_the_step_mask():
    from atoll.runtime.base import LocalWork

    sched = StepSchedule("normal", 6.0, 4.0)
    work = LocalWork(batch_size=3, epochs=1, schedule=sched)
    x, y = torch.randn(7, 2), torch.zeros(7, dtype=torch.long)
    for r in range(1, 6):
        batches, mask, _ = client_work(x, y, 4, r, 0, work)
        assert int(mask.sum()) == mask.shape[0] == sched(4, r, 0, 7) and batches["x"].shape[0] == mask.shape[0]


CLOCK = ["devices.profile=lognormal", "devices.spread=1.0", "devices.steps=normal",
         "devices.steps_mean=6", "devices.steps_std=4", "devices.speed=50", "devices.up=2e4",
         "devices.down=1e5"]


def run(over, runtime=None, run_dir=None, plots=False):
    alg, model, fed, plan = config.build(config.load(text=BASE, overrides=list(over)))
    return simulate(alg, model, fed, plan, runtime=runtime or LoopRuntime(), plots=plots, run_dir=run_dir), plan, fed


def test_sync_clock_is_the_slowest_client_with_real_bytes(tmp_path):
    res, plan, fed = run(CLOCK, run_dir=tmp_path / "a", plots=True)
    from atoll import sampling
    from atoll.runtime.base import active_steps

    t = 0.0
    for m in res.metrics:
        cohort = sampling.sample(len(fed.clients), m["round"], plan.seed, count=4)
        down = m["bytes_down"] // 4
        up = m["bytes_up"] // 4  # identity codec: every client's message has the same size
        t += max(plan.devices.client_time(c, active_steps(c, m["round"], 0, plan.work, fed.clients[c].n), down, up)
                 for c in cohort)
        assert m["sim_time"] == pytest.approx(t, rel=1e-12)
    assert (tmp_path / "a/plots/time.png").exists()
    again, _, _ = run(CLOCK, run_dir=tmp_path / "b")
    assert (tmp_path / "a/metrics.jsonl").read_bytes() == (tmp_path / "b/metrics.jsonl").read_bytes()


def test_offline_clients_sit_the_round_out():
    res, _, _ = run(CLOCK + ["devices.availability=random", "devices.on_s=0.05", "devices.off_s=0.05",
                             "rounds=6"])
    offline = [m.get("clients_offline", 0) for m in res.metrics]
    assert sum(offline) > 0
    assert all(m["clients_sampled"] + o == 4 for m, o in zip(res.metrics, offline))


@pytest.mark.parametrize("algorithm", [["algorithm.name=fednova"], ["algorithm.name=scaffold"],
                                       ["algorithm.name=fedagrac"],
                                       ["algorithm.name=fedagrac", "algorithm.form=published"],
                                       ["algorithm.name=fedprox", "algorithm.mu=0.1"], []],
                         ids=["fednova", "scaffold", "fedagrac-seed", "fedagrac-published", "fedprox", "fedavg"])
def test_vmap_equals_loop_with_heterogeneous_steps(algorithm):
    over = CLOCK + algorithm + ["client.stragglers=0.3"]
    loop, _, _ = run(over)
    vec, _, _ = run(over, runtime=VmapRuntime(chunk_clients=3))
    for k in loop.state.params:
        assert float((loop.state.params[k] - vec.state.params[k]).abs().max()) < 1e-9
    for a, b in zip(loop.metrics, vec.metrics):
        assert a.keys() == b.keys()
        for key, va in a.items():
            assert va == pytest.approx(b[key], abs=1e-9) if isinstance(va, float) else va == b[key], key


def test_config_errors_name_the_key():
    with pytest.raises(config.ConfigError, match="devices.profile"):
        config.build(config.load(text=BASE, overrides=["devices.steps=deadline", "devices.deadline_s=3"]))
    with pytest.raises(config.ConfigError, match="devices.profile: Input should be"):
        config.load(text="[devices]\nprofile = 'slowish'\n")
    with pytest.raises(ValueError, match="devices.deadline_s"):
        config.build(config.load(text=BASE, overrides=["devices.profile=uniform", "devices.steps=deadline"]))
    json.dumps(config.load(text=BASE, overrides=CLOCK).model_dump())


def test_banks_example_builds_with_deadline_steps():
    cfg = config.load("examples/banks/banks.toml")
    alg, _, fed, plan = config.build(cfg)
    steps = [plan.work.round_steps(c, 1, plan.seed, fed.clients[c].n) for c in range(5)]
    speeds = plan.devices.speed.tolist()
    assert speeds == [200.0, 50.0, 20.0, 5.0, 2.0] and alg.name == "fedagrac-seed"
    assert steps == [max(1, math.floor((0.5 - plan.work.schedule.comm_s[c]) * speeds[c])) for c in range(5)]
    assert steps[0] >= 50 * steps[-1]  # a hundredfold spread of local work
