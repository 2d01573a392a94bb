"""The benchmark's names (levels, models, dtypes, layouts) without importing torch, so the CLI can parse and
reject arguments in a fraction of a second; fusedres.bench.common maps them to torch objects."""
LEVELS = ("kernels", "blocks", "models")  # timed: need a CUDA GPU
CPU_LEVELS = ("demo", "count")  # run anywhere (count: fake tensors, modeled numbers; fusedres.bench.count)
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d")
# Named with --models only (not in the default run): the CIFAR pre-activation ResNets of "Identity Mappings"
# (fusedres.preact; stock = unconverted, fused = fusedres.convert), run at CIFAR's 32x32 whatever image_size is.
# ResNet-1001 is the memory row: 1001 layers of activations at batch 128.
EXTRA_MODELS = ("preact_resnet164", "preact_resnet1001")
CIFAR_MODELS = {"preact_resnet164": 32, "preact_resnet1001": 32}
DTYPE_NAMES = ("fp32", "bf16", "fp16")
MEMORY_FORMAT_NAMES = ("channels_last", "contiguous")
