"""FedAdagrad (Reddi et al. 2021): Adagrad with server momentum b1 on the pseudo-gradient."""
from atoll.algorithm import Algorithm
from atoll.transforms import Transform, adagrad, sgd


def fedadagrad(local_opt: Transform | None = None, server_lr: float = 1e-1, b1: float = 0.0,
               tau: float = 1e-3, **parts) -> Algorithm:
    server = adagrad(server_lr, eps=tau, initial_accumulator_value=tau * tau, b1=b1)
    return Algorithm("fedadagrad", local_opt or sgd(0.05), server, **parts)
