#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a GPU machine with torch but no network and none of litgpt,
# bitsandbytes, jsonargparse, datasketch: install the wheels that `make gpu-wheels` put in .whl/
# (and onegpu itself) offline into /tmp/site, then run the check. Extra arguments go to gpu_check.py.
#   bash benchmarks/gpu_check.sh --out "$OUT/gpu_check_results.json"
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
ls "$WHEELS"/*.whl >/dev/null || { echo "no wheels in $WHEELS: run 'make gpu-wheels' first" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site .
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py --tokenizer_dir "$WHEELS/tokenizer" "$@"
