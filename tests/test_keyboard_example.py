"""The keyboard example (examples/keyboard): seeded non-IID text, next-word rows, the metrics
against a slow reference, and federated training that beats the unigram baseline."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from atoll import config
from atoll.runtime.work import pooled

PATH = Path(__file__).resolve().parents[1] / "examples" / "keyboard" / "keyboard.py"
spec = importlib.util.spec_from_file_location("keyboard_example", PATH)
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)
IDS = {w: i for i, w in enumerate(ex.vocabulary())}


def _freq(sentences):
    return np.bincount([t for s in sentences for t in s], minlength=len(IDS)) / sum(map(len, sentences))


def test_generator_is_seeded_and_users_differ():
    a, b = ex.user_sentences(3, 0, IDS), ex.user_sentences(3, 0, IDS)
    assert a == b and a != ex.user_sentences(3, 1, IDS)
    assert all(s[-1] == 1 and 0 not in s and 1 not in s[:-1] for s in a)  # </s> ends, no <s>
    # non-IID: word frequencies differ far more between two users than between two halves of
    # the same user's text (total variation distance over 300 + 300 messages)
    text = []
    for u in range(10):
        user = ex.User(u, 0)
        text.append([[IDS[w] for w in user.sentence()] for _ in range(600)])
    within = np.mean([0.5 * np.abs(_freq(s[:300]) - _freq(s[300:])).sum() for s in text])
    between = np.mean([0.5 * np.abs(_freq(text[u][:300]) - _freq(text[v][300:])).sum()
                       for u in range(10) for v in range(10) if u != v])
    assert between > 3 * within, (between, within)
    users = [ex.user_sentences(u, 0, IDS) for u in range(12)]
    sizes = [len(s) for s in users]
    assert min(sizes) >= 10 and max(sizes) <= 300 and max(sizes) > 2 * min(sizes)  # quantity skew


def test_next_word_rows():
    x, y = ex.next_word([[5, 6, 1], [7, 1]], k=3)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.tolist() == [[0, 0, 0], [0, 0, 5], [0, 5, 6], [0, 0, 0], [0, 0, 7]]
    assert y.tolist() == [5, 6, 1, 7, 1]


def test_federated_text_layout():
    fed, (xu, yu), words = ex.federated_text(users=8, unseen=2, k=4)
    assert fed.n_features == 4 and fed.n_classes == len(words) == len(IDS)
    assert len(fed.clients) == 8 and pooled([c.x for c in fed.clients], [c.y for c in fed.clients])
    for t in (fed.x_test, xu, *[c.x for c in fed.clients]):
        assert t.shape[1] == 4 and torch.equal(t, t.round()) and 0 <= t.min() and t.max() < len(words)
    assert torch.equal(fed.y_test, torch.cat([c.y_test for c in fed.clients]))
    assert int(fed.y_test.min()) >= 1 and len(yu) > 0  # <s> is never a target
    test_share = len(fed.y_test) / (len(fed.y_test) + sum(c.n for c in fed.clients))
    assert 0.1 < test_share < 0.3


class _Table(torch.nn.Module):
    """Row i of ``logits`` for input id i."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def test_metrics_equal_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(7, 11, generator=g, dtype=torch.float64), torch.randint(0, 11, (7,), generator=g)
    got = ex.metrics(_Table(logits), torch.arange(7.0)[:, None], y, batch=3)
    nll, top1, top3 = 0.0, 0, 0
    for row, t in zip(logits.tolist(), y.tolist()):
        nll += math.log(sum(math.exp(v) for v in row)) - row[t]
        order = sorted(range(11), key=lambda j: -row[j])
        top1 += order[0] == t
        top3 += t in order[:3]
    assert math.isclose(got["ppl"], math.exp(nll / 7), rel_tol=1e-9)
    assert got["top1"] == top1 / 7 and got["top3"] == top3 / 7
    assert 0 < top1 < top3  # the sample exercises both hits and misses


def test_unigram_baseline_equals_its_formula():
    p = ex.unigram_ppl(torch.tensor([1, 1, 2]), torch.tensor([1, 2]), vocab=4)
    assert math.isclose(p, math.exp(-(math.log(3 / 7) + math.log(2 / 7)) / 2), rel_tol=1e-12)


def test_a_few_fedavg_rounds_beat_the_unigram_baseline():
    fed, _, words = ex.federated_text(users=12, unseen=1)
    cfg = config.load(str(PATH.with_name("keyboard.toml")), ["rounds=3", "eval.every=3",
                                                              "sampling.clients_per_round=6"])
    _, untrained, _, _ = config.build(cfg, data=fed)
    before = ex.metrics(untrained, fed.x_test, fed.y_test)["ppl"]
    model = ex.federated(cfg, fed)
    unigram = ex.unigram_ppl(torch.cat([c.y for c in fed.clients]), fed.y_test, len(words))
    got = ex.metrics(model, fed.x_test, fed.y_test)
    assert before > unigram > 50 and got["ppl"] < 0.75 * unigram, (before, got, unigram)
    assert got["top3"] > 0.3
