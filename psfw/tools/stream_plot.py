"""The picture of ``psfw bench --sparse --stream``: each run's shard RSS and rows
held against its steps, the cap drawn in."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_stream_plot(figures: dict[str, Any], path: Path) -> None:
    """RSS (the shards' sum, MB) above, rows held (the shards' sum) below, a line
    per run; the capped run's ``max_rows`` dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss, rows) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for run, colour in (("capped", "tab:blue"), ("uncapped", "tab:orange")):
        key = f"stream_{run}_"
        if key + "sample_steps" not in figures:
            continue
        steps = figures[key + "sample_steps"]
        cap = figures[key + "max_rows"]
        label = f"max_rows {cap:,}" if cap else "no cap"
        label += f", {figures[key + 'events']:,} events"
        rss.plot(steps, [sum(s) for s in figures[key + "rss_mb"]], color=colour, label=label)
        rows.plot(steps, [sum(s) for s in figures[key + "rows_held"]], color=colour, label=label)
        if cap:
            rows.axhline(cap, color=colour, linestyle="--", linewidth=0.8)
    rss.set_ylabel("shard RSS, both shards (MB)")
    rows.set_ylabel("rows held, both shards")
    rows.set_xlabel(f"step ({figures['stream_batch']:,} events each)")
    rss.legend(loc="lower right")
    rss.set_title(
        f"a stream of {figures['stream_events']:,} events, about {figures['stream_distinct']:,} distinct ids "
        f"(expire_after {figures['stream_expire_after']:,}, admit_after {figures['stream_admit_after']})",
        fontsize=9,
    )
    for axis in (rss, rows):
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["write_stream_plot"]
