#!/usr/bin/env bash
# The GPU check (issue 15), one command on a machine with CUDA (one GPU or several):
#
#     benchmarks/gpu_check.sh            # on the GPUs; under 5 minutes on one GPU once the organism is built
#     benchmarks/gpu_check.sh --cpu      # the same steps on the CPU (or GPU_CHECK_ALLOW_CPU=1): the plumbing
#     benchmarks/gpu_check.sh --gate     # and step 4, the CI gate on the device (about 2 minutes more on 2 CPU
#                                        # cores; builds tiny-gptj first if the cache lacks it)
#
# 1. builds the tiny-gpt2 organism if the cache lacks it (a one-time cost, timed apart: set EDITSAFETY_CACHE
#    to a cache that holds it to skip it);
# 2. tests/gpu: the organism loads in bfloat16 and float16 on the GPU, float32 perplexity there equals the
#    CPU's (rel 1e-4; half precision rel 1e-2), c-rome and rome edits are restored bit-exactly and the
#    whole-model fingerprint holds;
# 3. a real certification run, `pytest --editor=c-rome --model=tiny-gpt2 --cases=normal -n <GPU count>`;
# 4. with --gate, the gate a CI job runs, on the device: `pytest --editor=rome --model=tiny-gptj --cases=hard`
#    must fail with perplexity damage (the papers' collapse) and `pytest --editor=c-rome-prefix --model=tiny-gptj`
#    must pass (timed, not counted in the 5-minute budget);
# 5. benchmarks/gpu_check.py reads the JSON: every worker recorded cases, each on its own GPU (and, with --gate,
#    the gate stopped rome and let c-rome-prefix through), and prints the figures (per-case seconds, the device
#    of each worker, each step's time) and one line per check.
# Exits non-zero when any check fails. Python: $PYTHON, else .venv/bin/python, else python3. Outputs go to
# $GPU_CHECK_OUT (default: a new temporary directory), printed at the start.
set -uo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

mode=gpu
gate=0
case "${GPU_CHECK_ALLOW_CPU:-}" in 1) mode=cpu ;; esac
for arg in "$@"; do
    case "$arg" in
        --cpu) mode=cpu ;;
        --gate) gate=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
root=$PWD
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
# this checkout's code, also in the pytest subprocesses and their xdist workers
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
out=${GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
mkdir -p "$out" || exit 2
echo "gpu_check: mode $mode, python $py, outputs in $out"

now() { "$py" -c 'import time; print(f"{time.time():.3f}")'; }
since() { "$py" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

if [ "$mode" = cpu ]; then
    # honest on a GPU machine too: no worker, test or torch call may see a GPU
    export CUDA_VISIBLE_DEVICES=-1
    export GPU_CHECK_ALLOW_CPU=1
    workers=${GPU_CHECK_CPU_WORKERS:-2}
else
    # the controller's own count (CUDA_VISIBLE_DEVICES, else nvidia-smi -L) is what -n auto would use; torch
    # must see as many, or the workers' pinning is not what the check thinks
    planned=$("$py" -c 'from pytest_editsafety.xdist_glue import visible_gpus; print(len(visible_gpus()))') || exit 2
    seen=$("$py" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)') || exit 2
    "$py" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")'
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    if [ "$seen" -eq 0 ]; then
        echo "gpu_check: no CUDA device (torch sees none): run it on a GPU machine, or with --cpu for the plumbing" >&2
        exit 1
    fi
    if [ "$planned" -eq 0 ] && [ -z "${CUDA_VISIBLE_DEVICES+set}" ]; then
        # no nvidia-smi (some containers): name torch's GPUs, so that the controller hands them out
        CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((seen - 1)))
        export CUDA_VISIBLE_DEVICES
        echo "gpu_check: nvidia-smi lists no GPU; CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES from torch's count"
        planned=$seen
    fi
    if [ "$planned" -ne "$seen" ]; then
        echo "gpu_check: the xdist controller would hand out $planned GPUs but torch sees $seen;" \
            "set CUDA_VISIBLE_DEVICES" >&2
        exit 1
    fi
    workers=$seen
fi
echo "gpu_check: $workers workers"

timings=()

# 1. the organism (built on the CPU; once per cache)
t0=$(now)
"$py" -m pytest_editsafety zoo build tiny-gpt2 || { echo "gpu_check: organism build failed" >&2; exit 1; }
timings+=(--timing "build=$(since "$t0")")

# 2. the device tests
t0=$(now)
"$py" -m pytest tests/gpu -m gpu -p no:cacheprovider -q -rs --durations=5 --junitxml "$out/gpu-tests.xml"
tests_exit=$?
timings+=(--timing "tests=$(since "$t0")")

# 3. a real certification run, one worker per GPU
t0=$(now)
"$py" -m pytest --editor=c-rome --model=tiny-gpt2 --cases=normal -n "$workers" -p no:cacheprovider -q \
    --editsafety-json "$out/editsafety.json" --editsafety-report "$out/editsafety.md"
certify_exit=$?
timings+=(--timing "certify=$(since "$t0")")

# 4. (--gate) the CI gate on the device: a collapsing editor stopped, a safe one let through
gate_args=()
if [ "$gate" = 1 ]; then
    t0=$(now)
    "$py" -m pytest_editsafety zoo build tiny-gptj || { echo "gpu_check: organism build failed" >&2; exit 1; }
    timings+=(--timing "gate_build=$(since "$t0")")
    t0=$(now)
    for editor in rome c-rome-prefix; do
        cases=(); [ "$editor" = rome ] && cases=(--cases=hard)
        "$py" -m pytest --editor="$editor" --model=tiny-gptj "${cases[@]}" -n "$workers" -p no:cacheprovider -q \
            --editsafety-json "$out/gate-$editor.json" --editsafety-report "$out/gate-$editor.md" \
            > "$out/gate-$editor.log" 2>&1
        gate_exit=$?
        echo "gate: $editor on tiny-gptj exited $gate_exit ($out/gate-$editor.log)"
        grep '^editsafety: ' "$out/gate-$editor.log"
        gate_args+=("$out/gate-$editor.json" "$gate_exit")
    done
    timings+=(--timing "gate=$(since "$t0")")
    gate_args=(--gate "${gate_args[@]}")
fi

# 5. the verdict
echo
"$py" benchmarks/gpu_check.py "$out/editsafety.json" --workers "$workers" --mode "$mode" \
    --certify-exit "$certify_exit" --tests-junit "$out/gpu-tests.xml" --tests-exit "$tests_exit" "${timings[@]}" \
    "${gate_args[@]}"
