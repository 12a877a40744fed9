"""What a deployed round is made of: the server's policy, a client's header, the round's
bookkeeping, an accepted update, and the checks on the run folder (``deploy.coordinator``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from atoll import checkpoint
from atoll.deploy import downlink
from atoll.runtime.base import RoundStats


@dataclass(frozen=True)
class RoundPolicy:
    round_timeout: float = 60.0
    min_clients: int = 1
    min_fraction: float = 1.0
    poll_s: float = 10.0  # longest a task request waits on the server before "poll again"
    max_num_examples: int = 10_000_000   # a header's num_examples must lie in [1, this]
    max_update_norm: float | None = None  # reject a delta of larger L2 norm at once
    max_norm_ratio: float | None = 10.0  # at close, reject norms above this x the lower median
    stage_timeout: float = 30.0  # [secure]: longest wait for the answers of one protocol stage
    stage_quorum: float = 1.0    # [secure]: a stage closes once this share answered (+ as long again)


@dataclass
class Header:
    """What a client says about its update (the bytes travel separately)."""
    round: int
    task_id: str
    num_examples: int
    loss: float
    samples: float
    straggler: bool = False
    stage: int = 0        # > 0: the answer to this secure-aggregation stage
    seconds: float = 0.0  # ... and the client's crypto seconds in it


@dataclass
class Round:
    r: int
    cohort: list[int]
    down: bytes
    tasks: dict[int, str]
    params: dict
    opened: float | None = None
    answers: dict = field(default_factory=dict)   # cid -> Answer
    final: set = field(default_factory=set)       # cids whose answer is in (any outcome)
    busy: set = field(default_factory=set)        # cids uploading right now
    stats: RoundStats = field(default_factory=RoundStats)
    late: int = 0                                 # answers for earlier rounds that came in meanwhile
    closed: bool = False
    secure: object = None                         # the open secure-aggregation stage (deploy.secure_rounds)
    privacy: dict = field(default_factory=dict)   # the round's epsilon (and clip) for its metrics line
    server_error: str | None = None               # the server step failed: the model is unchanged
    tracked: downlink.TrackedRound | None = None  # the tracker's per-client downlink (None: broadcast)


@dataclass
class Answer:
    """One accepted update, decoded and validated."""
    delta: dict
    aux: dict
    num_examples: int
    loss: float
    samples: float
    norm: float       # L2 norm of the delta
    aux_norm: float   # L2 norm of aux's floating entries (0 if none)


def read_chunks(chunks, limit: int) -> tuple[bytes, str | None]:
    """Join the update's chunks, stopping as soon as it exceeds ``limit`` bytes."""
    buf, n = [], 0
    for c in chunks:
        n += len(c)
        if n > limit:
            return b"", f"update exceeds the size limit of {limit} bytes"
        buf.append(c)
    return b"".join(buf), None


def same_run(run_dir: Path, config_text: str | None) -> bool:
    """Whether ``run_dir`` holds this run (a checkpoint, or the same ``config.toml``)."""
    old = run_dir / "config.toml"
    return (run_dir / checkpoint.FILE).exists() or (
        config_text is not None and old.exists() and old.read_text() == config_text)


def check_same_config(run_dir: Path, config_text: str | None) -> None:
    old = run_dir / "config.toml"
    if config_text is not None and old.exists() and old.read_text() != config_text:
        raise ValueError(f"{run_dir} holds a run with a different config ({old}); "
                         "use another run folder or the same config to resume")
