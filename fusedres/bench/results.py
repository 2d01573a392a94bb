"""Result rows and what is done with them: speedups within the run, JSON/CSV/markdown, --compare.

A result document is the environment (`device`, `driver`, `torch`, `triton`, `cuda`, `commit`, `date`, …)
plus `rows`; every row carries ROW_KEYS (None where a value does not apply or the candidate failed, in which
case `error` says why) and may carry OPTIONAL_KEYS.
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

META_KEYS = ("device", "driver", "torch", "triton", "cuda", "commit", "date")
ROW_KEYS = ("level", "name", "mode", "impl", "dtype", "memory_format", "batch",
            "ms", "img_per_s", "gbps", "peak_mem_bytes")
OPTIONAL_KEYS = ("ms_min", "ms_max", "repeats", "iters", "shape", "bytes", "copy_gbps", "pct_of_copy",
                 "speedup", "peak_mem_ratio", "error")
MODES = ("train", "infer", "fwd", "bwd")
# Per level, which impls every other row of its group is compared with: speedup[key] = baseline ms / ms.
BASELINES = {
    "kernels": {"pytorch": ("pytorch",), "compile": ("pytorch+compile",)},
    "blocks": {"eager": ("eager",), "compile": ("compile",)},
    "models": {"eager": ("eager",), "compile": ("compile", "compile[max-autotune]")},
}
NO_SPEEDUP = ("copy",)  # the roofline is not a contender
GROUP_KEYS = ("level", "name", "mode", "dtype", "memory_format", "batch")


def make_row(level, name, mode, impl, dtype, memory_format, batch, measurement=None, **extra) -> dict:
    """A row with every ROW_KEY; the timing fields come from a timing.Measurement when one is given."""
    row = dict.fromkeys(ROW_KEYS)
    row.update(level=level, name=name, mode=mode, impl=impl, dtype=dtype, memory_format=memory_format,
               batch=batch)
    if measurement is not None:
        row["ms"] = measurement.ms
        row["peak_mem_bytes"] = measurement.peak_mem_bytes
        if measurement.samples_ms and measurement.error is None:
            row.update(ms_min=min(measurement.samples_ms), ms_max=max(measurement.samples_ms),
                       repeats=len(measurement.samples_ms), iters=measurement.iters)
        if measurement.error is not None:
            row["error"] = measurement.error
    row.update(extra)
    return row


def group_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in GROUP_KEYS)


def add_speedups(rows: list[dict], baselines: dict = BASELINES) -> list[dict]:
    """Set row['speedup'] = {baseline: baseline_ms / row_ms} against the baselines of the row's own group."""
    groups = defaultdict(list)
    for row in rows:
        groups[group_key(row)].append(row)
    for members in groups.values():
        level = members[0]["level"]
        for key, impls in baselines.get(level, {}).items():
            base = next((r for r in members if r["impl"] in impls and r.get("ms")), None)
            if base is None:
                continue
            for row in members:
                if row.get("ms") and row["impl"] not in NO_SPEEDUP:
                    row.setdefault("speedup", {})[key] = base["ms"] / row["ms"]
        add_memory_ratios(members)
    return rows


def add_memory_ratios(members: list[dict]) -> None:
    """row['peak_mem_ratio'] = {'eager': row peak / eager's peak} within one models or blocks group (below 1 =
    less memory than eager; e.g. the ResNet-1001 train rows)."""
    if members[0]["level"] not in ("models", "blocks"):
        return
    base = next((r for r in members if r["impl"] == "eager" and r.get("peak_mem_bytes")), None)
    if base is None:
        return
    for row in members:
        if row.get("peak_mem_bytes") is not None:
            row.setdefault("peak_mem_ratio", {})["eager"] = row["peak_mem_bytes"] / base["peak_mem_bytes"]


def document(meta: dict, rows: list[dict]) -> dict:
    doc = {k: meta.get(k) for k in META_KEYS}
    doc.update({k: v for k, v in meta.items() if k not in doc})
    doc["rows"] = rows
    return doc


def validate(doc: dict) -> list[str]:
    """What is wrong with a result document (empty when it follows the layout)."""
    problems = [f"missing top-level key {k!r}" for k in META_KEYS if k not in doc]
    rows = doc.get("rows")
    if not isinstance(rows, list):
        return problems + ["'rows' must be a list"]
    for i, row in enumerate(rows):
        problems += [f"row {i}: missing {k!r}" for k in ROW_KEYS if k not in row]
        if row.get("mode") not in MODES:
            problems.append(f"row {i}: mode {row.get('mode')!r} is not one of {MODES}")
        if row.get("level") == "count":  # modeled, never timed (fusedres.bench.count)
            if row.get("ms") is not None or (row.get("modeled_ms") is None and not row.get("error")):
                problems.append(f"row {i}: a count row needs modeled_ms (or an error) and no time")
        elif row.get("ms") is None and not row.get("error"):
            problems.append(f"row {i}: neither a time nor an error")
    return problems


