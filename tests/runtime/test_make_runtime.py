"""``[runtime]`` config keys and ``make_runtime``: auto is the vectorised runtime."""
import pytest
import torch

from atoll import config
from atoll.runtime import make_runtime
from atoll.runtime.host import usable_cores
from atoll.runtime.loop import LoopRuntime
from atoll.runtime.vmap import VmapRuntime


def _runtime(*overrides):
    return make_runtime(config.load(text="", overrides=list(overrides)).runtime)


def test_auto_is_vmap_and_names_its_choices():
    rt = _runtime()
    assert isinstance(rt, VmapRuntime) and rt.threads == usable_cores()
    assert str(rt.device) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert f"{rt.threads} torch thread" in rt.describe()
    assert isinstance(_runtime("runtime.name=loop"), LoopRuntime)
    rt = _runtime("runtime.name=vmap", "runtime.device=cpu", "runtime.memory_budget_mb=64",
                  "runtime.threads=1")
    assert (rt.budget, rt.threads, str(rt.device)) == (64 * 2**20, 1, "cpu")


def test_bad_runtime_keys_are_named():
    with pytest.raises(config.ConfigError, match="runtime.name"):
        _runtime("runtime.name=threads")
    with pytest.raises(config.ConfigError, match="runtime.device"):
        _runtime("runtime.device=tpu")
    with pytest.raises(config.ConfigError, match="runtime.ray_workers"):
        _runtime("runtime.ray_workers=0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            _runtime("runtime.device=cuda")


def test_ray_runtime_from_config():
    pytest.importorskip("ray")
    from atoll.runtime.ray import RayRuntime

    rt = _runtime("runtime.name=ray", "runtime.ray_workers=2", 'runtime.ray_address="auto"')
    assert isinstance(rt, RayRuntime) and (rt.workers, rt.address) == (2, "auto") and not rt.actors
