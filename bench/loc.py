"""Lines of code per layer of src/atoll: non-blank lines that are not only a comment.

    .venv/bin/python bench/loc.py              # this checkout
    .venv/bin/python bench/loc.py OTHER/src    # another tree (e.g. `git archive REV src | tar -x`)

Docstrings count as code (they are part of what a reader reads). Modules outside the named layers
(data, models, secure, downlink, ...) are summed as "other".
"""
import sys
from pathlib import Path

LAYERS = [  # (layer, modules or packages under atoll/)
    ("core", ("tree", "rng", "types", "errors", "wireformat", "sampling")),
    ("stages", ("transforms", "codecs", "aggregators", "privacy")),
    ("client/algorithm(s)", ("client", "algorithm", "algorithms")),
    ("runtime", ("runtime",)),
    ("transport", ("transport",)),
    ("deploy", ("deploy",)),
    ("edge", ("config", "privacy_config", "privacy_modes", "cli", "simulation", "asynchronous", "runlog")),
]


def count(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines()
               if line.strip() and not line.strip().startswith("#"))


def layer_of(rel: Path) -> str:
    top = rel.parts[0].removesuffix(".py")
    return next((name for name, parts in LAYERS if top in parts), "other")


def table(src: Path) -> dict[str, tuple[int, int]]:
    """layer -> (files, lines)."""
    out = {name: (0, 0) for name, _ in LAYERS + [("other", ())]}
    for path in sorted((src / "atoll").rglob("*.py")):
        files, lines = out[layer_of(path.relative_to(src / "atoll"))]
        out[layer_of(path.relative_to(src / "atoll"))] = (files + 1, lines + count(path))
    return out


def main(argv):
    src = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "src"
    rows = table(src)
    print(f"{'layer':<22}{'files':>6}{'lines':>8}")
    for name, (files, lines) in rows.items():
        print(f"{name:<22}{files:>6}{lines:>8}")
    print(f"{'total':<22}{sum(f for f, _ in rows.values()):>6}{sum(n for _, n in rows.values()):>8}")


if __name__ == "__main__":
    main(sys.argv[1:])
