#!/usr/bin/env bash
# The project as a user installs it: build the sdist and the wheel from this checkout, install the wheel WITHOUT
# extras into a fresh virtualenv (torch first, from $TORCH_SPEC), and run every documented command from outside
# the source tree, so that every import comes from the wheel. Any failed step stops the script with its log.
#
#   PY=python3 BUILD_PY=.venv/bin/python TORCH_SPEC=torch==2.13.0 bash .ci/wheel_smoke.sh   (or: make wheel-smoke)
#
# BUILD_PY needs the `build` package (the [dev] extra). pip's cache and the kernel build cache
# ($ASPEN_KERNEL_CACHE, default $ASPEN_HOME/kernels) are reused: kernels built by the test suite are not built
# again. Everything else (models, adapters, reports) goes to a temporary ASPEN_HOME that is removed at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
BUILD_PY=${BUILD_PY:-$ROOT/.venv/bin/python}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-600}  # a cold kernel cache compiles the kernels before the server is ready
export ASPEN_KERNEL_CACHE=${ASPEN_KERNEL_CACHE:-${ASPEN_HOME:-$HOME/.cache/aspen}/kernels}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/aspen-wheel-smoke.XXXXXX")
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then kill -KILL "$SERVER_PID"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '== wheel smoke [%3ds] %s\n' "$SECONDS" "$*"; }
fail() {
    echo "wheel smoke FAILED: $1" >&2
    for log in "${@:2}"; do [ -f "$log" ] && { echo "--- $log (last 40 lines)" >&2; tail -n 40 "$log" >&2; }; done
    exit 1
}
# run LOG CMD...: run CMD with its output in LOG; on failure, say which command and show the log
run() {
    local log=$1; shift
    "$@" >"$log" 2>&1 || fail "exit status $? from: $*" "$log"
}
# no packaging deprecation warning of ours may appear in a build or install log
no_deprecations() {
    if grep -iE "deprecat|absent from the .packages. configuration" "$1" | grep -v "is ignored: it is neither"; then
        fail "packaging deprecation warnings in $1" "$1"
    fi
}

