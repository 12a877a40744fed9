"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): local SGD, sample-weighted mean of the deltas, server step of 1."""
from atoll.algorithm import Algorithm
from atoll.transforms import Transform, sgd


def fedavg(local_opt: Transform | None = None, server_lr: float = 1.0, **parts) -> Algorithm:
    return Algorithm("fedavg", local_opt or sgd(0.05), sgd(server_lr), **parts)
