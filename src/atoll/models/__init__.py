"""Reference models (pure functions of their parameters) and ``build`` by name or import path."""
from atoll.models.zoo import CNN, MODELS, build, cnn, logreg, mlp

__all__ = ["CNN", "MODELS", "build", "cnn", "logreg", "mlp"]
