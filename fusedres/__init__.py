"""fusedres: fused BatchNorm + residual add + ReLU kernels (Triton, CUDA) and drop-in ResNet blocks."""
from fusedres import ops
from fusedres._layout import poison_outputs
from fusedres.backends import available_backends, not_supported_reasons, use_backend
from fusedres.ops import bn_act, dual_bn_act
from fusedres import nn, models
from fusedres.convert import convert, unconvert
from fusedres.ops.conv_bn_act import conv_bn_act
from fusedres.ops.scale_shift_act import scale_shift_act
from fusedres.fold import fold
from fusedres.autotune import tune

__version__ = "0.1.0"
__all__ = ["ops", "bn_act", "dual_bn_act", "use_backend", "available_backends", "not_supported_reasons",
           "poison_outputs", "nn", "models", "convert", "unconvert",
           "conv_bn_act", "scale_shift_act", "fold", "tune"]
