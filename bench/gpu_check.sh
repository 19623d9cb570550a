#!/usr/bin/env bash
# The GPU check: everything Spillway wants to know from one lent H100/H200, in under 8 minutes.
#
#   bench/gpu_check.sh --fetch-wheels   # HERE (network): the wheels the GPU machine lacks
#   bench/gpu_check.sh --dry-run        # any CPU machine: wheels, install, imports, the logic
#   bench/gpu_check.sh                  # on the GPU machine (bench/gpu_wheels/ carried along)
#
# The GPU machine has torch 2.11 with CUDA but no hydra-core, omegaconf (nor its antlr4
# runtime), blake3 or ray, and no network. A rank of `python -m torch.distributed.run -m
# recipes.gpt.train` imports hydra-core, omegaconf, antlr4, blake3, PyYAML, numpy, fsspec, tqdm
# and packaging besides torch (measured: the dry run trains with ray, wandb and s3fs made
# unimportable), and that machine has all but the first four. --fetch-wheels downloads those
# four into bench/gpu_wheels/ (ignored by git through its own .gitignore): the pure-Python ones,
# antlr4 built into a wheel (PyPI has only its sdist), and blake3 for CPython 3.12 (the GPU
# machine's python3) and for this machine's Python (for the dry run).
#
# They are installed with pip --no-index --no-deps --target into a temp dir put first on
# PYTHONPATH, not into a `venv --system-site-packages`: the GPU machine's python3 is itself a
# venv (/opt/torch/.venv), and a venv made from it sees its base interpreter's site-packages,
# not that venv's torch.
#
# Parts, each under its own timeout (seconds, overridable) so one hang cannot take the rest:
#   install     the carried wheels, with pip into a temp dir                              30
#   imports     what a rank imports, imported (ray, wandb, s3fs made unimportable)        30
#   cuda_tests  pytest -m cuda bench/gpu_tests/test_cuda.py: NCCL, meta init, bf16, compile,
#               the recipe under torchrun on the GPU                                       110
#   memory_8b   bench/gpu_memory.py: model=8b, FSDP2, activation checkpointing, 3 steps;
#               peak memory, or where and why it does not fit                              70
#   throughput  bench/gpu_throughput.py: model=1b recipe vs the bare compiled FSDP2 loop,
#               tokens/s, MFU, ratio (20 steps, 8 left out as warmup)                      230
# With nvidia-smi's 10 s that is 480 s at the very worst.
# Results: one file, $OUT/gpu_check.txt when OUT is set, else ./gpu_check.txt, printed at the
# end; every part's full output goes to gpu_check.log beside it. Exit status: 0 when every part
# passed, 1 otherwise (a failed install or import stops there), 2 for a bad argument.
#
# On the lent machine, from this repository's root:
#   run(command="bash bench/gpu_check.sh", carry=["bench/gpu_wheels"], timeout_s=540)

set -u -o pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
WHEELS=${GPU_WHEELS:-$HERE/gpu_wheels}
PY=${PYTHON:-python3}
GPU_PY=${GPU_PYTHON_VERSION:-3.12}
# The versions CI tests with (the dev venv's); pyproject.toml allows them.
PURE=(hydra-core==1.3.8 omegaconf==2.3.1)
SDIST_ONLY=(antlr4-python3-runtime==4.9.3)
BINARY=(blake3==1.0.11)
T_SETUP=${T_SETUP:-30}
T_TESTS=${T_TESTS:-110}
T_MEMORY=${T_MEMORY:-70}
T_THROUGHPUT=${T_THROUGHPUT:-230}

usage() { sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

MODE=gpu
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  -h | --help) usage; exit 0 ;;
  *) echo "gpu_check: unknown argument ${1} (see --help)" >&2; exit 2 ;;
esac

fetch_wheels() {
  local here_py platforms=()
  here_py=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') || exit 2
  for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
  done
  mkdir -p "$WHEELS" && printf '*\n' >"$WHEELS/.gitignore"
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" "${PURE[@]}" || exit 2
  "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "${SDIST_ONLY[@]}" || exit 2
  for v in $(printf '%s\n' "$GPU_PY" "$here_py" | sort -u); do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
      --python-version "$v" "${platforms[@]}" -d "$WHEELS" "${BINARY[@]}" || exit 2
  done
  echo "gpu_check: wheels in $WHEELS (carry it to the GPU machine):"
  ls -l "$WHEELS" | sed 1d
}

