"""Reporting: medians, ratios goma-pt / peer, the console table, markdown and the PNG chart.

goma-pt (on CPython) is the reference of every table; goma-pt-pypy, the same goma-pt run by
PyPy, is a column like the peers, and has its own ratios goma-pt-pypy / peer beside.

Also a small CLI to re-render a saved result:
  python bench/report.py bench/results/<stamp>.json [--chart out.png] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import DIRECT, GOMA, GOMA_ONE, GOMA_PYPY

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


def ratios(meds: dict[str, dict[str, float]], ref: str = GOMA) -> dict[str, dict[str, float]]:
    """`ref` median / peer median, per workload (peers measured in the same run)."""
    out: dict[str, dict[str, float]] = {}
    for key, per_peer in meds.items():
        mine = per_peer.get(ref)
        out[key] = {
            peer: mine / value
            for peer, value in per_peer.items()
            if mine is not None and value and peer != ref
        }
    return out


def has_pypy(result: Result) -> bool:
    """True if goma-pt-pypy was in the run and has at least one median."""
    return any(GOMA_PYPY in meds for meds in result["medians"].values())


def pypy_ratios(result: Result) -> dict[str, dict[str, float]]:
    """goma-pt-pypy / peer (from the medians: results saved before it had no such key)."""
    return ratios(result["medians"], GOMA_PYPY)


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
    pypy = pypy_ratios(result) if has_pypy(result) else None
    w = max([13, *(len(peer) for peer in result["peers"])])
    for key, wl in result["workloads"].items():
        better = "higher" if wl["higher_is_better"] else "lower"
        lines.append(f"\n== {key}: {wl['title']} [{wl['unit']}, {better} is better]")
        unit = WORK_DONE[key][2] if key in WORK_DONE else ""
        head = f"  {'peer':<{w}} {'median':>12} {'goma/peer':>10}"
        head += f" {'pypy/peer':>10}" if pypy else ""
        lines.append(head + (f" {'cpu ' + unit:>13}" if unit else "") + "  rounds")
        for peer in result["peers"]:
            med = result["medians"].get(key, {}).get(peer)
            ratio = result["ratios"].get(key, {}).get(peer)
            rounds = ", ".join(_fmt(v) for v in result["samples"].get(key, {}).get(peer, []))
            why = _cell_status(result, key, peer)
            if med is None:
                lines.append(f"  {peer:<{w}} {'-':>12} {'-':>10}  {why or ''}"[:160])
                continue
            line = f"  {peer:<{w}} {_fmt(med):>12} {_fmt(ratio) if ratio else '':>10}"
            if pypy:
                mine = pypy.get(key, {}).get(peer)
                line += f" {_fmt(mine) if mine else '':>10}"
            if unit:
                line += f" {_fmt(cpu_per_unit(result, key, peer)):>13}"
            lines.append(f"{line}  [{rounds}]")
    if result.get("procs", 1) > 1:
        lines.append(f"\n== split over {result['procs']} processes / threads (busiest first)")
        for key, cells in split_rows(result):
            shown = "; ".join(f"{c} {v}" for c, v in cells.items())
            lines.append(f"  {key:<11} {shown}")
    return "\n".join(lines)


def _ratio_rows(result: Result, ref: str, rats: dict[str, dict[str, float]]) -> list[str]:
    """A markdown table of `ref` / peer per workload (1 in `ref`'s own column)."""
    peers = list(result["peers"])
    rows = [
        "| workload | better | " + " | ".join(peers) + " |",
        "|---|---|" + "---:|" * len(peers),
    ]
    for key, wl in result["workloads"].items():
        meds = result["medians"].get(key, {})
        mine = rats.get(key, {})
        cells = [
            "1" if p == ref and p in meds else (_fmt(mine[p]) if p in mine else "-") for p in peers
        ]
        better = "higher" if wl["higher_is_better"] else "lower"
        rows.append(f"| {key} | {better} | " + " | ".join(cells) + " |")
    return rows


def markdown(result: Result) -> str:
    """Markdown tables: medians per peer, ratios goma-pt / peer, and with goma-pt-pypy in the
    run its ratios goma-pt-pypy / peer; for a one-process run, CPU per unit of work."""
    peers = list(result["peers"])
    med_rows = [
        "| workload | unit | " + " | ".join(peers) + " |",
        "|---|---|" + "---:|" * len(peers),
    ]
    for key, wl in result["workloads"].items():
        meds = result["medians"].get(key, {})
        med_cells = [
            _fmt(meds.get(p)) if p in meds else _short_status(result, key, p) for p in peers
        ]
        med_rows.append(f"| {key} | {wl['unit']} | " + " | ".join(med_cells) + " |")
    text = (
        "Medians of the rounds:\n\n"
        + "\n".join(med_rows)
        + "\n\nRatio goma-pt / peer (goma-pt on CPython, same run):\n\n"
        + "\n".join(_ratio_rows(result, GOMA, result["ratios"]))
        + "\n"
    )
    if has_pypy(result):
        text += (
            "\nRatio goma-pt-pypy / peer (the same goma-pt on PyPy, same run; its goma-pt "
            "column is PyPy / CPython):\n\n"
            + "\n".join(_ratio_rows(result, GOMA_PYPY, pypy_ratios(result)))
            + "\n"
        )
    if result.get("procs", 1) == 1 and any(
        cpu_per_unit(result, k, p) for k in WORK_DONE for p in peers
    ):
        text += "\n" + cpu_markdown(result)
    if result.get("procs", 1) == 1 and any(
        machine_per_unit(result, k, p) for k in WORK_DONE for p in peers
    ):
        text += "\n" + whole_machine_markdown(result)
    return text


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


def machine_per_unit(result: Result, key: str, peer: str) -> dict[str, float] | None:
    """Medians over the rounds of the whole machine's busy CPU seconds per unit of work, of
    the ends' (the client's and the backend's) part of it, and of the idle share; or None
    (a run from before the machine was measured)."""
    if key not in WORK_DONE:
        return None
    field, scale, _unit = WORK_DONE[key]
    done = [
        (d["machine"], d[field] * scale)
        for d in result["details"].get(key, {}).get(peer, [])
        if "machine" in d and d.get(field)
    ]
    if not done:
        return None
    return {
        "busy": statistics.median(m["busy"] / units for m, units in done),
        "ends": statistics.median(
            (m.get("client", 0.0) + m.get("backend", 0.0)) / units for m, units in done
        ),
        "idle": statistics.median(m["idle"] / ((m["busy"] + m["idle"]) or 1) for m, _ in done),
    }


def whole_machine_markdown(result: Result) -> str:
    """The whole machine's CPU per unit of work under each forwarder (and direct)."""
    peers = list(result["peers"])
    keys = [k for k in result["workloads"] if k in WORK_DONE]
    per = {k: {p: machine_per_unit(result, k, p) for p in peers} for k in keys}

    def cells(show: Callable[[dict[str, float]], str]) -> list[list[str]]:
        return [
            [k, WORK_DONE[k][2], *(show(got) if got else "-" for got in per[k].values())]
            for k in keys
        ]

    lines = [
        "Whole machine CPU time per unit of work, then its idle share (all cores: the "
        "clients, the servers, the forwarder and the kernel, from /proc/stat; median over the "
        "rounds). Where the idle share is near 0%, the rate is set by this total, not by the "
        "forwarder's own CPU alone:",
        "",
        *_table(
            ["workload", "unit", *peers],
            cells(lambda got: f"{_fmt(got['busy'])} / {100 * got['idle']:.0f}%"),
        ),
        "",
        "Of which the ends: CPU time per unit of work of the client tool and the backend "
        "server together (what each forwarder makes them spend, as well as their own work):",
        "",
        *_table(["workload", "unit", *peers], cells(lambda got: _fmt(got["ends"]))),
    ]
    return "\n".join(lines) + "\n"


def cpu_markdown(result: Result) -> str:
    """CPU per unit of work of every forwarder, then the ratios of goma-pt (and of
    goma-pt-pypy when it ran) to each peer, one row per workload and reference."""
    peers = [p for p in result["peers"] if p != DIRECT]
    refs = [r for r in (GOMA, GOMA_PYPY) if r in peers]
    keys = [k for k in result["workloads"] if k in WORK_DONE]
    per = {k: {p: cpu_per_unit(result, k, p) for p in peers} for k in keys}
    values = [
        [k, WORK_DONE[k][2], *(_fmt(per[k][p]) if per[k][p] else "-" for p in peers)] for k in keys
    ]
    rows = []
    for k in keys:
        for ref in refs:
            mine = per[k][ref]
            rows.append(
                [
                    k,
                    ref,
                    *(
                        "1" if p == ref and mine else _fmt(mine / v) if mine and v else "-"
                        for p, v in per[k].items()
                    ),
                ]
            )
    lines = [
        "Forwarder CPU time per unit of work (utime + stime of all its processes and "
        "threads during the measurement; median over the rounds; lower is better):",
        "",
        *_table(["workload", "unit", *peers], values),
        "",
        f"Ratio of CPU per unit, {' or '.join(refs)} / peer (lower is better):",
        "",
        *_table(["workload", "of", *peers], rows),
    ]
    return "\n".join(lines) + "\n"


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
    pypy = m.get("pypy")
    if pypy and "missing" not in pypy:
        pypy_line = (
            f"- goma-pt-pypy: PyPy {pypy['pypy']} (Python {pypy['python']}), "
            f"Twisted {pypy['twisted']}\n"
        )
    elif pypy:
        pypy_line = f"- goma-pt-pypy: missing ({pypy['missing']})\n"
    else:
        pypy_line = ""
    return commit + (
        f"- {m['nproc']} cores ({m['cpu']}), Linux {m['kernel']}, "
        f"RLIMIT_NOFILE hard limit {m['nofile_hard_limit']}\n"
        f"- Python {m['python']}, Twisted {m['twisted']}\n{pypy_line}- {versions}\n"
    )


def _short_status(result: Result, key: str, peer: str) -> str:
    why = _cell_status(result, key, peer) or "-"
    for short in ("missing", "error", "n/a"):
        if why.startswith(short):
            return short
    return why


def chart_panels(result: Result) -> list[tuple[str, dict[str, dict[str, float]], list[str]]]:
    """What the chart draws: per panel its reference, the ratios and the peers with a bar.

    goma-pt / peer always; with goma-pt-pypy in the run, goma-pt-pypy / peer below it.
    """
    keys = [k for k in result["workloads"] if result["ratios"].get(k)]
    panels = [(GOMA, result["ratios"])]
    if has_pypy(result):
        panels.append((GOMA_PYPY, pypy_ratios(result)))
    out = []
    for ref, rats in panels:
        peers = [
            p for p in result["peers"] if p != ref and any(p in rats.get(k, {}) for k in keys)
        ]
        if peers:
            out.append((ref, rats, peers))
    return out


def _bars(
    ax: Any, rats: dict[str, dict[str, float]], keys: list[str], peers: list[str], color: Any
) -> None:
    """One group of bars per workload, one bar per peer (clipped ones labelled)."""
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(keys))]
        ys = [rats.get(k, {}).get(peer) for k in keys]
        shown = [min(max(y, CHART_RANGE[0]), CHART_RANGE[1]) if y else 0.0 for y in ys]
        ax.bar(xs, shown, width, label=peer, color=color(peer))
        for x, y, bar in zip(xs, ys, shown):
            if y and bar != y:  # clipped: print the real ratio on the bar
                ax.text(
                    x,
                    bar,
                    _fmt(y),
                    rotation=90,
                    fontsize=6,
                    ha="center",
                    va="top" if y > 1 else "bottom",
                )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(*CHART_RANGE)
    ax.set_xticks(range(len(keys)))


