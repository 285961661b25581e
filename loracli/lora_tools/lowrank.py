"""Low-rank factorisation of a weight delta, and sd-scripts' rank choices.

`choose_rank` gives each parameter the meaning it has in sd-scripts'
networks/resize_lora.py (`--dynamic_method`/`--dynamic_param`):
  sv_ratio P       keep singular values larger than S[0]/P
  sv_cumulative P  keep singular values until their sum reaches P of the total
  sv_fro P         keep singular values until the Frobenius norm reaches P of the total
with sd-scripts' arithmetic, its "one more than the index" included (the
guides' thresholds were tuned against it), capped by the requested maximum rank
and, here, by the module's own rank (components past it are rounding noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")
MIN_SV = 1e-6  # sd-scripts: a module whose largest singular value is below this is a zero matrix


def _clamp_index(index: int, count: int) -> int:
    return max(1, min(index, count - 1))


def _index_cumulative(s: torch.Tensor, target: float) -> int:
    shares = torch.cumsum(s, dim=0) / float(torch.sum(s))
    return _clamp_index(int(torch.searchsorted(shares, target)) + 1, len(s))


def _index_fro(s: torch.Tensor, target: float) -> int:
    squares = s.pow(2)
    shares = torch.cumsum(squares, dim=0) / float(torch.sum(squares))
    return _clamp_index(int(torch.searchsorted(shares, target ** 2)) + 1, len(s))


def _index_ratio(s: torch.Tensor, target: float) -> int:
    return _clamp_index(int(torch.sum(s > s[0] / target).item()), len(s))


def choose_rank(s: torch.Tensor, max_rank: int, method: str | None, param: float | None) -> int:
    """The rank sd-scripts' resize keeps for singular values `s` (descending)."""
    if method is None:
        rank = max_rank
    elif method == "sv_ratio":
        rank = _index_ratio(s, float(param)) + 1
    elif method == "sv_cumulative":
        rank = _index_cumulative(s, float(param)) + 1
    elif method == "sv_fro":
        rank = _index_fro(s, float(param)) + 1
    else:
        raise ValueError(f"unknown method {method!r}")
    if float(s[0]) <= MIN_SV:
        return 1
    return max(1, min(rank, max_rank))


def fro_share(s: torch.Tensor, rank: int) -> float:
    """||ΔW_rank||_F / ||ΔW||_F: the share of the Frobenius norm the first `rank` values keep."""
    squares = s.double().pow(2)
    total = float(squares.sum())
    return 1.0 if total == 0 else float(squares[:rank].sum() / total) ** 0.5


@dataclass
class Factors:
    up: torch.Tensor  # (out, rank[, 1, 1])
    down: torch.Tensor  # (rank, in[, k, k])
    rank: int
    fro_retained: float
    singular_values: torch.Tensor


def flatten(delta: torch.Tensor) -> torch.Tensor:
    """A weight delta as the matrix LoRA factorises: (out, in·k·k)."""
    return delta.reshape(delta.shape[0], -1)


def svd(delta: torch.Tensor, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(flatten(delta).to(device=device, dtype=torch.float32), full_matrices=False)


def product_svd(up: torch.Tensor, down: torch.Tensor, device: str | torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of up·down (up: out×r, down: r×in, any trailing dims flattened) without forming it:
    QR of each factor, then the SVD of an r×r core. Exact (the product has rank ≤ r) and
    O((out+in)·r²) instead of O(out·in·min(out, in)): seconds instead of minutes for an SDXL LoRA."""
    up = up.reshape(up.shape[0], -1).to(device=device, dtype=torch.float64)
    down = down.reshape(down.shape[0], -1).to(device=device, dtype=torch.float64)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return (q_up @ u_core).float(), s.float(), (vh_core @ q_down.T).float()


def factorise(delta: torch.Tensor, rank: int, device: str | torch.device, clamp_quantile: float | None = None,
              decomposition: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> Factors:
    """up·down = the best rank-`rank` approximation of `delta` (singular values folded into up,
    as sd-scripts does), optionally clamped at a quantile of the factors' values (extract/SVD merge)."""
    u, s, vh = decomposition if decomposition is not None else svd(delta, device)
    rank = max(1, min(rank, s.shape[0]))
    up = u[:, :rank] @ torch.diag(s[:rank])
    down = vh[:rank, :]
    if clamp_quantile is not None and clamp_quantile < 1:
        values = torch.cat([up.flatten(), down.flatten()])
        # torch.quantile refuses very large inputs; a strided sample gives the same bound in practice
        if values.numel() > 8_000_000:
            values = values[:: values.numel() // 8_000_000 + 1]
        high = torch.quantile(values, clamp_quantile)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    out_features = delta.shape[0]
    if delta.dim() == 4:
        up = up.reshape(out_features, rank, 1, 1)
        down = down.reshape(rank, *delta.shape[1:])
    return Factors(up.cpu().contiguous(), down.cpu().contiguous(), rank, fro_share(s, rank), s.cpu())
