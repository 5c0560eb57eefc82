#!/usr/bin/env bash
# CI check of the HIP backend on a machine without a GPU or ROCm. Two Debian toolchains build
# libarms_hip.so from the build-time-hipified cpp/, exactly as cmake/HipBackend.cmake does on a
# ROCm machine:
#   sid       ROCm 6.4 HIP runtime and headers, clang 21, ROCm 7.0 device libraries: the default
#             architecture list of ROCm >= 6 (gfx90a;gfx942;gfx950: MI200, MI300, MI350). Debian
#             sid needs a newer glibc than this machine's, so its packages are unpacked into a
#             private directory (no root, nothing installed) and the compiler's executables are
#             pointed at sid's own loader and libraries with patchelf (see hip/README.md).
#   bookworm  Debian 12's HIP 5.2 and clang 15 (apt): gfx90a;gfx940, the ROCm 5 path.
# Each result is checked:
#   1. the build succeeds (hipify at build time, then compile and link for every target), the
#      library carries one code object per requested target, and (sid) no header of another
#      HIP installation was included;
#   2. libarms_hip.so exports arms_backend_api and nothing else;
#   3. it loads (all symbols resolve, with that toolchain's HIP runtime) and its table says ABI
#      version, name "hip", warp size 64;
#   4. the hipified sources, and hip/, contain no CUDA-only spelling (runtime API, warp *_sync
#      intrinsics, inline PTX, CUDA headers or types) outside comments.
# Given the path of a libarms_cuda.so (first argument, or ARMS_CUDA_LIB), checks 2 and 3 run on
# it too (export present; name "cuda", warp size 32).
#
# Usage:  bash .ci/hip_build.sh [path/to/libarms_cuda.so]
# Environment:
#   PYTHON          the build Python: needs torch (any build; hipify is pure Python) and nanobind
#                   (installed with pip if missing). Default: python3
#   BUILD_DIR       build trees and the unpacked sid toolchain, wiped first unless KEEP_BUILD=1
#                   (which also reuses an unpacked toolchain). Default: build/ci-hip
#   HIP_TOOLCHAINS  which builds to run, in order. Default: "sid bookworm"
#   ARMS_CI_TOOLS   where a newer cmake from PyPI is kept when the system one is older than 3.27
#                   (Debian's HIP layout needs CMAKE_HIP_COMPILER_ROCM_LIB). Default: ~/.cache/...
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUILD_DIR="${BUILD_DIR:-$repo/build/ci-hip}"
HIP_TOOLCHAINS="${HIP_TOOLCHAINS:-sid bookworm}"
ARMS_CI_TOOLS="${ARMS_CI_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/allreduce-rms/ci-tools}"
cuda_lib="${1:-${ARMS_CUDA_LIB:-}}"
multiarch=x86_64-linux-gnu

step() { printf '\n==> [%ds] %s\n' "$SECONDS" "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
die() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root (or sudo) to run: $*"; fi
}

apt_install() {  # packages: installed from this machine's own suite (quietly)
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
  done
  [ ${#missing[@]} = 0 ] && return 0
  as_root apt-get update -qq || die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get install ${missing[*]} failed"
}

# --- common tools --------------------------------------------------------------------------------
command -v apt-get >/dev/null || die "this check needs Debian's packages (apt-get not found)"
for t in $HIP_TOOLCHAINS; do
  case "$t" in sid | bookworm) ;; *) die "HIP_TOOLCHAINS: unknown toolchain '$t' (sid, bookworm)" ;; esac
done

step "build Python ($PYTHON): torch.utils.hipify and nanobind"
"$PYTHON" -c 'import torch.utils.hipify.hipify_python' 2>/dev/null ||
  die "$PYTHON cannot import torch.utils.hipify: install torch into it (the CPU wheel is enough), or set PYTHON"
if ! "$PYTHON" -c 'import nanobind' 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check nanobind || die "could not pip install nanobind into $PYTHON"
fi
ok "torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), nanobind $("$PYTHON" -c 'import nanobind; print(nanobind.__version__)')"
# The interpreter itself (not a venv's symlink), for the load check under another loader.
base_python="$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')"

step "cmake >= 3.27, ninja, patchelf, binutils"
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
apt_install ninja-build patchelf binutils
ok "$cmake_bin ($(version_of "$cmake_bin")), ninja $(ninja --version), patchelf $(patchelf --version | cut -d' ' -f2)"

[ "${KEEP_BUILD:-0}" = 1 ] || rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"

# --- toolchains ----------------------------------------------------------------------------------
# Each sets: tc_desc, tc_hip_major (the libamdhip64.so version the library must link),
# tc_compiler, tc_cmake_args (array), tc_archs ("" = HipBackend.cmake's default list), tc_expect
# (targets that must be in the library), tc_bundler, tc_loader (array: how to run the build
# Python so that it loads this toolchain's HIP runtime), tc_sysinc (a HIP header directory that
# must not be used, or "").

