"""conv_bn_act: the Triton implicit-GEMM conv with fused prologue/epilogue against F.conv2d + the reference math
in float64 (forward, BN statistics, and gradients through aten.convolution_backward), per option combination,
geometry (1x1/3x3/7x7, stride 2, padding with prologue, groups, dilation, odd channels), layout and dtype.
Outputs are NaN-poisoned (conftest), so an element the kernel fails to write fails the comparison."""
import pytest
import torch
import torch.nn.functional as F

import fusedres
from fusedres.ops.conv_bn_act import conv_bn_act
from fusedres.reference import conv_bn_act_reference
from helpers import assert_close, double_leaf, leaf


@pytest.fixture(autouse=True)
def _on_device(on_test_device):
    pass

# name: which optional operands are present, and the flags
OPTIONS = {
    "raw": dict(),
    "stats": dict(stats=True),
    "bias": dict(out_shift=True),
    "bn_relu": dict(out_scale=True, out_shift=True, relu=True),
    "bn_add_relu": dict(out_scale=True, out_shift=True, residual=True, relu=True),
    "bn_projbn_relu": dict(out_scale=True, out_shift=True, residual=True, res_scale=True, res_shift=True,
                           relu=True),
    "prologue_stats": dict(in_scale=True, in_shift=True, in_relu=True, stats=True),
    "prologue_noact": dict(in_scale=True, in_shift=True),
    "everything": dict(in_scale=True, in_shift=True, in_relu=True, out_scale=True, out_shift=True,
                       residual=True, res_scale=True, res_shift=True, relu=True, stats=True),
}
# name: (N, C_in, H, W), C_out, kernel, stride, padding, dilation, groups
GEOMETRIES = {
    "3x3": ((2, 5, 7, 7), 6, 3, 1, 1, 1, 1),
    "stem7x7s2": ((2, 3, 9, 9), 8, 7, 2, 3, 1, 1),
    "1x1s2": ((2, 16, 6, 6), 12, 1, 2, 0, 1, 1),
    "3x3s2_groups": ((2, 6, 5, 5), 6, 3, 2, 1, 1, 3),
    "pad2_dil2": ((2, 4, 5, 6), 5, 3, 1, 2, 2, 1),
    "odd_17ch": ((1, 17, 4, 5), 19, 3, 1, 1, 1, 1),
    # 147 rows = 5 row tiles (the interpreter's GROUP_M=2 leaves a partial last group) x 3 column tiles
    "tiles": ((3, 16, 7, 7), 40, 3, 1, 1, 1, 1),
}
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 3e-2),
       torch.float64: (1e-10, 1e-10)}


