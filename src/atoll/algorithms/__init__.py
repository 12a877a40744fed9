"""Recipes: short functions that assemble existing parts into an ``Algorithm``."""
from atoll.algorithms.fedadagrad import fedadagrad
from atoll.algorithms.fedadam import fedadam
from atoll.algorithms.fedavg import fedavg
from atoll.algorithms.fedavgm import fedavgm
from atoll.algorithms.fedprox import fedprox
from atoll.algorithms.fedyogi import fedyogi

RECIPES = {f.__name__: f for f in (fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad)}

__all__ = list(RECIPES) + ["RECIPES"]
