"""Seeded Rademacher random projections that come out identical on any device.

Entries are ±1 signs from an integer hash of ``(seed, key, row, column)`` computed with exact
int64 tensor arithmetic, so a block is the same on CPU and GPU, for any batch size and any number
of processes, and any block of a huge matrix can be generated on its own (nothing is ever stored
whole). ``key`` separates independent matrices (one per LoRA module and side).

Two projections of LoRA gradients to ``d`` dimensions:

* **factorised** (default): module ``m`` with weight ``out × in`` gets ``P_m = (P_out ⊗ P_in)`` with
  ``P_out`` (k_o × out) and ``P_in`` (k_i × in) Rademacher / √k and ``k_o·k_i = d``. Because the
  per-example gradient is ``Σ_t δ_t x_tᵀ``, ``P_m vec(G) = vec(Σ_t (P_out δ_t)(P_in x_t)ᵀ)``: the
  projections act on δ and x before the outer product and the full gradient is never formed.
  Modules are combined by **summing** their independently projected d-vectors. Since
  ``E[P_mᵀ P_m'] = I`` if m = m' and 0 otherwise, ``⟨Σ P_m g_m, Σ P_m h_m⟩`` is an unbiased
  estimate of ``Σ_m ⟨g_m, h_m⟩ = ⟨g, h⟩``; every module uses all d dimensions and the per-module
  Kronecker errors average out over the (many) modules. Concatenation with a per-module budget
  would leave d / #modules dimensions per module (32 for Llama-8B's 256 LoRA matrices at d=8192),
  far too few for a Kronecker sketch.
* **dense**: the concatenation of all modules' full per-example gradients (in module order)
  times one d × D Rademacher matrix / √d, generated block by block (the LESS/TRAK projection).
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch

ProjectionKind = Literal["factorised", "dense"]

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D  # odd multipliers below 2**31: products of 32-bit values stay inside int64
_MUL2 = 0x5BD1E995


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    x = x ^ (x >> 16)
    return x


def stream_key(seed: int, name: str) -> int:
    """32-bit key of the independent stream ``name`` under ``seed`` (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def rademacher_block(
    key: int, row0: int, nrows: int, col0: int, ncols: int, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows ``row0:row0+nrows`` and columns ``col0:col0+ncols`` of the ±1 matrix of stream ``key``.

    One 32-bit hash per (row, 32-column word) gives the signs of 32 columns (its bits)."""
    if not (0 <= row0 and row0 + nrows <= 2**32 and 0 <= col0 and col0 + ncols <= 2**37):
        raise ValueError("rademacher_block: row/column index out of range")
    word0, word1 = col0 // 32, (col0 + ncols - 1) // 32 + 1
    rows = torch.arange(row0, row0 + nrows, dtype=torch.int64, device=device)
    words = torch.arange(word0, word1, dtype=torch.int64, device=device)
    row_h = _mix32(_mix32(rows ^ key) ^ (key >> 7))
    word_h = _mix32(((words & _MASK32) ^ ((words >> 32) * _MUL2 & _MASK32)) + 0x9E3779B9 & _MASK32)
    h = _mix32(row_h[:, None] ^ word_h[None, :])
    byte = (h[:, :, None] >> torch.arange(0, 32, 8, dtype=torch.int64, device=device)) & 0xFF
    signs = _byte_signs(device, dtype)[byte]  # [nrows, nwords, 4, 8]: bit j of byte k is column 8k + j
    return signs.reshape(nrows, -1)[:, col0 - word0 * 32 : col0 - word0 * 32 + ncols]


def _byte_signs(device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: row v holds 1 − 2·bit_j(v) for j = 0..7."""
    values = torch.arange(256, dtype=torch.int64, device=device)
    return (1 - 2 * ((values[:, None] >> torch.arange(8, dtype=torch.int64, device=device)) & 1)).to(dtype)


def factor_dims(dim: int) -> tuple[int, int]:
    """``(small, large)`` with ``small·large = dim`` and ``small`` the largest divisor ≤ √dim."""
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    small = max(k for k in range(1, math.isqrt(dim) + 1) if dim % k == 0)
    if small * 4 < math.isqrt(dim):
        raise ValueError(
            f"dim={dim} has no balanced factorisation (best {small} × {dim // small}); the factorised "
            "projection needs d = k_o·k_i with both sides near √d, e.g. a power of two such as 8192"
        )
    return small, dim // small


class KroneckerProjector:
    """The factorised projection of one ``out × in`` weight: ``P_out`` (k_o × out), ``P_in`` (k_i × in).

    The larger factor of d goes to the larger side of the weight. Matrices are generated once
    (they are small) and cached on the device they were first asked for."""

    def __init__(self, seed: int, name: str, out_features: int, in_features: int, dim: int):
        small, large = factor_dims(dim)
        self.k_out, self.k_in = (small, large) if out_features <= in_features else (large, small)
        self.name, self.out_features, self.in_features, self.dim = name, out_features, in_features, dim
        self._key_out = stream_key(seed, f"{name}/out")
        self._key_in = stream_key(seed, f"{name}/in")
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def matrices(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_out, P_in)`` scaled by 1/√k each, so ``E[(P_out ⊗ P_in)ᵀ(P_out ⊗ P_in)] = I``."""
        cache_key = (torch.device(device), dtype)
        if cache_key not in self._cache:
            p_out = rademacher_block(self._key_out, 0, self.k_out, 0, self.out_features, device, dtype)
            p_in = rademacher_block(self._key_in, 0, self.k_in, 0, self.in_features, device, dtype)
            self._cache[cache_key] = (p_out / math.sqrt(self.k_out), p_in / math.sqrt(self.k_in))
        return self._cache[cache_key]

    def project_weight_grads(self, grads: torch.Tensor) -> torch.Tensor:
        """``[B, out, in]`` full per-example gradients (or Adam directions) → ``[B, d]``."""
        p_out, p_in = self.matrices(grads.device, grads.dtype)
        return torch.matmul(torch.matmul(p_out, grads), p_in.T).reshape(grads.shape[0], self.dim)


class DenseProjector:
    """One d × D Rademacher / √d matrix over the concatenated gradient, generated in column blocks.

    Blocks are kept (per device) while their total size stays within ``cache_bytes`` and
    regenerated on every call beyond it, so memory stays bounded for any D."""

    def __init__(self, seed: int, dim: int, cache_bytes: int = 2 << 30, block_entries: int = 1 << 22):
        self.key, self.dim, self.cache_bytes = stream_key(seed, "dense"), dim, cache_bytes
        self.block_columns = max(32, block_entries // dim // 32 * 32)
        self._cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}
        self._cached_bytes = 0

    def _block(self, col0: int, ncols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (col0, ncols, device, dtype)
        if key in self._cache:
            return self._cache[key]
        block = rademacher_block(self.key, 0, self.dim, col0, ncols, device, dtype) / math.sqrt(self.dim)
        size = block.numel() * block.element_size()
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = block
            self._cached_bytes += size
        return block

    def project(self, flat: torch.Tensor, col0: int) -> torch.Tensor:
        """Contribution ``flat @ R[:, col0:col0+n]ᵀ / √d`` of ``[B, n]`` gradient columns starting at ``col0``."""
        out = torch.zeros(flat.shape[0], self.dim, dtype=flat.dtype, device=flat.device)
        for start in range(0, flat.shape[1], self.block_columns):
            part = flat[:, start : start + self.block_columns]
            out += part @ self._block(col0 + start, part.shape[1], flat.device, flat.dtype).T
        return out
