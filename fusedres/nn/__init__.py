"""Fused modules with torchvision attribute names and state_dict keys: `BatchNormAct2d`, `BasicBlock`,
`Bottleneck`, and `dual_bn_act_modules` (the two-BatchNorm downsampling tail run from two BN modules)."""
from fusedres.nn.batchnorm_act import BatchNormAct2d, batch_norm_args, bn_act_module, dual_bn_act_modules
from fusedres.nn.blocks import BasicBlock, Bottleneck

__all__ = ["BatchNormAct2d", "BasicBlock", "Bottleneck", "batch_norm_args", "bn_act_module",
           "dual_bn_act_modules"]
