"""Strict input validation across the public API: every bad input below raises our own exception type with a
message that names the argument and what was expected — before any kernel runs and before any running
statistic or num_batches_tracked of a module changes. One table, one test; each row is
(builder, exception type, regex). A builder takes the test device and returns (call, watched): the call must
raise; `watched` (a module, or None) must keep every tensor of its state_dict bit for bit.
"""
import pytest
import torch
from torch import nn

import fusedres
from fusedres.backends import BackendUnavailable
from fusedres.nn import BatchNormAct2d

C = 3


def _x(d, *shape, dtype=torch.float32):
    return torch.randn(shape or (2, C, 4, 4), device=d, dtype=dtype)


def _vecs(d, c=C):
    """weight, bias, running_mean, running_var."""
    return (torch.rand(c, device=d) + 0.5, torch.randn(c, device=d), torch.zeros(c, device=d),
            torch.ones(c, device=d))


def _other_device(d):
    """A second device for device-mismatch cases: "meta" (no data; our check must fire before any use)."""
    return "meta"


def bn(d, x=None, training=True, **kw):
    """fusedres.bn_act with good defaults, any of them overridden."""
    w, b, rm, rv = _vecs(d)
    args = dict(running_mean=rm, running_var=rv, weight=w, bias=b, training=training)
    args.update(kw)
    return lambda: fusedres.bn_act(_x(d) if x is None else x, **args), None


def dual(d, r=None, **kw):
    (w, b, rm, rv), (wr, br, rmr, rvr) = _vecs(d), _vecs(d)
    args = dict(weight=w, bias=b, running_mean=rm, running_var=rv, weight_r=wr, bias_r=br, running_mean_r=rmr,
                running_var_r=rvr, training=True)
    args.update(kw)
    return lambda: fusedres.dual_bn_act(_x(d), _x(d) if r is None else r, **args), None


def ssa(d, **kw):
    m, s, t, _ = _vecs(d)
    args = dict(mean=m, scale=s, shift=t)
    args.update(kw)
    return lambda: fusedres.scale_shift_act(_x(d), **args), None


def conv(d, x=None, w=None, **kw):
    x = _x(d) if x is None else x
    w = torch.randn(4, C, 3, 3, device=d) if w is None else w
    kw.setdefault("padding", 1)
    return lambda: fusedres.conv_bn_act(x, w, **kw), None


def module_call(d, x=None, residual=None, **kw):
    """A training BatchNormAct2d(3) called on a bad input: its running statistics and num_batches_tracked must
    not change."""
    m = BatchNormAct2d(C, **kw).to(d).train()
    x = _x(d) if x is None else x
    return lambda: m(x, residual), m


def conv_mode_block_one_value(d):
    """A conv-mode BasicBlock training on 1 value per channel: stock BatchNorm2d refuses it (var would be 0
    and the unbiased running variance inf)."""
    from torchvision.models.resnet import BasicBlock as TvBasic

    block = fusedres.convert(TvBasic(C, C), mode="conv").to(d).train()
    x = _x(d, 1, C, 1, 1)
    return lambda: block(x), block


def folded_conv(d, training, dtype=torch.float32):
    from fusedres.nn.conv import FoldedConv2d

    c = nn.Conv2d(C, 4, 3, padding=1, bias=False).to(d)
    b = nn.BatchNorm2d(4).to(d).eval()
    f = FoldedConv2d.from_conv_bn(c, b, True).train(training)
    x = _x(d, dtype=dtype)
    return lambda: f(x), None


def forced(d, name, fn):
    def call():
        with fusedres.use_backend(name):
            fn()
    return call, None


def plain(fn):
    return lambda d: (lambda: fn(d), None)