if [ "$MODE" = fetch ]; then
  fetch_wheels
  exit 0
fi

DEST=${OUT:-$PWD}
RESULTS=$DEST/gpu_check.txt
LOG=$DEST/gpu_check.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spillway-gpu-check-XXXXXX") || exit 2
SCRATCH=$WORK/scratch
cleanup() {
  sweep
  rm -rf "$WORK"
  [ "$SCRATCH" = "$WORK/scratch" ] || rm -rf "$SCRATCH"
}
# Processes of a part that outlived it (a benchmark's children run in their own sessions, so a
# timeout's signal to its process group misses them): found by the temp dirs in their command
# lines and environments, killed by PID (bench/common.py).
sweep() {
  [ -n "${SITE_READY:-}" ] || return 0
  "$PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); import common; from pathlib import Path
for root in sys.argv[2:]: common.kill_leftovers(Path(root), "its part of gpu_check")' \
    "$HERE" "$WORK" "$SCRATCH" >>"$LOG" 2>&1 || true
}
trap cleanup EXIT
mkdir -p "$DEST" "$SCRATCH" && : >"$RESULTS" && : >"$LOG" || exit 2
FAILED=0

record() { printf '%s\n' "$*" >>"$RESULTS"; }

# part NAME LIMIT_S CMD...: run CMD under its own timeout, output to $WORK/NAME.log (and the log
# file), one status line in the results; returns CMD's status. EXPECT_RC: the status that
# counts as passing (0 unless set).
part() {
  local name=$1 limit=$2 began=$SECONDS rc status expect=${EXPECT_RC:-0}
  shift 2
  printf '\n==== %s (limit %ss): %s\n' "$name" "$limit" "$*" >>"$LOG"
  echo "gpu_check: $name (at most ${limit}s)..." >&2
  timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  cat "$WORK/$name.log" >>"$LOG"
  case $rc in
    "$expect") status="ok$([ "$rc" = 0 ] || echo " (exit $rc, as expected)")" ;;
    124 | 137) status="TIMED OUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  sweep
  record ""
  record "== $name: $status, $((SECONDS - began))s"
  [ "$rc" = "$expect" ] || FAILED=1
  return "$rc"
}

# The lines of a part's log worth keeping in the results; its tail when it failed.
keep() {
  local name=$1 rc=$2 pattern=$3
  grep -E "$pattern" "$WORK/$name.log" >>"$RESULTS" || true
  if [ "$rc" != 0 ]; then
    record "-- last lines of $name's output:"
    tail -n 15 "$WORK/$name.log" >>"$RESULTS"
  fi
}

finish() {
  record ""
  record "overall: $([ "$FAILED" = 0 ] && echo ok || echo 'FAILED (see above and gpu_check.log)')"
  cat "$RESULTS"
  exit "$([ "$FAILED" = 0 ] && echo 0 || echo 1)"
}

record "gpu_check ($MODE) $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), commit" \
  "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" \
  "$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
if command -v nvidia-smi >/dev/null; then
  record "gpu: $(timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader 2>&1 | head -n 2 | tr '\n' ' ')"
else
  record "gpu: no nvidia-smi on this machine"
fi

# ---- setup: the carried wheels, installed; what a rank imports, imported ----------------------
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  record ""
  record "== setup: FAILED: no wheels in $WHEELS; run bench/gpu_check.sh --fetch-wheels where pip" \
    "reaches PyPI, and carry that directory along"
  FAILED=1
  finish
fi
part install "$T_SETUP" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --disable-pip-version-check --find-links "$WHEELS" --target "$WORK/site" \
  "${PURE[@]}" "${SDIST_ONLY[@]}" "${BINARY[@]}"
rc=$?
keep install "$rc" '^$'
[ "$rc" = 0 ] || finish
# The GPU machine has no ray, wandb or s3fs: the recipe's rank must not need them.
PYTHONPATH="$WORK/site:$REPO" part imports "$T_SETUP" "$PY" - "$WORK/site" <<'EOF'
import sys

