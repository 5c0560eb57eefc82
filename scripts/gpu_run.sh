#!/usr/bin/env bash
# The whole GPU run, the same every session: install the carried build wheels, build and install
# the package, run the GPU tests, the benchmark and the reliability run; logs and JSON go to
# $OUT (the device tool brings that folder back) or ./gpu-run-out.
#
#   STAGES="build tests bench reliability" bash scripts/gpu_run.sh      (default: all four)
#   STAGES="build profile"   LOCAL-mode timing vs roofline, and Nsight Compute reports if ncu exists
#   STAGES="build host"      host time per eager call, part by part (benchmarks/host_profile.py)
#   STAGES="build trace"     per-phase trace of the fused kernel, the machine's floors, plan sweep
#                            (TRACE_SWEEP=0: no sweep; TRACE_ARGS="--tokens 1 64": other T)
#   NCU_TOKENS="1 1024 8192" (token counts the profile stage captures with ncu)
#   PYTEST_K="hot_path or torch_integration"  (a pytest -k expression for the tests stage; PYTEST_ARGS
#                            is split on spaces, so an expression with spaces goes here)
#   ARCHS=90a  (CUDA architectures to build; default 90a to keep the build short)
#   TRACE_ALL_BLOCKS=ON  (the build stage makes a trace build: every block stamps the trace stage's
#                         trace; a small cost per call, so not for the bench stage)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-run-out}
STAGES=${STAGES:-"build tests bench reliability"}
ARCHS=${ARCHS:-90a}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
log() { echo "[gpu_run $(date +%T)] $*"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
status=0

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1
card=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace('NVIDIA ','').replace(' ','-'))")
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
log "card=$card gpus=$ngpu stages=[$STAGES]"

if has build; then
  log "building (CUDA archs $ARCHS)"
  start=$SECONDS
  if ! python3 -m pip install --no-build-isolation --no-deps --no-index -v . \
      -Ccmake.define.ALLREDUCE_RMS_CUDA_ARCHS="$ARCHS" \
      -Ccmake.define.ALLREDUCE_RMS_TRACE_ALL_BLOCKS="${TRACE_ALL_BLOCKS:-OFF}" > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; log "BUILD FAILED"; exit 1
  fi
  log "built in $((SECONDS - start)) s"
fi

cd /tmp  # import the installed package, not the source tree
if has tests; then
  log "GPU tests"
  python3 -m pytest -q -rs -m "gpu or multigpu" "$OLDPWD/tests" ${PYTEST_K:+-k "$PYTEST_K"} ${PYTEST_ARGS:-} 2>&1 \
    | tee "$OUT/pytest-gpu.log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if has bench; then
  for tp in ${BENCH_TP:-$ngpu}; do  # e.g. BENCH_TP="4 2" on a 4-GPU machine
    log "benchmark, TP$tp"
    python3 -m allreduce_rms --world-size "$tp" --json "$OUT/bench-$card-tp$tp.json" --plot "$OUT/bench-$card-tp$tp.png" \
      ${BENCH_ARGS:-} 2>"$OUT/bench-tp$tp-stderr.log" | tee "$OUT/bench-tp$tp.txt" || status=1
  done
fi
if has trace; then
  log "trace: per-phase timestamps, floors and plan sweep (TP$ngpu)"
  python3 "$OLDPWD/benchmarks/trace_kernel.py" $([ "${TRACE_SWEEP:-1}" = 1 ] && echo --sweep) \
    --json "$OUT/trace-$card-tp$ngpu.json" ${TRACE_ARGS:-} \
    2>&1 | tee "$OUT/trace.log" | tail -30 || status=1
fi
if has host; then
  log "host profile: eager host time per call, part by part (TP$ngpu)"
  python3 "$OLDPWD/benchmarks/host_profile.py" --json "$OUT/host-profile-$card-tp$ngpu.json" ${HOST_ARGS:-} \
    2>&1 | tee "$OUT/host-profile.log" | tail -40 || status=1
fi
if has reliability; then
  log "reliability (soak + sanitizers)"
  python3 "$OLDPWD/benchmarks/reliability.py" --json "$OUT/reliability-$card.json" ${RELIABILITY_ARGS:-} \
    2>&1 | tee "$OUT/reliability.log" | tail -20 || status=1
fi
if has profile; then
  log "profile: LOCAL mode vs roofline"
  python3 "$OLDPWD/benchmarks/profile_kernel.py" --json "$OUT/profile-local-$card.json" 2>&1 | tee "$OUT/profile-local.txt" || status=1
  ncu_bin=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  if [ -n "$ncu_bin" ]; then
    for t in ${NCU_TOKENS:-1 1024 8192}; do
      log "ncu at T=$t"
      "$ncu_bin" --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section SchedulerStats --section Occupancy --section LaunchStats -k regex:norm_kernel \
        --launch-skip 5 --launch-count 1 python3 "$OLDPWD/benchmarks/profile_kernel.py" --ncu-tokens "$t" \
        > "$OUT/ncu-local-T$t.txt" 2>&1 || status=1
    done
  else
    log "no ncu on this machine"
  fi
fi
log "done, status $status"
exit $status