setup_bookworm() {
  step "bookworm: Debian 12 HIP toolchain (hipcc, libamdhip64-dev)"
  apt_install hipcc libamdhip64-dev
  command -v clang++-15 >/dev/null || die "clang++-15 not found after installing hipcc"
  [ -f /usr/include/hip/hip_version.h ] || die "/usr/include/hip/hip_version.h not found after installing libamdhip64-dev"
  local v
  v="$(sed -n 's/^#define HIP_VERSION_\(MAJOR\|MINOR\) \([0-9]*\)/\2/p' /usr/include/hip/hip_version.h | paste -sd.)"
  tc_desc="HIP $v, $(clang++-15 --version | head -n1)"
  tc_hip_major="${v%%.*}"
  tc_compiler=clang++-15
  tc_cmake_args=(
    -DCMAKE_HIP_COMPILER_ROCM_LIB=/usr/lib/$multiarch
    -DCMAKE_PREFIX_PATH=/usr/lib/$multiarch/cmake
    -DCMAKE_HIP_FLAGS="--rocm-path=/usr --hip-device-lib-path=/usr/lib/$multiarch/amdgcn/bitcode")
  tc_archs="gfx90a;gfx940"  # HIP 5.2's clang 15 knows neither gfx942 nor gfx950
  tc_expect="gfx90a gfx940"
  tc_bundler=clang-offload-bundler-15
  tc_loader=("$base_python")
  tc_sysinc=""
  ok "$tc_desc"
}

