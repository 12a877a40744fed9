"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): Adam without bias
correction on the server's pseudo-gradient, tau (eps) = 1e-3 by default."""
from atoll.algorithm import Algorithm
from atoll.transforms import Transform, adam, sgd


def fedadam(local_opt: Transform | None = None, server_lr: float = 1e-2, b1: float = 0.9,
            b2: float = 0.99, tau: float = 1e-3, **parts) -> Algorithm:
    server = adam(server_lr, b1=b1, b2=b2, eps=tau, bias_correction=False)
    return Algorithm("fedadam", local_opt or sgd(0.05), server, **parts)
