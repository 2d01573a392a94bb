"""fusedres-bench: fusedres against stock PyTorch on kernels, blocks and whole ResNets (CUDA), or, without a
GPU, a check that the fused ResNet computes what stock torchvision computes (Triton interpreter on CPU).

Modules: cli (arguments, the run), kernels / blocks / models (the timed levels), timing (interleaved medians),
traffic (bytes each kernel must move), results (rows, JSON/CSV/markdown, --compare), plots, demo, env.
"""