for absent in ("ray", "wandb", "s3fs", "moto"):
    sys.modules[absent] = None  # importing it now raises ImportError
import antlr4, blake3, fsspec, hydra, numpy, omegaconf, packaging, torch, tqdm, yaml  # noqa
import recipes.gpt.train  # noqa: F401  (what a rank imports)

for mod in (hydra, omegaconf, antlr4, blake3):
    assert mod.__file__.startswith(sys.argv[1]), f"{mod.__name__} not from the wheels: {mod.__file__}"
cuda = torch.cuda.is_available()
print(
    f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
    f"available: {cuda}{', ' + torch.cuda.get_device_name(0) if cuda else ''}), "
    f"hydra {hydra.__version__}, omegaconf {omegaconf.__version__}, blake3 {blake3.__version__}, "
    f"numpy {numpy.__version__}, fsspec {fsspec.__version__}: the recipe imports without ray"
)
EOF
rc=$?
keep imports "$rc" '^python '
[ "$rc" = 0 ] || finish
SITE_READY=1
export PYTHONPATH="$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ "$MODE" = dry ]; then
  # The logic of every GPU part, on a CPU: the CUDA tests must skip with their reason, the memory
  # check runs on a tiny model, the throughput benchmark must refuse cleanly, and the recipe
  # trains through torchrun with ray, wandb and s3fs unimportable in its ranks.
  part cuda_tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs \
    "$REPO/bench/gpu_tests/test_cuda.py"
  rc=$?
  keep cuda_tests "$rc" 'passed|failed|skipped|error'
  if ! grep -qE '^[0-9]+ skipped' "$WORK/cuda_tests.log"; then
    record "dry run: expected every CUDA test to skip on a CPU"
    FAILED=1
  fi
  part memory_8b "$T_MEMORY" "$PY" "$HERE/gpu_memory.py" --device cpu --model tiny --seq-len 32 \
    --steps 2
  keep memory_8b $? '^(gpu_memory|states|device|recipe AdamW|fused AdamW)'
  EXPECT_RC=2 part throughput 60 "$PY" "$HERE/gpu_throughput.py"
  keep throughput 0 'no CUDA device'
  mkdir -p "$WORK/block"
  printf 'import sys\nfor m in ("ray", "wandb", "s3fs", "moto"):\n    sys.modules[m] = None\n' \
    >"$WORK/block/sitecustomize.py"
  PYTHONPATH="$WORK/block:$PYTHONPATH" TMPDIR="$SCRATCH" OMP_NUM_THREADS=1 \
    part recipe_cpu 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m recipes.gpt.train model=tiny data=synthetic data.seq_len=32 trainer.max_steps=2 \
    trainer.global_batch_size=2 "run_dir=$SCRATCH/run"
  keep recipe_cpu $? 'step +2/2|committed'
  finish
fi

# ---- on the GPU ---------------------------------------------------------------------------------
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  record ""
  record "no CUDA device here: nothing measured (bench/gpu_check.sh --dry-run checks the logic)"
  FAILED=1
  finish
fi

part cuda_tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs \
  "$REPO/bench/gpu_tests/test_cuda.py"
keep cuda_tests $? 'passed|failed|skipped|error|^FAILED|^SKIPPED'

part memory_8b "$T_MEMORY" "$PY" "$HERE/gpu_memory.py" --model 8b --steps 3 --seq-len 2048
keep memory_8b $? '^(gpu_memory|states|device|recipe AdamW|fused AdamW)'

# The recipe saves its last step (1b with AdamW: ~18 GB): on a large tmpfs when there is one.
if [ "$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')" -gt $((40 * 1024 * 1024)) ] \
  2>/dev/null; then
  SCRATCH=$(mktemp -d /dev/shm/spillway-gpu-check-XXXXXX)
fi
# Each of its two runs gets under half the part's limit, so its own timeout (which kills the
# run's whole process tree) fires first and says which run hung.
TMPDIR="$SCRATCH" part throughput "$T_THROUGHPUT" "$PY" "$HERE/gpu_throughput.py" --model 1b \
  --steps 20 --warmup 8 --timeout-s $(((T_THROUGHPUT - 10) / 2))
keep throughput $? '^(gpu_throughput|recipe:|bare:|ratio)'
record "scratch for the throughput runs: $SCRATCH"
finish
