#!/usr/bin/env bash
# Are the quickstart's metrics.jsonl byte-identical between this tree and OLD (another checkout,
# e.g. `git worktree add ../old 7f3efc1`), for the vmap and loop runtimes x FedAvg, SCAFFOLD,
# FedaGrac (8 rounds)?   usage: bench/same_metrics.sh OLD
set -euo pipefail
old=$(cd "$1" && pwd); new=$(cd "$(dirname "$0")/.." && pwd); out=$(mktemp -d)
py="$new/.venv/bin/python"
for rt in vmap loop; do for alg in fedavg scaffold fedagrac; do
  for tree in "$old" "$new"; do
    tag=$([ "$tree" = "$old" ] && echo old || echo new)
    (cd "$tree" && PYTHONPATH=src "$py" -m atoll.cli run examples/quickstart/digits.toml --quiet \
      --set rounds=8 --set runtime.name=$rt --set algorithm.name=$alg --out "$out/$tag-$rt-$alg" >/dev/null 2>&1)
  done
  if cmp -s "$out/old-$rt-$alg/metrics.jsonl" "$out/new-$rt-$alg/metrics.jsonl"; then
    echo "$rt $alg identical"; else echo "$rt $alg DIFFER"; fi
done; done
rm -rf "$out"
