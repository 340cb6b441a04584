"""The retouch (paper Algorithm 1) for every model family: the loop, the editor's edits, the family
contract, the reference caches, and both stages end to end.

  loop       the retouch of stage-1 layouts: inversions, the batched three-path step, the mask
  editor     the edits (copy, paint, maps, blend) over Q, K, V and the rows of a call
  family     the model-family contract (what unet/ and dit/ supply)
  layers     the layer table (which layers copy, paint, blend, give maps)
  conds      the three paths' conditionings
  caches     reference inversions and reference K/V across generations
  generate   both stages with the library's samplers
  patch      per-instance forwards that always restore
"""

from .caches import (
    INVERSION_CACHE_ENTRIES,
    INVERSION_ENTRY_MB,
    KV_REFERENCE_MB,
    KV_STEP_MB,
    InversionCache,
    ReferenceAttentionCache,
    inversion_key,
)
from .conds import RetouchConds
from .generate import GenerationResult, encode_prompts, generate, to_uint8
from .loop import (
    IN_USER_MASK,
    MASK_CA_ONLY,
    MASK_SAM,
    MASK_USER,
    ProgressFn,
    RetouchResult,
    RetouchSettings,
    invert_latents,
    retouch,
)

__all__ = [
    "INVERSION_CACHE_ENTRIES",
    "INVERSION_ENTRY_MB",
    "IN_USER_MASK",
    "KV_REFERENCE_MB",
    "KV_STEP_MB",
    "MASK_CA_ONLY",
    "MASK_SAM",
    "MASK_USER",
    "GenerationResult",
    "InversionCache",
    "ProgressFn",
    "ReferenceAttentionCache",
    "RetouchConds",
    "RetouchResult",
    "RetouchSettings",
    "encode_prompts",
    "generate",
    "invert_latents",
    "inversion_key",
    "retouch",
    "to_uint8",
]
