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

from bench.peers import DIRECT, GOMA, GOMA_ONE

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
    if result.get("procs", 1) > 1:
        lines.append(f"\n== split over {result['procs']} processes / threads (busiest first)")
        for key, cells in split_rows(result):
            shown = "; ".join(f"{c} {v}" for c, v in cells.items())
            lines.append(f"  {key:<11} {shown}")
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


def _shares(values: list[float], n: int) -> list[float]:
    """The `n` largest of `values` as percentages of their sum (padded with zeros)."""
    top = sorted(values, reverse=True)[:n]
    top += [0.0] * (n - len(top))
    total = sum(top)
    return [100.0 * v / total for v in top] if total else [0.0] * n


def _round_shares(rounds: list[list[float]], n: int) -> str:
    """Each round's split, busiest first: "53/47, 100/0"."""
    if not rounds:
        return "-"
    return ", ".join("/".join(f"{v:.0f}" for v in _shares(r, n)) for r in rounds)


def _work_key(result: Result, key: str) -> str:
    """Which goma-pt counter shows the spread of a workload's work over the processes."""
    if result["workloads"][key]["proto"] == "udp":
        return "datagrams"
    return "bytes" if key.startswith("bulk") else "connections"


# what a measurement's detail says was done: (detail key, scale to the shown unit, unit)
WORK_DONE = {
    "bulk_up": ("bytes", 1e-9, "s/GB"),
    "bulk_down": ("bytes", 1e-9, "s/GB"),
    "tcp_rr": ("requests", 1e-6, "us/req"),
    "tcp_connect": ("requests", 1e-6, "us/req"),
    "udp_dns": ("completed", 1e-6, "us/query"),
    "udp_churn": ("answered", 1e-6, "us/query"),
}


def cpu_per_unit(result: Result, key: str, peer: str) -> float | None:
    """Median over the rounds of the forwarder's CPU seconds per unit of work done."""
    if key not in WORK_DONE:
        return None
    field, scale, _unit = WORK_DONE[key]
    per = [
        d["cpu"]["seconds"] / (d[field] * scale)
        for d in result["details"].get(key, {}).get(peer, [])
        if "cpu" in d and d.get(field) and d["cpu"]["seconds"]
    ]
    return statistics.median(per) if per else None


def split_rows(result: Result) -> list[tuple[str, dict[str, str]]]:
    """Per workload, how each peer's work was spread over its processes or threads.

    `<peer> cpu`: shares of the forwarder's CPU time taken by its busiest N threads (goma-pt
    processes, nginx workers, HAProxy threads); `goma-pt work`: each goma-pt process's share
    of what its /metrics counted (bytes for bulk, connections, UDP datagrams). One split per
    round: with few connections the kernel's hash may put them all on one process.
    """
    n = int(result.get("procs", 1))
    rows = []
    for key in result["workloads"]:
        cells: dict[str, str] = {}
        for peer, details in result["details"].get(key, {}).items():
            tasks = [d["cpu"]["tasks"] for d in details if "cpu" in d]
            if tasks and peer not in (DIRECT, GOMA_ONE):
                cells[f"{peer} cpu"] = _round_shares(tasks, n)
            what = _work_key(result, key)
            work = [
                [float(proc[what]) for proc in d["processes"]]
                for d in details
                if d.get("processes")
            ]
            if work:
                total = statistics.median(sum(w) for w in work)
                shown = f"{_fmt(total / 1e9)} GB" if what == "bytes" else f"{_fmt(total)} {what}"
                cells[f"{peer} work"] = f"{_round_shares(work, n)} of {shown}"
        rows.append((key, cells))
    return rows


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def split_markdown(result: Result) -> str:
    """The spread over processes, and CPU per unit of work, as two markdown tables."""
    rows = split_rows(result)
    cols = sorted(
        {c for _k, cells in rows for c in cells}, key=lambda c: (not c.startswith(GOMA), c)
    )
    peers = [p for p in result["peers"] if p != DIRECT]
    lines = [
        f"Split over the {result.get('procs', 1)} processes / threads (busiest first, % of the "
        "forwarder's CPU time, or of what each goma-pt process counted in its /metrics; "
        "one split per round, the total is the median):",
        "",
        *_table(["workload", *cols], [[k, *(c.get(x, "-") for x in cols)] for k, c in rows]),
        "",
        "Forwarder CPU time per unit of work (all its processes and threads; median over the "
        "rounds), and goma-pt / peer (lower is better):",
        "",
    ]
    body = []
    for key in result["workloads"]:
        if key not in WORK_DONE:
            continue
        per = {p: cpu_per_unit(result, key, p) for p in peers}
        goma = per.get(GOMA)
        cells = [_fmt(per[p]) if per[p] is not None else "-" for p in peers]
        for p in peers:
            value = per[p]
            if p != GOMA:
                cells.append(_fmt(goma / value) if goma and value else "-")
        body.append([key, WORK_DONE[key][2], *cells])
    head = ["workload", "unit", *peers, *(f"goma-pt / {p}" for p in peers if p != GOMA)]
    lines += _table(head, body)
    return "\n".join(lines) + "\n"


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
        for x, y, bar in zip(xs, ys, shown):
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
    procs = result.get("procs", 1)
    who = "goma-pt" if procs == 1 else f"goma-pt x{procs} (--procs {procs})"
    ax.set_title(
        f"{who} relative to each peer ({result['rounds']} rounds, "
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
