"""Token sampling for a batch of logits rows: greedy, temperature, top-k, top-p, seeds.

Everything is batched. A greedy-only batch is one ``argmax``. On a GPU, a batch that uses
only temperatures (the common case) is one fused Triton pass over the logits in the model
dtype: Gumbel-max sampling, ``argmax(logits / T - log(-log(u)))`` with Philox uniforms,
which draws from ``softmax(logits / T)`` without materialising fp32 logits, probabilities
or a sort (a greedy row, T = 0, takes the plain argmax in the same pass). Otherwise the
logits are divided by per-row temperatures, optionally cut by per-row top-k / top-p (one
sort or one ``topk`` for the whole batch), and a token is drawn with the exponential race
(``argmax(probs / q)``, ``q ~ Exp(1)``), which equals sampling from ``probs`` and needs no
``multinomial``. Rows of seeded requests draw their ``q`` from the request's own
``torch.Generator``, so their tokens depend only on the seed and the logits, not on which
other requests share the batch; only those rows are touched one by one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step (device tensors, or None when unused).

    ``temperature`` holds 0 for greedy rows. ``top_k`` is int (0 = off), ``top_p`` float
    (1 = off); ``max_top_k`` is the largest k on the host, used to pick ``topk`` over a
    full sort when only top-k is active. ``generators`` maps a row to its request's
    generator.
    """

    all_greedy: bool = True
    any_greedy: bool = False
    temperature: torch.Tensor | None = None
    top_k: torch.Tensor | None = None
    top_p: torch.Tensor | None = None
    max_top_k: int = 0
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    seed: int = 0  # Philox seed of this step's fused sampling (unseeded rows)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                      max_top_k: int = 0) -> torch.Tensor:
    """Mask (to -inf) the logits outside each row's top-k and top-p sets. Rows with
    ``top_k <= 0`` / ``top_p >= 1`` are left alone. May modify ``logits`` in place."""
    vocab = logits.shape[-1]
    if top_k is not None:
        top_k = top_k.long()
        top_k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    if top_p is None:
        if top_k is None:
            return logits
        if 0 < max_top_k < vocab:
            # Only top-k: the k-th largest value per row from one small topk, no full sort.
            values = logits.topk(max_top_k, dim=-1).values
            kth = values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
            # Rows with k off (== vocab > max_top_k) keep everything.
            kth = torch.where((top_k >= vocab).unsqueeze(1), torch.full_like(kth, float("-inf")), kth)
            return logits.masked_fill_(logits < kth, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        drop = cum <= (1.0 - top_p.float()).unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, order, sorted_logits)


#: Vocabulary entries per program of the fused sampler (19 programs per row for Qwen3).
SAMPLER_SPLIT = 8192


@triton.jit(do_not_specialize=["seed"])
def _gumbel_argmax_kernel(logits_ptr, temp_ptr, part_val_ptr, part_idx_ptr, stride_row, vocab, seed,
                          SPLIT: tl.constexpr, BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Program (row, split): best Gumbel-perturbed score of the split's vocabulary slice."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    greedy = temp == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    lo = split * SPLIT
    for start in range(0, SPLIT, BLOCK):
        cols = lo + start + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        u = tl.rand(seed, row * vocab + cols)
        gumbel = -tl.log(-tl.log(u))
        score = tl.where(greedy, x, x * inv_t + gumbel)
        better = score > best_v
        best_v = tl.where(better, score, best_v)
        best_i = tl.where(better, cols, best_i)
    m = tl.max(best_v, axis=0)
    idx = tl.min(tl.where(best_v == m, best_i, 2147483647), axis=0)
    tl.store(part_val_ptr + row * NUM_SPLITS + split, m)
    tl.store(part_idx_ptr + row * NUM_SPLITS + split, idx)


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """Sample one token per row from ``softmax(logits / T)`` (argmax where T == 0) in one
    pass over ``logits`` [N, vocab] (any float dtype, CUDA). Returns int64 [N]."""
    n, vocab = logits.shape
    assert logits.stride(1) == 1
    # Every constexpr depends on the vocabulary only, never on the batch: a batch-dependent
    # split would compile a new kernel variant for each batch size met during a run.
    block = 1024
    split = SAMPLER_SPLIT
    num_splits = triton.cdiv(vocab, split)
    part_val = torch.empty(n, num_splits, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(n, num_splits, dtype=torch.int32, device=logits.device)
    _gumbel_argmax_kernel[(n, num_splits)](logits, temperature, part_val, part_idx, logits.stride(0), vocab,
                                           seed & 0x7FFFFFFF, SPLIT=split, BLOCK=block, NUM_SPLITS=num_splits,
                                           num_warps=4)
    if num_splits == 1:
        return part_idx[:, 0].long()
    best = part_val.argmax(dim=1, keepdim=True)
    return part_idx.gather(1, best).squeeze(1).long()


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One token id per row of ``logits`` [N, vocab]; returns int64 [N].

    ``logits`` may be in the model dtype: the fused GPU path reads it as is, the torch
    path upcasts to fp32 first.
    """
    if batch.all_greedy:
        return logits.argmax(dim=-1)
    if logits.is_cuda and batch.top_k is None and batch.top_p is None:
        assert batch.temperature is not None
        tokens = gumbel_sample(logits, batch.temperature, batch.seed)
        if batch.generators:  # seeded rows: redraw them from their own generators
            rows = list(batch.generators)
            index = torch.tensor(rows, device=logits.device)
            sub = SamplingBatch(all_greedy=False, temperature=batch.temperature.index_select(0, index),
                                generators={i: batch.generators[r] for i, r in enumerate(rows)})
            tokens[index] = _torch_sample(logits.index_select(0, index).float(), sub)
        return tokens
    return _torch_sample(logits.float(), batch)


def _torch_sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The general path on fp32 logits (modified in place)."""
    temperature = batch.temperature
    assert temperature is not None
    greedy_mask = None
    greedy = None
    if batch.any_greedy:
        greedy_mask = temperature == 0
        greedy = logits.argmax(dim=-1)
        temperature = temperature.masked_fill(greedy_mask, 1.0)
    logits = logits.div_(temperature.unsqueeze(1))
    if batch.top_k is not None or batch.top_p is not None:
        logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p, batch.max_top_k)
    probs = logits.softmax(dim=-1)
    q = torch.empty_like(probs)
    if len(batch.generators) < probs.shape[0]:
        q.exponential_()
    for row, generator in batch.generators.items():
        q[row].exponential_(generator=generator)
    sampled = probs.div_(q).argmax(dim=-1)
    if greedy_mask is not None:
        sampled = torch.where(greedy_mask, greedy, sampled)
    return sampled
