"""Which validated variants a bundle ships, for the device's self-benchmark to choose among.

The build host's timing picks ``model.onnx``, but whether INT8 beats FP32 is a property of the
CPU that serves it: on an AVX2-only EPYC (no VNNI) mobilenet_v3_small was slower in every INT8
form, on a Xeon with AVX-512 VNNI/AMX U8S8 ran resnet18 2.7x faster than FP32. So CPU bundles
ship the contenders by default and the device times them (``edgerun.loader``), caching the
decision per ISA.

Contenders, at most one float variant plus :data:`MAX_INT8` INT8 variants:

- the fastest in-budget float variant (FP32, or a fused FP32 graph): the safe answer on a CPU
  without int8 dot-product instructions;
- the fastest in-budget INT8 variant of each recipe family (QDQ/QOperator, reduce-range or not,
  dynamic, partial, fused), families ranked by their best member: the families are what flips
  between CPUs (reduce-range exists for CPUs without VNNI, and QOperator's and QDQ's kernels
  differ), a second member of the same family rarely does.

Size: an INT8 file is about a quarter of FP32's, so FP32 + 2 INT8 is about 1.5x the FP32 file,
against 0.25x for an INT8-only bundle; ``--variants one`` keeps the single-variant bundle for
size-critical devices, ``--variants all`` ships every in-budget variant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgebuild.candidates import Candidate
from edgebuild.targets import TargetProfile

if TYPE_CHECKING:
    from edgebuild.options import PackOptions
    from edgerun.manifest import Manifest

VARIANT_MODES = ("auto", "one", "contenders", "all")
MAX_INT8 = 2
FLOAT = ("fp32", "fp16")


def family(candidate: Candidate) -> str:
    """The recipe family an INT8 candidate belongs to (what differs between CPUs)."""
    settings = candidate.metrics.get("settings") or {}
    parts = ["fused"] if candidate.metrics.get("fusion") else []
    if "partial" in candidate.name:  # not precision "mixed": a dynamic INT8 leaving score MatMuls float is mixed too
        parts.append("partial")
    if settings.get("format"):
        parts.append(str(settings["format"]))
    elif "dynamic" in candidate.name or candidate.precision == "int8-dynamic":
        parts.append("dynamic")
    if settings.get("reduce_range"):
        parts.append("reduce-range")
    return "-".join(parts) or candidate.precision


def mode(options: PackOptions, target: TargetProfile) -> str:
    """The effective ``--variants`` mode: ``auto`` is ``all`` on GPU targets, ``contenders`` on CPUs;
    ``--ship-variants``/``--no-ship-variants`` still mean ``all``/``one``."""
    chosen = getattr(options, "variants", "auto") or "auto"
    if chosen != "auto":
        return chosen
    if options.ship_variants is not None:
        return "all" if options.ship_variants else "one"
    return "all" if target.device == "gpu" else "contenders"


def contenders(chosen: Candidate, candidates: list[Candidate]) -> list[Candidate]:
    """``chosen`` first, then the fastest float variant and the best INT8 variant per family (bounded)."""
    eligible = [c for c in candidates if c.within_budget and c.latency is not None]  # in budget: built and validated
    shipped = [chosen]
    if chosen.precision not in FLOAT:
        floats = sorted((c for c in eligible if c.precision in FLOAT), key=lambda c: c.p50)
        shipped += floats[:1]
    families = {family(chosen)} if chosen.precision not in FLOAT else set()
    for candidate in sorted((c for c in eligible if c.precision not in FLOAT), key=lambda c: c.p50):
        if sum(c.precision not in FLOAT for c in shipped) >= MAX_INT8:
            break
        if candidate is not chosen and family(candidate) not in families:
            families.add(family(candidate))
            shipped.append(candidate)
    return shipped


def shipped_variants(
    chosen: Candidate, candidates: list[Candidate], options: PackOptions, target: TargetProfile
) -> list[Candidate]:
    """What the bundle carries: ``chosen`` (as model.onnx) first, then the variants."""
    wanted = mode(options, target)
    if wanted == "one":
        return [chosen]
    if wanted == "all":
        return [chosen] + [c for c in candidates if c is not chosen and c.within_budget]
    return contenders(chosen, candidates)


def record_host_isa(manifest: Manifest) -> None:
    """Stamp the build host's ISA next to every host timing: a timing says nothing about a CPU
    with other int8 instructions."""
    from edgerun.isa import cpu_isa

    isa = cpu_isa()
    manifest.benchmark.setdefault("host", {})["isa"] = isa
    for row in manifest.benchmark.get("candidates", []):
        if "p50_ms" in row:
            row["isa"] = isa
    for model in manifest.all_models():
        if model.benchmark:
            model.benchmark = {**model.benchmark, "isa": isa}
