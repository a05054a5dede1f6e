"""What the user sees: a progress bar while the sweep runs, a table at the end, and the plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .counting import wire_ratio
from .runner import Progress


class RichProgress(Progress):
    """A rich progress bar over all timed calls of the run (use as a context manager)."""

    def __init__(self, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as _P

        self._p = _P(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                     disable=not enabled, transient=False)
        self._task = self._p.add_task("starting", total=0)

    def __enter__(self):
        self._p.start()
        return self

    def __exit__(self, *exc):
        self._p.stop()

    def add(self, calls: int) -> None:
        self._p.update(self._task, total=(self._p.tasks[0].total or 0) + calls)

    def advance(self, calls: int = 1) -> None:
        self._p.advance(self._task, calls)

    def describe(self, text: str) -> None:
        self._p.update(self._task, description=text)


def _fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def _si(v: float | None) -> str:
    """3 significant digits with an SI suffix: 4.83G, 512T, 37.7."""
    if v is None:
        return "n/a"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def _ms(v: float | None) -> str:
    """Milliseconds without exponents: 5450, 42.7, 0.913, 0.0123."""
    if v is None:
        return "n/a"
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def case_label(row: dict, with_dtype_mode: bool = False) -> str:
    c = row["config"]
    label = f"{c['shape']} T={c['tokens']}"
    if with_dtype_mode:
        label += f" {c['dtype']} {c['mode']}"
    if c["world_size"] > 1:
        label += f" x{c['world_size']} ranks"
    return label


def _varied(rows: list[dict]) -> bool:
    """Whether the rows span several dtypes or modes (then every case label names its own)."""
    return len({(r["config"]["dtype"], r["config"]["mode"]) for r in rows}) > 1


def reason_tags(rows: list[dict]) -> dict[tuple[str, str], str]:
    """A short tag ("[1]", "[2]", ...) per distinct (status, reason) of the rows that were not timed, numbered in
    order of first appearance: the table shows the tag in the row and each reason once under the table."""
    tags: dict[tuple[str, str], str] = {}
    for r in rows:
        if r["status"] != "ok":
            tags.setdefault((r["status"], r["reason"] or ""), f"[{len(tags) + 1}]")
    return tags


def reason_notes(rows: list[dict]) -> list[str]:
    """The footnotes for `reason_tags`: "[1] unavailable (triton, fused): <reason>", one line per distinct reason."""
    names: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in rows:
        if r["status"] != "ok":
            key = (r["status"], r["reason"] or "")
            if r["candidate"] not in names[key]:
                names[key].append(r["candidate"])
    return [f"{tag} {status} ({', '.join(names[(status, reason)])}): {reason}"
            for (status, reason), tag in reason_tags(rows).items()]


def table(rows: list[dict], title: str):
    """A rich Table of the rows, one section per case. Rows that were not timed show their status and a tag;
    the reasons are `reason_notes(rows)`, printed once under the table (print_table)."""
    from rich.table import Table

    distributed = any(r["config"]["world_size"] > 1 for r in rows)
    t = Table(title=title, caption="vs best = fastest ok baseline's median / this median (>1: faster than every "
              "baseline); roofline = max(FLOPs/matmul ceiling, bytes/copy ceiling) / time, c/m: which binds",
              header_style="bold")
    for col, just in (("case", "left"), ("candidate", "left"), ("median ms", "right"), ("p20-p80 ms", "right"),
                      ("tok/s", "right"), ("FLOP/s", "right"), ("roofline", "right"), ("vs best", "right"),
                      ("ops", "right"), ("Triton", "right"), ("launch", "right"), ("sync", "right"),
                      ("peak MiB", "right")):
        t.add_column(col, justify=just, no_wrap=col != "case")
    if distributed:
        t.add_column("wire MB (min, ratio)", justify="right")
    t.add_column("status", no_wrap=True)
    last, varied, tags = None, _varied(rows), reason_tags(rows)
    for r in rows:
        m, label = r["metrics"], case_label(r, varied)
        if last is not None and label != last:
            t.add_section()
        ok = r["status"] == "ok"
        eff = m["roofline_efficiency"]
        cells = [label if label != last else "", r["candidate"],
                 _ms(m["latency_ms_median"]),
                 f"{_ms(m['latency_ms_p20'])}-{_ms(m['latency_ms_p80'])}" if ok else "",
                 _si(m["tokens_per_s"]) if ok else "", _si(m["tflops"] * 1e12) if ok else "",
                 f"{100 * eff:.1f}% {m['bound'][0]}" if ok else "",
                 _fmt(m["speedup_vs_best_baseline"], ".2f", "") + ("x" if m["speedup_vs_best_baseline"] else ""),
                 _fmt(m["aten_ops"], "d", ""), _fmt(m.get("triton_launches"), "d", ""),
                 _fmt(m["kernel_launches"], "d", "n/a" if ok else ""),
                 _fmt(m["host_syncs"], "d", "n/a" if ok else ""),
                 _fmt(None if m["peak_mem_bytes"] is None else m["peak_mem_bytes"] / 2**20, ".1f", "")]
        if distributed:
            wire, least = m["wire_bytes"], m["wire_min_bytes"]
            ratio = wire_ratio(wire, least)
            cells.append("" if wire is None else f"{wire / 1e6:.3g} ({_fmt(least and least / 1e6, '.3g')}, "
                         f"{_fmt(ratio, '.2f', '-')}{'x' if ratio else ''})")
        cells.append("ok" if ok else f"{r['status']} {tags[(r['status'], r['reason'] or '')]}")
        t.add_row(*cells, style=None if ok else "dim")
        last = label
    return t


def console():
    """A rich Console; when output goes to a file or pipe (make bench | tee), wide enough for the table."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=max(c.width, 180))