def _close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def _inputs(geometry, option, dtype, channels_last, device=None):
    shape, c_out, k, stride, pad, dil, groups = GEOMETRIES[geometry]
    opts = OPTIONS[option]
    n, c_in, h, w = shape
    x = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    weight = (torch.randn(c_out, c_in // groups, k, k, dtype=torch.float64, device=device)
              / (c_in // groups * k * k) ** 0.5).to(dtype)
    oh = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
    ow = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
    vdtype = torch.float64 if dtype == torch.float64 else torch.float32  # BN parameters: fp32 (fp64 for fp64)
    vec = lambda c: torch.randn(c, device=device, dtype=vdtype)  # noqa: E731
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups, in_relu=opts.get("in_relu", False),
              relu=opts.get("relu", False), stats=opts.get("stats", False))
    tensors = dict(x=x, weight=weight)
    for name, c in (("in_scale", c_in), ("in_shift", c_in), ("out_scale", c_out), ("out_shift", c_out),
                    ("res_scale", c_out), ("res_shift", c_out)):
        if opts.get(name):
            tensors[name] = vec(c)
    if opts.get("residual"):
        tensors["residual"] = torch.randn(n, c_out, oh, ow, dtype=torch.float64, device=device).to(dtype)
    if channels_last:
        for name in ("x", "residual"):
            if name in tensors:
                tensors[name] = tensors[name].contiguous(memory_format=torch.channels_last)
    return tensors, kw


def _check(geometry, option, dtype, channels_last, backward=True, backend=None):
    tensors, kw = _inputs(geometry, option, dtype, channels_last)
    leaves = {k: leaf(v) for k, v in tensors.items()}
    with fusedres.use_backend(backend):
        out = conv_bn_act(**leaves, **kw, allow_tf32=False)
    y, mean, var = out if kw["stats"] else (out, None, None)
    dleaves = {k: double_leaf(v) for k, v in tensors.items()}
    yd, md, vd = conv_bn_act_reference(**dleaves, **kw)

    assert y.dtype == dtype and y.shape == yd.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    _close(y, yd, dtype, "y")
    if kw["stats"]:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert mean.dtype == acc and var.dtype == acc
        # statistics of the raw conv output, accumulated in fp32 from the fp32 accumulator
        _close(mean, md, torch.float32 if dtype == torch.float32 else dtype, "mean")
        _close(var, vd, torch.float32 if dtype == torch.float32 else dtype, "var")
    if not backward:
        return
    gy = torch.randn(yd.shape, dtype=torch.float64)
    loss = (y.double() * gy).sum()
    loss_d = (yd * gy).sum()
    if kw["stats"]:
        gm, gv = torch.randn_like(md), torch.randn_like(vd)
        loss = loss + (mean.double() * gm).sum() + (var.double() * gv).sum()
        loss_d = loss_d + (md * gm).sum() + (vd * gv).sum()
    loss.backward()
    loss_d.backward()
    for name in tensors:
        _close(leaves[name].grad, dleaves[name].grad, dtype, f"grad {name}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_option_fp32(option, channels_last):
    _check("3x3", option, torch.float32, channels_last)


@pytest.mark.parametrize("option", ["bn_add_relu", "prologue_stats", "everything"])
@pytest.mark.parametrize("geometry", [g for g in GEOMETRIES if g != "3x3"])
def test_geometries_fp32(geometry, option):
    _check(geometry, option, torch.float32, channels_last=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("geometry,option", [("3x3", "everything"), ("stem7x7s2", "bn_relu"),
                                             ("3x3s2_groups", "prologue_stats")])
def test_low_precision(geometry, option, dtype):
    _check(geometry, option, dtype, channels_last=True, backward=geometry == "3x3")


@pytest.mark.parametrize("option", ["prologue_stats", "everything"])
@pytest.mark.parametrize("geometry", ["3x3", "stem7x7s2", "3x3s2_groups", "pad2_dil2"])
def test_small_cin_channel_block_path(geometry, option, monkeypatch):
    """C_in/groups < 16 with a spatial filter takes the packed (flat kh, kw, c) reduction, which every test above
    with these geometries runs; the per-tap channel-block path it replaces stays correct (forced here)."""
    from fusedres.triton import conv_bn_act as tconv
    (n, c_in, h, w), c_out, k, stride, pad, dil, groups = GEOMETRIES[geometry]
    assert tconv.packed(c_in // groups, k, k)
    monkeypatch.setattr(tconv, "packed", lambda cin_g, kh, kw: False)
    _check(geometry, option, torch.float32, channels_last=True, backward=False)


def test_grouped_program_order_covers_every_tile():
    """Grouped (L2-swizzled) program order over 5 row tiles x 3 column tiles with a partial last group: every
    output element and every statistics partial is written once (outputs are NaN-poisoned)."""
    _check("tiles", "everything", torch.float32, channels_last=True)


def test_float64_and_forced_reference_backend():
    _check("3x3", "everything", torch.float64, channels_last=False)          # float64: reference backend
    _check("3x3s2_groups", "everything", torch.float32, True, backend="reference")


def test_matches_f_conv2d_and_tf32_flag():
    x = torch.randn(2, 5, 7, 7)
    w = torch.randn(6, 5, 3, 3)
    ref = F.conv2d(x.double(), w.double(), padding=1)
    for tf32 in (False, True):  # the interpreter computes fp32 either way; on a GPU tf32 is ~1e-3 relative
        y = conv_bn_act(x, w, padding=1, allow_tf32=tf32)
        assert_close(y, ref, torch.float32 if not tf32 else torch.float16, f"allow_tf32={tf32}")


def test_padding_after_prologue_contributes_zero():
    """A prologue with a large shift must not leak into padded positions (they are 0 after the prologue)."""
    x = torch.zeros(1, 2, 3, 3)
    w = torch.ones(1, 2, 3, 3)
    y = conv_bn_act(x, w, padding=1, in_shift=torch.full((2,), 5.0), in_relu=True, allow_tf32=False)
    counts = F.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3), padding=1)  # in-image taps per output
    torch.testing.assert_close(y, 2 * 5.0 * counts)


def test_statistics_deterministic_and_stable():
    x = torch.randn(2, 5, 7, 7).contiguous(memory_format=torch.channels_last) + 100.0  # |mean| >> std
    w = torch.randn(6, 5, 1, 1)
    _, m1, v1 = conv_bn_act(x, w, stats=True, allow_tf32=False)
    _, m2, v2 = conv_bn_act(x, w, stats=True, allow_tf32=False)
    assert torch.equal(m1, m2) and torch.equal(v1, v2)
    c = F.conv2d(x.double(), w.double())
    torch.testing.assert_close(v1.double(), c.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-3)


def test_int64_offsets(monkeypatch):
    from fusedres.triton import conv_bn_act as tconv
    monkeypatch.setattr(tconv, "INT64_INDEX_THRESHOLD", 0)
    _check("3x3s2_groups", "everything", torch.float32, True, backward=False)


@pytest.mark.parametrize("option", ["everything", "prologue_stats"])
def test_opcheck(option):
    tensors, kw = _inputs("3x3s2_groups", option, torch.float32, True)
    t = {k: v.requires_grad_() for k, v in tensors.items()}
    args = (t["x"], t["weight"], t.get("in_scale"), t.get("in_shift"), t.get("out_scale"), t.get("out_shift"),
            t.get("residual"), t.get("res_scale"), t.get("res_shift"), [kw["stride"]] * 2, [kw["padding"]] * 2,
            [1, 1], kw["groups"], kw["in_relu"], kw["relu"], kw["stats"], False)
    torch.library.opcheck(torch.ops.fusedres.conv_bn_act.default, args)


def test_compile_fullgraph():
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    s, b = torch.randn(6), torch.randn(6)
    fn = lambda x, w: conv_bn_act(x, w, padding=1, out_scale=s, out_shift=b, relu=True,  # noqa: E731
                                  allow_tf32=False)
    y = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, w)
    torch.testing.assert_close(y, fn(x, w))
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("bad", ["channels", "groups", "residual", "res_affine_without_residual", "vector"])
def test_errors(bad):
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    kwargs = {}
    if bad == "channels":
        w = torch.randn(6, 3, 3, 3)
    elif bad == "groups":
        kwargs["groups"] = 3
    elif bad == "residual":
        kwargs["residual"] = torch.randn(2, 6, 5, 5)
    elif bad == "res_affine_without_residual":
        kwargs["res_scale"] = torch.randn(6)
    else:
        kwargs["out_scale"] = torch.randn(5)
    with pytest.raises((ValueError, TypeError)):
        conv_bn_act(x, w, **kwargs)


# (C_in, C_out, kernel, stride, input size, epilogue) — ResNet-50 layers, batch 256 (GPU only: far too big for
# the interpreter)
RESNET50_LAYERS = [(3, 64, 7, 2, 224, "bn_relu"), (64, 64, 3, 1, 56, "bn_relu"), (128, 128, 3, 2, 56, "stats"),
                   (256, 1024, 1, 1, 14, "bn_add_relu"), (1024, 2048, 1, 2, 14, "proj"),
                   (512, 512, 3, 1, 7, "prologue_stats")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="ResNet-50 shapes at batch 256 need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layer", RESNET50_LAYERS, ids=lambda l: f"{l[0]}-{l[1]}-k{l[2]}s{l[3]}-{l[4]}-{l[5]}")
def test_resnet50_layers_batch256_gpu(layer, dtype):
    c_in, c_out, k, stride, size, kind = layer
    cl = torch.channels_last
    x = torch.randn(256, c_in, size, size, dtype=dtype).contiguous(memory_format=cl)
    w = (torch.randn(c_out, c_in, k, k) / (c_in * k * k) ** 0.5).to(dtype).contiguous(memory_format=cl)
    o = (size + 2 * (k // 2) - k) // stride + 1
    r = torch.randn(256, c_out, o, o, dtype=dtype).contiguous(memory_format=cl)
    s, b, s_r, b_r = torch.rand(c_out) + 0.5, torch.randn(c_out), torch.rand(c_out) + 0.5, torch.randn(c_out)
    s_in, b_in = torch.rand(c_in) + 0.5, torch.randn(c_in)
    kw = dict(stride=stride, padding=k // 2)
    if kind == "bn_relu":
        kw.update(out_scale=s, out_shift=b, relu=True)
    elif kind == "bn_add_relu":
        kw.update(out_scale=s, out_shift=b, residual=r, relu=True)
    elif kind == "proj":
        kw.update(out_scale=s, out_shift=b, residual=r, res_scale=s_r, res_shift=b_r, relu=True)
    elif kind == "prologue_stats":
        kw.update(in_scale=s_in, in_shift=b_in, in_relu=True, stats=True)
    else:
        kw.update(stats=True)
    out = conv_bn_act(x, w, **kw)
    y = out[0] if kw.get("stats") else out
    ref = conv_bn_act_reference(x, w, **kw)  # float32 conv (TF32 off) of the same rounded inputs
    _close(y, ref[0], dtype, "y")
    if kw.get("stats"):
        _close(out[1], ref[1], dtype, "mean")
        _close(out[2], ref[2], dtype, "var")


def test_config_tables():
    """Every GPU config keeps BLOCK_M a multiple of the statistics row group; the untuned heuristic fits the
    channel counts."""
    from fusedres.triton import conv_bn_act as tconv
    for configs in tconv.CONFIGS.values():
        for cfg in configs:
            assert cfg.kwargs["BLOCK_M"] % tconv.GPU_STAT_ROWS == 0
    assert tconv.INTERPRET_CONFIG["BLOCK_M"] % tconv.INTERPRET_STAT_ROWS == 0
    assert tconv.heuristic_config(3, 64)["BLOCK_K"] == 16
    assert tconv.heuristic_config(256, 512) == dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    assert tconv.heuristic_config(3, 64, 7, 7)["BLOCK_K"] == 32  # packed stem: 147 of 160 K lanes used


def test_autotune_key_and_pruning():
    """The tune key ignores the batch size; configs over the shared-memory or register budget, or wider than
    the channels, are pruned before timing, and at most TUNE_TOP_K remain."""
    from fusedres.triton import conv_bn_act as tconv
    flags = dict(KH=3, KW=3, PROLOGUE=True, STATS=True, STAT_ROWS=64, UPCAST=False)
    key = lambda n: tconv.tune_key(torch.bfloat16, n, 56, 56, 64, 64, 64, 3, 3, (1, 1), flags)  # noqa: E731
    assert key(256) == key(143) == key(1)
    assert key(256) != tconv.tune_key(torch.bfloat16, 256, 28, 28, 64, 64, 64, 3, 3, (1, 1), flags)
    cfgs = [tconv._cfg(128, 128, 64, 8, 3), tconv._cfg(128, 256, 64, 8, 3), tconv._cfg(128, 128, 32, 4, 4),
            tconv._cfg(64, 64, 64, 4, 4), tconv._cfg(64, 64, 32, 4, 4)]
    kept = lambda *a: [tconv.config_label(c.all_kwargs()) for c in tconv.prune_configs(cfgs, *a)]  # noqa: E731
    # 128x256 and 128x128 on 4 warps: accumulators of 128 and 128 registers per thread
    assert kept(2, 256, 256, 3, 3, 227 * 1024) == ["128x128x64", "64x64x64", "64x64x32"]
    assert kept(2, 256, 256, 3, 3, 90 * 1024) == ["64x64x64", "64x64x32"]     # 3 stages x 32 KB > 90 KB
    assert kept(2, 256, 64, 3, 3, 227 * 1024) == ["64x64x64", "64x64x32"]     # BLOCK_N 128 > C_out/g = 64
    assert kept(2, 8, 64, 1, 1, 227 * 1024) == []                             # BLOCK_K 32 > C_in/g = 8
    assert len(tconv.prune_configs(cfgs * 3, 2, 256, 256, 3, 3, 227 * 1024)) == tconv.TUNE_TOP_K


def test_autotune_disk_cache(tmp_path, monkeypatch):
    """A winner is timed once, written to the cache file under its GPU + Triton scope, and a fresh process
    (emptied memory) reads it back without timing."""
    import json
    from fusedres.triton import conv_bn_act as tconv
    monkeypatch.setenv("FUSEDRES_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tconv, "_WINNERS", {})
    monkeypatch.setattr(tconv, "_LOADED", set())
    timed = []
    cands = [dict(BLOCK_M=64, v=0), dict(BLOCK_M=128, v=1), dict(BLOCK_M=32, v=2)]
    bench = lambda fn: fn() or [3.0, 1.0, 2.0][timed[-1]]  # noqa: E731
    launch = lambda cfg: timed.append(cfg["v"])  # noqa: E731
    assert tconv._autotuned_config("k1", "GPU X|triton 9", cands, launch, bench) == cands[1]
    assert timed == [0, 1, 2]
    data = json.loads((tmp_path / "conv_autotune.json").read_text())
    assert data == {"GPU X|triton 9": {"k1": cands[1]}}
    monkeypatch.setattr(tconv, "_WINNERS", {})
    monkeypatch.setattr(tconv, "_LOADED", set())
    assert tconv._autotuned_config("k1", "GPU X|triton 9", cands, launch, bench) == cands[1]
    assert timed == [0, 1, 2]                                                  # no timing: read from disk
    assert tconv._autotuned_config("k1", "GPU Y|triton 9", cands, launch, bench) == cands[1]
    assert timed == [0, 1, 2, 0, 1, 2]                                         # another GPU: timed again


@pytest.mark.parametrize("n,hw,c_out,groups", [(2, 9, 6, 1), (3, 11, 37, 1), (1, 13, 20, 2)])
def test_statistics_merge_in_the_conv_matches_float64(n, hw, c_out, groups):
    """The statistics merge in the conv's last programs (chunks of rows, several row tiles per chunk, a short last
    chunk and a short last partial group; several column tiles; groups) against float64 statistics of the conv
    output, offset so a naive one-pass variance would lose digits; the counters are zero afterwards."""
    from fusedres._counters import _BUFFERS
    from fusedres.triton import conv_bn_act as tconv
    torch.manual_seed(n * hw + c_out)
    x = (torch.randn(n, 4 * groups, hw, hw) + 3).to(memory_format=torch.channels_last)
    w = torch.randn(c_out, 4, 3, 3)
    rows = n * hw * hw
    chunk = tconv.stat_chunk_rows(rows, True)
    assert rows > chunk > tconv.INTERPRET_CONFIG["BLOCK_M"] and rows % chunk and rows % tconv.INTERPRET_STAT_ROWS
    y, mean, var = conv_bn_act(x, w, padding=1, groups=groups, stats=True, allow_tf32=False)
    c = F.conv2d(x.double(), w.double(), padding=1, groups=groups)
    torch.testing.assert_close(mean.double(), c.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), c.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=0)
    assert all(int(b.count_nonzero()) == 0 for b in _BUFFERS.values())


def test_statistics_merge_plan_at_resnet50_shapes():
    """At batch 256 every ResNet-50 conv's statistics merge has at least 132 merging programs (an H100 / H200's
    SMs) even with the widest column tile, and chunk rows are a multiple of every config's BLOCK_M and of
    STAT_ROWS (a chunk is whole row tiles, so the merge does not depend on the config)."""
    from fusedres.triton import conv_bn_act as tconv
    block_ms = {c.kwargs["BLOCK_M"] for cs in tconv.CONFIGS.values() for c in cs}
    block_ms |= {tconv.heuristic_config(ci, co, k, k)["BLOCK_M"] for ci, co, k in ((3, 64, 7), (64, 64, 3), (256, 256, 1))}
    widest = max(c.kwargs["BLOCK_N"] for cs in tconv.CONFIGS.values() for c in cs)
    layers = [(112, 64)] + [(56, c) for c in (64, 256)] + [(28, c) for c in (128, 512)] \
        + [(14, c) for c in (256, 1024)] + [(7, c) for c in (512, 2048)]
    for hw, c_out in layers:
        rows = 256 * hw * hw
        chunk = tconv.stat_chunk_rows(rows, False)
        assert all(chunk % bm == 0 for bm in block_ms) and chunk % tconv.GPU_STAT_ROWS == 0
        assert -(-rows // chunk) * -(-c_out // widest) >= 132, (hw, c_out)
    assert tconv.INTERPRET_CONFIG["BLOCK_M"] % tconv.INTERPRET_STAT_ROWS == 0
    assert min(c.kwargs["BLOCK_N"] for cs in tconv.CONFIGS.values() for c in cs) >= tconv.MIN_BLOCK_N
    assert tconv.INTERPRET_CONFIG["BLOCK_N"] >= tconv.MIN_BLOCK_N


def _bn_relu_conv(x, w, gamma, beta, stats, geometry_kw, fused):
    """relu(BatchNorm(x)) -> conv: fused (BatchNorm prologue with x's batch statistics `stats`) or stock ops."""
    if fused:
        return conv_bn_act(x, w, in_stats=stats, in_weight=gamma, in_bias=beta, in_eps=1e-5, in_relu=True,
                           allow_tf32=False, **geometry_kw)
    a = torch.relu(F.batch_norm(x, None, None, gamma.to(x.dtype), beta.to(x.dtype), True, 0.0, 1e-5))
    return F.conv2d(a, w, None, **geometry_kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geometry", ["3x3", "1x1s2", "3x3s2_groups"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bn_prologue_backward_like_stock(dtype, geometry, channels_last):
    """A BatchNorm + ReLU prologue with batch statistics given (as the previous conv's epilogue emits them): y and
    every gradient (x's through the statistics) within 2x stock PyTorch's own error against float64 (plus a
    few float32 ulps)."""
    shape, c_out, k, stride, pad, dil, groups = GEOMETRIES[geometry]
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, shape[1] // groups, k, k, dtype=torch.float64) / (shape[1] // groups * k * k) ** 0.5
    gamma, beta = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    gy = torch.randn(F.conv2d(x, w, None, **kw).shape, dtype=torch.float64)
    vdtype = torch.float64 if dtype == torch.float64 else torch.float32

    def run(dt, fused):
        leaves = [t.to(d).detach().requires_grad_() for t, d in ((x, dt), (w, dt), (gamma, vdtype), (beta, vdtype))]
        xl = leaves[0]
        var, mean = torch.var_mean(xl.detach().to(vdtype), dim=(0, 2, 3), unbiased=False)
        y = _bn_relu_conv(*leaves, (mean, var), kw, fused)
        (y.double() * gy).sum().backward()
        return [y] + [t.grad for t in leaves]

    exact = run(torch.float64, False)
    stock, ours = run(dtype, False), run(dtype, True)
    for name, e, s, o in zip(("y", "grad x", "grad w", "grad gamma", "grad beta"), exact, stock, ours):
        scale = e.abs().max().item()
        err_stock = (s.double() - e).abs().max().item() / scale
        err_ours = (o.double() - e).abs().max().item() / scale
        # floor: a few float32 ulps of the largest value (summation order of float32 reductions differs)
        floor = 1e-12 if dtype == torch.float64 else 4 * torch.finfo(torch.float32).eps
        assert err_ours <= 2 * err_stock + floor, f"{name}: error {err_ours:.2e} vs stock {err_stock:.2e}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bn_prologue_given_params_match_formed(channels_last):
    """The prologue's x * in_scale + in_shift form given with the statistics (conv mode passes the finalize
    launch's `fusedres::bn_finalize(centred=True)` output) computes what the op forms itself: y and every
    gradient, with no gradient of their own."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 5) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 6, 3, 3) / 7
    gamma, beta = torch.rand(6) + 0.5, torch.randn(6)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    scale, shift = torch.ops.fusedres.bn_finalize(x, mean, var, gamma, beta, 1e-5, None, None, None, 0.0, True)
    gy = torch.randn(2, 4, 5, 5)
    outs = []
    for params in ({}, dict(in_scale=scale, in_shift=shift)):
        leaves = [t.clone().requires_grad_() for t in (x, w, gamma, beta)]
        y = conv_bn_act(leaves[0], leaves[1], padding=1, in_stats=(mean, var), in_weight=leaves[2],
                        in_bias=leaves[3], in_eps=1e-5, in_relu=True, allow_tf32=False, **params)
        (y * gy).sum().backward()
        outs.append([y] + [t.grad for t in leaves])
    for name, a, b in zip(("y", "grad x", "grad w", "grad gamma", "grad beta"), *outs):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=2e-6, msg=name)


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_stats=(torch.zeros(4),)), "in_stats must be a \\(mean, var\\) pair"),
    (dict(in_stats=(torch.zeros(4), torch.ones(3))), "in_var has shape"),
    (dict(in_stats=(torch.zeros(4), torch.ones(4)), in_scale=torch.ones(4)), "if given, both"),
    (dict(in_stats=(torch.zeros(4), torch.ones(4)), in_scale=torch.ones(4, requires_grad=True),
          in_shift=torch.zeros(4)), "no gradient of their own"),
    (dict(in_weight=torch.ones(4)), "need in_mean and in_var"),
    (dict(in_stats=(torch.zeros(4), torch.ones(4)), in_eps=0.0), "in_eps must be positive"),
], ids=["not_a_pair", "var_channels", "half_given_params", "params_with_grad", "weight_without_stats", "eps"])
def test_bn_prologue_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        conv_bn_act(torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3), in_relu=True, **kwargs)


def test_stats_bn_act_errors():
    from fusedres.ops.stats_bn_act import stats_bn_act
    x, m, v = torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="residual or a second input xb, not both"):
        stats_bn_act(x, m, v, residual=x, xb=x, stats_b=(m, v))
    with pytest.raises(ValueError, match="needs mean_b and var_b"):
        stats_bn_act(x, m, v, xb=x)
    with pytest.raises(ValueError, match="mean \\(the batch statistics of x\\)"):
        stats_bn_act(x, None, v)
    with pytest.raises(ValueError, match="residual_weight was given without a residual"):
        stats_bn_act(x, m, v, residual_weight=torch.ones(3))
