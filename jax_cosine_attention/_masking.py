"""Which (query, key) pairs may attend: one definition shared by the reference and the XLA path."""

import jax.numpy as jnp


def valid_pairs(t_idx, s_idx, *, T, S, is_causal, q_len=None, kv_len=None, mask=None, head_axes=1):
    """Bool array broadcastable to [B,<heads>,T',S'] for query rows t_idx [T'] and key columns s_idx [S'].

    `head_axes` is 1 for an [N] head axis, 2 for the [K,G] split used by grouped-query attention.

    Indices at or past T / S (block padding) are invalid. Causal masking is bottom-right aligned:
    query t sees key s iff s <= t + S - T. `mask` must already be sliced to these rows/columns
    (its dims are each full or 1); q_len / kv_len are int32 [B].
    """
    t = t_idx[:, None]
    s = s_idx[None, :]
    ok = (t < T) & (s < S)
    if is_causal:
        ok = ok & (s <= t + (S - T))
    lead = (1,) * (1 + head_axes)
    ok = ok.reshape(lead + ok.shape)
    per_batch = (-1,) + (1,) * (head_axes + 2)
    if q_len is not None:
        ok = ok & (t.reshape(lead + t.shape) < q_len.reshape(per_batch))
    if kv_len is not None:
        ok = ok & (s.reshape(lead + s.shape) < kv_len.reshape(per_batch))
    if mask is not None:
        ok = ok & mask
    return ok