setup_sid() {
  local root="$BUILD_DIR/toolchain-sid" apt="$BUILD_DIR/toolchain-sid.apt"
  step "sid: Debian sid's ROCm packages, unpacked into $root"
  if [ ! -f "$root/.llvm-version" ]; then
    rm -rf "$root" "$apt"
    mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$apt/etc/apt.conf.d" "$apt/etc/preferences.d" "$root"
    : >"$apt/status"
    # sid from the Debian archive this machine already uses (its own apt sources), signed by
    # Debian's archive keyring. Check-Valid-Until off: a frozen mirror serves an expired Release
    # file, and the keyring still authenticates it.
    debian_mirror() {  # known only once the lists are there (the label comes from the Release file)
      apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' 'Label: Debian' 'Component: main' | head -n1
    }
    local mirror
    mirror="$(debian_mirror)"
    if [ -z "$mirror" ]; then
      as_root apt-get update -qq || die "apt-get update failed"
      mirror="$(debian_mirror)"
    fi
    [ -n "$mirror" ] || die "sid: this machine's apt sources name no Debian archive (apt-get indextargets)"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$apt/etc/sources.list"
    cat >"$apt/apt.conf" <<EOF
Dir::Etc "$apt/etc/";
Dir::Etc::sourcelist "$apt/etc/sources.list";
Dir::Etc::sourceparts "-";
Dir::State "$apt/";
Dir::State::lists "$apt/lists/";
Dir::State::status "$apt/status";
Dir::Cache "$apt/";
Dir::Cache::archives "$apt/archives/";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
APT::Sandbox::User "root";
Acquire::Languages "none";
Acquire::Check-Valid-Until "false";
EOF
    local aptc=(env APT_CONFIG="$apt/apt.conf")
    "${aptc[@]}" apt-get update -qq 2>"$apt/update.log" || { cat "$apt/update.log" >&2; die "apt-get update (sid) failed"; }
    # The LLVM that Debian's hipcc is built against is the one whose device libraries exist.
    local llvm
    llvm="$("${aptc[@]}" apt-cache depends hipcc 2>/dev/null | sed -n 's/^ *Depends: rocm-device-libs-\([0-9]*\)$/\1/p' | head -n1)"
    [ -n "$llvm" ] || die "sid: could not tell which LLVM Debian's hipcc uses (apt-cache depends hipcc)"
    # The compiler and its runtime libraries, the HIP runtime and headers, the device libraries.
    # Left out: what compiles or links host code (this machine's gcc, libstdc++ and binutils do
    # that, as on any ROCm machine) and what only tools written in Python need.
    local wanted=(clang-$llvm clang-tools-$llvm lld-$llvm libclang-rt-$llvm-dev rocm-device-libs-$llvm libamdhip64-dev)
    local skip='^(binutils.*|libbinutils|libsframe.*|libgprofng.*|libctf.*|libjansson.*|gcc-.*|cpp-.*|g\+\+.*|lib(a|l|t|ub|hwa)san.*|libgomp1|libitm1|libatomic1|libquadmath0|libgcc-.*-dev|libc-dev-bin|linux-libc-dev|libc6-dev|libstdc\+\+-.*-dev|libgc1|libobjc.*|python3.*|libpython.*|llvm-.*-linker-tools|libc-gconv-modules-extra|libssl.*|libexpat.*|libsqlite.*|libreadline.*|readline-common|libncursesw.*|liblzma.*|libbz2.*|libuuid.*|libdb.*|libgdbm.*|netbase|tzdata|media-types|ca-certificates|openssl.*|lib32.*|libc6-i386|rocminfo|libisl.*|libmpc.*|libmpfr.*|libgmp.*|libcrypt.*|perl.*|libperl.*)$'
    local pkgs
    pkgs="$("${aptc[@]}" apt-get install -s --no-install-recommends "${wanted[@]}" 2>"$apt/resolve.log" |
            awk '/^Inst /{print $2}' | grep -Ev "$skip" || true)"
    [ -n "$pkgs" ] || { cat "$apt/resolve.log" >&2; die "sid: could not resolve ${wanted[*]}"; }
    (cd "$apt/archives" && "${aptc[@]}" apt-get download -qq $pkgs 2>"$apt/download.log") ||
      { cat "$apt/download.log" >&2; die "sid: downloading packages failed"; }
    for deb in "$apt"/archives/*.deb; do dpkg-deb -x "$deb" "$root"; done
    ok "$(wc -w <<<"$pkgs") packages, $(du -cm "$apt"/archives/*.deb | tail -n1 | cut -f1) MB: LLVM $llvm, $(
        ls "$apt"/archives/ | sed -n 's/^libamdhip64-dev_\([^_]*\)_.*/libamdhip64-dev \1/p')"
    rm -rf "$apt"
    # sid's compiler runs under sid's loader and libraries: patch the executables the build runs
    # (the driver, the device linker and the offload bundler) and the two libraries whose
    # RUNPATH points elsewhere.
    local bin="$root/usr/lib/llvm-$llvm/bin" lib="$root/usr/lib/$multiarch"
    [ -x "$lib/ld-linux-x86-64.so.2" ] || die "sid: no loader in $lib"
    for exe in "$bin/clang-$llvm" "$bin/lld" "$bin/clang-offload-bundler"; do
      patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --force-rpath --set-rpath '$ORIGIN/../../'"$multiarch" "$exe"
    done
    for so in "$lib"/libLLVM.so.* "$lib"/libclang-cpp.so.*; do
      [ -L "$so" ] || patchelf --set-rpath '$ORIGIN' "$so"
    done
    echo "$llvm" >"$root/.llvm-version"  # also marks the toolchain as complete
  else
    ok "reusing $root (KEEP_BUILD=1)"
  fi
  local llvm
  llvm="$(cat "$root/.llvm-version")"
  local bin="$root/usr/lib/llvm-$llvm/bin" lib="$root/usr/lib/$multiarch"
  local resource
  resource="$("$bin/clang++" -print-resource-dir)" || die "sid: clang++ does not run (see above)"
  local v
  v="$(sed -n 's/^#define HIP_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)/\2/p' "$root/usr/include/hip/hip_version.h" | paste -sd.)"
  tc_desc="HIP $v, $("$bin/clang++" --version | head -n1), device libraries in $resource/amdgcn"
  tc_hip_major="${v%%.*}"
  tc_compiler="$bin/clang++"
  # -isystem: clang adds the --rocm-path headers with -idirafter, after /usr/include, where the
  # bookworm toolchain puts HIP 5.2's (and CMake drops an -isystem for them as implicit).
  # -L: clang links -lamdhip64 from <rocm>/lib, but Debian keeps it in lib/<multiarch>, and the
  # system's HIP 5.2 must not answer instead (the unversioned .so names there are few: no libc,
  # libm, libstdc++ or libgcc_s, which stay this machine's).
  # --allow-shlib-undefined: CMake's compiler checks link small executables against sid's HIP
  # runtime, whose own dependencies want sid's glibc; the library itself links as any -shared does.
  tc_cmake_args=(
    -DCMAKE_HIP_COMPILER_ROCM_ROOT="$root/usr"
    -DCMAKE_HIP_COMPILER_ROCM_LIB="$lib"
    -DCMAKE_PREFIX_PATH="$lib/cmake"
    -DCMAKE_HIP_FLAGS="--rocm-path=$root/usr --rocm-device-lib-path=$resource/amdgcn/bitcode -isystem $root/usr/include -L$lib -Wl,--allow-shlib-undefined -Wno-unused-command-line-argument")
  tc_archs=""  # HipBackend.cmake's default list for ROCm >= 6
  tc_expect="gfx90a gfx942 gfx950"
  tc_bundler="$bin/clang-offload-bundler"
  tc_loader=("$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$base_python")
  tc_sysinc=/usr/include/hip/
  ok "$tc_desc"
}

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

