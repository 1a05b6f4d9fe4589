"""How ``edgebuild profile`` shows a profile: Markdown tables, a bar chart, and the bundle report's section.

The numbers come from :mod:`edgebuild.profile`; this module only lays them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.profile import Profile, ProfileReport, profile_file


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


SHARE_ROWS = (
    ("conv_matmul", "Conv/MatMul-type ops"),
    ("conv_matmul_float", "  of which in float"),
    ("conv_matmul_int8", "  of which in int8"),
    ("quantize_dequantize", "Quantize/DequantizeLinear"),
    ("other_float", "other ops in float"),
    ("other_int8", "other ops in int8"),
)


def format_markdown(report: ProfileReport, top: int = 15) -> str:
    lines = [f"# Where the time goes: {report.source}", ""]
    for batch in sorted({p.batch for p in report.profiles}):
        group = [p for p in report.profiles if p.batch == batch]
        lines += [f"## Batch {batch}", "", "| | " + " | ".join(p.label for p in group) + " |"]
        lines.append("|---|" + "---|" * len(group))
        lines.append(
            f"| run time (ORT model_run, median of {group[0].runs}) | "
            + " | ".join(f"{p.run_ms:.3f} ms" for p in group)
            + " |"
        )
        lines.append(
            "| node time (sum of node medians) | "
            + " | ".join(f"{p.node_ms:.3f} ms ({p.node_ms / p.run_ms:.0%} of run)" for p in group)
            + " |"
        )
        lines.append("| wall time of session.run | " + " | ".join(f"{p.wall_ms:.3f} ms" for p in group) + " |")
        for key, title in SHARE_ROWS:
            lines.append(f"| {title} | " + " | ".join(_pct(p.shares()[key]) for p in group) + " |")
        lines += ["", "### By op type", "", op_type_table(group, top), ""]
        for p in group:
            lines += [f"### Slowest nodes: {p.label}", "", "| node | op type | ms | share |", "|---|---|---|---|"]
            total = p.node_ms or 1.0
            lines += [f"| `{n.name}` | {n.op_type} | {n.ms:.4f} | {_pct(n.ms / total)} |" for n in p.nodes[:top]]
            lines.append("")
    for eager in report.torch:
        lines += [
            f"## PyTorch eager by operator (batch {eager['batch']}, wall {eager['wall_ms']:.3f} ms per run)",
            "",
            "| operator | self CPU ms per run | calls per run |",
            "|---|---|---|",
        ]
        lines += [f"| {o['op']} | {o['ms']:.4f} | {o['calls']} |" for o in eager["ops"][:top]]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def op_type_table(group: list[Profile], top: int) -> str:
    """Op types side by side, ordered by the last profile's (the chosen variant's) time."""
    per = [{r.op_type: r for r in p.by_op_type()} for p in group]
    order = [r.op_type for r in group[-1].by_op_type()]
    order += [op for table in per[:-1] for op in table if op not in order]
    header = "| op type | " + " | ".join(f"{p.label} ms | share | nodes" for p in group) + " |"
    lines = [header, "|---|" + "---|---|---|" * len(group)]
    for op in order[:top]:
        cells = []
        for table in per:
            row = table.get(op)
            cells.append(f"{row.ms:.4f} | {_pct(row.share)} | {row.nodes}" if row else "– | – | –")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_chart(report: ProfileReport, path: Path, top: int = 10) -> Path:
    """Horizontal bars per op type (ms), one colour per profiled file, at the smallest batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = min(p.batch for p in report.profiles)
    group = [p for p in report.profiles if p.batch == batch]
    per = [{r.op_type: r.ms for r in p.by_op_type()} for p in group]
    order = [r.op_type for r in group[-1].by_op_type()][:top]
    order += [op for table in per[:-1] for op in list(table)[:top] if op not in order][: max(0, top - len(order))]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(order) + 1.5))
    height = 0.8 / len(group)
    for i, (p, table) in enumerate(zip(group, per)):
        ax.barh(
            [y + i * height for y in range(len(order))], [table.get(op, 0.0) for op in order], height, label=p.label
        )
    ax.set_yticks([y + height * (len(group) - 1) / 2 for y in range(len(order))], order)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per run (median), batch {batch}")
    ax.set_title(f"Where the time goes: {Path(report.source).name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_section(path: Path, session_options: Any, feeds: dict[str, np.ndarray], top: int = 8) -> list[str]:
    """The bundle report's short "where the time goes" table for the chosen variant (batch of ``feeds``)."""
    p = profile_file(path, feeds, session_options, runs=10)
    shares = p.shares()
    lines = [
        "## Where the time goes (chosen variant)",
        "",
        f"ONNX Runtime profile at batch {p.batch}, median of {p.runs} runs: run {p.run_ms:.3f} ms, nodes "
        f"{p.node_ms:.3f} ms; Conv/MatMul-type ops {_pct(shares['conv_matmul'])} (in float "
        f"{_pct(shares['conv_matmul_float'])}), Quantize/DequantizeLinear {_pct(shares['quantize_dequantize'])}, "
        f"other float ops {_pct(shares['other_float'])}. `edgebuild profile BUNDLE` shows every node and FP32 next to it.",
        "",
        "| op type | ms | share | nodes |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.op_type} | {r.ms:.4f} | {_pct(r.share)} | {r.nodes} |" for r in p.by_op_type()[:top]]
    return lines + [""]


def append_report_section(report_md: Path, path: Path, session_options: Any, feeds: dict[str, np.ndarray]) -> None:
    """Add the section to a written report.md; a profiler failure costs only the section."""
    try:
        lines = report_section(path, session_options, feeds)
    except Exception as exc:  # noqa: BLE001 - the report must not fail a bundle that was validated
        lines = ["## Where the time goes (chosen variant)", "", f"profiling failed: {exc}", ""]
    with report_md.open("a") as out:
        out.write("\n" + "\n".join(lines))
