"""Model building blocks on effattn's kernels (``torch.nn`` modules and the functions behind them)."""

from effattn.nn.deformer import CachedContext, CacheInfo, ContextKey, DeFormerEncoder, EncoderLayer
from effattn.nn.funnel import (
    CLS_TOKEN_TYPE,
    FunnelRelAttention,
    funnel_attention,
    pool_attention_mask,
    pool_sequence,
    position_features,
    stride_select,
    token_type_features,
    upsample,
)

__all__ = [
    "CLS_TOKEN_TYPE",
    "CacheInfo",
    "CachedContext",
    "ContextKey",
    "DeFormerEncoder",
    "EncoderLayer",
    "FunnelRelAttention",
    "funnel_attention",
    "pool_attention_mask",
    "pool_sequence",
    "position_features",
    "stride_select",
    "token_type_features",
    "upsample",
]
