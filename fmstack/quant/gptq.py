"""GPTQ: calibrated int4 weight quantization (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers").

For one projection with weight W `[N, K]` and inputs X `[n, K]`, GPTQ minimizes ||X W^T - X Q^T||
column by column: after quantizing column j, the remaining columns absorb its error, weighted by the
inverse Hessian H^-1 of that objective, H = 2/n X^T X. It works from the upper Cholesky factor U of
H^-1 (H^-1 = U^T U): quantizing column j gives error e = (w_j - q_j) / U_jj, and the columns k > j
are updated by w_k -= e * U_jk. Columns are processed in blocks; inside a block the update is applied
column by column, to the columns after the block once per block (one matmul).

The result uses the same portable int4 format as round to nearest (`linear.py`): q in 0..15, groups
of G contiguous input columns, w ~= (q - 8) * scale + zero, a group's (scale, zero) spanning its
[min, max]. In natural order a group's params come from the weight as updated when its first column
is reached. With `act_order`, columns are processed by decreasing H_jj (the inputs with the most
energy first) while groups stay the contiguous original columns the int4 kernels need: the params of
every group are fixed up front from the original weight ("static groups").

Models are quantized block by block (`gptq_quantize`): the calibration tokens are embedded, each
block's four projections get their Hessians from one forward of the float block, are quantized and
installed, and the quantized block's outputs are the next block's inputs, so later blocks see (and
correct for) the errors of earlier ones. That quantized pass runs the dequantized weights through the
dense matmul (the same function as the int4 kernels, which can be far slower on CPUs without their
fast paths, and bf16-only on CUDA).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from fmstack.errors import ParameterError
from fmstack.models.llama import rope_cos_sin, rope_inv_freq
from fmstack.quant import QuantSpec, _set_module, check_shapes, module_from_portable, ops, rtn_portable
from fmstack.quant.linear import dequantize_int4, int4_params

log = logging.getLogger(__name__)

PROJECTIONS = ("attn.wqkv", "attn.wo", "mlp.w_gate_up", "mlp.w_down")


def _quantize_column(w: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    """w `[N]` with per-row (scale, zero) -> (q in 0..15 as float, dequantized value)."""
    q = torch.round((w - zero) / scale + 8.0).clamp_(0, 15)
    return q, (q - 8.0) * scale + zero


def _inverse_hessian_factor(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, computed in fp64. The damping is
    raised tenfold (up to 3 times) if H is still not positive definite."""
    h = h.double()
    mean_diag = torch.diag(h).mean().item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(4):
        lam = damp * (10.0 ** attempt) * mean_diag
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if info.item() == 0:
            if attempt:
                log.warning("gptq: Hessian not positive definite; used damping %.3g", damp * 10.0 ** attempt)
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True)
    raise ParameterError(f"gptq: the Hessian is not positive definite even with damping {damp * 1000:g}; "
                         "use more (or more varied) calibration data")


