#!/usr/bin/env bash
# Side-by-side A/B of the fused kernel on a GPU machine: benchmarks/trace_kernel.py (per-phase
# trace and graph time at every T) for a reference commit's build and for this tree's, each
# variant in its own process, one after another on the same machine.
#
#   git archive -o ab-old-src.tar <reference commit>      (here, before the run; ignored by git)
#   VARIANTS="old new new-p2 old" bash scripts/ab_trace.sh (on the GPU machine; the device tool
#                                                           needs carry: [".whl", "ab-old-src.tar"])
#
# A variant named old* runs the reference build; any other runs this tree's, with -pN in its name
# setting ALLREDUCE_RMS_PREWAIT_PREFETCH=N (0 off, 2 on every launch), e.g. "new", "new-p2". TESTS="tests/test_fused_gpu.py"
# also runs those GPU tests on this tree's build afterwards; TRACE_ALL_BLOCKS=ON makes this tree's
# build a trace build (gpu_run.sh). Writes trace-<variant>.json and logs.tgz to $OUT.
# (history/trace-H200-tp2-epoch-cells-ab.json and trace-H200-tp2-tail-claims-ab.json came from
# earlier versions of this script, with other knobs; their notes say what each variant ran.)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-run-out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site
STAGES="build" bash scripts/gpu_run.sh > "$OUT/run.log" 2>&1 || { tail -30 "$OUT/run.log"; exit 1; }
if [ ! -d /tmp/site-old ]; then
  mkdir -p /tmp/old && tar -xf ab-old-src.tar -C /tmp/old
  (cd /tmp/old && python3 -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/site-old . \
     -Ccmake.define.ALLREDUCE_RMS_CUDA_ARCHS=90a) >> "$OUT/run.log" 2>&1 || { echo "reference build failed"; tail -30 "$OUT/run.log"; exit 1; }
fi
repo=$PWD
cd /tmp  # import the installed packages, not the source tree
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
for v in ${VARIANTS:-old new}; do
  path=/tmp/site
  prefetch=1
  case $v in old*) path=/tmp/site-old:/tmp/site;; esac
  [[ $v =~ ^(old|new)[0-9]*(-p[012])?$ ]] || { echo "variant $v: expected old*, new* or new*-pN"; exit 2; }
  [[ $v =~ -p([0-9]) ]] && prefetch=${BASH_REMATCH[1]}
  echo "== $v $(date +%T)"
  PYTHONPATH=$path ALLREDUCE_RMS_PREWAIT_PREFETCH=$prefetch timeout 170 \
    python3 "$repo/benchmarks/trace_kernel.py" --json "$OUT/trace-$v.json" ${TRACE_ARGS:-} 2>&1 \
    | grep -E "^T=|Error|error" | sed -E 's/, plan.*phases / /' | cut -c1-300
done
if [ -n "${TESTS:-}" ]; then
  echo "== tests $(date +%T)"
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -x -m "gpu or multigpu" -p no:cacheprovider \
    $(for t in $TESTS; do echo "$repo/$t"; done) 2>&1 | tail -15
fi
cd "$OUT" && tar -czf logs.tgz run.log && rm run.log
