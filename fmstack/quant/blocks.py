"""Block-quantized weights in one layout, and their matmul: GGUF's formats kept as they are (Q8_0,
Q4_0, Q4_1; K-quants repacked once at load, same values) and fmstack's own int8/int4 re-expressed in
it, so that one kernel family serves all of them.

Layout of a weight `[N, K]` (N output rows, K input columns, K a multiple of `block`):
  qweight  bits 8: int8 `[N, K]`, the quantized values q (signed).
           bits 4: uint8 `[N, K/2]`; in each block of 32 values, byte j (0..15) holds value j in its low
                   nibble and value j + 16 in its high nibble (ggml's order: GGUF Q4_0/Q4_1 quants copy
                   as they are). q is unsigned, 0..15. 4-bit weights use block 32.
  scales   `[N, K/block]`, float16 or float32 (fp16 keeps a GGUF file's own bits; fp32 where a
           scale is a product, as in the K-quants, or fmstack's per-channel int8 repeated per block).
  mins     None, or `[N, K/block]` (scales' dtype).
  value    w[n, k] = q[n, k] * scales[n, k // block] + (mins[n, k // block] if mins is not None else 0).

`block_linear(x, weight, int8_act)`: x `[M, K]` -> `[M, N]` = x @ w.T (float32). With `int8_act`, x is
first quantized per row and block of `block` columns to int8 (`quantize_activations`: symmetric,
scale = max|x| / 127, round to nearest), so a kernel can use integer dot products; the reference
computes the same thing in float. Without it the result is x @ w.T within float32 rounding.

`block_linear_reference` is the pure-PyTorch definition every native kernel is tested against.

Modules hold their weight **interleaved by 16 rows** (`pack_rows` -> `PackedBlocks`, once at load: the
same bits, a fixed permutation): for each group of 16 output rows and each block, the rows' bytes in
64-byte chunks [row 0..15][4 bytes]. One 512-bit load then holds 4 bytes of 16 rows, and one integer
dot product against 4 broadcast activation bytes gives the 16 rows' partial sums in 16 lanes, with
one scale multiply per block for all 16 rows and no horizontal sum per row (the row-major kernel
spent most of its instructions on those: 0.36 ms for a 3072x576 Q4_1 matrix, ~3 GB/s;
docs/quant-kernels.md has the figures). 8-bit values are stored + 128 (unsigned), so VNNI's u8 x s8
product takes them as they are; scales and mins are [groups, blocks, 16].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fmstack import native

BITS = (4, 8)
BLOCKS = (16, 32)
ROWS = 16  # output rows per interleaved group


def layout_of(w: "BlockWeight | PackedBlocks") -> tuple[int, int, str, bool]:
    """(bits, block, scales dtype, has mins) of a weight in either layout."""
    return w.bits, w.block, str(w.scales.dtype).removeprefix("torch."), w.mins is not None


@dataclass(frozen=True)
class BlockWeight:
    qweight: Tensor
    scales: Tensor
    mins: Tensor | None
    bits: int
    block: int

    def __post_init__(self) -> None:
        if self.bits not in BITS or self.block not in BLOCKS or (self.bits == 4 and self.block != 32):
            raise ValueError(f"block layout bits={self.bits} block={self.block} is not supported "
                             "(bits 8 with block 16 or 32; bits 4 with block 32)")

    @property
    def layout(self) -> tuple[int, int, str, bool]:
        """(bits, block, scales dtype, has mins): what a kernel specializes on."""
        return layout_of(self)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.scales.shape[1] * self.block


@dataclass(frozen=True)
class PackedBlocks:
    """A `BlockWeight` interleaved by `ROWS` output rows (module docstring): qweight uint8
    `[G, nb * ROWS * block * bits / 8]` with G = ceil(n / ROWS) (missing rows are zero), scales and mins
    `[G, nb, ROWS]`; n the number of output rows."""
    qweight: Tensor
    scales: Tensor
    mins: Tensor | None
    bits: int
    block: int
    n: int

    @property
    def layout(self) -> tuple[int, int, str, bool]:
        return layout_of(self)

    @property
    def in_features(self) -> int:
        return self.scales.shape[1] * self.block

    def _chunks(self) -> Tensor:  # [G, nb, chunks, ROWS] 4-byte pieces of the stored bytes, as int32
        g, nb = self.scales.shape[:2]
        return self.qweight.view(torch.int32).view(g, nb, self.block * self.bits // 32, ROWS)

    def unpack(self, rows: Tensor | None = None) -> BlockWeight:
        """The `BlockWeight` of all rows, or of the given row indices (an embedding lookup)."""
        q, s, mn = self._chunks(), self.scales, self.mins
        if rows is None:  # [G, nb, chunks, ROWS] -> [G, ROWS, nb, chunks]; scales [G, nb, ROWS] -> [G, ROWS, nb]
            q = q.permute(0, 3, 1, 2).reshape(-1, q.shape[1] * q.shape[2])[:self.n]
            s = s.transpose(1, 2).reshape(-1, s.shape[1])[:self.n]
            mn = None if mn is None else mn.transpose(1, 2).reshape(-1, mn.shape[1])[:self.n]
        else:
            g, r = rows // ROWS, rows % ROWS
            q, s, mn = q[g, :, :, r].reshape(len(rows), -1), s[g, :, r], None if mn is None else mn[g, :, r]
        q = q.contiguous().view(torch.uint8)
        if self.bits == 8:
            q = (q ^ 0x80).view(torch.int8)
        return BlockWeight(q.contiguous(), s.contiguous(), None if mn is None else mn.contiguous(), self.bits, self.block)


def pack_rows(w: BlockWeight) -> PackedBlocks:
    """`w` interleaved by `ROWS` rows (see the module docstring); `PackedBlocks.unpack` inverts it."""
    n, nb = w.scales.shape
    pad = -n % ROWS
    g = (n + pad) // ROWS
    q = w.qweight.view(torch.uint8)
    if w.bits == 8:
        q = q ^ 0x80
    # the 4-byte pieces moved as int32: a byte-wise permute took 5 s for the default model's weights
    q = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(torch.int32).view(g, ROWS, nb, w.block * w.bits // 32)
    q = q.permute(0, 2, 3, 1).contiguous().view(torch.uint8).reshape(g, -1)

    def per_group(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (0, 0, 0, pad)).view(g, ROWS, nb).transpose(1, 2).contiguous()

    return PackedBlocks(q, per_group(w.scales), None if w.mins is None else per_group(w.mins), w.bits, w.block, n)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """uint8 `[N, K/2]` in ggml's block order -> uint8 `[N, K]` values 0..15."""
    n = packed.shape[0]
    b = packed.reshape(n, -1, 16)
    return torch.cat([b & 0x0F, b >> 4], dim=-1).reshape(n, -1)


