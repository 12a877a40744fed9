"""The bench scripts are importable by name (``import robustness``) in every test; appended, so
that a bench script never shadows an installed package."""
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
