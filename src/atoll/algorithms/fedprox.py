"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): each client
minimises its loss plus (mu/2)||w - w_global||^2, and partial work of stragglers is kept."""
from atoll.algorithm import Algorithm
from atoll.transforms import Transform, chain, proximal, sgd


def fedprox(local_opt: Transform | None = None, mu: float = 0.01, server_lr: float = 1.0,
            **parts) -> Algorithm:
    if mu < 0:
        raise ValueError(f"fedprox: mu must be >= 0, got {mu}")
    return Algorithm("fedprox", chain(proximal(mu), local_opt or sgd(0.05)), sgd(server_lr), **parts)
