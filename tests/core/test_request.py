from __future__ import annotations

import sys

import pytest

from core.request import Request
from core.sampling_params import SamplingParams


@pytest.mark.parametrize("prompt_len, max_tokens", [(1, 1), (10, 500), (1000, 300), (3000, 4000)])
def test_all_token_ids_is_an_own_copy_of_the_prompt_with_room_for_outputs(prompt_len, max_tokens):
    prompt = list(range(prompt_len))
    r = Request("a", prompt, SamplingParams(max_tokens=max_tokens))
    assert r.all_token_ids == prompt and r.all_token_ids is not prompt
    r.all_token_ids.append(7)
    assert prompt == list(range(prompt_len))
    if prompt_len >= max_tokens:  # the outputs fit without a reallocation (CPython list sizes)
        capacity = (sys.getsizeof(r.all_token_ids) - sys.getsizeof([])) // 8
        assert capacity >= prompt_len + min(max_tokens, 1024)
