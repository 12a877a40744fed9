"""CPython 3.11 keeps the AST constructor's recursion counter per interpreter, not per thread
(python/cpython#106905): a thread switch inside ``ast.parse`` (a garbage collection running a
finaliser is enough) makes another thread's parse raise ``SystemError: AST constructor recursion
depth mismatch``. A deployment client died of it in CI while reading its ``.npz`` (``np.load``
parses each header with ``ast.literal_eval``). atoll's own parses (client data, data sets, codec
specs) must survive being run from many threads at once; and a client's data file that is not
what it must be is refused, naming the file, with nothing unpickled."""
import sys
import threading

import numpy as np
import pytest
import torch

from atoll.codecs import build_codec
from atoll.data.datasets import read_npz
from atoll.deploy.client import _client_data


class _Cycle:  # garbage whose collection runs Python code, so the interpreter may switch threads
    def __del__(self):
        sum(range(50))


def _hammer(jobs, n_threads=6, reps=300):
    errors = []

    def work(k):
        try:
            for i in range(reps):
                jobs[(i + k) % len(jobs)]()
                for _ in range(3):
                    c = _Cycle()
                    c.me = c
        except Exception as e:  # noqa: BLE001 (any failure is the finding)
            errors.append(repr(e))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        ts = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
        [t.start() for t in ts]
        [t.join() for t in ts]
    finally:
        sys.setswitchinterval(old)
    return errors


def test_atoll_parses_survive_threads(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((5, 3), np.float32), y=np.arange(5) % 2)
    jobs = [lambda: _client_data(path, 3, 2, torch.float32), lambda: read_npz(path),
            lambda: build_codec("top_k(0.1) + cast(float16)")]
    assert _hammer(jobs) == []


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path.read_bytes()


X, Y = np.zeros((4, 3), np.float32), np.array([0, 1, 1, 0])


@pytest.mark.parametrize("make,words", [
    (lambda p: b"PK\x03\x04 not a zip", "not a readable .npz"),
    (lambda p: b"", "not a readable .npz"),
    (lambda p: _npz(p, x=X), "needs arrays 'x' and 'y'; arrays present: \\['x'\\]"),
    (lambda p: _npz(p, x=np.array([object()] * 4, dtype=object), y=Y), "not a readable .npz"),  # a pickle
    (lambda p: _npz(p, x=np.zeros((4, 5), np.float32), y=Y), "need x \\(N, 3\\)"),
    (lambda p: _npz(p, x=X[:0], y=Y[:0]), "N > 0"),
    (lambda p: _npz(p, x=X, y=np.array([0, 1, 2, 0])), "class ids in \\[0, 2\\)"),
    (lambda p: _npz(p, x=X, y=np.array([0, 1, -1, 0])), "class ids in \\[0, 2\\)"),
    (lambda p: _npz(p, x=X, y=Y.astype(np.float32)), "integer class ids"),
], ids=["corrupt", "empty", "no y", "object array", "features", "no rows", "label too big",
        "negative label", "float labels"])
def test_a_bad_client_file_is_refused_naming_it(tmp_path, make, words):
    path = tmp_path / "bad.npz"
    path.write_bytes(make(tmp_path / "tmp.npz"))
    with pytest.raises(ValueError, match=words) as e:
        _client_data(path, 3, 2, torch.float32)
    assert str(path) in str(e.value)
