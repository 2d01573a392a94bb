"""PNG plots of a run: model speedups per impl, and kernel GB/s against the copy roofline.

matplotlib is optional (the GPU machine may lack it): without it the plots are skipped with a message.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_models(rows: list[dict], path, plt) -> Path | None:
    """Per mode, bars of speedup vs eager (same dtype) for each model and impl."""
    rows = [r for r in rows if r["level"] == "models" and (r.get("speedup") or {}).get("eager")
            and r["impl"] != "eager"]
    if not rows:
        return None
    modes = [m for m in ("train", "infer") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 4.2 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        sub = [r for r in rows if r["mode"] == mode]
        models = list(dict.fromkeys(r["name"] for r in sub))
        series = list(dict.fromkeys(f"{r['impl']} ({r['dtype']})" for r in sub))
        value = {(r["name"], f"{r['impl']} ({r['dtype']})"): r["speedup"]["eager"] for r in sub}
        width = 0.8 / max(len(series), 1)
        for i, s in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(models))]
            ax.bar(xs, [value.get((m, s), 0.0) for m in models], width, label=s)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=15)
        ax.set_ylabel("speedup vs eager (same dtype)")
        ax.set_title(f"{mode}: throughput relative to eager PyTorch")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_kernels(rows: list[dict], path, plt) -> Path | None:
    """Per mode, achieved GB/s of each impl per kernel, with the copy of the same tensor as a roofline mark."""
    rows = [r for r in rows if r["level"] == "kernels" and r.get("gbps")]
    if not rows:
        return None
    panels = list(dict.fromkeys((r["mode"], r["dtype"], r["memory_format"]) for r in rows))
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 4.5 * len(panels)), squeeze=False)
    for ax, (mode, dtype, fmt) in zip(axes[:, 0], panels):
        sub = [r for r in rows if (r["mode"], r["dtype"], r["memory_format"]) == (mode, dtype, fmt)]
        names = list(dict.fromkeys(r["name"] for r in sub))
        impls = [i for i in dict.fromkeys(r["impl"] for r in sub) if i != "copy"]
        value = {(r["name"], r["impl"]): r["gbps"] for r in sub}
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(names))]
            ax.bar(xs, [value.get((n, impl), 0.0) for n in names], width, label=impl)
        copies = [value.get((n, "copy")) for n in names]
        ax.scatter([j for j, c in enumerate(copies) if c], [c for c in copies if c], marker="_", s=900,
                   color="black", label="device copy (roofline)", zorder=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("GB/s (bytes the fused kernel must move)")
        ax.set_title(f"kernels, {mode}, {dtype}, {fmt}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_plots(rows: list[dict], stem_path: Path, log=print) -> list[Path]:
    """<stem>-models.png and <stem>-kernels.png for the levels present; [] with a message without matplotlib."""
    plt = _pyplot()
    if plt is None:
        log("matplotlib is not installed: plots skipped (pip install matplotlib to get them)")
        return []
    written = []
    by_kind = defaultdict(list)
    for r in rows:
        by_kind[r["level"]].append(r)
    for level, fn in (("models", plot_models), ("kernels", plot_kernels)):
        if by_kind.get(level):
            out = fn(by_kind[level], Path(f"{stem_path}-{level}.png"), plt)
            if out is not None:
                written.append(out)
    return written
