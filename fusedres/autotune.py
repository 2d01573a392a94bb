"""Tune the conv kernel once, ahead of training: `fusedres.tune(model, example_input)` or

    python -m fusedres.autotune --model resnet50 --batch 256 --mode conv [--dtype bfloat16] [--size 224]

runs the model's training and eval forward passes on the example batch, so every conv_bn_act shape they launch
is timed now and its winner written to the on-disk cache (`fusedres.triton.conv_bn_act.cache_path()`, per GPU
name and Triton version). Later processes on the same GPU and Triton start with no timing. Tune keys do not
depend on the batch size, so partial last batches and eval reuse the winners. Model state is restored.
"""
from __future__ import annotations

import argparse
import contextlib

import torch


def tune(model: torch.nn.Module, example_input: torch.Tensor, *, train: bool = True, eval: bool = True,
         autocast_dtype: torch.dtype | None = None) -> list[str]:
    """Autotune every conv shape `model`'s forward launches on `example_input` (in train mode when `train`, in
    eval mode when `eval`), under autocast to `autocast_dtype` when given. Returns the tune keys timed by this call. Parameters,
    buffers (running statistics) and the train/eval mode are left as they were."""
    from fusedres.triton import conv_bn_act as tc

    if example_input.device.type != "cuda":
        return []
    before = {scope: set(keys) for scope, keys in tc._WINNERS.items()}
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    amp = (torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    try:
        with torch.no_grad(), amp:
            if train:
                model.train()
                model(example_input)
            if eval:
                model.eval()
                model(example_input)
        torch.cuda.synchronize(example_input.device)
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
    return sorted(k for scope, keys in tc._WINNERS.items() for k in keys if k not in before.get(scope, set()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Autotune fusedres' conv kernel for a model ahead of training.")
    ap.add_argument("--model", default="resnet50", help="a fusedres.models constructor (default resnet50)")
    ap.add_argument("--mode", default="conv", choices=("conv", "fold"), help="convert(mode='conv') or fold()")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    a = ap.parse_args(argv)
    import fusedres
    from fusedres.triton import conv_bn_act as tc

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to tune")
        return 1
    model = getattr(fusedres.models, a.model)().cuda().to(memory_format=torch.channels_last)
    model = fusedres.fold(model.eval()) if a.mode == "fold" else fusedres.convert(model, mode="conv")
    x = torch.randn(a.batch, 3, a.size, a.size, device="cuda").to(memory_format=torch.channels_last)
    dtype = getattr(torch, a.dtype)
    keys = tune(model, x, train=a.mode == "conv", autocast_dtype=None if dtype == torch.float32 else dtype)
    print(f"tuned {len(keys)} conv shapes; cache: {tc.cache_path()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
