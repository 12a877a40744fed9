"""FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution"):
FedAvg with heavy-ball momentum on the server's pseudo-gradient."""
from atoll.algorithm import Algorithm
from atoll.transforms import Transform, sgd


def fedavgm(local_opt: Transform | None = None, server_lr: float = 1.0,
            server_momentum: float = 0.9, nesterov: bool = False, **parts) -> Algorithm:
    server = sgd(server_lr, momentum=server_momentum, nesterov=nesterov)
    return Algorithm("fedavgm", local_opt or sgd(0.05), server, **parts)
