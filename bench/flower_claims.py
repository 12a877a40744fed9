"""The issue's claims about Flower 1.41's SecAgg+, checked against its own functions, and an
attack on its client's unmask stage; used by bench/flower_secaggplus.py (flwr + numpy only)."""
import copy
import importlib
import inspect
import os
import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_mod
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage)
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.supercore.primitives import asymmetric as asym

cmod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")


def both_shares_attack(grid, ws, target, mod_range):
    """A server that lists `target` as both active and dead in its unmask request: each honest
    neighbour's `secaggplus_mod` (state as it stood before the unmask stage) answers with both its
    share of target's mask seed and of target's sk1; with `threshold` of them the server rebuilds
    every mask of target's vector and reads its input. Returns target's recovered quantized input."""
    helpers = sorted((ws.nid_to_neighbours[target] - {target}) & set(grid.before_unmask))
    seed_shares, sk_shares = [], []
    for v in helpers:
        ctx = Context(1, v, {}, RecordDict(), {})
        ctx.state.config_records[RECORD_KEY_STATE] = copy.deepcopy(grid.before_unmask[v])
        live = ws.nid_to_neighbours[v] & set(grid.before_unmask)  # the honest request ...
        ask = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: sorted(live),
                            Key.DEAD_NODE_ID_LIST: sorted(ws.nid_to_neighbours[v] - live) + [target]})
        msg = Message(RecordDict({RECORD_KEY_CONFIGS: ask}), dst_node_id=v, message_type=MessageType.TRAIN)
        out = cmod.secaggplus_mod(msg, ctx, None).content.config_records[RECORD_KEY_CONFIGS]
        got = [s for nid, s in zip(out[Key.NODE_ID_LIST], out[Key.SHARE_LIST]) if nid == target]
        seed_shares.append(got[0])  # ... with target also listed as dead: both its shares come back
        sk_shares.append(got[1])
    y = [bytes_to_ndarray(b) for b in grid.masked[target]]
    shapes = [a.shape for a in y]
    y = [a - m for a, m in zip(y, pseudo_rand_gen(combine_shares(seed_shares), mod_range, shapes))]
    sk1 = asym.bytes_to_private_key(combine_shares(sk_shares))
    for w in ws.nid_to_neighbours[target] - {target}:
        key = generate_shared_key(sk1, asym.bytes_to_public_key(ws.nid_to_publickeys[w][0]))
        sign = -1 if target > w else 1  # the client added the pair mask when its id was larger
        y = [a + sign * m for a, m in zip(y, pseudo_rand_gen(key, mod_range, shapes))]
    return len(helpers), parameters_mod(y, mod_range)[1].astype(np.uint64)


def claims(mod_range, pairs):
    """The issue's claims about Flower, checked against its own functions."""
    out = {}
    shapes = [(1000,)]
    a = os.urandom(32)
    b = a[4:8] + a[:4] + a[8:]  # another seed: its 4-byte words swapped, the same XOR fold
    out["fold_seed_differs_mask_same"] = a != b and bool(
        np.array_equal(pseudo_rand_gen(a, mod_range, shapes)[0], pseudo_rand_gen(b, mod_range, shapes)[0]))
    keys = [asym.generate_key_pairs() for _ in range(pairs + 1)]
    k = generate_shared_key(keys[0][0], keys[1][1])  # a real pair key: urlsafe base64, 44 bytes
    k2 = k[4:8] + k[:4] + k[8:]
    out["fold_pairkey_differs_mask_same"] = k != k2 and bool(
        np.array_equal(pseudo_rand_gen(k, mod_range, shapes)[0], pseudo_rand_gen(k2, mod_range, shapes)[0]))
    out["mask_max_drawn_mod_16"] = int(pseudo_rand_gen(os.urandom(32), 16, [(100000,)])[0].max())
    t0 = time.perf_counter()
    for s in range(20000):  # a search over the folded seed: candidate -> first mask values
        np.random.RandomState(s).randint(0, mod_range - 1, 4, dtype=np.int64)
    rate = 20000 / (time.perf_counter() - t0)
    out["seed_search_core_hours"] = 2 ** 32 / rate / 3600
    t0 = time.perf_counter()
    for i in range(pairs):
        generate_shared_key(keys[i][0], keys[i + 1][1])
    out["p384_us_per_pair"] = 1e6 * (time.perf_counter() - t0) / pairs
    pem = [(asym.private_key_to_bytes(s), asym.public_key_to_bytes(p)) for s, p in keys]
    t0 = time.perf_counter()
    for i in range(pairs):  # as the client mod does it per neighbour: both PEM keys parsed first
        generate_shared_key(asym.bytes_to_private_key(pem[i][0]), asym.bytes_to_public_key(pem[i + 1][1]))
    out["p384_pem_us_per_pair"] = 1e6 * (time.perf_counter() - t0) / pairs
    out["timeout_default"] = inspect.signature(SecAggPlusWorkflow.__init__).parameters["timeout"].default
    return out