step "build the sdist, then the wheel from it"
run "$WORK/build.log" "$BUILD_PY" -m build --outdir "$WORK/dist" "$ROOT"
no_deprecations "$WORK/build.log"
WHEEL=$(ls "$WORK"/dist/*.whl)
"$BUILD_PY" - "$WHEEL" <<'EOF' || fail "the wheel misses package data"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = {"demo weights": "aspen/demo/assets/model.safetensors", "wire contract": "clients/aspen/v1/aspen.proto",
        "kernel header": "aspen/kernels/csrc/aspen_extension.h", "kernel source": "aspen/kernels/csrc/cpu_kernels.cpp"}
missing = [f"{what} ({path})" for what, path in need.items() if path not in names]
if missing:
    sys.exit("missing from the wheel: " + ", ".join(missing))
EOF

step "fresh virtualenv: $TORCH_SPEC, then the wheel without extras"
"$PY" -m venv "$WORK/venv"
BIN=$WORK/venv/bin
run "$WORK/torch.log" "$BIN/python" -m pip install "$TORCH_SPEC"
run "$WORK/install.log" "$BIN/python" -m pip install "$WHEEL"
no_deprecations "$WORK/install.log"

mkdir "$WORK/run"
cd "$WORK/run"  # outside the source tree: nothing imports from the checkout
unset PYTHONPATH
export ASPEN_HOME=$WORK/home
PATH=$BIN:$PATH
"$BIN/python" - "$WORK/venv" <<'EOF' || fail "imports do not come from the wheel, or an extra is installed"
import importlib.util, sys
import aspen, benchmarks, clients, engine
for module in (aspen, benchmarks, clients, engine):
    if not module.__file__.startswith(sys.argv[1]):
        sys.exit(f"{module.__name__} imports from {module.__file__}, not from the virtualenv")
extras = [m for m in ("peft", "pytest") if importlib.util.find_spec(m) is not None]
if extras:
    sys.exit(f"installed without extras, yet {extras} import")
EOF
VERSION=$("$BIN/python" -c "from importlib.metadata import version; print(version('aspen-serve'))")

step "aspen --version"
[ "$(aspen --version)" = "aspen-serve $VERSION" ] || fail "aspen --version says '$(aspen --version)', not aspen-serve $VERSION"

step "aspen bench vs_peft without [bench]: refused at once, in one line"
start=$(date +%s%N)
if aspen bench vs_peft --tiny >"$WORK/refusal.out" 2>"$WORK/refusal.err"; then fail "aspen bench vs_peft ran without peft"; fi
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
[ "$(wc -l <"$WORK/refusal.err")" -eq 1 ] && grep -q "aspen-serve\[bench\]" "$WORK/refusal.err" \
    || fail "the refusal is not one line naming [bench]" "$WORK/refusal.err"
[ "$elapsed_ms" -lt 10000 ] || fail "the refusal took $elapsed_ms ms"

step "the demo base from the wheel's assets; aspen loadtest make-adapters"
BASE=$("$BIN/python" -c "from aspen.demo import ensure_demo_base; print(ensure_demo_base())")
run "$WORK/adapters.log" aspen loadtest make-adapters --model "$BASE" --out "$WORK/adapters" --num 4 --rank 8 \
    --no-progress

step "aspen serve (demo base, those adapters, a free port)"
aspen serve --model demo --no-demo-adapters --adapter-dir "$WORK/adapters" --port 0 --http-port 0 >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
ADDRESS=
for _ in $(seq "$READY_TIMEOUT_S"); do
    ADDRESS=$(grep -oE "ready on [0-9.]+:[0-9]+" "$WORK/serve.log" | awk '{print $3}') || true
    [ -n "$ADDRESS" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || fail "aspen serve exited before it was ready" "$WORK/serve.log"
    sleep 1
done
[ -n "$ADDRESS" ] || fail "aspen serve not ready within ${READY_TIMEOUT_S}s" "$WORK/serve.log"

step "aspen generate (base model, then an adapter)"
run "$WORK/generate.log" aspen generate --server "$ADDRESS" --max-new-tokens 8 --temperature 0 "Once upon a time"
[ -s "$WORK/generate.log" ] || fail "aspen generate printed nothing" "$WORK/serve.log"
run "$WORK/generate-adapter.log" aspen generate --server "$ADDRESS" --adapter adapter-0001 --max-new-tokens 8 \
    --temperature 0 "Once upon a time"

step "aspen adapters list; GetModelInfo.server_version"
run "$WORK/adapters-list.log" aspen adapters list --server "$ADDRESS"
grep -q adapter-0003 "$WORK/adapters-list.log" || fail "adapter-0003 not listed" "$WORK/adapters-list.log"
"$BIN/python" - "$ADDRESS" "$VERSION" <<'EOF' || fail "GetModelInfo.server_version is not the package version"
import sys
from clients.client import AspenClient
with AspenClient(sys.argv[1], timeout=30) as client:
    got = client.model_info().server_version
if got != sys.argv[2]:
    sys.exit(f"server_version {got!r}, package {sys.argv[2]!r}")
EOF

step "aspen loadtest run: report.json and latency_cdf.png"
LOADTEST=(aspen loadtest run --server "$ADDRESS" --num-adapters 4 --num-requests 8 --input-len 8 --output-len 4
          --no-progress)
run "$WORK/loadtest.log" "${LOADTEST[@]}" --out-dir "$WORK/loadtest"
"$BIN/python" - "$WORK/loadtest" <<'EOF' || fail "the load test's outputs are wrong" "$WORK/loadtest.log"
import json, os, sys
report = json.load(open(os.path.join(sys.argv[1], "report.json")))
summary = report["runs"][0]["summary"]
if summary["ok"] != 8:
    sys.exit(f"{summary['ok']} of 8 requests succeeded: {summary['errors']}")
with open(os.path.join(sys.argv[1], "latency_cdf.png"), "rb") as f:
    if f.read(8) != b"\x89PNG\r\n\x1a\n":
        sys.exit("latency_cdf.png is not a PNG")
EOF

step "aspen loadtest run without matplotlib: report.json, and the plot skipped with the reason"
run "$WORK/uninstall.log" "$BIN/python" -m pip uninstall -y matplotlib
run "$WORK/loadtest-noplot.log" "${LOADTEST[@]}" --out-dir "$WORK/loadtest-noplot"
[ -s "$WORK/loadtest-noplot/report.json" ] || fail "no report.json without matplotlib" "$WORK/loadtest-noplot.log"
[ ! -e "$WORK/loadtest-noplot/latency_cdf.png" ] || fail "a plot was drawn without matplotlib"
grep -q "plots skipped: matplotlib is not installed" "$WORK/loadtest-noplot.log" \
    || fail "no message saying the plots were skipped and why" "$WORK/loadtest-noplot.log"

step "SIGTERM: aspen serve drains and exits 0"
kill -TERM "$SERVER_PID"
status=0
wait "$SERVER_PID" || status=$?
SERVER_PID=
[ "$status" -eq 0 ] || fail "aspen serve exited $status after SIGTERM" "$WORK/serve.log"

step "aspen train (one tiny adapter, two steps, on the demo base)"
mkdir "$WORK/train"
cat >"$WORK/train/data.jsonl" <<'EOF'
{"prompt": "Once upon a time", "completion": " there was a cat."}
{"prompt": "The little dog", "completion": " ran to the park."}
{"prompt": "One day, Lily", "completion": " found a red ball."}
{"prompt": "Tom was happy", "completion": " because he had a new toy."}
EOF
cat >"$WORK/train/config.yaml" <<'EOF'
output_dir: out
adapters:
  - name: smoke
    data: data.jsonl
    r: 4
    alpha: 8
    batch_size: 2
    micro_batch_size: 2
    max_steps: 2
EOF
run "$WORK/train.log" aspen train --config "$WORK/train/config.yaml" --base-model "$BASE" --no-progress
[ -s "$WORK/train/out/smoke/adapter_model.safetensors" ] || fail "aspen train saved no adapter" "$WORK/train.log"

step "aspen bench lora_overhead --tiny (a benchmark that needs no extra)"
run "$WORK/bench.log" aspen bench lora_overhead --tiny --repeats 2 --out "$WORK/bench/lora_overhead.json"
"$BIN/python" - "$WORK/bench/lora_overhead.json" <<'EOF' || fail "the benchmark report is incomplete" "$WORK/bench.log"
import json, sys
report = json.load(open(sys.argv[1]))
if "partial" in report or report.get("lora_over_base", 0) <= 0:
    sys.exit(f"incomplete report: {sorted(report)}")
EOF

step "passed: $(basename "$WHEEL"), installed without extras"
