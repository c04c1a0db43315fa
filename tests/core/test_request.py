from __future__ import annotations

import pytest

from core.request import Request
from core.sampling_params import SamplingParams


@pytest.mark.parametrize("prompt_len, max_tokens", [(1, 1), (10, 500), (1000, 300)])
def test_all_token_ids_is_an_own_copy_of_the_prompt(prompt_len, max_tokens):
    prompt = list(range(prompt_len))
    r = Request("a", prompt, SamplingParams(max_tokens=max_tokens))
    assert r.all_token_ids == prompt and r.all_token_ids is not prompt
    r.all_token_ids.append(7)
    assert prompt == list(range(prompt_len)) and r.num_tokens == prompt_len + 1
