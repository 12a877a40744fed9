"""FedYogi (Reddi et al. 2021): Yogi's additive second-moment update on the server; ``v``
starts at ``initial_v``, ``tau**2`` by default (the paper's ``v_{-1} = tau^2``)."""
from atoll.algorithm import Algorithm
from atoll.transforms import Transform, sgd, yogi


def fedyogi(local_opt: Transform | None = None, server_lr: float = 1e-2, b1: float = 0.9,
            b2: float = 0.99, tau: float = 1e-3, initial_v: float | None = None, **parts) -> Algorithm:
    v0 = tau * tau if initial_v is None else float(initial_v)
    server = yogi(server_lr, b1=b1, b2=b2, eps=tau, initial_v=v0)
    return Algorithm("fedyogi", local_opt or sgd(0.05), server, **parts)
