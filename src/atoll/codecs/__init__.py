from atoll.codecs.base import Codec, chain, for_round, identity
from atoll.codecs.clip import clip_l1, clip_l2, clip_linf
from atoll.codecs.feedback import error_feedback
from atoll.codecs.intrinsic import aggregate_integers, dithered_quantize
from atoll.codecs.momentum import worker_momentum
from atoll.codecs.noise import gaussian_noise, laplace_noise
from atoll.codecs.quantize import cast, stochastic_quantize
from atoll.codecs.sketch import count_sketch, sum_payloads
from atoll.codecs.sparsify import rand_k, top_k
from atoll.codecs.registry import build_codec  # noqa: I001 (needs the codecs above)

__all__ = ["Codec", "chain", "for_round", "identity", "clip_l1", "clip_l2", "clip_linf", "gaussian_noise", "laplace_noise",
           "dithered_quantize", "aggregate_integers", "cast", "stochastic_quantize", "top_k",
           "rand_k", "count_sketch", "sum_payloads", "error_feedback",
           "worker_momentum", "build_codec"]
