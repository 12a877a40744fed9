from atoll.aggregators.base import Aggregator, mean

__all__ = ["Aggregator", "mean"]
