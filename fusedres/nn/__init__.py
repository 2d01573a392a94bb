"""Fused modules with torchvision attribute names and state_dict keys: `BatchNormAct2d`, `BasicBlock`,
`Bottleneck`, and `dual_bn_act_modules` (the two-BatchNorm downsampling tail run from two BN modules); the
fused pre-activation units `PreActBasicBlock`, `PreActBottleneck` (counterparts of `fusedres.preact`); and
timm's ResNet modules `TimmBasicBlock`, `TimmBottleneck`, `TimmBatchNormAct2d` (timm itself is not imported)."""
from fusedres.nn.batchnorm_act import BatchNormAct2d, batch_norm_args, bn_act_module, dual_bn_act_modules
from fusedres.nn.blocks import BasicBlock, Bottleneck
from fusedres.nn.sync_batchnorm import SyncBatchNormAct2d, from_sync_bn, to_sync_bn
from fusedres.nn.preact_blocks import PreActBasicBlock, PreActBottleneck
from fusedres.nn.timm_blocks import TimmBasicBlock, TimmBatchNormAct2d, TimmBottleneck

__all__ = ["BatchNormAct2d", "BasicBlock", "Bottleneck", "batch_norm_args", "bn_act_module",
           "SyncBatchNormAct2d", "to_sync_bn", "from_sync_bn",
           "dual_bn_act_modules", "PreActBasicBlock", "PreActBottleneck", "TimmBasicBlock", "TimmBottleneck",
           "TimmBatchNormAct2d"]
