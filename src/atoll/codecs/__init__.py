from atoll.codecs.base import Codec, chain, identity

__all__ = ["Codec", "chain", "identity"]
