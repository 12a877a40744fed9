"""Flower 1.41's SecAgg+ on the figure of bench/secure_secagg.py: n clients, d coordinates, k
neighbours, a fraction dropping after sharing, 16-bit inputs; every party in one process.

    VENV/bin/python bench/flower_secaggplus.py [--n 100] [--d 1000000] [--k 20] [--drop 0.1]
    # VENV: python -m venv VENV && VENV/bin/pip install flwr==1.41.0 (never an atoll dependency)

Flower's own code runs both sides: each client is `secaggplus_mod` (its `_setup`, `_share_keys`,
`_collect_masked_vectors`, `_unmask`) with a per-node `Context`; the server is
`SecAggPlusWorkflow`'s four stage methods (what its `__call__` loops over) with a real
`LegacyContext`, FedAvg's `configure_fit` and a `SimpleClientManager`. Only the network is a
stub: `Grid.send_and_receive` passes each message's RecordDict through Flower's protobuf serde
(the bytes measured are those) and calls the destination's mod; the dropped clients never
answer stage 3 (as after a timeout). The strategy's `aggregate_fit` only captures the result.
Timing wraps Flower's functions in the two modules' namespaces (a clock around the real call).
Imports flwr, numpy and the standard library only.
"""
import argparse
import copy
import importlib
import json
import logging
import math
import random
import time
from collections import defaultdict

import flower_claims  # bench/, next to this file
import flwr
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters, serde
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.logger import LOGGER_NAME
from flwr.supercore.task_identity import TaskIdentity

# the modules themselves (their packages re-export the function and class under the same names)
cmod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
wmod = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")

CLIENT_FNS = ("generate_key_pairs", "create_shares", "generate_shared_key", "bytes_to_private_key",
              "bytes_to_public_key", "encrypt", "decrypt", "pseudo_rand_gen", "quantize")
SERVER_FNS = ("combine_shares", "generate_shared_key", "bytes_to_private_key", "bytes_to_public_key",
              "pseudo_rand_gen", "bytes_to_ndarray", "parameters_addition", "parameters_subtraction",
              "parameters_mod", "dequantize")
CLOCK = {"client": defaultdict(float), "server": defaultdict(float)}
SEEN = {}  # what the workflow hands to Flower's dequantize / factor_extract (the exactness check)


def _clock(module, name, bucket):
    real = getattr(module, name)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            bucket[name] += time.perf_counter() - t0
    setattr(module, name, timed)


def _capture(module, name):
    real = getattr(module, name)

    def spy(*a, **kw):
        out = real(*a, **kw)
        SEEN[name] = (a, out)
        return out
    setattr(module, name, spy)


def instrument():
    for f in CLIENT_FNS:
        _clock(cmod, f, CLOCK["client"])
    for f in SERVER_FNS:
        _clock(wmod, f, CLOCK["server"])
    _capture(wmod, "dequantize")
    _capture(wmod, "factor_extract")


def payload(record):
    """Bytes of the byte-string values of a ConfigRecord (keys, ciphertexts, vectors, shares)."""
    vals = [v for x in record.values() for v in (x if isinstance(x, list) else [x])]
    return sum(len(v) for v in vals if isinstance(v, bytes))


class Grid:
    """The network: each message's RecordDict goes through Flower's protobuf serde to the node's
    `secaggplus_mod`; a dropped node does not answer stage 3 (`collect_masked_vectors`)."""

    def __init__(self, updates, gone, target):
        self.updates, self.gone, self.target = updates, gone, target
        self.ctx = {nid: Context(1, nid, {}, RecordDict(), {}) for nid in updates}
        self.seconds, self.client_s = 0.0, defaultdict(float)
        self.up, self.up_proto, self.down = (defaultdict(list) for _ in range(3))
        self.masked, self.before_unmask = {}, {}

    def send_and_receive(self, messages, *, timeout=None):
        t0 = time.perf_counter()
        replies = [r for r in map(self._deliver, messages) if r is not None]
        self.seconds += time.perf_counter() - t0
        return replies

    def _deliver(self, m):
        nid = m.metadata.dst_node_id
        content = serde.recorddict_from_proto(serde.recorddict_to_proto(m.content))
        stage = content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        if stage == Stage.COLLECT_MASKED_VECTORS and nid in self.gone:
            return None
        self.down[stage].append(payload(content.config_records[RECORD_KEY_CONFIGS]))
        self.train_s = 0.0
        t0 = time.perf_counter()
        reply = cmod.secaggplus_mod(Message(content, metadata=copy.copy(m.metadata)), self.ctx[nid],
                                    self._train)
        self.client_s[nid] += time.perf_counter() - t0 - self.train_s
        wire = serde.recorddict_to_proto(reply.content)
        self.up_proto[stage].append(wire.ByteSize())
        self.up[stage].append(payload(reply.content.config_records[RECORD_KEY_CONFIGS]))
        if stage == Stage.COLLECT_MASKED_VECTORS:  # what a malicious server keeps (flower_claims)
            if nid == self.target:
                self.masked[nid] = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            self.before_unmask[nid] = copy.deepcopy(self.ctx[nid].state.config_records[RECORD_KEY_STATE])
        return Message(serde.recorddict_from_proto(wire), metadata=copy.copy(reply.metadata))

    def _train(self, msg, ctxt):
        """The ClientApp's fit: returns this node's update (not counted in client seconds)."""
        t0 = time.perf_counter()
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([self.updates[msg.metadata.dst_node_id]]),
                     1, {})
        out = Message(compat.fitres_to_recorddict(res, False), reply_to=msg)
        self.train_s += time.perf_counter() - t0
        return out


