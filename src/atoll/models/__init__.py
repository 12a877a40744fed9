"""Reference models (pure functions of their parameters) and ``build`` by name or import path."""
from atoll.models.zoo import CNN, LSTMLM, MODELS, build, cnn, logreg, lstm_lm, mlp

__all__ = ["CNN", "LSTMLM", "MODELS", "build", "cnn", "logreg", "lstm_lm", "mlp"]