check_loads() {  # library, expected name, expected warp size, python command...
  local lib="$1" name="$2" warp="$3"
  shift 3
  "$@" - "$lib" "$name" "$warp" "$repo/cpp/backend_api.h" <<'EOF' || die "$lib failed the load check"
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

check_code_objects() {  # library, bundler, expected targets
  local fatbin="$BUILD_DIR/fatbin.$$" listed
  objcopy -O binary --only-section=.hip_fatbin "$1" "$fatbin" || die "$1 has no .hip_fatbin section"
  listed="$("$2" --list --type=o --input="$fatbin" | sed -n 's/^hipv4-amdgcn-amd-amdhsa--//p' | sort -u | paste -sd' ')"
  rm -f "$fatbin"
  for t in $3; do
    grep -qw "$t" <<<"$listed" || die "$(basename "$1") carries code objects for [$listed], not for $t"
  done
  ok "$(basename "$1") carries code objects for: $listed"
}

check_no_cuda() {  # hipified directory
  "$PYTHON" - "$1" "$repo/hip" <<'EOF' || die "CUDA-only spellings reached the HIP build (see above)"
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
}

# --- build and check with each toolchain ---------------------------------------------------------
export HIP_PLATFORM=amd
summary=()
for tc in $HIP_TOOLCHAINS; do
  t0=$SECONDS
  "setup_$tc"
  build="$BUILD_DIR/$tc"
  rm -rf "$build"
  mkdir -p "$build"
  log="$build/ci-build.log"
  arch_args=()
  [ -n "$tc_archs" ] && arch_args=(-DALLREDUCE_RMS_HIP_ARCHS="$tc_archs")

  step "$tc: configure (HIP backend only, architectures: ${tc_archs:-the default list}) in $build"
  if ! "$cmake_bin" -S "$repo" -B "$build" -G Ninja \
      -DCMAKE_BUILD_TYPE=Release \
      -DALLREDUCE_RMS_CUDA=OFF -DALLREDUCE_RMS_HIP=ON "${arch_args[@]}" \
      -DCMAKE_HIP_COMPILER="$tc_compiler" "${tc_cmake_args[@]}" \
      -DPython_EXECUTABLE="$(command -v "$PYTHON")" >"$log" 2>&1; then
    cat "$log" >&2
    die "$tc: cmake configure failed"
  fi
  grep 'allreduce_rms:' "$log" | sed 's/^-- /    /'

  step "$tc: build arms_hip (hipify, then compile for every target)"
  if ! "$cmake_bin" --build "$build" --target arms_hip --parallel "$(nproc)" >>"$log" 2>&1; then
    cat "$log" >&2
    die "$tc: building arms_hip failed (full log above, also in $log)"
  fi
  hip_lib="$build/libarms_hip.so"
  [ -f "$hip_lib" ] || die "$tc: the build produced no $hip_lib"
  ok "$hip_lib ($(du -h "$hip_lib" | cut -f1); $(grep -c 'warning:' "$log" || true) compiler warnings, log: $log)"
  check_code_objects "$hip_lib" "$tc_bundler" "$tc_expect"
  needed="$(readelf -d "$hip_lib" | sed -n 's/.*NEEDED.*\[\(libamdhip64[^]]*\)\]/\1/p' | paste -sd' ')"
  [ "$needed" = "libamdhip64.so.$tc_hip_major" ] ||
    die "$tc: libarms_hip.so needs [$needed], expected libamdhip64.so.$tc_hip_major alone"
  ok "links $needed alone"
  if [ -n "$tc_sysinc" ]; then
    leaked="$(ninja -C "$build" -t deps | grep -F " $tc_sysinc" | sort -u | head -n3 || true)"
    [ -z "$leaked" ] || die "$tc: the build included headers of another HIP installation:
$leaked"
    ok "no header from $tc_sysinc (another HIP installation on this machine) was included"
  fi

  step "$tc: exports and load check of libarms_hip.so"
  check_exports "$hip_lib" 1
  check_loads "$hip_lib" hip 64 "${tc_loader[@]}"

  step "$tc: no CUDA-only spellings in the hipified sources and hip/"
  check_no_cuda "$build/hipified"
  summary+=("$tc: $(tr ' ' ';' <<<"$tc_expect") with $tc_desc ($((SECONDS - t0))s)")
done

if [ -n "$cuda_lib" ]; then
  step "exports and load check of $cuda_lib"
  [ -f "$cuda_lib" ] || die "no such file: $cuda_lib"
  check_exports "$cuda_lib" 0
  check_loads "$cuda_lib" cuda 32 "$PYTHON"
fi

step "PASS: the HIP backend builds and passes every check (${SECONDS}s)"
printf '    %s\n' "${summary[@]}"
