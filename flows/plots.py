"""The label distribution of a build as a PNG, for the Prefect UI (a markdown artifact embeds it).

Plain matplotlib on its non-interactive Agg backend: shard threads and worker processes have no display.
"""

from __future__ import annotations

import base64
import io

from tasks.stats import BuildStats


def label_distribution_png(stats: BuildStats, title: str) -> bytes:
    """Steps per step position, stacked as positive (c > 0) / negative (c = 0, k > 0) / no rollouts (k = 0),
    with the mean MC value per position on a second axis: where solutions go wrong, at a glance."""
    from matplotlib.figure import Figure  # a Figure, not pyplot: no global state shared between threads

    keys = sorted(stats.by_index_steps, key=int)
    positions = [int(k) + 1 for k in keys]
    positive = [stats.by_index_positive.get(k, 0) for k in keys]
    unestimated = [stats.by_index_steps[k] - stats.by_index_mc_n.get(k, 0) for k in keys]
    negative = [stats.by_index_steps[k] - p - u for k, p, u in zip(keys, positive, unestimated)]
    mean_mc = [stats.by_index_mc_sum.get(k, 0.0) / stats.by_index_mc_n[k] if stats.by_index_mc_n.get(k) else None
               for k in keys]

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.bar(positions, positive, color="#2e7d32", label="positive (c > 0)")
    ax.bar(positions, negative, bottom=positive, color="#c62828", label="negative (c = 0, k > 0)")
    ax.bar(positions, unestimated, bottom=[p + n for p, n in zip(positive, negative)], color="#9e9e9e",
           label="no rollouts (k = 0)")
    ax.set_xlabel("step position")
    ax.set_ylabel("steps")
    ax.set_title(title)
    if positions:
        ax.set_xticks(positions)
    mc = ax.twinx()
    pts = [(x, y) for x, y in zip(positions, mean_mc) if y is not None]
    if pts:
        mc.plot([x for x, _ in pts], [y for _, y in pts], color="#1565c0", marker="o", label="mean MC value")
    mc.set_ylim(0, 1)
    mc.set_ylabel("mean MC value")
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = mc.get_legend_handles_labels()
    # Below the axes, so it never hides a bar.
    fig.legend(handles + h2, labels + l2, loc="lower center", ncol=4, fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def label_distribution_markdown(stats: BuildStats, title: str) -> str:
    """Markdown embedding the PNG as a data URI: the artifact is self-contained (no image host to reach)."""
    data = base64.b64encode(label_distribution_png(stats, title)).decode("ascii")
    return (f"![Label distribution by step position](data:image/png;base64,{data})\n\n"
            f"Steps by step position and label at the default threshold; the line is the mean MC value.\n")
