#!/usr/bin/env bash
# A slip model evaluated by LAION's CLIP_benchmark and by `slip zero-shot`, on the same images.
#
#   benchmarks/clip_benchmark_check.sh [--checkpoint CKPT] [--env DIR] [--work DIR] [options]
#
# 1. an isolated virtual environment (--env, created when missing) with clip_benchmark 1.6.2,
#    numpy < 2.4 (its accuracy() fails on numpy >= 2.4), requests, and the torch / torchvision /
#    open_clip_torch / timm versions of slip's own environment (so pip reuses its cache);
#    clip_benchmark never enters slip's environment;
# 2. a checkpoint: --checkpoint, or a short `slip demo` run (--epochs, default 5 = 155 steps);
# 3. `slip export CKPT WORK/export --format open_clip` (an open_clip `local-dir:` folder);
# 4. `slip export-benchmark WORK/bench/NAME` from a slip benchmark directory (--benchmark-dir, or the
#    synthetic one: the demo's, or `slip make-synthetic` when a checkpoint is given);
# 5. `clip_benchmark eval --dataset wds/NAME --dataset_root WORK/bench/NAME --model local-dir:...
#    --no_amp` (fp32 like slip zero-shot; --amp keeps clip_benchmark's default mixed precision,
#    bf16 on CPU / fp16 on CUDA, which changes the logits);
# 6. `slip zero-shot` on the same exported webdataset (a catalog entry of type wds) with
#    --clip-benchmark-out;
# 7. prints both results as one JSON line and a table; exit 0 when acc1, acc5 and
#    mean_per_class_recall agree (to within half an image), 1 when they differ, 2 for usage errors.
#
# Not used by the test suite. Everything is written under --work (default: a new temporary folder).
set -euo pipefail

usage() {
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

options:
  --checkpoint CKPT     checkpoint to evaluate (default: train a short demo run)
  --env DIR             isolated venv for clip_benchmark (default: ${TMPDIR:-/tmp}/slip-clip-benchmark-env)
  --work DIR            output folder, absent or empty (default: a new temporary folder)
  --benchmark-dir DIR   slip benchmark directory to export (default: the synthetic benchmark)
  --name NAME           dataset name, wds/NAME (default: synthetic)
  --label LABEL         clip_benchmark --pretrained / slip --pretrained-name (default: checkpoint stem)
  --epochs N            demo training epochs when no checkpoint is given (default 5)
  --slip CMD            slip's command (default: REPO/.venv/bin/slip, else slip on PATH)
  --python PY           interpreter that creates --env (default: python3)
  --amp                 let clip_benchmark use its default mixed precision (expect differences)
  --batch-size N        images per batch in both evaluations (default 64)
  -h, --help            this text
EOF
}

die() { echo "clip_benchmark_check: error: $*" >&2; exit 2; }
say() { echo "[clip_benchmark_check] $*" >&2; }

# Runs a step with its output in WORK/logs/NAME.log; on failure shows the log's tail and stops.
run_step() {
    local name="$1"; shift
    local log="$WORK/logs/$name.log" start end
    start=$(date +%s)
    say "$name: $*"
    if ! "$@" >"$log" 2>&1; then
        echo "clip_benchmark_check: step '$name' failed; last lines of $log:" >&2
        tail -n 25 "$log" >&2
        exit 1
    fi
    end=$(date +%s)
    TIMINGS+=("$name $((end - start))")
    say "$name: done in $((end - start)) s"
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")

CKPT=""
ENV_DIR="${TMPDIR:-/tmp}/slip-clip-benchmark-env"
WORK=""
BENCH_DIR=""
NAME="synthetic"
LABEL=""
EPOCHS=5
SLIP=""
PYTHON=python3
AMP=0
BATCH=64
while [ $# -gt 0 ]; do
    case "$1" in
        --checkpoint) CKPT="${2:?--checkpoint needs a value}"; shift 2 ;;
        --env) ENV_DIR="${2:?--env needs a value}"; shift 2 ;;
        --work) WORK="${2:?--work needs a value}"; shift 2 ;;
        --benchmark-dir) BENCH_DIR="${2:?--benchmark-dir needs a value}"; shift 2 ;;
        --name) NAME="${2:?--name needs a value}"; shift 2 ;;
        --label) LABEL="${2:?--label needs a value}"; shift 2 ;;
        --epochs) EPOCHS="${2:?--epochs needs a value}"; shift 2 ;;
        --slip) SLIP="${2:?--slip needs a value}"; shift 2 ;;
        --python) PYTHON="${2:?--python needs a value}"; shift 2 ;;
        --amp) AMP=1; shift ;;
        --batch-size) BATCH="${2:?--batch-size needs a value}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ "$NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--name '$NAME': use letters, digits, '.', '_' or '-'"
