#!/usr/bin/env bash
# CI check of the HIP backend on a machine without a GPU or ROCm: Debian's HIP 5.2 (clang-15)
# builds libarms_hip.so from the build-time-hipified cpp/ for gfx90a and gfx940, exactly as
# cmake/HipBackend.cmake does on a ROCm machine, and the result is checked:
#   1. the build succeeds (hipify at build time, then compile and link for both targets);
#   2. libarms_hip.so exports arms_backend_api and nothing else;
#   3. it loads (all symbols resolve) and its table says ABI version, name "hip", warp size 64;
#   4. the hipified sources, and hip/, contain no CUDA-only spelling (runtime API, warp *_sync
#      intrinsics, inline PTX, CUDA headers or types) outside comments.
# Given the path of a libarms_cuda.so (first argument, or ARMS_CUDA_LIB), checks 2 and 3 run on
# it too (export present; name "cuda", warp size 32).
#
# Usage:  bash .ci/hip_build.sh [path/to/libarms_cuda.so]
# Environment:
#   PYTHON          the build Python: needs torch (any build; hipify is pure Python) and nanobind
#                   (installed with pip if missing). Default: python3
#   BUILD_DIR       build tree, wiped first unless KEEP_BUILD=1. Default: build/ci-hip
#   ARMS_CI_TOOLS   where a newer cmake from PyPI is kept when the system one is older than 3.27
#                   (Debian's HIP layout needs CMAKE_HIP_COMPILER_ROCM_LIB). Default: ~/.cache/...
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUILD_DIR="${BUILD_DIR:-$repo/build/ci-hip}"
ARMS_CI_TOOLS="${ARMS_CI_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/allreduce-rms/ci-tools}"
cuda_lib="${1:-${ARMS_CUDA_LIB:-}}"
archs="gfx90a;gfx940"

step() { printf '\n==> [%ds] %s\n' "$SECONDS" "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
die() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root (or sudo) to run: $*"; fi
}

# --- toolchain -----------------------------------------------------------------------------------
step "Debian HIP toolchain (hipcc, libamdhip64-dev)"
command -v apt-get >/dev/null || die "this check needs Debian's HIP packages (apt-get not found)"
installed="$(dpkg-query -W -f='${Status}\n' hipcc libamdhip64-dev 2>/dev/null | grep -c '^install ok installed$' || true)"
if [ "$installed" != 2 ]; then
  as_root apt-get update -qq || die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes \
    apt-get install -y -qq --no-install-recommends hipcc libamdhip64-dev >/dev/null ||
    die "apt-get install hipcc libamdhip64-dev failed"
  ok "installed"
else
  ok "already installed"
fi
command -v clang++-15 >/dev/null || die "clang++-15 not found after installing hipcc"
[ -f /usr/include/hip/hip_version.h ] || die "/usr/include/hip/hip_version.h not found after installing libamdhip64-dev"
hip_version="$(sed -n 's/^#define HIP_VERSION_\(MAJOR\|MINOR\) \([0-9]*\)/\2/p' /usr/include/hip/hip_version.h | paste -sd.)"
ok "HIP $hip_version, $(clang++-15 --version | head -n1)"

step "build Python ($PYTHON): torch.utils.hipify and nanobind"
"$PYTHON" -c 'import torch.utils.hipify.hipify_python' 2>/dev/null ||
  die "$PYTHON cannot import torch.utils.hipify: install torch into it (the CPU wheel is enough), or set PYTHON"
if ! "$PYTHON" -c 'import nanobind' 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check nanobind || die "could not pip install nanobind into $PYTHON"
fi
ok "torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), nanobind $("$PYTHON" -c 'import nanobind; print(nanobind.__version__)')"

