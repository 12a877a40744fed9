"""The run folder's rules: one run per folder, resumes that do not change the run, logs that
survive a torn last line.

* A new run goes only into an empty (or new) folder; ``overwrite`` first removes the files a run
  writes (and only those: a user's other files stay), so two runs never mix.
* A resume may not change the run: the resumed config must equal ``config.toml`` except for a
  larger ``rounds`` (``check_config_change``), which is then recorded in ``config.toml``.
* ``metrics.jsonl`` and ``timings.jsonl`` are appended line by line; a crash with a full disk
  can leave the last line torn. ``read_log`` drops (and logs) that line; a bad line before the
  last is an error naming the file and the line.
"""
from __future__ import annotations

import json
import logging
import shutil
import tomllib
from pathlib import Path

from atoll.errors import ConfigError

log = logging.getLogger("atoll")

# what a run writes into its folder (simulation, report, deployment server)
RUN_FILES = ("config.toml", "metrics.jsonl", "timings.jsonl", "checkpoint.pt", "final.json",
             "model.pt", "summary.md", "plots", "fingerprints.json")
RUN_PATTERNS = ("checkpoint.clients-*", "*.tmp")


def prepare(run_dir: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Make ``run_dir`` ready for a new run (or check it for a resume): refuse a non-empty
    folder unless ``resume`` or ``overwrite``; with ``overwrite`` remove the old run's files."""
    run_dir = Path(run_dir)
    if resume:
        return  # checkpoint.load names a folder that holds no run
    present = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if present and not overwrite:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise ValueError(f"run folder {run_dir} is not empty (it holds {shown}); continue that "
                         "run with --resume, choose another --out, or replace it with --overwrite "
                         "(Python: resume=True / overwrite=True)")
    if present:
        for p in _run_files(run_dir):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        log.warning("--overwrite: removed the previous run's files from %s", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _run_files(run_dir: Path) -> list[Path]:
    found = [run_dir / n for n in RUN_FILES if (run_dir / n).exists()]
    return found + [p for pattern in RUN_PATTERNS for p in run_dir.glob(pattern)]


def check_resume(run_dir: Path, config_text: str | None) -> None:
    """Refuse a resume whose config changes the run recorded in ``run_dir/config.toml``."""
    old = Path(run_dir) / "config.toml"
    if config_text is None or not old.exists():
        return
    check_config_change(old.read_text(), config_text, source=str(old))


def check_config_change(old_text: str, new_text: str, source: str = "config.toml") -> None:
    """Refuse a resumed config that changes the run: every key must keep its value, except
    ``rounds``, which may grow (more rounds of the same run)."""
    old, new = _flat(tomllib.loads(old_text)), _flat(tomllib.loads(new_text))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k != "rounds")
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed)
        raise ConfigError(f"a resume cannot change the run recorded in {source}; it changes "
                          f"{shown}. Only rounds may be raised; start a new run (another --out) "
                          "for other settings")
    if new.get("rounds", 0) < old.get("rounds", 0):
        raise ConfigError(f"a resume may raise rounds, not lower it ({source} has rounds = "
                          f"{old['rounds']}, got {new['rounds']})")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def read_log(path: Path) -> list[str]:
    """The lines of a JSON-lines log; a torn last line (a crash mid-write) is dropped and logged,
    any other line that is not JSON is an error naming the file and the line."""
    lines = Path(path).read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                log.warning("%s: dropped a torn last line (%d characters, %s): %r", path,
                            len(line), exc.msg, line[:80])
                return lines[:-1]
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({exc.msg}); the log is "
                             "damaged before its last line, so the run cannot be resumed") from None
    return lines
