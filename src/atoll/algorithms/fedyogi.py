"""FedYogi (Reddi et al. 2021): Yogi's additive second-moment update on the server."""
from atoll.algorithm import Algorithm
from atoll.transforms import Transform, sgd, yogi


def fedyogi(local_opt: Transform | None = None, server_lr: float = 1e-2, b1: float = 0.9,
            b2: float = 0.99, tau: float = 1e-3, **parts) -> Algorithm:
    server = yogi(server_lr, b1=b1, b2=b2, eps=tau, initial_v=tau * tau)
    return Algorithm("fedyogi", local_opt or sgd(0.05), server, **parts)