TYPE, VALUE = TypeError, ValueError
CASES = [
    # ---------------------------------------------------------------- fusedres.bn_act
    ("bn_int_dtype", lambda d: bn(d, x=_x(d).int()), TYPE, r"x has dtype torch\.int32; supported: float32"),
    ("bn_complex_dtype", lambda d: bn(d, x=_x(d).to(torch.complex64)), TYPE, r"x has dtype torch\.complex64"),
    ("bn_bool_dtype", lambda d: bn(d, x=_x(d) > 0), TYPE, r"x has dtype torch\.bool"),
    ("bn_rank3", lambda d: bn(d, x=_x(d)[0]), VALUE, r"x must be 4-D \[N, C, H, W\].*got 3-D"),
    ("bn_rank5", lambda d: bn(d, x=_x(d)[None]), VALUE, r"x must be 4-D .*got 5-D"),
    ("bn_x_not_tensor", lambda d: bn(d, x=[[1.0]]), TYPE, r"x must be a torch\.Tensor, got list"),
    ("bn_zero_channels", lambda d: bn(d, x=_x(d, 2, 0, 4, 4), weight=None, bias=None, running_mean=None,
                                      running_var=None), VALUE, r"x has 0 channels .*expected C >= 1"),
    ("bn_weight_channels", lambda d: bn(d, weight=torch.ones(4, device=d)), VALUE,
     r"weight \(of x\) has shape \(4,\) but the input has 3 channels \(expected shape \(3,\)\)"),
    ("bn_bias_2d", lambda d: bn(d, bias=torch.zeros(1, C, device=d)), VALUE,
     r"bias \(of x\) has shape \(1, 3\) but .*expected shape \(3,\)"),
    ("bn_weight_not_tensor", lambda d: bn(d, weight=[1.0] * C), TYPE,
     r"weight \(of x\) must be a torch\.Tensor or None, got list"),
    ("bn_weight_int", lambda d: bn(d, weight=torch.ones(C, dtype=torch.long, device=d)), TYPE,
     r"weight \(of x\) must be a floating tensor, got torch\.int64"),
    ("bn_running_mean_channels", lambda d: bn(d, running_mean=torch.zeros(5, device=d)), VALUE,
     r"running_mean \(of x\) has shape \(5,\) but the input has 3 channels"),
    ("bn_running_var_int", lambda d: bn(d, running_var=torch.ones(C, dtype=torch.long, device=d)), TYPE,
     r"running_var \(of x\) must be a floating tensor"),
    ("bn_running_var_missing", lambda d: bn(d, running_var=None), VALUE,
     r"running_mean and running_var must both be tensors or both be None"),
    ("bn_eval_without_stats", lambda d: bn(d, training=False, running_mean=None, running_var=None), VALUE,
     r"training=False needs running_mean and running_var"),
    ("bn_residual_shape", lambda d: bn(d, residual=_x(d, 2, C, 4, 3)), VALUE,
     r"residual shape \(2, 3, 4, 3\) does not match x shape \(2, 3, 4, 4\)"),
    ("bn_residual_dtype", lambda d: bn(d, residual=_x(d).half()), TYPE,
     r"residual dtype torch\.float16 does not match x dtype torch\.float32"),
    ("bn_residual_device", lambda d: bn(d, residual=torch.empty(2, C, 4, 4, device=_other_device(d))), VALUE,
     r"residual is on meta but x is on"),
    ("bn_weight_device", lambda d: bn(d, weight=torch.ones(C, device=_other_device(d))), VALUE,
     r"weight \(of x\) is on meta but the input is on"),
    ("bn_x_device", lambda d: bn(d, x=torch.empty(2, C, 4, 4, device=_other_device(d))), VALUE,
     r"weight \(of x\) is on \w+.* but the input is on meta"),
    ("bn_one_value_per_channel", lambda d: bn(d, x=_x(d, 1, C, 1, 1)), VALUE,
     r"expected more than 1 value per channel when training, got x of shape \(1, 3, 1, 1\)"),
    ("bn_eps_zero_training", lambda d: bn(d, eps=0.0), VALUE, r"eps must be positive when training.*got 0\.0"),
    ("bn_eps_negative_eval", lambda d: bn(d, training=False, eps=-1e-5), VALUE, r"eps must be non-negative"),
    ("bn_eps_not_number", lambda d: bn(d, eps="1e-5"), TYPE, r"eps must be a real number, got str"),
    ("bn_momentum_none", lambda d: bn(d, momentum=None), VALUE,
     r"momentum=None \(cumulative moving average\) needs num_batches_tracked"),
    ("bn_momentum_str", lambda d: bn(d, momentum="0.1"), TYPE, r"momentum must be a real number, got str"),
    ("bn_training_not_bool", lambda d: bn(d, training="no"), TYPE, r"training must be a bool, got str"),
    ("bn_relu_not_bool", lambda d: bn(d, relu=1), TYPE, r"relu must be a bool, got int"),
    # ---------------------------------------------------------------- fusedres.dual_bn_act
    ("dual_r_shape", lambda d: dual(d, r=_x(d, 2, C, 2, 4)), VALUE, r"r \(the shortcut input\) shape"),
    ("dual_r_dtype", lambda d: dual(d, r=_x(d).double()), TYPE, r"r \(the shortcut input\) dtype torch\.float64"),
    ("dual_weight_r_channels", lambda d: dual(d, weight_r=torch.ones(5, device=d)), VALUE,
     r"weight_r \(of r\) has shape \(5,\) but the input has 3 channels"),
    ("dual_eval_without_r_stats", lambda d: dual(d, training=False, running_mean_r=None, running_var_r=None),
     VALUE, r"training=False needs running_mean_r and running_var_r"),
    ("dual_eps_r_zero", lambda d: dual(d, eps_r=0.0), VALUE, r"eps_r must be positive when training"),
    # ---------------------------------------------------------------- fusedres.scale_shift_act
    ("ssa_mean_missing", lambda d: ssa(d, mean=None), VALUE, r"scale_shift_act needs mean"),
    ("ssa_scale_channels", lambda d: ssa(d, scale=torch.ones(5, device=d)), VALUE,
     r"scale has shape \(5,\) but the input has 3 channels"),
    ("ssa_residual_and_xb", lambda d: ssa(d, residual=_x(d), xb=_x(d)), VALUE,
     r"takes a residual or a second input xb, not both"),
    ("ssa_xb_without_vectors", lambda d: ssa(d, xb=_x(d)), VALUE, r"scale_shift_act with xb needs scale_b"),
    ("ssa_xb_mean_without_shift", lambda d: ssa(d, xb=_x(d), mean_b=torch.ones(C, device=d),
                                                scale_b=torch.ones(C, device=d)), VALUE,
     r"needs mean_b and shift_b both, or neither"),
    ("ssa_vectors_without_xb", lambda d: ssa(d, scale_b=torch.ones(C, device=d)), VALUE,
     r"mean_b / scale_b / shift_b without xb"),
    ("ssa_relu_not_bool", lambda d: ssa(d, relu="yes"), TYPE, r"relu must be a bool"),
    # ---------------------------------------------------------------- fusedres.conv_bn_act
    ("conv_x_int", lambda d: conv(d, x=_x(d).long()), TYPE, r"x has dtype torch\.int64"),
    ("conv_weight_not_tensor", lambda d: conv(d, w=[[1.0]]), TYPE, r"conv weight must be a torch\.Tensor"),
    ("conv_weight_rank", lambda d: conv(d, w=torch.randn(4, C, 3, device=d)), VALUE,
     r"conv weight must be a 4-D tensor \[C_out, C_in/groups, KH, KW\]"),
    ("conv_weight_int", lambda d: conv(d, w=torch.ones(4, C, 3, 3, dtype=torch.int32, device=d)), TYPE,
     r"weight must be floating, got torch\.int32"),
    ("conv_weight_device", lambda d: conv(d, w=torch.empty(4, C, 3, 3, device=_other_device(d))), VALUE,
     r"weight is on meta but x is on"),
    ("conv_in_channels", lambda d: conv(d, w=torch.randn(4, 2, 3, 3, device=d)), VALUE,
     r"x has 3 channels, weight \(4, 2, 3, 3\), groups=1: need C_in == weight\.shape\[1\] \* groups"),
    ("conv_groups_mismatch", lambda d: conv(d, w=torch.randn(4, 1, 3, 3, device=d), groups=2), VALUE,
     r"groups=2: need C_in == weight\.shape\[1\] \* groups and C_out % groups == 0"),
    ("conv_groups_not_int", lambda d: conv(d, groups=1.0), TYPE, r"groups must be an int, got float"),
    ("conv_stride_zero", lambda d: conv(d, stride=0), VALUE, r"stride must be >= 1, got \[0, 0\]"),
    ("conv_dilation_zero", lambda d: conv(d, dilation=(1, 0)), VALUE, r"dilation must be >= 1, got \[1, 0\]"),
    ("conv_padding_negative", lambda d: conv(d, padding=-1), VALUE, r"padding must be >= 0, got \[-1, -1\]"),
    ("conv_padding_string", lambda d: conv(d, padding="same"), TYPE,
     r"padding must be an int or a pair of ints, got 'same'"),
    ("conv_stride_float", lambda d: conv(d, stride=1.5), TYPE, r"stride must be an int or a pair of ints"),
    ("conv_stride_three_values", lambda d: conv(d, stride=(1, 1, 1)), VALUE,
     r"stride must be an int or a pair of ints, got 3 values"),
    ("conv_empty_output", lambda d: conv(d, w=torch.randn(4, C, 7, 7, device=d), padding=0), VALUE,
     r"conv output would be empty"),
    ("conv_out_scale_channels", lambda d: conv(d, out_scale=torch.ones(C, device=d)), VALUE,
     r"out_scale has shape \(3,\) but the input has 4 channels"),
    ("conv_in_shift_channels", lambda d: conv(d, in_shift=torch.ones(4, device=d)), VALUE,
     r"in_shift has shape \(4,\) but the input has 3 channels"),
    ("conv_residual_shape", lambda d: conv(d, residual=_x(d)), VALUE,
     r"residual shape \(2, 3, 4, 4\) != conv output shape \(2, 4, 4, 4\)"),
    ("conv_res_scale_without_residual", lambda d: conv(d, res_scale=torch.ones(4, device=d)), VALUE,
     r"res_scale / res_shift given without a residual"),
    ("conv_in_relu_without_prologue", lambda d: conv(d, in_relu=True), VALUE,
     r"in_relu=True needs a prologue \(in_scale and/or in_shift, or in_mean and in_var\)"),
    ("conv_stats_not_bool", lambda d: conv(d, stats="yes"), TYPE, r"stats must be a bool"),
    # ---------------------------------------------------------------- torch.ops.fusedres.* called directly
    ("op_bn_act_train_weight_channels", plain(lambda d: torch.ops.fusedres.bn_act_train(
        _x(d), torch.ones(4, device=d), None, None, *_vecs(d), 1e-5, False)), VALUE,
     r"weight \(of x\) has shape \(4,\)"),
    ("op_bn_stats_running_channels", plain(lambda d: torch.ops.fusedres.bn_stats(
        _x(d), None, None, torch.zeros(4, device=d), torch.ones(4, device=d), None, 0.1, 1e-5)), VALUE,
     r"running_mean \(of x\) has shape \(4,\)"),
    ("op_bn_act_eval_residual_dtype", plain(lambda d: torch.ops.fusedres.bn_act_eval(
        _x(d), None, None, _x(d).double(), *_vecs(d)[2:], 1e-5, True)), TYPE, r"residual dtype torch\.float64"),
    ("op_bn_act_backward_grad_shape", plain(lambda d: torch.ops.fusedres.bn_act_backward(
        _x(d, 2, C, 4, 2), _x(d), None, None, None, *_vecs(d), 1e-5, True, True, False)), VALUE,
     r"grad_y shape \(2, 3, 4, 2\) does not match x shape"),
    ("op_dual_bn_act_train_r_device", plain(lambda d: torch.ops.fusedres.dual_bn_act_train(
        _x(d), None, None, *_vecs(d), 1e-5, torch.empty(2, C, 4, 4, device="meta"), None, None, *_vecs(d), 1e-5,
        True)), VALUE,
     r"r \(the shortcut input\) is on meta"),
    ("op_scale_shift_act_xb_dtype", plain(lambda d: torch.ops.fusedres.scale_shift_act(
        _x(d), *_vecs(d)[:3], None, _x(d).half(), *_vecs(d)[:3], True)), TYPE, r"xb dtype torch\.float16"),
    ("op_conv_bn_act_padding_negative", plain(lambda d: torch.ops.fusedres.conv_bn_act(
        _x(d), torch.randn(4, C, 3, 3, device=d), None, None, None, None, None, None, None, [1, 1], [-2, 1],
        [1, 1], 1, False, False, False, False)), VALUE, r"padding must be >= 0, got \[-2, 1\]"),
    # ---------------------------------------------------------------- modules (state must stay untouched)
    ("module_bad_activation", plain(lambda d: BatchNormAct2d(C, act="gelu")), VALUE,
     r"unsupported activation 'gelu'; choose one of \(None, 'relu'\)"),
    ("module_from_bn_not_batchnorm2d", plain(lambda d: BatchNormAct2d.from_bn(nn.BatchNorm1d(C))), TYPE,
     r"from_bn needs an nn\.BatchNorm2d, got BatchNorm1d"),
    ("module_channels", lambda d: module_call(d, x=_x(d, 2, 5, 4, 4)), VALUE,
     r"BatchNormAct2d\(3\): input has 5 channels but the layer has num_features=3"),
    ("module_rank", lambda d: module_call(d, x=_x(d, 2, C, 4)), VALUE, r"expected 4D input \[N, C, H, W\]"),
    ("module_dtype", lambda d: module_call(d, x=_x(d).to(torch.int8)), TYPE, r"input has dtype torch\.int8"),
    ("module_input_on_other_device", lambda d: module_call(d, x=torch.empty(2, C, 4, 4, device="meta")), VALUE,
     r"weight \(of input\) is on \w+.* but the input is on meta"),
    ("module_residual_shape", lambda d: module_call(d, residual=_x(d, 2, C, 2, 2)), VALUE,
     r"residual shape \(2, 3, 2, 2\) does not match the BatchNorm input shape"),
    ("module_one_value_per_channel", lambda d: module_call(d, x=_x(d, 1, C, 1, 1)), VALUE,
     r"expected more than 1 value per channel when training"),
    ("module_eps_zero", lambda d: module_call(d, eps=0.0), VALUE, r"eps must be positive when training"),
    ("block_groups", plain(lambda d: fusedres.nn.BasicBlock(C, C, groups=2)), VALUE,
     r"BasicBlock only supports groups=1"),
    ("block_norm_layer", plain(lambda d: fusedres.nn.Bottleneck(C, C, norm_layer=lambda c: nn.GroupNorm(1, c))),
     TYPE, r"fuse nn\.BatchNorm2d only; norm_layer built a GroupNorm"),
    ("conv_mode_block_one_value_per_channel", conv_mode_block_one_value, VALUE,
     r"expected more than 1 value per channel when training, got the conv output of shape \(1, 3, 1, 1\)"),
    ("folded_conv_training", lambda d: folded_conv(d, True), RuntimeError,
     r"FoldedConv2d is a folded inference module; it cannot run in training mode"),
    ("folded_conv_dtype", lambda d: folded_conv(d, False, torch.float64), TYPE,
     r"input dtype torch\.float64 != weight dtype torch\.float32"),
    # ---------------------------------------------------------------- convert / unconvert / fold / models
    ("convert_not_module", plain(lambda d: fusedres.convert("resnet50")), TYPE,
     r"convert: model must be a torch\.nn\.Module, got str"),
    ("convert_unknown_mode", plain(lambda d: fusedres.convert(nn.Identity(), mode="fast")), VALUE,
     r"unknown mode 'fast'; choose 'bn' or 'conv'"),
    ("unconvert_not_module", plain(lambda d: fusedres.unconvert(None)), TYPE,
     r"unconvert: model must be a torch\.nn\.Module, got NoneType"),
    ("fold_not_module", plain(lambda d: fusedres.fold({})), TYPE, r"fold: model must be a torch\.nn\.Module"),
    ("fold_training_model", plain(lambda d: fusedres.fold(nn.Sequential(nn.Conv2d(1, 1, 1)).train())), VALUE,
     r"put the model in eval mode first"),
    ("models_weights", plain(lambda d: fusedres.models.resnet18(weights="IMAGENET1K_V3")), VALUE,
     r"unknown weights 'IMAGENET1K_V3'; choose from DEFAULT, IMAGENET1K_V1"),
    # ---------------------------------------------------------------- backends
    ("use_backend_unknown", plain(lambda d: fusedres.use_backend("cudnn").__enter__()), VALUE,
     r"unknown fusedres backend 'cudnn'; choose one of \('cuda', 'triton', 'reference'\)"),
    ("forced_cuda_on_cpu_tensor", lambda d: forced(d, "cuda", lambda: fusedres.bn_act(*bn_cpu_args())),
     BackendUnavailable, r"backend 'cuda' was forced but cannot run this input"),
    ("forced_triton_conv_float64", lambda d: forced(d, "triton", lambda: fusedres.conv_bn_act(
        _x(d).double(), torch.randn(4, C, 3, 3, device=d, dtype=torch.float64), padding=1)),
     BackendUnavailable, r"backend 'triton' was forced but the conv_bn_act Triton kernel cannot run this "
                         r"input: dtype torch\.float64"),
]


def bn_cpu_args():
    """A valid CPU bn_act call (the CUDA backend refuses CPU tensors on any machine)."""
    w, b, rm, rv = _vecs("cpu")
    return _x("cpu"), rm, rv, w, b, True


def test_table_has_enough_distinct_cases():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) >= 25


@pytest.mark.parametrize("build, error, match", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_raises_a_clear_error(device, build, error, match):
    call, watched = build(device)
    before = {k: v.clone() for k, v in watched.state_dict().items()} if watched is not None else {}
    with pytest.raises(error, match=match) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    if watched is not None:  # raised before any running statistic or num_batches_tracked changed
        after = watched.state_dict()
        for k, v in before.items():
            assert torch.equal(after[k], v), f"{k} changed before the error"


def test_stock_accepts_what_we_accept():
    """Inputs stock F.batch_norm accepts are not refused: eps = 0 in eval, empty batch in eval."""
    x = _x("cpu")
    w, b, rm, rv = _vecs("cpu")
    y = fusedres.bn_act(x, rm, rv, w, b, training=False, eps=0.0)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.1, 0.0))
    empty = torch.randn(0, C, 4, 4)
    assert fusedres.bn_act(empty, rm, rv, w, b, training=False).shape == empty.shape
