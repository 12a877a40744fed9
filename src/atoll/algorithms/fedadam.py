"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): Adam without bias
correction on the server's pseudo-gradient, tau (eps) = 1e-3 by default; ``v`` starts at
``initial_v``, ``tau**2`` by default as in the paper's Algorithm 2 (``v_{-1} = tau^2``; 0 was
atoll's earlier default, kept as an option)."""
from atoll.algorithm import Algorithm
from atoll.transforms import Transform, adam, sgd


def fedadam(local_opt: Transform | None = None, server_lr: float = 1e-2, b1: float = 0.9,
            b2: float = 0.99, tau: float = 1e-3, initial_v: float | None = None, **parts) -> Algorithm:
    v0 = tau * tau if initial_v is None else float(initial_v)
    server = adam(server_lr, b1=b1, b2=b2, eps=tau, bias_correction=False, initial_v=v0)
    return Algorithm("fedadam", local_opt or sgd(0.05), server, **parts)
