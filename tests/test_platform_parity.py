"""The HIP platform header spells every primitive the CUDA one does.

cpp/platform_cuda.h and hip/platform_hip.h are the two spellings of one vocabulary
(cpp/platform.h). The HIP build (.ci/hip_build.sh) is the real check, but it needs a ROCm
compiler; this one runs anywhere, so a primitive added on one side only fails here first.
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA = ROOT / "cpp" / "platform_cuda.h"
HIP = ROOT / "hip" / "platform_hip.h"

# Where only one vendor has the thing: CUDA's one-instruction bf16 conversion is optional
# (platform.h falls back to bit arithmetic when ARMS_NATIVE_FLOAT_TO_BF16 is not defined).
OPTIONAL = {"native_float_to_bf16"}

DEFINITION = re.compile(
    r"^\s*(?:template\s*<[^>]*>\s*)?"
    r"(?:(?:__device__|__host__|__forceinline__|inline|static|constexpr)\s+)+"
    r"[\w:<>*&\s]*?\b(\w+)\s*(?:\(|=)",
    re.M,
)
ALIAS = re.compile(r"^\s*using\s+(\w+)\s*=", re.M)


def _code(path: pathlib.Path) -> str:
    text = path.read_text(encoding="utf-8")
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def vocabulary(path: pathlib.Path) -> set[str]:
    code = _code(path)
    return set(DEFINITION.findall(code)) | set(ALIAS.findall(code))


def test_the_parser_finds_the_known_primitives():
    names = vocabulary(CUDA)
    for expected in ("kWarpSize", "warp_sum", "load_relaxed_sys", "store_relaxed_sys", "fence_system",
                     "timer_ns", "pdl_wait", "alloc_polled", "launch", "Stream", "Error"):
        assert expected in names, f"{expected} not found in {CUDA.name}: the test's parser is broken"


def test_hip_spells_every_cuda_primitive():
    missing = sorted(vocabulary(CUDA) - vocabulary(HIP) - OPTIONAL)
    assert not missing, f"hip/platform_hip.h lacks {missing}, which cpp/platform_cuda.h defines"


def test_hip_has_the_packet_primitives():
    # The value+flag packet exchange of the kernel rewrite needs these on AMD too (8-byte,
    # system scope, relaxed): see hip/PLATFORM_REVIEW.md, section 2.
    names = vocabulary(HIP)
    assert {"store_relaxed_sys_u64", "load_relaxed_sys_u64"} <= names


def test_hip_wavefront_is_64_in_both_passes():
    code = _code(HIP)
    assert re.search(r"constexpr\s+int\s+kWarpSize\s*=\s*64\s*;", code)
    assert "__AMDGCN_WAVEFRONT_SIZE" not in code  # deprecated by clang 21