step "cmake >= 3.27"
cmake_bin="$(command -v cmake || true)"
version_of() { "$1" --version | sed -n '1s/^cmake version //p'; }
if [ -z "$cmake_bin" ] || [ "$(printf '%s\n3.27\n' "$(version_of "$cmake_bin")" | sort -V | head -n1)" != 3.27 ]; then
  # The PyPI cmake wheel carries a self-contained binary: no venv needed, just a directory.
  cmake_bin="$ARMS_CI_TOOLS/cmake/data/bin/cmake"
  if [ ! -x "$cmake_bin" ]; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --target "$ARMS_CI_TOOLS" 'cmake>=3.27' ||
      die "could not pip install cmake into $ARMS_CI_TOOLS"
  fi
fi
ok "$cmake_bin ($(version_of "$cmake_bin"))"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

# --- build ---------------------------------------------------------------------------------------
[ "${KEEP_BUILD:-0}" = 1 ] || rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"
log="$BUILD_DIR/ci-build.log"

step "configure ($archs, HIP backend only) in $BUILD_DIR"
export HIP_PLATFORM=amd
if ! "$cmake_bin" -S "$repo" -B "$BUILD_DIR" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DALLREDUCE_RMS_CUDA=OFF -DALLREDUCE_RMS_HIP=ON -DALLREDUCE_RMS_HIP_ARCHS="$archs" \
    -DCMAKE_HIP_COMPILER=clang++-15 \
    -DCMAKE_HIP_COMPILER_ROCM_LIB=/usr/lib/x86_64-linux-gnu \
    -DCMAKE_PREFIX_PATH=/usr/lib/x86_64-linux-gnu/cmake \
    -DCMAKE_HIP_FLAGS="--rocm-path=/usr --hip-device-lib-path=/usr/lib/x86_64-linux-gnu/amdgcn/bitcode" \
    -DPython_EXECUTABLE="$(command -v "$PYTHON")" >"$log" 2>&1; then
  cat "$log" >&2
  die "cmake configure failed"
fi
grep 'allreduce_rms:' "$log" | sed 's/^-- /    /'

step "build arms_hip (hipify, then compile for $archs)"
if ! "$cmake_bin" --build "$BUILD_DIR" --target arms_hip --parallel "$(nproc)" >>"$log" 2>&1; then
  cat "$log" >&2
  die "building arms_hip failed (full log above, also in $log)"
fi
hip_lib="$BUILD_DIR/libarms_hip.so"
[ -f "$hip_lib" ] || die "the build produced no $hip_lib"
ok "$hip_lib ($(du -h "$hip_lib" | cut -f1); $(grep -c 'warning:' "$log" || true) compiler warnings, log: $log)"

# --- checks --------------------------------------------------------------------------------------
check_exports() {  # library, strict (1: arms_backend_api must be the only export)
  local exports
  exports="$(nm -D --defined-only "$1" | awk 'NF >= 3 { print $3 }' | sed 's/@.*//' | sort -u)"
  grep -qx arms_backend_api <<<"$exports" || die "$1 does not export arms_backend_api"
  local others
  others="$(grep -vx arms_backend_api <<<"$exports" || true)"
  if [ -n "$others" ]; then
    [ "$2" = 1 ] && die "$1 exports more than arms_backend_api:
$others"
    ok "$(basename "$1") exports arms_backend_api (and $(wc -l <<<"$others") other symbols)"
  else
    ok "$(basename "$1") exports arms_backend_api and nothing else"
  fi
}

check_loads() {  # library, expected name, expected warp size
  "$PYTHON" - "$1" "$2" "$3" "$repo/cpp/backend_api.h" <<'EOF' || die "$1 failed the load check"
import ctypes, re, sys
path, name, warp, header = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), sys.argv[4]
abi = int(re.search(r"#define ARMS_BACKEND_ABI_VERSION (\d+)", open(header).read()).group(1))

class Head(ctypes.Structure):  # the leading fields of ArmsBackendApi (cpp/backend_api.h)
    _fields_ = [("abi_version", ctypes.c_uint32), ("struct_size", ctypes.c_uint32), ("name", ctypes.c_char_p),
                ("last_error", ctypes.c_void_p), ("device_count", ctypes.c_void_p),
                ("warp_size", ctypes.CFUNCTYPE(ctypes.c_int))]