def pack_nibbles(q: Tensor) -> Tensor:
    """uint8 `[N, K]` values 0..15 -> `[N, K/2]` in ggml's block order (inverse of `unpack_nibbles`)."""
    n = q.shape[0]
    b = q.to(torch.uint8).reshape(n, -1, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(n, -1)


def dequantize_blocks(w: BlockWeight) -> Tensor:
    """The weight `[N, K]` in float32."""
    q = unpack_nibbles(w.qweight) if w.bits == 4 else w.qweight
    n = q.shape[0]
    # integer * float32 converts q inside the one kernel and the mins are added in place: the values of
    # q.float() * scale + min with one float32 [N, K] buffer instead of three (113 MB each for the
    # default model's head)
    v = q.reshape(n, -1, w.block) * w.scales.float()[..., None]
    if w.mins is not None:
        v.add_(w.mins.float()[..., None])
    return v.reshape(n, -1)


def quantize_activations(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """x `[M, K]` -> (q int8 `[M, K]`, scales float32 `[M, K/block]`), per row and block of columns:
    scale = max|x| / 127 (1 where the block is all zeros), q = round(x / scale)."""
    m = x.shape[0]
    xb = x.float().reshape(m, -1, block)
    s = xb.abs().amax(dim=-1) / 127.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(xb / s[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(m, -1), s


def block_linear_reference(x: Tensor, w: BlockWeight, int8_act: bool = False) -> Tensor:
    """x `[M, K]` -> float32 `[M, N]`: the definition (see the module docstring)."""
    x = x.float()
    if int8_act:
        q, s = quantize_activations(x, w.block)
        x = (q.float().reshape(x.shape[0], -1, w.block) * s[..., None]).reshape(x.shape)
    return x @ dequantize_blocks(w).T


def block_linear(x: Tensor, w: BlockWeight | PackedBlocks, int8_act: bool = False) -> Tensor:
    """x `[M, K]` -> float32 `[M, N]`: the native kernel where one is built for x's device (CPU, no
    gradient wanted: the op has no backward), else the reference. A `BlockWeight` is packed first (a
    module holds its weight packed once)."""
    if x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()) and native.available():
        p = w if isinstance(w, PackedBlocks) else pack_rows(w)
        return native.block_linear(x.float().contiguous(), p.qweight, p.scales, p.mins, p.bits, p.block, p.n, int8_act)
    return block_linear_reference(x, w.unpack() if isinstance(w, PackedBlocks) else w, int8_act)


def hold_blocks(module: nn.Module, w: BlockWeight | PackedBlocks) -> None:
    """Give `module` the weight's interleaved buffers (qweight, scales, mins: `pack_rows` of a
    `BlockWeight`, shared as they are from a `PackedBlocks`) and its bits, block and row count."""
    p = w if isinstance(w, PackedBlocks) else pack_rows(w)
    module.bits, module.block, module.rows = p.bits, p.block, p.n
    module.register_buffer("qweight", p.qweight)
    module.register_buffer("scales", p.scales)
    module.register_buffer("mins", p.mins)


class BlockLinear(nn.Module):
    """A projection holding a `BlockWeight` (buffers qweight, scales, mins); `int8_act` picks the
    integer-activation kernel; `scheme` names the quantization mode it came from (`fmstack.quant`
    modes, for `spec_of`). Output in x's dtype."""

    def __init__(self, w: BlockWeight | PackedBlocks, int8_act: bool = False, scheme: str = ""):
        super().__init__()
        self.int8_act, self.scheme = int8_act, scheme
        hold_blocks(self, w)
        self.in_features, self.out_features = self.scales.shape[1] * self.block, self.rows

    @property
    def packed_blocks(self) -> PackedBlocks:
        return PackedBlocks(self.qweight, self.scales, self.mins, self.bits, self.block, self.rows)

    @property
    def weight_blocks(self) -> BlockWeight:
        """The weight in the plain row-major layout (a copy: `PackedBlocks.unpack`)."""
        return self.packed_blocks.unpack()

    @property
    def layout(self) -> tuple[int, int, str, bool]:
        return self.packed_blocks.layout

    def forward(self, x: Tensor) -> Tensor:
        out = block_linear(x.reshape(-1, self.in_features), self.packed_blocks, self.int8_act)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"block={self.block}, int8_act={self.int8_act}")


def with_layout(w: BlockWeight, bits: int, block: int, dtype: torch.dtype, with_mins: bool) -> BlockWeight:
    """`w` re-expressed in another layout holding the same values: 4-bit -> 8-bit (q unchanged),
    block 32 -> 16 (each scale and min repeated), fp16 -> fp32 scales, zero mins added. Raises
    ValueError for a change that could lose values (8 -> 4 bits, 16 -> 32, fp32 -> fp16, dropping mins)."""
    if (bits, w.bits) == (4, 8) or (block, w.block) == (32, 16) or (w.mins is not None and not with_mins) \
            or (dtype == torch.float16 and w.scales.dtype != torch.float16) or block not in BLOCKS:
        raise ValueError(f"cannot hold bits={w.bits} block={w.block} {w.scales.dtype} mins={w.mins is not None} "
                         f"as bits={bits} block={block} {dtype} mins={with_mins} without changing values")
    q = w.qweight if bits == w.bits else unpack_nibbles(w.qweight).view(torch.int8)
    repeat = w.block // block
    scales = w.scales.to(dtype).repeat_interleave(repeat, dim=1)
    mins = w.mins if w.mins is not None or not with_mins else torch.zeros_like(w.scales)
    mins = None if mins is None else mins.to(dtype).repeat_interleave(repeat, dim=1)
    return BlockWeight(q, scales, mins, bits, block)


def cat_rows(parts: list[BlockWeight]) -> BlockWeight:
    """The row concatenation of `parts` (e.g. q, k and v into one fused projection) in the smallest
    layout that holds every part's values exactly: 4-bit only if all are, the smallest block, fp16
    scales only if all are, mins if any has them."""
    bits = 4 if all(p.bits == 4 for p in parts) else 8
    block = min(p.block for p in parts)
    dtype = torch.float16 if all(p.scales.dtype == torch.float16 for p in parts) else torch.float32
    with_mins = any(p.mins is not None for p in parts)
    same = [with_layout(p, bits, block, dtype, with_mins) for p in parts]
    mins = torch.cat([p.mins for p in same]) if with_mins else None
    return BlockWeight(torch.cat([p.qweight for p in same]), torch.cat([p.scales for p in same]), mins, bits, block)


def from_int8(q: Tensor, scales: Tensor, block: int = 32) -> BlockWeight:
    """fmstack int8 (q int8 `[N, K]`, per-channel scales `[N]`) -> 8-bit blocks, the channel scale
    repeated per block in fp32: the same values."""
    n, k = q.shape
    return BlockWeight(q, scales.float()[:, None].expand(n, k // block).contiguous(), None, 8, block)


def from_int4(q: Tensor, scales: Tensor, zeros: Tensor) -> BlockWeight:
    """fmstack int4 with group 32 (q uint8 `[N, K]` 0..15, value (q - 8) * s + z) -> 4-bit block 32 with
    mins z - 8 * s (fp32): the same values up to float32 rounding."""
    s = scales.float()
    return BlockWeight(pack_nibbles(q), s, zeros.float() - 8.0 * s, 4, 32)


class BlockEmbedding(nn.Module):
    """A token embedding holding its table as a `BlockWeight`; a lookup dequantizes only the gathered
    rows (to `dtype`). A tied LM head is `BlockLinear(embedding.packed_blocks)` over the same buffers."""

    def __init__(self, w: BlockWeight | PackedBlocks, dtype: torch.dtype = torch.float32, scheme: str = ""):
        super().__init__()
        self.dtype, self.scheme = dtype, scheme
        hold_blocks(self, w)
        self.num_embeddings, self.embedding_dim = self.rows, self.scales.shape[1] * self.block

    packed_blocks, weight_blocks, layout = BlockLinear.packed_blocks, BlockLinear.weight_blocks, BlockLinear.layout

    def forward(self, tokens: Tensor) -> Tensor:
        flat = tokens.reshape(-1)
        if flat.device.type == "cpu" and native.available():  # one op: a compiled graph calls it, no gather code
            rows = native.block_rows(self.qweight, self.scales, self.mins, self.bits, self.block, self.rows, flat)
        else:
            rows = dequantize_blocks(self.packed_blocks.unpack(flat))
        return rows.reshape(*tokens.shape, self.embedding_dim).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, block={self.block}"
