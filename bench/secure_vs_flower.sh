#!/usr/bin/env bash
# atoll's SecAgg+ and Flower 1.41's on the same n, d, k, dropout and inputs, in one run (atoll
# first, then Flower), and a side-by-side table: bytes per client, client and server seconds.
#
#   bench/secure_vs_flower.sh FLOWER_VENV [--n 100 --d 1000000 --k 20 --drop 0.1 --bits 16]
#
# FLOWER_VENV: a separate virtual environment holding Flower, for this bench only (Flower is
# never a dependency of atoll):  python -m venv FLOWER_VENV && FLOWER_VENV/bin/pip install flwr==1.41.0
# atoll's interpreter: $ATOLL_PYTHON, else the repository's .venv/bin/python, else python3.
set -euo pipefail
venv=${1:?usage: bench/secure_vs_flower.sh FLOWER_VENV [--n N --d D --k K --drop F --bits B]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
py=${ATOLL_PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || py=python3
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "$(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(uptime | sed 's/.*load/load/')"
PYTHONPATH="$root/src" "$py" "$root/bench/secure_secagg.py" "$@" --json "$out/atoll.json"
"$venv/bin/python" "$root/bench/flower_secaggplus.py" "$@" --json "$out/flower.json"
echo "after both: $(uptime | sed 's/.*load/load/')"
"$py" - "$out/atoll.json" "$out/flower.json" <<'PY'
import json, sys
a, f = (json.load(open(p)) for p in sys.argv[1:])
st = ("setup", "share_keys", "collect_masked_vectors", "unmask")
fu = [f["up"][s] for s in st]
rows = [(f"bytes up, {i + 1}. {name}", a["up"][i], fu[i]) for i, name in
        enumerate(("public keys", "sealed shares", "masked input", "unmask shares"))]
rows.append(("bytes up, total", sum(a["up"]), sum(fu)))
rows.append(("bits per coordinate of the masked input", 8 * a["up"][2] / a["d"], 8 * fu[2] / f["d"]))
pk = a["pack_s"]  # atoll's client s: its crypto seconds plus bit-packing its masked vector
rows += [("client s, mean", a["client_mean"] + pk, f["client_mean"]),
         ("client s, max", a["client_max"] + pk, f["client_max"]),
         ("server s", a["server_s"], f["server_s"]),
         ("key agreement us/pair: X25519 + HKDF / P-384 ECDH + HKDF", a["x25519_us_per_pair"],
          f["p384_us_per_pair"]),
         ("key agreement us/pair: X25519 + HKDF / P-384 as the mod runs it (PEM keys parsed)",
          a["x25519_us_per_pair"], f["p384_pem_us_per_pair"])]
print(f"\nn={a['n']} d={a['d']} k={a['k']} (Flower num_shares {f['num_shares']}) threshold "
      f"{a['threshold']} / {f['threshold']}, ring 2^{a['ring_bits']} / modulus 2^{f['ring_bits']}, "
      f"{a['dropped']} / {f['dropped']} dropped after sharing; exact: {a['exact']} / {f['exact']}\n")
print("client s: atoll's crypto seconds + bit-packing its masked vector; Flower's seconds in "
      "secaggplus_mod (all four stages, quantization and serialization included, training not)\n")
print("| per client | atoll | Flower " + f["flwr"] + " | Flower / atoll |\n|---|---|---|---|")
for name, x, y in rows:
    fmt = (lambda v: f"{v:,.0f}") if name.startswith("bytes") or "us/pair" in name else (lambda v: f"{v:.3f}")
    if name.startswith("bits"):
        fmt = lambda v: f"{v:.1f}"
    print(f"| {name} | {fmt(x)} | {fmt(y)} | {y / x:.1f}x |")
PY