[[ "$EPOCHS" =~ ^[1-9][0-9]*$ ]] || die "--epochs '$EPOCHS': a positive integer"
[[ "$BATCH" =~ ^[1-9][0-9]*$ ]] || die "--batch-size '$BATCH': a positive integer"
if [ -n "$CKPT" ]; then
    [ -f "$CKPT" ] || die "--checkpoint '$CKPT': no such file"
    CKPT=$(realpath "$CKPT")
fi
if [ -n "$BENCH_DIR" ]; then
    [ -f "$BENCH_DIR/benchmark.json" ] || die "--benchmark-dir '$BENCH_DIR': no benchmark.json there"
    BENCH_DIR=$(realpath "$BENCH_DIR")
fi

# slip's command and the interpreter beside it (for version look-ups and the comparison).
if [ -z "$SLIP" ]; then
    if [ -x "$REPO/.venv/bin/slip" ]; then SLIP="$REPO/.venv/bin/slip"
    elif command -v slip >/dev/null 2>&1; then SLIP=$(command -v slip)
    else die "no slip command: install slip (pip install -e .) or pass --slip"; fi
fi
command -v "$SLIP" >/dev/null 2>&1 || die "--slip '$SLIP': not an executable"
SLIP=$(command -v "$SLIP")
SLIP_PY="$(dirname "$SLIP")/python"
[ -x "$SLIP_PY" ] || die "no python beside $SLIP"