def chart(result: Result, path: Path) -> Path | None:
    """Grouped bars of goma-pt / peer per workload (log scale, 1.0 = parity), and below them
    goma-pt-pypy / peer when the run has it (the same colour for a peer in both)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install '.[bench]')", file=sys.stderr)
        return None
    keys = [k for k in result["workloads"] if result["ratios"].get(k)]
    panels = chart_panels(result)
    if not keys or not panels:
        return None
    names = list(result["peers"])
    palette = plt.get_cmap("tab10")

    def color(peer: str) -> Any:
        return palette(names.index(peer) % 10)

    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(9.0, 1.5 * len(keys)), 4.2 * len(panels) + 0.8),
        squeeze=False,
        sharex=True,
    )
    procs = result.get("procs", 1)
    labels = [
        k + ("\n(lower is better)" if not result["workloads"][k]["higher_is_better"] else "")
        for k in keys
    ]
    for ax, (ref, rats, peers) in zip(axes[:, 0], panels):
        _bars(ax, rats, keys, peers, color)
        who = ref
        if ref == GOMA:
            who = "goma-pt (CPython)" if procs == 1 else f"goma-pt x{procs} (--procs {procs})"
        ax.set_ylabel(f"{ref} / peer (median)", fontsize=8)
        ax.set_title(f"{who} relative to each peer", fontsize=9)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1, 0].set_xticklabels(labels, fontsize=8)
    fig.suptitle(
        f"{result['rounds']} rounds, {result['machine'].get('nproc')} cores, {result['started']}",
        fontsize=9,
    )
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
