"""Each fused op per backend vs PyTorch's sequence and a device copy, on ResNet-50 layer shapes (see
fusedres.bench.kernels); extra_info carries the bytes the kernel must move, for GB/s."""
import pytest
import torch

from fusedres.backends import BACKENDS
from fusedres.bench.common import DTYPES
from fusedres.bench.kernels import COPY, Problem, resnet50_specs

SPECS = resnet50_specs()
IMPLS = [COPY, "pytorch"] + [f"fusedres[{b}]" for b in BACKENDS]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "bwd", "infer"])
@pytest.mark.parametrize("spec", SPECS, ids=[s.name.replace(" ", "-") for s in SPECS])
def test_kernel(cuda_sync_benchmark, benchmark, bench_batch, bench_dtype, spec, mode, impl):
    import fusedres

    problem = Problem(spec, mode, bench_batch, DTYPES[bench_dtype], torch.channels_last, torch.device("cuda"))
    if impl.startswith("fusedres["):
        backend = impl[len("fusedres["):-1]
        reasons = fusedres.not_supported_reasons(backend, problem.x)
        if reasons:
            pytest.skip(f"backend {backend}: " + "; ".join(reasons))
    fn = problem.candidate(impl)()
    nbytes = 2 * problem.x.numel() * problem.x.element_size() if impl == COPY else \
        spec.bytes(bench_batch, problem.x.element_size(), mode)
    benchmark.extra_info.update(bytes=nbytes, shape=list(spec.shape(bench_batch)), dtype=bench_dtype, mode=mode)
    cuda_sync_benchmark(fn)
