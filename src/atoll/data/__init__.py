"""Data: built-in and user data sets, client partitions, federated splits, batching."""
from atoll.data.batching import batch_indices, gather, num_steps
from atoll.data.datasets import BUILTIN, Dataset, load
from atoll.data.federated import ClientData, FederatedData, build
from atoll.data.partition import partition

__all__ = ["BUILTIN", "ClientData", "Dataset", "FederatedData", "batch_indices", "build", "gather",
           "load", "num_steps", "partition"]
