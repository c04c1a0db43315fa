"""Prompt content: token ids, never text.

Prompts are token id lists in both backends so prefix caching sees real sharing. While a
workload is held in memory, a prompt is a tuple of read-only int32 *segments* whose
concatenation is the prompt: a shared system prompt, a conversation's history or a
Mooncake hash block is stored once and referenced by every request that contains it.
100,000 prompts of 1,000 tokens cost 400 MB this way instead of ~3.6 GB as Python lists
(and ~2 s of ``tolist``); the list is built only when a request is issued
(``segments_to_list``).

Multi-turn conversations: turn i's prompt is turn i-1's prompt + turn i-1's *output* +
new user tokens. The output in that history is a deterministic pseudo-random stand-in drawn
from the workload seed, not what a backend generated: a model's real output differs between
the simulator and the executor (and between runs), and feeding it back would make the two
backends see different prompts. Backends must not splice their sampled tokens into later
turns; the workload already fixed every prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from core.workloads._checks import check_int
from core.workloads.traces import MOONCAKE_BLOCK_SIZE

TokenSegments = tuple[np.ndarray, ...]
TOKEN_DTYPE = np.int32
_MAX_VOCAB = 2**31 - 1  # token ids are int32


def check_vocab_size(owner: str, vocab_size: int) -> int:
    vocab_size = check_int(owner, "vocab_size", vocab_size, 1)
    if vocab_size > _MAX_VOCAB:
        raise ValueError(f"{owner}.vocab_size must be <= {_MAX_VOCAB} (int32 token ids), got {vocab_size!r}")
    return vocab_size


def random_token_segments(rng: np.random.Generator, lengths: np.ndarray | Sequence[int],
                          vocab_size: int) -> list[np.ndarray]:
    """One uniform token block per length, as read-only views of a single draw (fast)."""
    vocab_size = check_vocab_size("random_token_segments", vocab_size)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or (lengths < 0).any():
        raise ValueError(f"random_token_segments.lengths must be a 1-D array of ints >= 0, got {lengths!r}")
    buf = rng.integers(0, vocab_size, size=int(lengths.sum()), dtype=TOKEN_DTYPE)
    buf.flags.writeable = False
    ends = np.cumsum(lengths)
    return [buf[s:e] for s, e in zip((ends - lengths).tolist(), ends.tolist())]


def segments_len(segments: TokenSegments) -> int:
    return sum(len(s) for s in segments)


# Python int objects for token ids 0..len-1, index = value (see ``_int_list``). Grown on
# demand up to _INT_TABLE_MAX entries, which covers the common vocabularies (<= 262,144).
_INT_TABLE_MAX = 1 << 18
_int_table: np.ndarray = np.empty(0, dtype=object)


def _int_list(ids: np.ndarray) -> list[int]:
    """``ids.tolist()``, with every token id a shared int object from ``_int_table``.

    ``tolist`` allocates one int object per token, which dominated building the requests
    of a large workload (10^7 tokens); taking existing objects from a table of the
    vocabulary only copies references (about twice as fast), and the lists free faster.
    Ids outside the table (negative, beyond the cap) and arrays that are not native
    integers fall back to ``tolist``; either way the values are the same.
    """
    global _int_table
    if ids.dtype.kind not in "iu" or not ids.dtype.isnative or ids.size == 0:
        return ids.tolist()
    # Viewed as unsigned, negative ids become huge, so one max bounds both ends.
    top = int(ids.view(f"u{ids.dtype.itemsize}").max())
    if top >= len(_int_table):
        if top >= _INT_TABLE_MAX:
            return ids.tolist()
        _int_table = np.arange(min(_INT_TABLE_MAX, max(top + 1, 2 * len(_int_table)))).astype(object)
    return _int_table.take(ids).tolist()


def segments_to_list(segments: TokenSegments) -> list[int]:
    """The prompt as a list of Python ints (what ``core.request.Request`` takes)."""
    if not segments:
        return []
    return _int_list(segments[0] if len(segments) == 1 else np.concatenate(segments))


def truncate_segments(segments: TokenSegments, num_tokens: int) -> TokenSegments:
    """The first ``num_tokens`` tokens (keeping the head keeps shared prefixes intact)."""
    num_tokens = check_int("truncate_segments", "num_tokens", num_tokens, 0)
    out: list[np.ndarray] = []
    left = num_tokens
    for seg in segments:
        if left <= 0:
            break
        out.append(seg if len(seg) <= left else seg[:left])
        left -= len(seg)
    return tuple(out)


def conversation_prompts(prefix: TokenSegments, user_parts: Sequence[np.ndarray],
                         output_parts: Sequence[np.ndarray]) -> list[TokenSegments]:
    """Prompts of one conversation's turns, in order.

    Turn 0 is ``prefix + user_parts[0]``; turn i is turn i-1's prompt +
    ``output_parts[i-1]`` + ``user_parts[i]``, so each prompt is a strict prefix of the
    next one (segments are shared, not copied). A single-turn request is the case
    ``len(user_parts) == 1``.
    """
    if len(output_parts) < len(user_parts) - 1:
        raise ValueError(f"conversation_prompts: {len(user_parts)} turns need {len(user_parts) - 1} "
                         f"output parts, got {len(output_parts)}")
    prompts: list[TokenSegments] = []
    history = prefix
    for i, user in enumerate(user_parts):
        prompt = history + (user,)
        prompts.append(prompt)
        if i + 1 < len(user_parts):
            history = prompt + (output_parts[i],)
    return prompts


@dataclass(frozen=True)
class SystemPromptGroups:
    """``len(prefix_lens)`` shared system prompts; group g's prompt has ``prefix_lens[g]`` tokens.

    Every request (every conversation, for multi-turn) is assigned one group uniformly at
    random and its prompt starts with that group's exact token ids, so the KV prefix cache
    can reuse them across requests. The prefix is prepended: the sampled input length
    counts the user tokens after it.
    """

    prefix_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        lens = tuple(self.prefix_lens)
        if not lens:
            raise ValueError("SystemPromptGroups.prefix_lens must name at least one group, got ()")
        for g, n in enumerate(lens):
            check_int("SystemPromptGroups", f"prefix_lens[{g}]", n, 1)
        object.__setattr__(self, "prefix_lens", tuple(int(n) for n in lens))

    @property
    def num_groups(self) -> int:
        return len(self.prefix_lens)

    def prefixes(self, rng: np.random.Generator, vocab_size: int) -> list[np.ndarray]:
        """Each group's system-prompt tokens."""
        return random_token_segments(rng, self.prefix_lens, vocab_size)

    def assign(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """A group index for each of ``n`` requests."""
        return rng.integers(0, self.num_groups, size=check_int("SystemPromptGroups", "n", n, 0))


# splitmix64 (Steele et al.): a cheap, well-mixed 64-bit hash, vectorised in numpy. uint64
# array arithmetic wraps modulo 2**64, which is what the hash needs.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


class HashBlockTokens:
    """Token blocks for prefix-block hash ids (Mooncake ``hash_ids``), cached per id.

    Block tokens are a pure function of (seed, vocab_size, block_size, hash id): the same
    id gives the same tokens in every request, at every position, in either backend and
    whatever order blocks are first requested in, so the trace's prefix sharing turns into
    identical token prefixes. Blocks are computed counter-style (a hash of id and
    position), not drawn from a generator, which makes them independent of the request.
    """

    def __init__(self, vocab_size: int, seed: int, block_size: int = MOONCAKE_BLOCK_SIZE) -> None:
        self.vocab_size = check_vocab_size("HashBlockTokens", vocab_size)
        self.seed = check_int("HashBlockTokens", "seed", seed, 0)
        self.block_size = check_int("HashBlockTokens", "block_size", block_size, 1)
        self._seed_key = _splitmix64(np.array([self.seed], dtype=np.uint64))[0]
        self._offsets = (np.arange(1, self.block_size + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        """Number of distinct blocks cached."""
        return len(self._cache)

    def _compute(self, hash_ids: list[int]) -> None:
        keys = _splitmix64(np.asarray(hash_ids, dtype=np.uint64) ^ self._seed_key)
        blocks = (_splitmix64(keys[:, None] + self._offsets) % np.uint64(self.vocab_size)).astype(TOKEN_DTYPE)
        blocks.flags.writeable = False
        for h, row in zip(hash_ids, blocks):
            self._cache[h] = row

    def expand(self, hash_ids: Sequence[int], num_tokens: int) -> TokenSegments:
        """The prompt of ``num_tokens`` tokens made of these blocks, the last one truncated.

        ``len(hash_ids)`` must equal ``ceil(num_tokens / block_size)``.
        """
        num_tokens = check_int("HashBlockTokens.expand", "num_tokens", num_tokens, 1)
        expected = -(-num_tokens // self.block_size)
        if len(hash_ids) != expected:
            raise ValueError(f"HashBlockTokens.expand: {len(hash_ids)} hash ids for {num_tokens} tokens, "
                             f"expected ceil({num_tokens}/{self.block_size}) = {expected}")
        cache = self._cache
        missing = [h for h in dict.fromkeys(hash_ids) if h not in cache]
        if missing:
            bad = [h for h in missing if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 0]
            if bad:
                raise ValueError(f"HashBlockTokens.expand: hash ids must be ints >= 0, got {bad[0]!r}")
            self._compute([int(h) for h in missing])
        blocks = [cache[h] for h in hash_ids]
        tail = num_tokens - (expected - 1) * self.block_size
        if tail < self.block_size:
            blocks[-1] = blocks[-1][:tail]
        return tuple(blocks)


__all__ = ["TokenSegments", "TOKEN_DTYPE", "check_vocab_size", "random_token_segments", "segments_len",
           "segments_to_list", "truncate_segments", "conversation_prompts", "SystemPromptGroups",
           "HashBlockTokens"]
