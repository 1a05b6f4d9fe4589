"""Human-facing report: ``report.md`` (what was done and measured) and ``report.png`` (trade-off plot)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _detection_cells(v: dict) -> str:
    """mAP50-95 | mAP50 | box agreement | distinct scores (FP32's) of a detection candidate."""
    scores = v.get("scores") or {}
    reference = v.get("reference_scores") or {}
    collapse = f"{scores.get('distinct', '–')} ({reference.get('distinct', '–')})"
    if v.get("refused"):
        collapse += " **refused**"
    return f" {_fmt(v.get('map50_95'))} | {_fmt(v.get('map50'))} | {_fmt(v.get('box_agreement'))} | {collapse} |"


def candidate_table(candidates, chosen) -> list[str]:
    detection = any("box_agreement" in (c.validation or {}) for c in candidates)
    extra_head = " mAP50-95 | mAP50 | box agreement | distinct scores (FP32) |" if detection else ""
    lines = [
        "| variant | precision | recipe | p50 ms (batch 1) | size KiB | metric | value | drop | within budget | quantized ops |"
        + extra_head,
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" * 4 if detection else ""),
    ]
    for c in candidates:
        mark = " **(chosen)**" if c is chosen else ""
        v = c.validation or {}
        coverage = c.metrics.get("coverage")
        quantized = f"{coverage['quantized_compute_ops']}/{coverage['compute_ops']}" if coverage else "–"
        if c.error:
            # The whole reason: a cut one ("...is no") tells a reader nothing. Pipes would end the cell.
            reason = " ".join(c.error.split()).replace("|", "\\|")
            lines.append(
                f"| {c.name} | {c.precision} | {c.recipe} | failed: {reason} | | | | | no | {quantized} |"
                + (" | | | |" if detection else "")
            )
            continue
        lines.append(
            f"| {c.name}{mark} | {c.precision} | {c.recipe} | {_fmt(c.latency and c.latency['p50_ms'], 3)} | {c.size_bytes / 1024:.1f} | "
            f"{v.get('metric', '–')} | {_fmt(v.get('packed'))} | {_fmt(v.get('drop'))} | {'yes' if c.within_budget else 'no'} | {quantized} |"
            + (_detection_cells(v) if detection else "")
        )
    return lines


_CHOSEN, _IN_BUDGET, _OVER = "tab:red", "tab:blue", "tab:gray"


def write_plot(path: Path, candidates, chosen, metric: str) -> Path | None:
    """One row per candidate: p50 latency and file size side by side as bars, the metric written
    at the end of each latency bar. Rows never overlap, however close the candidates measure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:  # matplotlib is optional for the report
        return None
    measured = [c for c in candidates if c.latency and c.validation]
    if not measured:
        return None
    measured.sort(key=lambda c: c.latency["p50_ms"], reverse=True)  # fastest at the top
    failed = [c for c in candidates if c not in measured]  # drawn at the bottom, without bars, saying why
    usable = failed + measured
    names = [c.name for c in usable]
    colors = [_CHOSEN if c is chosen else (_IN_BUDGET if c.within_budget else _OVER) for c in usable]
    rows = range(len(usable))
    fig, (lat, size) = plt.subplots(
        1, 2, figsize=(9, 1.4 + 0.42 * len(usable)), dpi=100, sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    latencies = [c.latency["p50_ms"] if c.latency and c.validation else 0.0 for c in usable]
    lat.barh(rows, latencies, color=colors, alpha=0.85)
    lat.set_yticks(list(rows), names, fontsize=8)
    lat.set_xlabel("p50 latency, batch 1 (ms, this host)", fontsize=8)
    lat.set_xlim(0, max(latencies) * 2.0)  # room for the metric text
    lat.set_title(f"at each bar's end: p50 ms | {metric}, drop vs FP32", fontsize=8)
    for row, c in zip(rows, usable):
        if c in failed:
            lat.text(0, row, f"  failed: {(c.error or 'not measured')[:70]}", va="center", fontsize=7)
            continue
        v = c.validation
        # A drop is a loss: "drop 0.0750" reads as one, "+0.0750" read as a gain.
        lat.text(
            c.latency["p50_ms"],
            row,
            f"  {c.latency['p50_ms']:.3f} | {v['packed']:.4f}, drop {v['drop']:.4f}",
            va="center",
            fontsize=7,
        )
    size.barh(rows, [c.size_bytes / 1024 if c not in failed else 0.0 for c in usable], color=colors, alpha=0.85)
    size.set_xlabel("file size (KiB)", fontsize=8)
    for axis in (lat, size):
        axis.tick_params(axis="x", labelsize=7)
        axis.grid(axis="x", alpha=0.3)
    fig.legend(
        handles=[
            Patch(color=_CHOSEN, label="chosen"),
            Patch(color=_IN_BUDGET, label="within budget"),
            Patch(color=_OVER, label="over budget"),
        ],
        loc="upper center",
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    fig.savefig(path)
    plt.close(fig)
    return path


def notes(candidates, fp32) -> list[str]:
    """What a reader would otherwise misread: quantized files not smaller than FP32, library chatter."""
    lines = []
    for c in candidates:
        if c.error or c is fp32:
            continue
        if c.precision != "fp16" and c.metrics.get("coverage") and fp32.size_bytes and c.size_bytes >= fp32.size_bytes:
            why = c.metrics.get("weight_storage") or "the quantization tool added more than the int8 weights saved"
            lines.append(
                f"- `{c.name}` is {c.size_bytes / 1024:.1f} KiB, not smaller than FP32 ({fp32.size_bytes / 1024:.1f} KiB): {why}."
            )
        said = c.metrics.get("library_messages")
        if said:
            lines.append(
                f"- `{c.name}`: {said['count']} library message(s) captured while building; first: {said['first']}"
            )
    return lines


def write_report(
    path: Path,
    *,
    name,
    target,
    candidates,
    chosen,
    validation: dict,
    fp32,
    passes,
    choice: str | None = None,
    pictures: dict[str, str] | None = None,
) -> tuple[Path, Path | None]:
    """``pictures`` maps a file written next to the report (e.g. ``report-detections.png``) to its caption."""
    lines = [f"# {name} for {target.name}", "", target.description, ""]
    if chosen is None:
        lines += ["**No variant met the accuracy budget; no bundle was written.**", ""]
    else:
        speedup = fp32.latency["p50_ms"] / chosen.latency["p50_ms"] if fp32.latency else None
        lines += [
            f"Chosen variant: **{chosen.name}** ({chosen.recipe}){': ' + choice if choice else ''}.",
            f"- latency p50 at batch 1 on the build host: {chosen.latency['p50_ms']:.3f} ms "
            f"(FP32 {fp32.latency['p50_ms']:.3f} ms, {speedup:.2f}× )"
            if speedup
            else "",
            f"- size: {chosen.size_bytes / 1024:.1f} KiB (FP32 {fp32.size_bytes / 1024:.1f} KiB, "
            f"{chosen.size_bytes / max(fp32.size_bytes, 1):.2f}×)",
            "",
        ]
    lines += [
        "## Validation",
        f"- metric: {validation['metric']} on {validation['samples']} samples of `{validation['data']}`",
        f"- budget: max drop {validation['max_accuracy_drop']}",
    ]
    if not validation.get("validated", True):
        lines.append("- **WARNING: accuracy not validated on real data** (outputs compared on random inputs only)")
    if validation.get("metric_reason"):
        lines.append(f"- why this metric: {validation['metric_reason']}")
    lines += ["", "## Candidates", "", *candidate_table(candidates, chosen), ""]
    for file, caption in (pictures or {}).items():
        lines += [f"## {caption}", "", f"![{caption}]({file})", ""]
    extra = notes(candidates, fp32)
    if extra:
        lines += ["## Notes", "", *extra, ""]
    lines += ["## Passes", ""]
    for record in passes:
        if not record.name.startswith("candidate:"):
            lines.append(f"- `{record.name}` {record.params} → {record.metrics}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(line for line in lines if line is not None) + "\n")
    png = write_plot(path.with_suffix(".png"), candidates, chosen, validation["metric"]) if chosen is not None else None
    return path, png
