"""The fused ops, registered as torch.ops.fusedres.* (importing this package registers them)."""
from fusedres.ops.bn_act import bn_act
from fusedres.ops.dual_bn_act import dual_bn_act

__all__ = ["bn_act", "dual_bn_act"]
