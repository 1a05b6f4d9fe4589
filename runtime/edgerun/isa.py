"""The CPU's instruction-set extensions that decide which precision is fast here.

ONNX Runtime's integer kernels are only fast where the CPU has dot-product instructions for
8-bit integers: on an AVX2-only CPU (no VNNI) INT8 was slower than FP32 for small CNNs in every
recipe, on a Xeon with AVX-512 VNNI and AMX the same U8S8 model ran 1.9-2.7x faster than FP32.
So a variant decision is only valid for the ISA it was measured on, and a host timing in the
manifest says which ISA it came from. Both sides read the flags through this module.
"""

from __future__ import annotations

import platform
from pathlib import Path

# /proc/cpuinfo flag -> the name used in manifests and decisions (one name per capability; the
# kernel spells AVX-512 VNNI "avx512_vnni", some tools "avx512vnni").
_FLAGS = {
    "avx2": "avx2",
    "avx512f": "avx512f",
    "avx512_vnni": "avx512_vnni",
    "avx512vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    # Arm: dot-product and int8 matrix-multiply instructions play the same role.
    "asimddp": "asimddp",
    "i8mm": "i8mm",
}
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def parse_flags(cpuinfo: str) -> list[str]:
    """The known ISA extensions named on the first ``flags``/``Features`` line of a cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present = set(value.split())
            return sorted({name for flag, name in _FLAGS.items() if flag in present})
    return []


def cpu_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """This machine's ISA extensions (empty where /proc/cpuinfo cannot be read)."""
    try:
        return parse_flags(cpuinfo.read_text())
    except OSError:
        return []


def describe(isa: list[str]) -> str:
    """One phrase: the extensions, and whether INT8 dot-product instructions are among them."""
    if not isa:
        return f"{platform.machine()} (ISA flags unknown)"
    fast = [f for f in isa if f in INT8_DOT]
    return f"{' '.join(isa)} ({'int8 dot-product: ' + ', '.join(fast) if fast else 'no int8 dot-product instructions'})"
