"""torchvision BasicBlock and Bottleneck (with and without downsample), stock vs fusedres per backend, in
training forward, forward + backward and eval (see fusedres.bench.blocks)."""
import pytest
import torch

from fusedres.backends import BACKENDS
from fusedres.bench.blocks import DEFAULT_BLOCKS, candidate
from fusedres.bench.common import DTYPES

IMPLS = ["eager"] + [f"fusedres[{b}]" for b in BACKENDS]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "train", "infer"])
@pytest.mark.parametrize("spec", DEFAULT_BLOCKS, ids=[s.name.replace(" ", "-") for s in DEFAULT_BLOCKS])
def test_block(cuda_sync_benchmark, benchmark, bench_batch, bench_dtype, spec, mode, impl):
    import fusedres

    device = torch.device("cuda")
    dtype = DTYPES[bench_dtype]
    x = torch.randn(bench_batch, spec.inplanes, spec.size, spec.size, device=device).contiguous(
        memory_format=torch.channels_last)
    if impl.startswith("fusedres["):
        backend = impl[len("fusedres["):-1]
        reasons = fusedres.not_supported_reasons(backend, x.to(dtype))
        if reasons:
            pytest.skip(f"backend {backend}: " + "; ".join(reasons))
    fn = candidate(spec.build(), impl, mode, x, dtype, device)()
    benchmark.extra_info.update(batch=bench_batch, dtype=bench_dtype, mode=mode)
    cuda_sync_benchmark(fn)