def _clean(value):
    """JSON has no NaN or inf; such values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(doc: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(doc), indent=1) + "\n")
    return path


def load_json(path) -> dict:
    doc = json.loads(Path(path).read_text())
    problems = validate(doc)
    if problems:
        raise ValueError(f"{path} is not a fusedres-bench result: " + "; ".join(problems[:5]))
    return doc


def csv_columns(rows: list[dict]) -> list[str]:
    speedups = sorted({k for r in rows for k in (r.get("speedup") or {})})
    extra = sorted({k for r in rows for k in r} - set(ROW_KEYS) - set(OPTIONAL_KEYS))
    return (list(ROW_KEYS) + [k for k in OPTIONAL_KEYS if k != "speedup"]
            + [f"speedup_vs_{k}" for k in speedups] + extra)


def write_csv(rows: list[dict], path) -> Path:
    """One line per row; speedup is flattened to speedup_vs_<baseline>, lists are space-separated."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = csv_columns(rows)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            flat = {k: v for k, v in row.items() if k != "speedup"}
            for k, v in (row.get("speedup") or {}).items():
                flat[f"speedup_vs_{k}"] = v
            flat = {k: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in flat.items()}
            writer.writerow({k: "" if flat.get(k) is None else flat[k] for k in columns})
    return path


# ---------------------------------------------------------------- markdown
def markdown_table(headers: list[str], cells: list[list[str]], align: list[str] | None = None) -> str:
    """A GitHub markdown table; align holds 'l' or 'r' per column (default: left)."""
    align = align or ["l"] * len(headers)
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if a == "r" else v.ljust(w)
                                  for v, w, a in zip(values, widths, align)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                          for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), rule] + [line(c) for c in cells])


def fmt_num(value, digits: int = 3) -> str:
    """`digits` significant digits, no exponent for ordinary magnitudes; '' for None."""
    if value is None:
        return ""
    if value == 0:
        return "0"
    places = max(digits - 1 - int(math.floor(math.log10(abs(value)))), 0)
    return f"{value:,.{places}f}"


