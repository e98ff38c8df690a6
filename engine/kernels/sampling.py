"""One token per row in a single pass over the vocabulary, replacing torch's float -> /temperature -> softmax ->
exponential_ -> divide -> argmax chain, which reads and writes a [batch, vocab] fp32 tensor about ten times a step.

Greedy rows (inv_temperature 0) take the argmax of the logits. Random rows take the Gumbel-max draw
argmax_v(logits[v] * inv_t - log(-log(u_v))), u uniform from Philox, which is distributed as
softmax(logits * inv_t) without ever normalizing. A -inf logit scores -inf and is never drawn; a row of only -inf
gives index 0, greedy or not. inv_temperature must be >= 0; NaN logits give an unspecified token.

Stage one runs a program per (row, vocab chunk), so even batch 1 spreads over the GPU, and writes each chunk's
best score and index; stage two picks each row's best chunk. Both break ties towards the lowest index, as
torch.argmax does. Nothing is read on the host, so sampling stays asynchronous and capturable (the seed is a launch
argument: a captured CUDA graph replays the seed it was captured with).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096  # vocab entries per program: 38 programs per row at a 151936-token vocab
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _chunk_best(row_ptr, first, vocab, inv_t, seed, counter, QUARTER: tl.constexpr, RANDOM: tl.constexpr):
    """Best (score, index) over entries [first, first + 4 * QUARTER), read as four quarters: one Philox call per
    lane gives four uniforms, one per quarter."""
    if RANDOM:
        r = tl.randint4x(seed, counter)
    else:
        r = (0, 0, 0, 0)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = first  # kept when everything is -inf
    for k in tl.static_range(4):
        v = first + k * QUARTER + tl.arange(0, QUARTER)
        x = tl.load(row_ptr + v, mask=v < vocab, other=float("-inf")).to(tl.float32)
        if RANDOM:  # top 23 random bits -> u in [2**-24, 1 - 2**-24], exact in fp32 (24 bits would round to 1.0)
            u = ((r[k].to(tl.uint32, bitcast=True) >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
            x = x * inv_t - tl.log(-tl.log(u))
        # tie_break_left: the first max, as torch (the interpreter always does so, so CPU tests cannot tell)
        score, idx = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        better = score > best  # strict: a tie in a later quarter keeps the earlier index
        best = tl.where(better, score, best)
        best_idx = tl.where(better, first + k * QUARTER + idx, best_idx)
    return best, best_idx


@triton.jit(do_not_specialize=["seed"])
def _chunk_kernel(logits, inv_temperature, chunk_score, chunk_index, seed, vocab, stride_row, stride_t,
                  QUARTER: tl.constexpr):
    row, chunk, num_chunks = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
    row_ptr = logits + row * stride_row
    first = chunk * (4 * QUARTER)
    inv_t = tl.load(inv_temperature + row * stride_t)
    # Philox counters unique per (row, chunk, lane) in 64 bits, so no wrap at batch * vocab >= 2**31
    counter = (row * num_chunks + chunk) * QUARTER + tl.arange(0, QUARTER)
    if inv_t == 0.0:  # greedy rows skip Philox altogether (and never compute 0 * -inf)
        best, best_idx = _chunk_best(row_ptr, first, vocab, inv_t, seed, counter, QUARTER, False)
    else:
        best, best_idx = _chunk_best(row_ptr, first, vocab, inv_t, seed, counter, QUARTER, True)
    tl.store(chunk_score + row * num_chunks + chunk, best)
    tl.store(chunk_index + row * num_chunks + chunk, best_idx)


@triton.jit
def _pick_kernel(chunk_score, chunk_index, out, num_chunks, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    score = tl.load(chunk_score + row * num_chunks + c, mask=c < num_chunks, other=float("-inf"))
    _, best = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)  # chunks are in vocab order
    tl.store(out + row, tl.load(chunk_index + row * num_chunks + best).to(tl.int64))


def sample_tokens(logits: torch.Tensor, inv_temperature: torch.Tensor, seed: int, *, chunk: int = CHUNK
                  ) -> torch.Tensor:
    """logits [B, V] (fp32/bf16/fp16, last dim contiguous, any row stride); inv_temperature [B] float32 on the
    same device, 0.0 meaning greedy for that row. Returns int64 [B] token ids. Rows draw independently; the same
    (seed, row, chunk) gives the same draw. `chunk` (vocab entries per program, a power of two >= 4) is for tests
    and tuning."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if logits.dtype not in _DTYPES:
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if vocab == 0 or (vocab > 1 and logits.stride(1) != 1):
        raise ValueError(f"logits needs a non-empty, contiguous last dim, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    if inv_temperature.shape != (batch,) or inv_temperature.dtype != torch.float32:
        raise ValueError(f"inv_temperature must be float32 of shape ({batch},), got {inv_temperature.dtype} "
                         f"of shape {tuple(inv_temperature.shape)}")
    if inv_temperature.device != logits.device:
        raise ValueError(f"inv_temperature is on {inv_temperature.device}, logits on {logits.device}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    if chunk < 4 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 4, got {chunk}")
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    num_chunks = triton.cdiv(vocab, chunk)
    score = torch.empty(batch, num_chunks, dtype=torch.float32, device=logits.device)
    index = torch.empty(batch, num_chunks, dtype=torch.int32, device=logits.device)
    seed = (seed + 2**63) % 2**64 - 2**63  # any int, as the int64 whose 64 bits key Philox
    _chunk_kernel[(batch, num_chunks)](logits, inv_temperature, score, index, seed, vocab, logits.stride(0),
                                       inv_temperature.stride(0), QUARTER=chunk // 4)
    _pick_kernel[(batch,)](score, index, out, num_chunks, BLOCK_C=triton.next_power_of_2(num_chunks), num_warps=1)
    return out
