"""Right-padding of ragged per-sample rows (the one place it is done)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_rows(rows: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D rows of different lengths, right-padded with zeros.

    Returns:
        ``(out [N, T], mask [N, T])`` with ``T`` the longest row; ``mask`` marks real entries.
    """
    t = max((len(r) for r in rows), default=0)
    device = rows[0].device if len(rows) else None
    out = torch.zeros(len(rows), t, dtype=dtype, device=device)
    mask = torch.zeros(len(rows), t, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r.to(dtype)
        mask[i, :len(r)] = True
    return out, mask


def pad_steps(x: torch.Tensor, t: int) -> torch.Tensor:
    """Right-pad the last dimension of ``x`` with zeros (or ``False``) to length ``t``."""
    return torch.nn.functional.pad(x, (0, t - x.shape[-1]))
