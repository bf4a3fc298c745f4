"""Ready-made attention masks for Hugging Face models (the policy engine and the trainer's rollouts).

transformers builds a 4D mask from a 2D padding mask at every forward; with padding it does so
with a vmap that costs more than the whole forward of a small model (3-4 ms against ~1 ms on a
CPU). A 4D mask passed in is used as it is.
"""

from __future__ import annotations

import torch


def attention_mask_4d(key_mask: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, q_len, K) for the last q_len of K positions: causal and no padded keys.

    key_mask (B, K) is 1 on real tokens. A padded query row may see itself only, so no row is all
    -inf (softmax would give NaN, and NaN times a zero weight is still NaN in the next layer).
    """
    B, K = key_mask.shape
    neg = torch.finfo(dtype).min
    if q_len == 1:  # a decode step: nothing causal to mask, so half the ops (it runs every step)
        hidden = key_mask == 0
        hidden[:, -1] = False
        return torch.zeros(B, K, dtype=dtype, device=key_mask.device).masked_fill(hidden, neg)[:, None, None]
    q_pos = torch.arange(K - q_len, K, device=key_mask.device)  # (q,)
    k_pos = torch.arange(K, device=key_mask.device)  # (K,)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_mask.bool()[:, None, :]  # (B, q, K)
    allowed |= (k_pos[None, :] == q_pos[:, None])[None]
    mask = torch.zeros(B, 1, q_len, K, dtype=dtype, device=key_mask.device)
    return mask.masked_fill(~allowed[:, None], neg)
