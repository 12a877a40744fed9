"""Client state lives on the client: advanced by accepted updates only, and a round the server
redoes after a restart starts again from the state before that round."""
import pytest
import torch

from atoll import algorithms, data, models, transforms
from atoll.client import model_loss, params_of
from atoll.codecs import Codec
from atoll.deploy.client import Client
from atoll.deploy.coordinator import downlink_bytes
from atoll.runtime.base import LocalWork


def counting_codec() -> Codec:  # its state counts the updates it encoded
    return Codec("count", init=lambda tree: torch.zeros(()), decode=dict,
                 encode=lambda tree, n, key: (dict(tree), n + 1))


class Stub:
    def __init__(self):
        self.accept = True

    def submit(self, r, task_id, message, **head):
        return (True, "") if self.accept else (False, "rejected")


class Task:
    def __init__(self, r, data):
        self.round, self.task_id, self.data = r, "t", data


def test_state_file_commits_accepted_rounds_and_redoes_from_before(tmp_path):
    fed = data.build(data.load("wine"), num_clients=2, seed=0)
    model = models.build("logreg", fed.n_features, fed.n_classes)
    algorithm = algorithms.fedavg(transforms.sgd(0.1), uplink=counting_codec())
    down = downlink_bytes(algorithm, algorithm.init(params_of(model)), 0)
    path = tmp_path / "me.state.pt"

    def client():
        c = Client("unused:1", fed.clients[0], token="t", insecure=True, state_path=path)
        c.algorithm, c.work, c.seed, c.cid, c.cdata = algorithm, LocalWork(batch_size=8), 0, 0, fed.clients[0]
        c.client_update, c.run_id = algorithm.client(model_loss(model)), "run-a"
        c.states = c._load_states()
        return c

    c, conn = client(), Stub()
    count = lambda: float(c.states["after"]["uplink"])  # noqa: E731
    c._answer(conn, Task(1, down))
    c._answer(conn, Task(2, down))
    assert (c.states["round"], count()) == (2, 2.0)
    c._answer(conn, Task(2, down))  # the server lost round 2 and asks again
    assert (c.states["round"], count()) == (2, 2.0)
    conn.accept = False
    c._answer(conn, Task(3, down))  # rejected: nothing committed
    assert (c.states["round"], count()) == (2, 2.0)
    again = client()  # a restarted client reads its file
    assert again.states["round"] == 2 and float(again.states["after"]["uplink"]) == 2.0
    again.run_id = "run-b"
    assert again._load_states() is None  # another run's state is not reused


CALLS = []


def _record(*args):  # what a crafted file would run; here it only records that it ran
    CALLS.append(args)
    return {}


class _Payload:
    def __reduce__(self):
        return (_record, ("code ran on load",))


def test_crafted_client_state_file_runs_no_code(tmp_path):
    """A state file that would run code when unpickled is refused, and nothing runs."""
    CALLS.clear()
    path = tmp_path / "me.state.pt"
    torch.save({"run": "r", "round": 1, "before": None, "after": _Payload()}, path)
    c = Client("unused:1", None, token="t", insecure=True, state_path=path)
    c.run_id = "r"
    with pytest.raises(ValueError, match="me.state.pt"):
        c._load_states()
    assert CALLS == []
