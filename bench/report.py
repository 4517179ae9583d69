"""Reporting: medians, ratios goma-pt / peer, the console table, markdown and the PNG chart.

Also a small CLI to re-render a saved result:
  python bench/report.py bench/results/<stamp>.json [--chart out.png] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import GOMA

Result = dict[str, Any]
CHART_RANGE = (0.05, 20.0)  # ratios outside are clipped, with their value written on the bar


def medians(samples: dict[str, dict[str, list[float | None]]]) -> dict[str, dict[str, float]]:
    """Median of the successful rounds of each (workload, peer) cell."""
    out: dict[str, dict[str, float]] = {}
    for key, per_peer in samples.items():
        out[key] = {}
        for peer, values in per_peer.items():
            ok = [v for v in values if v is not None]
            if ok:
                out[key][peer] = statistics.median(ok)
    return out


def ratios(meds: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """goma-pt median / peer median, per workload (peers measured in the same run)."""
    out: dict[str, dict[str, float]] = {}
    for key, per_peer in meds.items():
        goma = per_peer.get(GOMA)
        out[key] = {
            peer: goma / value
            for peer, value in per_peer.items()
            if goma is not None and value and peer != GOMA
        }
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.2g}"


def _cell_status(result: Result, key: str, peer: str) -> str | None:
    """Why a (workload, peer) cell has no number: missing, n/a, or the last error."""
    missing = result["peers"][peer].get("missing")
    if missing:
        return f"missing ({missing})"
    status = result["status"].get(key, {}).get(peer)
    if status:
        return str(status)
    errors = result["errors"].get(key, {}).get(peer)
    return f"error: {errors[-1]}" if errors else None


def console(result: Result) -> str:
    """The per-workload table printed at the end of a run."""
    lines: list[str] = []
    for key, wl in result["workloads"].items():
        better = "higher" if wl["higher_is_better"] else "lower"
        lines.append(f"\n== {key}: {wl['title']} [{wl['unit']}, {better} is better]")
        lines.append(f"  {'peer':<12} {'median':>12} {'goma/peer':>10}  rounds")
        for peer in result["peers"]:
            med = result["medians"].get(key, {}).get(peer)
            ratio = result["ratios"].get(key, {}).get(peer)
            rounds = ", ".join(_fmt(v) for v in result["samples"].get(key, {}).get(peer, []))
            why = _cell_status(result, key, peer)
            if med is None:
                lines.append(f"  {peer:<12} {'-':>12} {'-':>10}  {why or ''}"[:160])
                continue
            lines.append(
                f"  {peer:<12} {_fmt(med):>12} {_fmt(ratio) if ratio else '':>10}  [{rounds}]"
            )
    return "\n".join(lines)


def markdown(result: Result) -> str:
    """Two markdown tables: medians per peer, then ratios goma-pt / peer."""
    peers = list(result["peers"])
    head = "| workload | unit | " + " | ".join(peers) + " |"
    sep = "|---|---|" + "---:|" * len(peers)
    med_rows, ratio_rows = [head, sep], [head.replace("| unit ", "| better "), sep]
    for key, wl in result["workloads"].items():
        meds = result["medians"].get(key, {})
        rats = result["ratios"].get(key, {})
        med_cells = [
            _fmt(meds.get(p)) if p in meds else _short_status(result, key, p) for p in peers
        ]
        rat_cells = [
            "1" if p == GOMA and p in meds else (_fmt(rats[p]) if p in rats else "-")
            for p in peers
        ]
        med_rows.append(f"| {key} | {wl['unit']} | " + " | ".join(med_cells) + " |")
        better = "higher" if wl["higher_is_better"] else "lower"
        ratio_rows.append(f"| {key} | {better} | " + " | ".join(rat_cells) + " |")
    return (
        "Medians of the rounds:\n\n"
        + "\n".join(med_rows)
        + "\n\nRatio goma-pt / peer (same run):\n\n"
        + "\n".join(ratio_rows)
        + "\n"
    )


def machine_markdown(result: Result) -> str:
    """The machine and tool versions of a run, as a markdown list."""
    m = result["machine"]
    versions = ", ".join(f"{name} {ver}" for name, ver in m["versions"].items())
    commit = f"- goma-pt at commit {result['commit']}\n" if "commit" in result else ""
    return commit + (
        f"- {m['nproc']} cores ({m['cpu']}), Linux {m['kernel']}, "
        f"RLIMIT_NOFILE hard limit {m['nofile_hard_limit']}\n"
        f"- Python {m['python']}, Twisted {m['twisted']}\n- {versions}\n"
    )


def _short_status(result: Result, key: str, peer: str) -> str:
    why = _cell_status(result, key, peer) or "-"
    for short in ("missing", "error", "n/a"):
        if why.startswith(short):
            return short
    return why


def chart(result: Result, path: Path) -> Path | None:
    """Grouped bars of goma-pt / peer per workload (log scale, 1.0 = parity)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install '.[bench]')", file=sys.stderr)
        return None
    keys = [k for k in result["workloads"] if result["ratios"].get(k)]
    peers = [
        p
        for p in result["peers"]
        if p != GOMA and any(p in result["ratios"].get(k, {}) for k in keys)
    ]
    if not keys or not peers:
        return None
    fig, ax = plt.subplots(figsize=(max(9.0, 1.5 * len(keys)), 5.0))
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(keys))]
        ys = [result["ratios"][k].get(peer) for k in keys]
        shown = [min(max(y, CHART_RANGE[0]), CHART_RANGE[1]) if y else 0.0 for y in ys]
        ax.bar(xs, shown, width, label=peer)
        for x, y, bar in zip(xs, ys, shown, strict=True):
            if y and bar != y:  # clipped: print the real ratio on the bar
                ax.text(
                    x,
                    bar,
                    f"{y:.2g}",
                    rotation=90,
                    fontsize=6,
                    ha="center",
                    va="top" if y > 1 else "bottom",
                )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(*CHART_RANGE)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(
        [
            k + ("\n(lower is better)" if not result["workloads"][k]["higher_is_better"] else "")
            for k in keys
        ],
        fontsize=8,
    )
    ax.set_ylabel("goma-pt / peer (median)")
    ax.set_title(
        f"goma-pt relative to each peer ({result['rounds']} rounds, "
        f"{result['machine'].get('nproc')} cores, {result['started']})",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path)
    parser.add_argument("--chart", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text())
    print(markdown(result) if args.markdown else console(result))
    if args.chart:
        chart(result, args.chart)


if __name__ == "__main__":
    main()
