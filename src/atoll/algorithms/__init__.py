"""Recipes: short functions that assemble existing parts into an ``Algorithm``."""
from atoll.algorithms.fedadagrad import fedadagrad
from atoll.algorithms.fedadam import fedadam
from atoll.algorithms.apfl import apfl
from atoll.algorithms.ditto import ditto
from atoll.algorithms.fedagrac import fedagrac
from atoll.algorithms.fedavg import fedavg
from atoll.algorithms.fedavgm import fedavgm
from atoll.algorithms.fednova import fednova
from atoll.algorithms.fedprox import fedprox
from atoll.algorithms.fedrep import fedbn, fedper, fedrep, lg_fedavg
from atoll.algorithms.fedyogi import fedyogi
from atoll.algorithms.per_fedavg import per_fedavg
from atoll.algorithms.pfedme import pfedme
from atoll.algorithms.scaffold import scaffold

RECIPES = {f.__name__: f for f in (fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad)}
# heterogeneous devices
RECIPES.update({f.__name__: f for f in (fednova, scaffold, fedagrac)})
# personalization (docs/personalization.md)
RECIPES.update({f.__name__: f for f in (ditto, fedper, fedrep, fedbn, lg_fedavg, apfl,
                                        pfedme, per_fedavg)})

__all__ = list(RECIPES) + ["RECIPES"]