@torch.no_grad()
def gptq_weight(weight: Tensor, hessian: Tensor, group_size: int, act_order: bool = False,
                damp: float = 0.01, block_size: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ-quantize one weight `[N, K]` given its input Hessian `[K, K]` (any positive scale).

    Returns (q uint8 `[N, K]` in 0..15, scales `[N, K/G]`, zeros `[N, K/G]`) in fp32 on the weight's
    device, with the semantics of `int4_params` / `quantize_int4_with`. Dead inputs (H_jj == 0: the
    column never saw a nonzero input) are rounded to nearest and pass no error to other columns.
    """
    n_rows, k = weight.shape
    if k % group_size:
        raise ParameterError(f"gptq: group size {group_size} does not divide the input width {k}")
    if damp <= 0:
        raise ParameterError(f"gptq: damp={damp} is invalid: must be > 0")
    device = weight.device
    # Transposed layout, wt `[K, N]`: a column of W is a contiguous row here.
    wt = weight.detach().to(torch.float32).T.contiguous()
    h = hessian.to(device=device, dtype=torch.float64).clone()
    dead = torch.diag(h) == 0
    if dead.any():
        h[dead, :] = 0
        h[:, dead] = 0
        h[dead, dead] = 1.0  # decoupled from the other columns: no error flows in or out
        log.debug("gptq: %d dead input columns of %d", int(dead.sum()), k)
    n_groups = k // group_size
    scales = torch.empty(n_groups, n_rows, dtype=torch.float32, device=device)  # transposed too
    zeros = torch.empty_like(scales)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        s, z = int4_params(weight.detach(), group_size)  # static groups, from the original weight
        scales.copy_(s.T)
        zeros.copy_(z.T)
        wt = wt[perm]
        h = h[perm][:, perm]
        group_of = (perm // group_size).tolist()  # processing position -> original group
    else:
        perm = None
    u = _inverse_hessian_factor(h, damp).to(torch.float32)
    del h
    qt = torch.zeros(k, n_rows, dtype=torch.float32, device=device)
    # A block holds whole groups, so a group's params come from its already-updated columns.
    bs = max(1, math.ceil(block_size / group_size)) * group_size
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            if act_order:
                g = group_of[col]
            else:
                g = col // group_size
                if col % group_size == 0:
                    s, z = int4_params(w1[j:j + group_size].T, group_size)
                    scales[g], zeros[g] = s[:, 0], z[:, 0]
            qj, wq = _quantize_column(w1[j], scales[g], zeros[g])
            qt[col] = qj
            e = (w1[j] - wq) / u1[j, j]
            w1[j:] -= u1[j, j:, None] * e[None, :]
            err1[j] = e
        wt[i2:] -= u[i1:i2, i2:].T @ err1
    if perm is not None:
        qt = qt[torch.argsort(perm)]
    q, scales, zeros = qt.T.contiguous(), scales.T.contiguous(), zeros.T.contiguous()
    return q.to(torch.uint8), scales, zeros


def gptq_portable(weight: Tensor, hessian: Tensor, spec: QuantSpec, act_order: bool = False, damp: float = 0.01,
                  block_size: int = 128) -> dict[str, Tensor]:
    """Portable int4 tensors (`{"qweight", "scales", "zeros"}`, as `rtn_portable`) of one weight."""
    q, scales, zeros = gptq_weight(weight, hessian, spec.group_size, act_order, damp, block_size)
    return {"qweight": ops.pack_uint4(q), "scales": scales, "zeros": zeros}


def _dequantized_linear(t: dict[str, Tensor], group_size: int, dtype: torch.dtype) -> nn.Linear:
    """A plain Linear holding the dequantized weight of portable int4 tensors: the function the int4
    kernels compute, but through the dense matmul (fast everywhere, in the model dtype)."""
    w = dequantize_int4(ops.unpack_uint4(t["qweight"]), t["scales"], t["zeros"], group_size)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=dtype)
    lin.weight.copy_(w)
    return lin.requires_grad_(False)


class _HessianHook:
    """Forward pre-hook accumulating sum(X^T X) (fp32) and the row count over a Linear's inputs."""

    def __init__(self, k: int, device: torch.device):
        self.sum = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.rows = 0

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def hessian(self) -> Tensor:
        return self.sum.mul_(2.0 / max(self.rows, 1))


def _batches(calib_ids: Tensor | Sequence[Sequence[int]], micro_batch: int, device: torch.device) -> list[Tensor]:
    """Calibration samples -> LongTensor micro-batches `[b, T]` (consecutive samples of equal length)."""
    if isinstance(calib_ids, Tensor):
        if calib_ids.dim() != 2 or calib_ids.shape[0] == 0 or calib_ids.shape[1] == 0:
            raise ParameterError(f"gptq: calibration ids must be a non-empty [n, T] tensor, got "
                                 f"{tuple(calib_ids.shape)}")
        rows = calib_ids.long()
        return [rows[i:i + micro_batch].to(device) for i in range(0, rows.shape[0], micro_batch)]
    samples = [list(s) for s in calib_ids]
    if not samples or any(len(s) == 0 for s in samples):
        raise ParameterError("gptq: calibration ids must be a non-empty list of non-empty token lists")
    out: list[Tensor] = []
    run: list[list[int]] = []
    for s in samples:
        if run and (len(s) != len(run[0]) or len(run) == micro_batch):
            out.append(torch.tensor(run, dtype=torch.long, device=device))
            run = []
        run.append(s)
    out.append(torch.tensor(run, dtype=torch.long, device=device))
    return out


@torch.no_grad()
def gptq_quantize(model: nn.Module, calib_ids: Tensor | Sequence[Sequence[int]], spec: QuantSpec,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  keep: dict[str, Tensor] | None = None, micro_batch: int = 8, head: str = "rtn") -> nn.Module:
    """Quantize `model` (a `Transformer`, in place) with GPTQ; the output head is rounded to nearest
    (`head="rtn"`, default) or GPTQ-quantized too (`head="gptq"`, inputs: the final-normed hidden states).

    `calib_ids`: calibration token ids, a LongTensor `[n, T]` or a list of token lists (e.g. from
    `calibration_ids`); `spec`: mode "gptq" with its group size; `act_order`: process columns by
    decreasing Hessian diagonal (static groups); `damp`: fraction of the mean Hessian diagonal added
    to it; `block_size`: columns per lazy-update block (rounded up to whole groups); `keep`: receives
    every projection's portable tensors as `{name}.{key}` (on CPU), as `quantize_model` does;
    `micro_batch`: calibration samples per forward.

    Peak memory beyond the model: one block's four Hessians in fp32 (4 * K^2 bytes each: dim^2 for
    wqkv, wo (q_dim^2) and w_gate_up, ffn_dim^2 for w_down; plus an fp64 copy of one during its
    factorization) and two copies of the calibration activations (n * T * dim in the model dtype:
    128 x 256 tokens of SmolLM2-135M, dim 576, take 75 MB each in fp32), plus one micro-batch's
    intermediate activations and, while one projection is quantized, three fp32 `[K, N]` copies of
    its weight (working weight, q, per-block error). With `head="gptq"` the last of those is the
    output head (V x dim).
    """
    if head not in ("rtn", "gptq"):
        raise ParameterError(f"gptq_quantize: head={head!r} is invalid: choose rtn or gptq")
    if spec.mode != "gptq":
        raise ParameterError(f"gptq_quantize needs a QuantSpec with mode 'gptq', got {spec.mode!r}")
    check_shapes(model, spec)
    t0 = time.perf_counter()
    dtype = model.embed.weight.dtype
    xs, run_block = _calibration_inputs(model, _batches(calib_ids, micro_batch, model.embed.weight.device), spec,
                                        act_order)
    for i, block in enumerate(model.layers):
        xs = _gptq_block(block, f"layers.{i}", xs, run_block, spec, (act_order, damp, block_size), keep)
        log.info("gptq: block %d/%d done (%.1fs)", i + 1, len(model.layers), time.perf_counter() - t0)
    if head == "gptq":
        hook = _HessianHook(model.output.in_features, model.output.weight.device)
        for x in xs:
            hook(model.output, (model.norm(x),))
        t = gptq_portable(model.output.weight, hook.hessian(), spec, act_order, damp, block_size)
        del hook
    else:
        t = rtn_portable(model.output.weight, spec)
    del xs
    if keep is not None:
        keep.update({f"output.{k}": v.cpu() for k, v in t.items()})
    _set_module(model, "output", module_from_portable(t, spec, dtype))
    log.info("gptq: quantized %d projections in %.1fs", 4 * len(model.layers) + 1, time.perf_counter() - t0)
    return model


def _calibration_inputs(model: nn.Module, batches: list[Tensor], spec: QuantSpec, act_order: bool):
    """The embedded calibration batches (the first block's inputs) and `run_block(block, inputs)`,
    which runs one block over every batch with the RoPE tables of its length."""
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    log.info("gptq: %d calibration samples, %d tokens, group size %d, act_order=%s", sum(len(b) for b in batches),
             sum(b.numel() for b in batches), spec.group_size, act_order)
    inv_freq = rope_inv_freq(model.config, device=device)
    rope = {}  # T -> (cos, sin, positions)
    for b in batches:
        if b.shape[1] not in rope:
            pos = torch.arange(b.shape[1], device=device)[None]
            rope[b.shape[1]] = (*rope_cos_sin(inv_freq, pos, dtype), pos)

    def run_block(block: nn.Module, inputs: list[Tensor]) -> list[Tensor]:
        outs = []
        for x in inputs:
            cos, sin, pos = rope[x.shape[1]]
            outs.append(block(x, cos, sin, pos.expand(x.shape[0], -1), None))
        return outs

    return [model.embed(b) for b in batches], run_block


def _gptq_block(block: nn.Module, name: str, xs: list[Tensor], run_block, spec: QuantSpec, solver: tuple,
                keep: dict[str, Tensor] | None) -> list[Tensor]:
    """GPTQ-quantize one block's four projections in place (Hessians from the float block's inputs);
    returns the next block's inputs, computed through the quantized (dequantized) weights.
    `solver`: (act_order, damp, block_size) for `gptq_portable`."""
    dtype = block.attn_norm.weight.dtype
    linears = {p: block.get_submodule(p) for p in PROJECTIONS}
    hooks = {p: _HessianHook(lin.in_features, lin.weight.device) for p, lin in linears.items()}
    handles = [lin.register_forward_pre_hook(hooks[p]) for p, lin in linears.items()]
    try:
        run_block(block, xs)  # float block: the inputs of all four projections
    finally:
        for hd in handles:
            hd.remove()
    portable = {}
    for p, lin in linears.items():
        h = hooks.pop(p).hessian()
        portable[p] = t = gptq_portable(lin.weight, h, spec, *solver)
        del h
        _set_module(block, p, _dequantized_linear(t, spec.group_size, dtype))
    xs = run_block(block, xs)  # quantized block (dequantized weights): next block's inputs
    for p, t in portable.items():
        if keep is not None:
            keep.update({f"{name}.{p}.{k}": v.cpu() for k, v in t.items()})
        _set_module(block, p, module_from_portable(t, spec, dtype))
    return xs


def _read_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ParameterError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                text = row.get("text", row.get("ctx")) if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise ParameterError(f"{path}:{lineno}: expected an object with a 'text' or 'ctx' string field")
                if text.strip():
                    texts.append(text.strip())
        return texts
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ParameterError(f"calibration file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [text] if text.strip() else []


def calibration_ids(tokenizer, path: str | Path, n_samples: int = 128, seq_len: int = 256,
                    seed: int = 0) -> Tensor:
    """`n_samples` random windows of `seq_len` tokens (LongTensor `[n, seq_len]`, seeded) from a text.

    `path`: a UTF-8 text file, or a JSONL file whose rows give their `text` field (else `ctx`, as in
    HellaSwag); the rows are joined with blank lines and tokenized as one text (no BOS)."""
    path = Path(path)
    if n_samples < 1 or seq_len < 1:
        raise ParameterError(f"calibration: n_samples={n_samples} and seq_len={seq_len} must be >= 1")
    if not path.is_file():
        raise ParameterError(f"calibration file {path}: no such file")
    texts = _read_texts(path)
    if not texts:
        raise ParameterError(f"calibration file {path}: no text in it")
    ids = tokenizer.encode("\n\n".join(texts), add_bos=False)
    if len(ids) < seq_len:
        raise ParameterError(f"calibration file {path}: {len(ids)} tokens, fewer than seq_len={seq_len}")
    if n_samples * seq_len > len(ids):
        log.warning("calibration: %d windows of %d tokens overlap in a text of %d tokens", n_samples, seq_len,
                    len(ids))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=g)
    t = torch.tensor(ids, dtype=torch.long)
    return torch.stack([t[s:s + seq_len] for s in starts.tolist()])