if [ -z "$WORK" ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/slip-clip-benchmark-check.XXXXXX")
else
    if [ -e "$WORK" ] && [ -n "$(ls -A "$WORK" 2>/dev/null)" ]; then
        die "--work '$WORK' is not empty; give a new folder"
    fi
    mkdir -p "$WORK"
    WORK=$(realpath "$WORK")
fi
mkdir -p "$WORK/logs" "$WORK/results"
TIMINGS=()
say "working in $WORK"

# 1. The isolated clip_benchmark environment.
pkg_version() {  # version of a distribution in slip's environment, or nothing
    "$SLIP_PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}
CB_PY="$ENV_DIR/bin/python"
env_ok() {
    [ -x "$CB_PY" ] && "$CB_PY" - <<'EOF' >/dev/null 2>&1
import importlib.metadata as m
assert m.version("clip_benchmark") == "1.6.2"
major, minor = (int(x) for x in m.version("numpy").split(".")[:2])
assert (major, minor) < (2, 4)
import requests, open_clip, clip_benchmark.cli  # noqa: F401 -- the CLI imports these
EOF
}
if env_ok; then
    say "using the clip_benchmark environment $ENV_DIR"
else
    if [ ! -x "$CB_PY" ]; then
        [ -e "$ENV_DIR" ] && [ -n "$(ls -A "$ENV_DIR" 2>/dev/null)" ] && \
            die "--env '$ENV_DIR' exists but is no virtual environment; remove it or give another path"
        run_step make-env "$PYTHON" -m venv "$ENV_DIR"
    fi
    pins=("clip_benchmark==1.6.2" "numpy<2.4" "requests")
    for dist in torch torchvision open_clip_torch timm; do
        v=$(pkg_version "$dist")
        if [ -n "$v" ]; then pins+=("$dist==${v%%+*}"); else pins+=("$dist"); fi
    done
    run_step install-env "$CB_PY" -m pip install "${pins[@]}"
    env_ok || die "the environment $ENV_DIR still lacks clip_benchmark 1.6.2 with numpy < 2.4 (see $WORK/logs/install-env.log)"
fi
CB="$ENV_DIR/bin/clip_benchmark"

# 2. The checkpoint.
if [ -z "$CKPT" ]; then
    run_step train "$SLIP" demo --out "$WORK/demo" "train.epochs=$EPOCHS"
    CKPT=$(ls -1 "$WORK/demo/run/checkpoints/"step-*.pt 2>/dev/null | sort | tail -n 1 || true)
    [ -n "$CKPT" ] || die "the demo run wrote no checkpoint under $WORK/demo/run/checkpoints"
    [ -n "$BENCH_DIR" ] || BENCH_DIR="$WORK/demo/corpus/benchmark"
fi
if [ -z "$BENCH_DIR" ]; then
    run_step make-synthetic "$SLIP" make-synthetic "$WORK/corpus" --train-samples 64 --no-progress
    BENCH_DIR="$WORK/corpus/benchmark"
fi
if [ -z "$LABEL" ]; then
    LABEL=$(basename "$CKPT"); LABEL="${LABEL%.*}"
fi
say "checkpoint $CKPT, benchmark $BENCH_DIR"

# 3-4. Exports.
EXPORT="$WORK/export_open_clip"
WDS="$WORK/bench/$NAME"
run_step export "$SLIP" export "$CKPT" "$EXPORT" --format open_clip
run_step export-benchmark "$SLIP" export-benchmark "$WDS" --benchmark-dir "$BENCH_DIR"

# 5. CLIP_benchmark (its --dataset_root is the benchmark folder itself for wds/ datasets).
CB_OUT="$WORK/results/clip_benchmark.json"
cb_args=(eval --dataset "wds/$NAME" --dataset_root "$WDS" --model "local-dir:$EXPORT" --pretrained "$LABEL"
         --task zeroshot_classification --output "$CB_OUT" --batch_size "$BATCH" --num_workers 1)
[ "$AMP" = 1 ] || cb_args+=(--no_amp)
run_step clip_benchmark "$CB" "${cb_args[@]}"
[ -f "$CB_OUT" ] || die "clip_benchmark wrote no $CB_OUT (see $WORK/logs/clip_benchmark.log)"

# 6. slip zero-shot on the same webdataset.
CATALOG="$WORK/catalog.json"
"$SLIP_PY" -c 'import json, sys; json.dump({sys.argv[1]: {"type": "wds", "path": sys.argv[2], "test": "test"}}, open(sys.argv[3], "w"), indent=2)' \
    "$NAME" "$WDS" "$CATALOG"
SLIP_OUT="$WORK/results/slip_zero_shot.json"
run_step slip-zero-shot "$SLIP" zero-shot --checkpoint "$CKPT" --catalog "$CATALOG" --benchmarks "$NAME" \
    --out "$WORK/results/slip_zero_shot_table.json" --clip-benchmark-out "$SLIP_OUT" \
    --pretrained-name "$LABEL" --batch-size "$BATCH" --workers 1 --no-cache --no-progress
[ -f "$SLIP_OUT" ] || die "slip zero-shot wrote no $SLIP_OUT (see $WORK/logs/slip-zero-shot.log)"

# 7. Side by side.
N_IMAGES=$("$SLIP_PY" -c 'import sys, tarfile, pathlib
d = pathlib.Path(sys.argv[1]) / "test"
print(sum(n.name.endswith(".cls") for i in range(int((d / "nshards.txt").read_text())) for n in tarfile.open(d / f"{i}.tar")))' "$WDS")
TIMES=$(printf '%s\n' "${TIMINGS[@]}")
set +e
"$SLIP_PY" - "$CB_OUT" "$SLIP_OUT" "$N_IMAGES" "$AMP" "$CKPT" "$WORK" "$TIMES" <<'EOF'
import json, sys
cb_path, slip_path, n, amp, ckpt, work, times = sys.argv[1:8]
n = int(n)
cb, sl = json.load(open(cb_path)), json.load(open(slip_path))
keys = ("acc1", "acc5", "mean_per_class_recall")
diff = {k: abs(cb["metrics"][k] - sl["metrics"][k]) for k in keys}
agree = all(d < 0.5 / n for d in diff.values())  # the same number of images, whatever the rounding
line = {"dataset": cb["dataset"], "checkpoint": ckpt, "pretrained": cb["pretrained"], "images": n,
        "clip_benchmark_amp": amp == "1",
        "clip_benchmark": {k: cb["metrics"][k] for k in keys},
        "slip_zero_shot": {k: sl["metrics"][k] for k in keys},
        "abs_diff": diff, "agree": agree,
        "seconds": {t.split()[0]: int(t.split()[1]) for t in times.splitlines() if t.strip()},
        "work": work}
print(json.dumps(line))
print()
print(f"{'metric':<24}{'clip_benchmark':>16}{'slip zero-shot':>16}{'|diff|':>10}")
for k in keys:
    print(f"{k:<24}{100 * cb['metrics'][k]:>15.2f}%{100 * sl['metrics'][k]:>15.2f}%{100 * diff[k]:>9.2f}%")
print(f"{n} images; {'agree' if agree else 'DIFFER'}"
      + ("" if agree or amp == "1" else " (both fp32: compare the logits)")
      + (" (clip_benchmark ran with its mixed precision, --amp)" if amp == "1" else ""))
sys.exit(0 if agree else 1)
EOF
status=$?
set -e
exit "$status"
