"""The main job where no GPU is present: does the fused ResNet compute what stock torchvision computes?

A torchvision model (random weights) and its `fusedres.convert` copy run the same tiny batch through one
training step (output, input and parameter gradients, running statistics afterwards) and one eval forward, on
every fusedres backend that accepts the input (on CPU the Triton kernels run in Triton's interpreter), in
float64 and float32. It measures agreement only; it never reports a time.

float64 is the sharp test of the semantics. In float32 a pre-activation within rounding of 0 can fall on
either side of a ReLU, which moves a whole channel's gradient sum when channels have few values (as on a tiny
input), and BatchNorm over a handful of values per channel (layer4 of a tiny input) is ill-conditioned; so a
float32 difference beyond tolerance still passes when the fused result's error against float64 stock is within
FLOAT32_FACTOR times float32 stock's own (verdict 'ok*').
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fusedres.bench.common import convert_model, describe_error, ensure_interpreter, force_backend
from fusedres.bench.results import markdown_table

TOLERANCE = {"float64": 1e-9, "float32": 1e-3}
QUANTITIES = (("train", "output"), ("train", "input grad"), ("train", "param grads"),
              ("train", "running stats"), ("train", "num_batches_tracked"), ("eval", "output"))
FLOAT32_FACTOR = 4.0
NOTE = (f"ok* = fused float32 differs from stock float32 beyond tolerance, but its error against float64 is "
        f"within {FLOAT32_FACTOR:g}x stock float32's own: float32 itself is the limit here (a pre-activation at "
        "a ReLU kink rounding to the other side, or BatchNorm over very few values per channel).")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|): the error relative to the tensor's own scale."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0, 0.0
    abs_diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return abs_diff, abs_diff / scale if scale > 0 else (0.0 if abs_diff == 0 else float("inf"))


def collect(model, x, labels, backend: str | None) -> dict:
    """What one training step and one eval forward produce: {(mode, quantity): tensor or {name: tensor}}."""
    model.train()
    xg = x.clone().requires_grad_(True)
    with force_backend(backend):
        out = model(xg)
        F.cross_entropy(out, labels).backward()
    buffers = dict(model.named_buffers())
    got = {("train", "output"): out.detach(), ("train", "input grad"): xg.grad,
           ("train", "param grads"): {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
           ("train", "running stats"): {n: b for n, b in buffers.items() if b.is_floating_point()},
           ("train", "num_batches_tracked"): {n: b for n, b in buffers.items() if not b.is_floating_point()}}
    model.eval()
    with torch.no_grad(), force_backend(backend):
        got[("eval", "output")] = model(x)
    return got


def diff(a: dict, b: dict) -> dict:
    """Per quantity (max_abs, max_rel, tensors compared, names only one side has): worst tensor of a group."""
    out = {}
    for key in QUANTITIES:
        va, vb = a[key], b[key]
        if isinstance(va, torch.Tensor):
            out[key] = (*max_diff(va, vb), 1, [])
            continue
        names = [n for n in vb if n in va]
        diffs = [max_diff(va[n], vb[n]) for n in names]
        out[key] = (max((d[0] for d in diffs), default=0.0), max((d[1] for d in diffs), default=0.0), len(names),
                    sorted(set(va) ^ set(vb)))
    return out


def verdict(rel: float, tol: float, rel_fused_truth: float | None = None,
            rel_stock_truth: float | None = None) -> str:
    if rel <= tol:
        return "ok"
    if rel_fused_truth is not None and rel_fused_truth <= max(tol, FLOAT32_FACTOR * (rel_stock_truth or 0.0)):
        return "ok*"
    return "MISMATCH"


def run_demo(model_name: str = "resnet18", size=(2, 3, 64, 64), backends=None, convert=None, build=None,
             device=None, dtypes=(torch.float64, torch.float32), seed: int = 0, log=print) -> dict:
    """Compare stock vs fused on every accepted backend (or `backends`) in each dtype.

    Returns {'ok', 'rows', 'errors', ...}; ok when no row is a MISMATCH and no backend failed.
    build(model_name) makes the stock model (default: torchvision, random weights, 10 classes);
    convert(model) fuses it (default: fusedres.convert).
    """
    interpreting = ensure_interpreter()
    import fusedres

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if build is None:
        from fusedres.bench.models import build_model

        def build(name):
            return build_model(name, num_classes=10)
    torch.manual_seed(seed)
    base = build(model_name).to(device=device)
    x = torch.randn(*size, device=device)
    labels = torch.randint(0, 10, (size[0],), device=device)
    rows, errors, all_names, truth = [], [], [], None
    for dtype in sorted(dtypes, key=lambda d: d != torch.float64):
        dname = str(dtype).replace("torch.", "")
        tol = TOLERANCE.get(dname, 1e-2)
        probe = torch.empty(size[0], 8, 4, 4, device=device, dtype=dtype)
        names = list(backends) if backends is not None else fusedres.available_backends(probe)
        all_names += [n for n in names if n not in all_names]
        typed = copy.deepcopy(base).to(dtype)
        stock = collect(copy.deepcopy(typed), x.to(dtype), labels, None)
        if dtype == torch.float64:
            truth = stock
        stock_vs_truth = diff(stock, truth) if truth is not None and truth is not stock else None
        for name in names:
            try:
                fused = collect(convert_model(copy.deepcopy(typed), convert), x.to(dtype), labels, name)
            except Exception as exc:  # report the backend that fails, keep checking the others
                errors.append(dict(backend=name, dtype=dname, error=describe_error(exc, 500)))
                continue
            d = diff(fused, stock)
            d_truth = diff(fused, truth) if stock_vs_truth is not None else None
            for key in QUANTITIES:
                max_abs, max_rel, count, unmatched = d[key]
                row = dict(backend=name, dtype=dname, mode=key[0], quantity=key[1], count=count, max_abs=max_abs,
                           max_rel=max_rel, unmatched=unmatched)
                if d_truth is not None:
                    row.update(fused_vs_float64=d_truth[key][1], stock_vs_float64=stock_vs_truth[key][1])
                row["verdict"] = "MISMATCH" if unmatched else verdict(
                    max_rel, tol, row.get("fused_vs_float64"), row.get("stock_vs_float64"))
                rows.append(row)
    ok = not errors and bool(rows) and all(r["verdict"] != "MISMATCH" for r in rows)

    def e(v):
        return "" if v is None else f"{v:.2e}"

    log(f"fusedres demo: {model_name} (random weights) vs fusedres.convert of it, input {tuple(size)} on "
        f"{device}, one training step and one eval forward; backends: {', '.join(all_names)}"
        + ("; Triton runs in its interpreter (TRITON_INTERPRET=1)" if device.type == "cpu" and interpreting
           else ""))
    cells = [[r["backend"], r["dtype"], r["mode"], r["quantity"], str(r["count"]), e(r["max_abs"]),
              e(r["max_rel"]), e(r.get("fused_vs_float64")), e(r.get("stock_vs_float64")), r["verdict"]]
             for r in rows]
    log("")
    log(markdown_table(["backend", "dtype", "mode", "compared", "tensors", "max abs diff", "max rel diff",
                        "fused vs f64", "stock vs f64", "verdict"], cells, ["l"] * 4 + ["r"] * 5 + ["l"]))
    log("max rel diff = max |fused - stock| / max |stock| per tensor (worst tensor of a group); stock = "
        "torchvision with nn.BatchNorm2d; 'vs f64' = the same against stock float64; tolerance "
        + ", ".join(f"{k} {TOLERANCE.get(k, 1e-2):g}" for k in dict.fromkeys(r["dtype"] for r in rows)) + ".")
    if any(r["verdict"] == "ok*" for r in rows):
        log(NOTE)
    for r in rows:
        if r["unmatched"]:
            log(f"backend {r['backend']}: names only one model has: {', '.join(r['unmatched'][:8])}")
    for err in errors:
        log(f"backend {err['backend']} ({err['dtype']}): FAILED: {err['error']}")
    log(f"agreement: {'every comparison passes' if ok else 'NOT within tolerance (see above)'} "
        f"({len(rows)} comparisons, {len(errors)} backend failures)")
    return dict(ok=ok, rows=rows, errors=errors, model=model_name, size=list(size), device=str(device),
                backends=all_names, tolerance={k: TOLERANCE.get(k, 1e-2) for k in dict.fromkeys(
                    r["dtype"] for r in rows)})