lib = ctypes.CDLL(path)  # RTLD_NOW: an unresolved symbol fails here
lib.arms_backend_api.restype = ctypes.POINTER(Head)
api = lib.arms_backend_api().contents
got = (api.abi_version, api.name, api.warp_size())
if got != (abi, name, warp):
    sys.exit(f"{path}: (abi_version, name, warp_size) = {got}, expected {(abi, name, warp)}")
print(f"    ok: {path.rsplit('/', 1)[-1]} loads: ABI {abi}, name {name.decode()}, warp size {warp}, "
      f"table of {api.struct_size} bytes")
EOF
}

step "exports and load check of libarms_hip.so"
check_exports "$hip_lib" 1
check_loads "$hip_lib" hip 64

if [ -n "$cuda_lib" ]; then
  step "exports and load check of $cuda_lib"
  [ -f "$cuda_lib" ] || die "no such file: $cuda_lib"
  check_exports "$cuda_lib" 0
  check_loads "$cuda_lib" cuda 32
fi

step "no CUDA-only spellings in the hipified sources and hip/"
"$PYTHON" - "$BUILD_DIR/hipified" "$repo/hip" <<'EOF' || die "CUDA-only spellings reached the HIP build (see above)"
import pathlib, re, sys

# What hipify leaves alone and a HIP compiler must never see: runtime and driver API names it did
# not map, warp intrinsics with masks, CUDA headers and types, and inline PTX. Kernel code reaches
# all of these only through the platform layer (cpp/platform.h -> hip/platform_hip.h on AMD).
FORBIDDEN = [
    (r"\bcuda[A-Z_]\w*", "CUDA runtime API"),
    (r"\bcu[A-Z][a-z]\w*\s*\(", "CUDA driver API"),
    (r"\b__(shfl\w*|ballot|any|all|match_\w+|reduce_\w+)_sync\b|\b__syncwarp\b", "warp *_sync intrinsic"),
    (r"#\s*include\s*[<\"](cuda|cub/|thrust/|cooperative_groups)", "CUDA header"),
    (r"\b__nv_\w+|\bnv_bfloat16\b", "CUDA type"),
    (r"\b__CUDA_ARCH__\b|\b__CUDACC\w*", "CUDA compiler macro"),
    (r"\basm\b[^;]*\"\s*(ld|st|mov|red|atom|fence|membar|cvt|bar|shfl|vote|prmt|cp)\.", "inline PTX"),
    (r"griddepcontrol|%globaltimer|%laneid|%clock", "inline PTX"),
]
# Comments are skipped (they may name what the code avoids); string literals are kept (PTX lives there).
TOKENS = re.compile(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'", re.S)

def code_only(text):
    return TOKENS.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)) if m.group(0)[0] == "/" else m.group(0), text)

hipified, hip = map(pathlib.Path, sys.argv[1:3])
files = sorted(p for p in hipified.iterdir() if p.suffix in (".hip", ".h", ".cuh"))
if not any(p.suffix == ".hip" for p in files):
    sys.exit(f"no hipified sources in {hipified}")
if (hipified / "platform_cuda.h").exists() or (hipified / "platform_hip.h").exists():
    sys.exit(f"{hipified} holds a copy of the CUDA platform header; hip/platform_hip.h must be the only one")
files += sorted(p for p in hip.rglob("*") if p.suffix in (".h", ".hpp", ".cuh"))
bad = 0
for path in files:
    lines = code_only(path.read_text(encoding="utf-8")).splitlines()
    for number, line in enumerate(lines, 1):
        for pattern, what in FORBIDDEN:
            for m in re.finditer(pattern, line):
                print(f"    {path}:{number}: {what}: {m.group(0).strip()}")
                bad += 1
if bad:
    sys.exit(f"{bad} CUDA-only spellings")
print(f"    ok: {len(files)} files clean ({', '.join(p.name for p in files)})")
EOF

step "PASS: HIP backend builds for $archs with HIP $hip_version and passes every check (${SECONDS}s)"