def print_table(rows: list[dict], title: str, out=None) -> None:
    """The table, then each distinct reason a row was not timed, once, after its tag."""
    from rich.markup import escape

    out = out or console()
    out.print(table(rows, title))
    for note in reason_notes(rows):
        out.print(escape(note), style="dim", highlight=False)


def markdown_table(rows: list[dict]) -> str:
    """The same numbers as a Markdown table (for the README); `ops` are top-level aten calls per call, `Triton` the
    Triton kernel launches per call.
    Distributed rows add the bytes put on the wire (the least any transport must send, and their ratio)."""
    wire = any(r["metrics"].get("wire_bytes") is not None for r in rows)
    head = ("| case | candidate | median ms | p20-p80 ms | tok/s | FLOP/s | roofline | vs best | ops | Triton | "
            "peak MiB |"
            + (" wire MB (min, ratio) |" if wire else ""))
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    varied = _varied(rows)

    def opt(v, fmt):
        return "n/a" if v is None else fmt(v)

    for r in rows:
        m, label = r["metrics"], case_label(r, varied)
        if r["status"] != "ok":
            out.append(f"| {label} | {r['candidate']} | {r['status']}: {r['reason']} |" + " |" * (head.count("|") - 4))
            continue
        line = (f"| {label} | {r['candidate']} | {_ms(m['latency_ms_median'])} | "
                f"{_ms(m['latency_ms_p20'])}-{_ms(m['latency_ms_p80'])} | {_si(m['tokens_per_s'])} | "
                f"{_si(m['tflops'] * 1e12)} | {100 * m['roofline_efficiency']:.1f}% {m['bound']} | "
                f"{m['speedup_vs_best_baseline']:.2f}x | {opt(m['aten_ops'], str)} | "
                f"{opt(m.get('triton_launches'), str)} | "
                f"{opt(m['peak_mem_bytes'], lambda b: f'{b / 2**20:.1f}')} |")
        if wire:
            ratio = wire_ratio(m.get("wire_bytes"), m.get("wire_min_bytes"))
            line += (f" {opt(m.get('wire_bytes'), lambda b: f'{b / 1e6:.2f}')} "
                     f"({opt(m.get('wire_min_bytes'), lambda b: f'{b / 1e6:.2f}')}, "
                     f"{opt(ratio, lambda r: f'{r:.2f}x')}) |")
        out.append(line)
    return "\n".join(out)


def plot(rows: list[dict], path: str | Path, title: str) -> Path:
    """Latency and roofline efficiency against tokens, one line per candidate, one row of panels per
    (shape, dtype, mode, ranks). Written with matplotlib's Agg backend (no display needed)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["status"] != "ok":
            continue
        c = r["config"]
        key = (c["shape"], c["dtype"], c["mode"], c["world_size"])
        groups[key][r["candidate"]].append((c["tokens"], r["metrics"]["latency_ms_median"],
                                            100 * r["metrics"]["roofline_efficiency"]))
    if not groups:
        raise ValueError("nothing to plot: no row was timed")
    names = sorted({n for g in groups.values() for n in g})
    markers = "osD^v<>pP*Xh"
    style = {n: (f"C{i % 10}", markers[i % len(markers)]) for i, n in enumerate(names)}
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    for (shape, dtype, mode, ws), (ax_lat, ax_eff) in zip(groups, axes):
        for n, pts in sorted(groups[(shape, dtype, mode, ws)].items()):
            pts.sort()
            x = [p[0] for p in pts]
            color, marker = style[n]
            ax_lat.plot(x, [p[1] for p in pts], marker=marker, color=color, label=n, linewidth=1.8)
            ax_eff.plot(x, [p[2] for p in pts], marker=marker, color=color, label=n, linewidth=1.8)
        where = f"{shape}, {dtype}, {mode}" + (f", {ws} ranks" if ws > 1 else "")
        ax_lat.set(xscale="log", yscale="log", xlabel="tokens per rank", ylabel="latency (ms, median)",
                   title=f"latency: {where}")
        ax_eff.set(xscale="log", xlabel="tokens per rank", ylabel="roofline efficiency (%)",
                   title=f"efficiency: {where}")
        ax_eff.set_ylim(bottom=0)
        tokens = sorted({p[0] for pts in groups[(shape, dtype, mode, ws)].values() for p in pts})
        for ax in (ax_lat, ax_eff):
            ax.set_xticks(tokens, [str(t) for t in tokens])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
