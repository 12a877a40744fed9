from atoll.codecs.base import Codec, chain, identity
from atoll.codecs.clip import clip_l2, clip_linf
from atoll.codecs.intrinsic import aggregate_integers, dithered_quantize
from atoll.codecs.noise import gaussian_noise, laplace_noise

__all__ = ["Codec", "chain", "identity", "clip_l2", "clip_linf", "gaussian_noise", "laplace_noise",
           "dithered_quantize", "aggregate_integers"]
