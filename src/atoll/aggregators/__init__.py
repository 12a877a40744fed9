from atoll.aggregators.base import Aggregator, mean
from atoll.aggregators.mixing import arc, bucketing, centered_clipping, nnm, norm_bound
from atoll.aggregators.rlr import rlr
from atoll.aggregators.trust import flame, fltrust
from atoll.aggregators.robust import (bulyan, geometric_median, krum, median, multi_krum,
                                      trimmed_mean)

__all__ = ["Aggregator", "mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
           "geometric_median", "centered_clipping", "norm_bound", "bucketing", "nnm", "arc", "fltrust", "flame",
           "rlr"]