class Capture(FedAvg):
    """FedAvg's client sampling; aggregate_fit keeps the workflow's already averaged vector."""

    def aggregate_fit(self, server_round, results, failures):
        self.result = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}


def server_context(grid, n):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    cm = SimpleClientManager()
    for nid in grid.updates:
        cm.register(GridClientProxy(nid, grid, 1))
    strategy = Capture(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n)
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    # the global model sent with the fit instruction: one number, so the figures are SecAgg+'s alone
    glob = ndarrays_to_parameters([np.zeros(1, np.float32)])
    state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(glob, True)
    return LegacyContext(Context(1, 0, {}, state, {}), ServerConfig(), strategy, cm)


def run_protocol(wf, grid, ctx):
    """SecAggPlusWorkflow.__call__'s loop, each stage timed without the time spent in the grid."""
    ws, server_s = wmod.WorkflowState(), {}
    for step in (wf.setup_stage, wf.share_keys_stage, wf.collect_masked_vectors_stage, wf.unmask_stage):
        g0, t0 = grid.seconds, time.perf_counter()
        ok = step(grid, ctx, ws)
        server_s[step.__name__] = time.perf_counter() - t0 - (grid.seconds - g0)
        if not ok:
            raise SystemExit(f"Flower's workflow halted at {step.__name__}")
    return ws, server_s


def inputs(a):
    """bench/secure_secagg.py's inputs and dropouts (same generator, same draws), as float32
    updates in [-1, 1) on Flower's quantization grid (clipping_range 1, quantization_range 2^bits),
    so Flower's stochastic rounding returns exactly the 16-bit integers."""
    g = np.random.default_rng(0)
    q = {u + 1: g.integers(0, 1 << a.bits, a.d, dtype=np.uint64) for u in range(a.n)}
    gone = {u + 1 for u in g.choice(a.n, size=int(a.drop * a.n), replace=False).tolist()}
    half = float(1 << (a.bits - 1))
    return q, gone, {nid: (v.astype(np.float32) / np.float32(half) - np.float32(1)) for nid, v in q.items()}


def check_exact(q, survivors, ring, bits, result):
    """Flower's unmasked integer sum (what it hands to dequantize) against the plaintext sum of the
    survivors' 16-bit inputs mod 2^ring, bit for bit; the float mean within 1e-6 of a step."""
    expect = np.zeros_like(next(iter(q.values())))
    for u in survivors:
        expect += q[u]
    expect &= np.uint64((1 << ring) - 1)
    (recon,) = SEEN["dequantize"][0][0]  # the arguments of its one call
    q_total = SEEN["factor_extract"][1][0]
    half, m = float(1 << (bits - 1)), len(survivors)
    mean = (expect.astype(np.float64) / half - m) / m
    return {"exact": bool(np.array_equal(recon.astype(np.uint64), expect)) and int(q_total) == m << bits,
            "mean_max_err_steps": float(np.max(np.abs(result - mean)) * half)}


