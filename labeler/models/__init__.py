"""Token models: FAN-Hybrid (registered in timm on import) and token heads for any timm backbone.

    import labeler.models  # registers fan_* in timm
    m = create_token_model("fan_tiny_8_p4_hybrid_token", num_classes=1000)
    m(x)                              # class logits (B, C): timm's contract
    cls_logits, token_logits = m.forward_tokens(x)   # (B, C), (B, gh*gw, C) row-major
    token_grid(m, (224, 224))         # (14, 14)
    sha256 = load_checkpoint(m, "teacher.pth.tar")
"""
from labeler.errors import CheckpointError
from labeler.models.checkpoint import load_checkpoint
from labeler.models.fan_hybrid import FanHybrid
from labeler.models.fan_registry import FAN_SIZES, FanSize
from labeler.models.foreign_weights import load_efficientnet_lite0_weights, load_state_dict_in_order
from labeler.models.token_forward import TokenForward
from labeler.models.token_head import TokenHeadWrapper
from labeler.models.token_model_factory import create_token_model, token_grid

__all__ = [
    "FAN_SIZES", "CheckpointError", "FanHybrid", "FanSize", "TokenForward", "TokenHeadWrapper", "create_token_model",
    "load_checkpoint", "load_efficientnet_lite0_weights", "load_state_dict_in_order", "token_grid",
]
