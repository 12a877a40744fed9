"""FedAdagrad (Reddi et al. 2021): Adagrad with server momentum b1 on the pseudo-gradient; the
accumulator starts at ``initial_v``, ``tau**2`` by default (the paper's ``v_{-1} = tau^2``)."""
from atoll.algorithm import Algorithm
from atoll.transforms import Transform, adagrad, sgd


def fedadagrad(local_opt: Transform | None = None, server_lr: float = 1e-1, b1: float = 0.0,
               tau: float = 1e-3, initial_v: float | None = None, **parts) -> Algorithm:
    v0 = tau * tau if initial_v is None else float(initial_v)
    server = adagrad(server_lr, eps=tau, initial_accumulator_value=v0, b1=b1)
    return Algorithm("fedadagrad", local_opt or sgd(0.05), server, **parts)