def mean_of(d):
    return {s: float(np.mean(v)) for s, v in d.items()}


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--drop", type=float, default=0.1)
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--threshold", type=int, default=0, help="Shamir t (default k // 2 + 1, atoll's)")
    ap.add_argument("--pairs", type=int, default=1000, help="key agreements timed for the P-384 figure")
    ap.add_argument("--json", help="also write the figures to this file")
    return ap.parse_args()


def main():
    a = parse()
    logging.getLogger(LOGGER_NAME).setLevel(logging.WARNING)  # the workflow's INFO lines
    random.seed(0)  # the workflow's neighbour shuffle and FedAvg's sampling
    np.random.seed(0)  # the quantizer's stochastic rounding (a no-op on these inputs)
    ring, t = a.bits + math.ceil(math.log2(a.n)), a.threshold or a.k // 2 + 1
    q, gone, updates = inputs(a)
    survivors = sorted(set(q) - gone)
    instrument()
    grid = Grid(updates, gone, target=survivors[0])
    ctx = server_context(grid, a.n)
    # num_shares = k + 1: Flower's neighbourhood is the offsets -k/2..k/2 around a node, itself included
    wf = SecAggPlusWorkflow(a.k + 1, t, max_weight=1.0, clipping_range=1.0,
                            quantization_range=1 << a.bits, modulus_range=1 << ring, timeout=None)
    t0 = time.perf_counter()
    ws, server_s = run_protocol(wf, grid, ctx)
    r = dict(n=a.n, d=a.d, k=a.k, num_shares=a.k + 1, threshold=t, ring_bits=ring, dropped=len(gone),
             flwr=flwr.__version__, wall=time.perf_counter() - t0)
    r.update(check_exact(q, survivors, ring, a.bits, ctx.strategy.result[0]))
    secs = [grid.client_s[u] for u in survivors]
    r.update(client_mean=float(np.mean(secs)), client_max=float(np.max(secs)),
             server_s=sum(server_s.values()), server_stage_s=server_s,
             client_fn_s={f: s / a.n for f, s in CLOCK["client"].items()},
             server_fn_s=dict(CLOCK["server"]), up=mean_of(grid.up), up_proto=mean_of(grid.up_proto),
             down=mean_of(grid.down))
    r["masked_dtype"] = str(bytes_to_ndarray(grid.masked[survivors[0]][1]).dtype)
    helpers, got = flower_claims.both_shares_attack(grid, ws, survivors[0], 1 << ring)
    r.update(attack_helpers=helpers, attack_recovered_input=bool(np.array_equal(got, q[survivors[0]])))
    r.update(flower_claims.claims(1 << ring, a.pairs))
    report(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)


def report(r):
    st = Stage.all()
    print(f"flwr {r['flwr']} SecAgg+: n={r['n']} d={r['d']} num_shares={r['num_shares']} (k={r['k']} "
          f"neighbours) threshold={r['threshold']} modulus 2^{r['ring_bits']} dropped={r['dropped']} "
          f"(after sharing)")
    print(f"exact: {r['exact']} (mean within {r['mean_max_err_steps']:.1e} quantization steps)")
    print(f"client s (secaggplus_mod, all stages): mean {r['client_mean']:.3f}, max {r['client_max']:.3f}; "
          f"server s {r['server_s']:.3f} ("
          + ", ".join(f"{k} {v:.3f}" for k, v in r["server_stage_s"].items()) + f"); wall (all in one process) {r['wall']:.1f}")
    print("client s per client in: " + ", ".join(f"{k} {v:.3f}" for k, v in r["client_fn_s"].items()))
    print("server s in: " + ", ".join(f"{k} {v:.3f}" for k, v in r["server_fn_s"].items()))
    for name, key in (("payload", "up"), ("protobuf RecordDict", "up_proto")):
        print(f"bytes per client up, {name}: " + ", ".join(f"{s} {r[key][s]:,.0f}" for s in st))
    print("bytes per client down, payload: " + ", ".join(f"{s} {r['down'][s]:,.0f}" for s in st))
    print(f"claims: masked vector dtype {r['masked_dtype']} "
          f"({r['up'][Stage.COLLECT_MASKED_VECTORS] / r['d']:.2f} bytes/coordinate); "
          f"32-bit seed fold (secaggplus_utils.pseudo_rand_gen): two different seeds, same mask "
          f"{r['fold_seed_differs_mask_same']}, two different pair keys, same mask "
          f"{r['fold_pairkey_differs_mask_same']}; a 2^32 seed search at this rate: "
          f"{r['seed_search_core_hours']:.1f} core-hours; largest mask drawn mod 16 over 1e5: "
          f"{r['mask_max_drawn_mod_16']} (randint's high is num_range - 1, exclusive)")
    print(f"claims: P-384 ECDH+HKDF {r['p384_us_per_pair']:.0f} us/pair, with the PEM parsing the mod "
          f"does per pair {r['p384_pem_us_per_pair']:.0f} us/pair; SecAggPlusWorkflow timeout default "
          f"{r['timeout_default']} (Grid.send_and_receive then waits for every reply)")
    print(f"attack: the server lists one client as active AND dead in the unmask request; "
          f"{r['attack_helpers']} honest neighbours answer with both shares; its input recovered "
          f"exactly: {r['attack_recovered_input']}")


if __name__ == "__main__":
    main()
