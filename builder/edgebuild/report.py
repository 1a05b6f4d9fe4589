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


def candidate_table(candidates, chosen) -> list[str]:
    lines = [
        "| variant | precision | recipe | p50 ms (batch 1) | size KiB | metric | value | drop | within budget | quantized ops |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in candidates:
        mark = " **(chosen)**" if c is chosen else ""
        v = c.validation or {}
        coverage = c.metrics.get("coverage")
        quantized = f"{coverage['quantized_compute_ops']}/{coverage['compute_ops']}" if coverage else "–"
        if c.error:
            lines.append(
                f"| {c.name} | {c.precision} | {c.recipe} | failed: {c.error[:80]} | | | | | no | {quantized} |"
            )
            continue
        lines.append(
            f"| {c.name}{mark} | {c.precision} | {c.recipe} | {_fmt(c.latency and c.latency['p50_ms'], 3)} | {c.size_bytes / 1024:.1f} | "
            f"{v.get('metric', '–')} | {_fmt(v.get('packed'))} | {_fmt(v.get('drop'))} | {'yes' if c.within_budget else 'no'} | {quantized} |"
        )
    return lines


def write_plot(path: Path, candidates, chosen, metric: str) -> Path | None:
    """Latency vs metric, marker area ~ file size, chosen variant highlighted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is optional for the report
        return None
    usable = [c for c in candidates if c.latency and c.validation]
    if not usable:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    biggest = max(c.size_bytes for c in usable) or 1
    for c in usable:
        color = "tab:red" if c is chosen else ("tab:blue" if c.within_budget else "tab:gray")
        ax.scatter(
            c.latency["p50_ms"], c.validation["packed"], s=40 + 400 * c.size_bytes / biggest, color=color, alpha=0.7
        )
        ax.annotate(
            f"{c.name} ({c.precision})" if c.precision not in c.name else c.name,
            (c.latency["p50_ms"], c.validation["packed"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("p50 latency, batch 1 (ms, this host)")
    ax.set_ylabel(metric)
    ax.set_title("candidates: red = chosen, gray = over budget; area = file size", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(
    path: Path, *, name, target, candidates, chosen, validation: dict, fp32, passes
) -> tuple[Path, Path | None]:
    lines = [f"# {name} for {target.name}", "", target.description, ""]
    if chosen is None:
        lines += ["**No variant met the accuracy budget; no bundle was written.**", ""]
    else:
        speedup = fp32.latency["p50_ms"] / chosen.latency["p50_ms"] if fp32.latency else None
        lines += [
            f"Chosen variant: **{chosen.name}** ({chosen.recipe}).",
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
    lines += ["", "## Candidates", "", *candidate_table(candidates, chosen), "", "## Passes", ""]
    for record in passes:
        if not record.name.startswith("candidate:"):
            lines.append(f"- `{record.name}` {record.params} → {record.metrics}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(line for line in lines if line is not None) + "\n")
    png = write_plot(path.with_suffix(".png"), candidates, chosen, validation["metric"]) if chosen is not None else None
    return path, png