def fmt_ratio(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def fmt_mib(nbytes) -> str:
    return "" if nbytes is None else f"{nbytes / 2 ** 20:,.0f}"


def _time_cell(row) -> str:
    if row.get("error"):
        err = row["error"]
        return "error: " + (err if len(err) <= 60 else err[:57] + "...")
    return fmt_num(row.get("ms"))


_COLUMNS = {
    "kernels": [("kernel", "name", "l"), ("mode", "mode", "l"), ("impl", "impl", "l"), ("dtype", "dtype", "l"),
                ("format", "memory_format", "l"), ("batch", "batch", "r"), ("ms", _time_cell, "r"),
                ("GB/s", lambda r: fmt_num(r.get("gbps"), 4), "r"),
                ("% of copy", lambda r: fmt_num(r.get("pct_of_copy"), 3), "r"),
                ("vs PyTorch", lambda r: fmt_ratio((r.get("speedup") or {}).get("pytorch")), "r"),
                ("vs compile", lambda r: fmt_ratio((r.get("speedup") or {}).get("compile")), "r")],
    "blocks": [("block", "name", "l"), ("mode", "mode", "l"), ("impl", "impl", "l"), ("dtype", "dtype", "l"),
               ("format", "memory_format", "l"), ("batch", "batch", "r"), ("ms", _time_cell, "r"),
               ("vs eager", lambda r: fmt_ratio((r.get("speedup") or {}).get("eager")), "r"),
               ("vs compile", lambda r: fmt_ratio((r.get("speedup") or {}).get("compile")), "r"),
               ("peak MiB", lambda r: fmt_mib(r.get("peak_mem_bytes")), "r")],
    "models": [("model", "name", "l"), ("mode", "mode", "l"), ("impl", "impl", "l"), ("dtype", "dtype", "l"),
               ("format", "memory_format", "l"), ("batch", "batch", "r"), ("ms", _time_cell, "r"),
               ("img/s", lambda r: fmt_num(r.get("img_per_s"), 4), "r"),
               ("vs eager", lambda r: fmt_ratio((r.get("speedup") or {}).get("eager")), "r"),
               ("vs compile", lambda r: fmt_ratio((r.get("speedup") or {}).get("compile")), "r"),
               ("peak MiB", lambda r: fmt_mib(r.get("peak_mem_bytes")), "r"),
               ("mem vs eager", lambda r: fmt_ratio((r.get("peak_mem_ratio") or {}).get("eager")), "r")],
}


def level_table(rows: list[dict], level: str) -> str:
    columns = _COLUMNS[level]
    cells = []
    for row in rows:
        if row["level"] != level:
            continue
        cells.append([str(c(row)) if callable(c) else ("" if row.get(c) is None else str(row.get(c)))
                      for _, c, _ in columns])
    return markdown_table([h for h, _, _ in columns], cells, [a for _, _, a in columns])


def format_tables(rows: list[dict], meta: dict | None = None) -> str:
    """Markdown: a heading with the environment, then one table per level present in rows."""
    parts = []
    if meta:
        parts.append(f"fusedres-bench on {meta.get('device')} (driver {meta.get('driver')}, torch "
                     f"{meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}), commit "
                     f"{(meta.get('commit') or '?')[:12]}, {meta.get('date')}")
    notes = {"kernels": "fwd = training forward, bwd = its backward, infer = eval forward; vs PyTorch / vs "
                        "compile = ms of PyTorch's own sequence (eager / torch.compile) / ms; GB/s = bytes the "
                        "fused kernel must move / time (same bytes for every impl); % of copy = GB/s / a "
                        "device-to-device copy of the same tensor measured alongside.",
             "blocks": "fwd = training-mode forward, train = forward + backward, infer = eval forward.",
             "models": "train = one SGD step (forward, loss, backward, optimizer), infer = eval forward; "
                       "speedups against eager and torch.compile of the same dtype; peak MiB = memory a call "
                       "adds above the resident model and optimizer state; mem vs eager = peak MiB / eager's "
                       "(same dtype)."}
    for level in ("kernels", "blocks", "models"):
        if any(r["level"] == level for r in rows):
            parts.append(f"### {level}\n\n{notes[level]}\n\n{level_table(rows, level)}")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- --compare
ROW_ID = ("level", "name", "mode", "impl", "dtype", "memory_format", "batch")


def row_id(row: dict) -> tuple:
    return tuple(row.get(k) for k in ROW_ID)


def compare(old: dict, new: dict, threshold_pct: float | None = None) -> tuple[str, list[dict]]:
    """The change of every row present in both documents, as markdown, and the regressions.

    change = (new ms - old ms) / old ms in percent (positive = slower). A regression is a change above
    threshold_pct, or a row that had a time before and now fails; with no threshold nothing is a regression.
    """
    old_rows = {row_id(r): r for r in old["rows"]}
    new_rows = {row_id(r): r for r in new["rows"]}
    cells, changes = [], []
    for key, n in new_rows.items():
        o = old_rows.get(key)
        if o is None or o.get("ms") is None:
            continue
        if n.get("ms") is None:
            change = {"id": key, "old_ms": o["ms"], "new_ms": None, "change_pct": None, "failed": True}
        else:
            change = {"id": key, "old_ms": o["ms"], "new_ms": n["ms"],
                      "change_pct": (n["ms"] - o["ms"]) / o["ms"] * 100.0, "failed": False}
        change["regression"] = threshold_pct is not None and (
            change["failed"] or change["change_pct"] > threshold_pct)
        changes.append(change)
        cells.append([key[0], str(key[1]), key[2], key[3], str(key[4]), str(key[6]), fmt_num(o["ms"]),
                      "error" if change["failed"] else fmt_num(n["ms"]),
                      "" if change["failed"] else f"{change['change_pct']:+.1f}%",
                      "REGRESSION" if change["regression"] else ""])
    lines = []
    if old.get("device") != new.get("device"):
        lines.append(f"warning: comparing results from different devices ({old.get('device')} -> "
                     f"{new.get('device')}); changes say little")
    lines.append(markdown_table(["level", "name", "mode", "impl", "dtype", "batch", "old ms", "new ms",
                                 "change", ""], cells, ["l", "l", "l", "l", "l", "r", "r", "r", "r", "l"]))
    only_old = len(set(old_rows) - set(new_rows))
    only_new = len(set(new_rows) - set(old_rows))
    regressions = [c for c in changes if c["regression"]]
    summary = f"{len(changes)} rows compared, {only_new} new, {only_old} no longer measured"
    if threshold_pct is not None:
        summary += f"; {len(regressions)} slower by more than {threshold_pct:g}% (or now failing)"
    lines.append(summary)
    return "\n".join(lines) + "\n", regressions
