"""Model correctness against transformers, through the paged-KV interface.

Every family case (see conftest) is checked three ways: (a) one-shot prompt logits equal
HF's, (b) greedy generation with a chunked prefill, shuffled cache blocks and one-token
decode steps equals HF's ``generate``, (c) a mixed batch (prefill continuation, prefix-cache
hit, decode) flattened into one forward equals each request run alone and HF. Then the
loader's and the random-model writer's formats and error messages.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from executor.config import ModelConfig
from executor.layers import TORCH_OPS, AttentionMetadata, set_kernel_ops, triton_ops
from executor.loader import load_config, load_model
from executor.make_random_model import CATALOG, checkpoint_shapes, hf_config_for, main, write_random_model

if TYPE_CHECKING:
    from conftest import FamilyCase

ATOL = 1e-4
BLOCK_SIZE = 16
VOCAB = 512  # the tiny shapes' vocabulary


class PagedKV:
    """A minimal stand-in for the model runner's cache: NaN-filled per-layer K/V pools (so
    any read of a slot that was never written poisons the logits) and shuffled block ids
    (so a block-table indexing mistake cannot pass by accident)."""

    def __init__(self, model: torch.nn.Module, num_blocks: int = 24, seed: int = 0) -> None:
        cfg: ModelConfig = model.config
        shape = (num_blocks, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
        self.model = model
        self.device = next(model.parameters()).device
        model.bind_kv_cache([(torch.full(shape, float("nan"), dtype=cfg.dtype, device=self.device),
                              torch.full(shape, float("nan"), dtype=cfg.dtype, device=self.device))
                             for _ in range(cfg.num_hidden_layers)])
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()

    def allocate(self, num_tokens: int) -> list[int]:
        return [self.free.pop() for _ in range(math.ceil(num_tokens / BLOCK_SIZE))]

    def step(self, requests: Sequence[tuple[Sequence[int], int, int, list[int]]]) -> torch.Tensor:
        """Run one flattened forward; each request is (all its token ids, num_computed,
        num_new, block_table). Returns logits for every scheduled token [T, vocab]."""
        ids = [t for tokens, c, n, _ in requests for t in tokens[c:c + n]]
        positions = [p for _, c, n, _ in requests for p in range(c, c + n)]
        metadata = AttentionMetadata.build([r[1] for r in requests], [r[2] for r in requests],
                                           [r[3] for r in requests], BLOCK_SIZE, self.device)
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids, device=self.device),
                                torch.tensor(positions, device=self.device), metadata)
            return self.model.compute_logits(hidden).cpu()


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(hf: torch.nn.Module, tokens: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([list(tokens)], device=hf.device)).logits[0].float().cpu()


def our_logits_alone(model: torch.nn.Module, tokens: Sequence[int]) -> torch.Tensor:
    kv = PagedKV(model, seed=7)
    return kv.step([(tokens, 0, len(tokens), kv.allocate(len(tokens)))])


# ---------------------------------------------------------------- (a) (b) (c) vs HF

def check_prompt_logits(model: torch.nn.Module, hf: torch.nn.Module, atol: float) -> None:
    tokens = random_tokens(37, seed=1)
    torch.testing.assert_close(our_logits_alone(model, tokens), hf_logits(hf, tokens), atol=atol, rtol=0)


def greedy_paged(model: torch.nn.Module, prompt: list[int], max_new_tokens: int,
                 first_chunk: int) -> list[int]:
    """Prefill in two chunks, then decode one token per step, all through the paged cache."""
    kv = PagedKV(model)
    tokens = list(prompt)
    table = kv.allocate(len(prompt) + max_new_tokens)
    kv.step([(tokens, 0, first_chunk, table)])
    logits = kv.step([(tokens, first_chunk, len(prompt) - first_chunk, table)])
    out: list[int] = []
    while len(out) < max_new_tokens:
        out.append(int(logits[-1].argmax()))
        tokens.append(out[-1])
        logits = kv.step([(tokens, len(tokens) - 1, 1, table)])
    return out


def check_greedy_generation(model: torch.nn.Module, hf: torch.nn.Module) -> None:
    prompt = random_tokens(37, seed=2)
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt], device=hf.device), max_new_tokens=20, do_sample=False)
    expected = hf_out[0, len(prompt):].tolist()
    assert len(expected) == 20, "HF stopped at EOS; pick another prompt seed"
    assert greedy_paged(model, prompt, 20, first_chunk=20) == expected


def check_mixed_batch(model: torch.nn.Module, hf: torch.nn.Module, atol: float) -> None:
    """One step holding a prefill continuation (A), a prefix-cache hit that shares A's first
    block (B) and a decode (C); every row must equal the request run alone, and HF."""
    a = random_tokens(40, seed=3)
    b = a[:16] + random_tokens(14, seed=4)
    c = random_tokens(10, seed=5)
    kv = PagedKV(model)
    table_a = kv.allocate(len(a))
    table_b = table_a[:1] + kv.allocate(len(b) - 16)
    table_c = kv.allocate(len(c))
    kv.step([(a, 0, 24, table_a), (c, 0, 9, table_c)])  # earlier step: partial prefills
    logits = kv.step([(a, 24, 16, table_a), (b, 16, 14, table_b), (c, 9, 1, table_c)])
    rows_a, rows_b, rows_c = logits.split([16, 14, 1])
    for rows, tokens, start in ((rows_a, a, 24), (rows_b, b, 16), (rows_c, c, 9)):
        torch.testing.assert_close(rows, our_logits_alone(model, tokens)[start:], atol=atol, rtol=0)
        torch.testing.assert_close(rows, hf_logits(hf, tokens)[start:], atol=atol, rtol=0)


def test_prompt_logits_match_hf(family_case: FamilyCase) -> None:
    check_prompt_logits(family_case.ours.model, family_case.hf, ATOL)


def test_greedy_generation_matches_hf(family_case: FamilyCase) -> None:
    check_greedy_generation(family_case.ours.model, family_case.hf)


def test_mixed_batch_matches_per_request(family_case: FamilyCase) -> None:
    check_mixed_batch(family_case.ours.model, family_case.hf, ATOL)


# ---------------------------------------------------------------- the kernel seam

@pytest.mark.parametrize("arch,length,steps,chunk,seed", [
    ("Qwen3ForCausalLM", 37, 8, 20, 2),
    ("LlamaForCausalLM", 29, 6, 17, 3),  # the fused attention prologue without q/k norm: rotary + KV store
])
def test_triton_kernel_ops_through_the_seam(make_tiny_model: Callable[..., Path], arch: str, length: int,
                                            steps: int, chunk: int, seed: int) -> None:
    """The ``executor.kernels`` adapter plugs in without model changes (on CPU the kernels
    run their torch references, so this checks the wiring; GPU runs check the kernels)."""
    pytest.importorskip("triton")
    model = load_model(make_tiny_model(arch)).model
    prompt = random_tokens(length, seed=seed)
    expected = greedy_paged(model, prompt, steps, first_chunk=chunk)
    previous = set_kernel_ops(triton_ops())
    try:
        assert triton_ops().qk_norm_rope_store is not None
        assert greedy_paged(model, prompt, steps, first_chunk=chunk) == expected
    finally:
        set_kernel_ops(previous)
    assert previous is TORCH_OPS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_on_gpu_match_hf(family_case: FamilyCase, load_hf: Callable[[Path], Any]) -> None:
    """The same three checks with the real Triton kernels on the GPU (fp32, IEEE dots)."""
    if any(w is not None for w in family_case.ours.config.sliding_windows):
        pytest.skip("the Triton attention kernel has no sliding window")
    model = load_model(family_case.path, device="cuda").model
    hf = load_hf(family_case.path).cuda()
    previous = set_kernel_ops(triton_ops())
    try:
        check_prompt_logits(model, hf, atol=1e-3)
        check_greedy_generation(model, hf)
        check_mixed_batch(model, hf, atol=1e-3)
    finally:
        set_kernel_ops(previous)


def test_triton_kernel_ops_reject_sliding_window(make_tiny_model: Callable[..., Path]) -> None:
    pytest.importorskip("triton")
    model = load_model(make_tiny_model("MistralForCausalLM", {"sliding_window": 8})).model
    previous = set_kernel_ops(triton_ops())
    try:
        with pytest.raises(NotImplementedError, match="sliding window"):
            our_logits_alone(model, random_tokens(5, seed=0))
    finally:
        set_kernel_ops(previous)


# ---------------------------------------------------------------- loader

def test_sharded_checkpoint_loads_like_single_file(make_tiny_model: Callable[..., Path]) -> None:
    single = make_tiny_model("LlamaForCausalLM")
    sharded = make_tiny_model("LlamaForCausalLM", max_shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1 and not (sharded / "model.safetensors").exists()
    assert all((sharded / f).is_file() for f in shard_files)
    tokens = random_tokens(20, seed=0)
    torch.testing.assert_close(our_logits_alone(load_model(sharded).model, tokens),
                               our_logits_alone(load_model(single).model, tokens), atol=0, rtol=0)


def test_dtypes_from_config_and_override(make_tiny_model: Callable[..., Path]) -> None:
    path = make_tiny_model("Qwen2ForCausalLM", dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in load_file(path / "model.safetensors").values())
    assert {p.dtype for p in load_model(path).model.parameters()} == {torch.bfloat16}
    model16 = load_model(path, dtype="fp16").model
    assert {p.dtype for p in model16.parameters()} == {torch.float16}
    model32 = load_model(path, dtype=torch.float32).model
    assert {p.dtype for p in model32.parameters()} == {torch.float32}
    assert model32.model.rotary_emb.cos_cache.dtype == torch.float32
    tokens = random_tokens(20, seed=0)
    torch.testing.assert_close(our_logits_alone(load_model(path).model, tokens),
                               our_logits_alone(model32, tokens), atol=0.1, rtol=0.05)


def test_tokenizer_loaded_when_present(make_tiny_model: Callable[..., Path]) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    path = make_tiny_model("LlamaForCausalLM")
    assert load_model(path).tokenizer is None
    backend = Tokenizer(WordLevel({"<unk>": 0, "hello": 5, "world": 6}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(path)
    tokenizer = load_model(path).tokenizer
    assert tokenizer is not None and tokenizer("hello world")["input_ids"] == [5, 6]


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*no config.json"):
        load_model(tmp_path)


def test_no_safetensors(make_tiny_model: Callable[..., Path]) -> None:
    path = make_tiny_model("LlamaForCausalLM")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{path} has no \\*.safetensors"):
        load_model(path)


def test_missing_shard_file(make_tiny_model: Callable[..., Path]) -> None:
    path = make_tiny_model("LlamaForCausalLM", max_shard_bytes=100_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (path / lost).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing: \\['{lost}'\\]"):
        load_model(path)


def test_unsupported_architecture(make_tiny_model: Callable[..., Path]) -> None:
    path = make_tiny_model("LlamaForCausalLM")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM, MistralForCausalLM, "
                                         "Qwen2ForCausalLM, Qwen3ForCausalLM"):
        load_model(path)


def test_unsupported_rope_type() -> None:
    hf = hf_config_for("Qwen3ForCausalLM", "tiny", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="rope type 'yarn'.*default, linear, llama3"):
        ModelConfig.from_hf(hf)


def _rewrite_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(make_tiny_model: Callable[..., Path]) -> None:
    path = make_tiny_model("Qwen3ForCausalLM")
    _rewrite_weights(path, lambda t: (t.pop("model.layers.1.mlp.up_proj.weight"),
                                      t.pop("model.layers.0.self_attn.k_norm.weight")))
    with pytest.raises(ValueError, match=r"missing 2 tensors: \['model.layers.0.self_attn.k_norm.weight', "
                                         r"'model.layers.1.mlp.up_proj.weight'\]"):
        load_model(path)


def test_unexpected_and_misshapen_tensors_are_named(make_tiny_model: Callable[..., Path]) -> None:
    path = make_tiny_model("LlamaForCausalLM")
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(ValueError, match="unexpected tensors.*q_norm"):
        load_model(path)
    path = make_tiny_model("LlamaForCausalLM")
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.v_proj.weight": torch.ones(8, 64)}))
    with pytest.raises(ValueError, match=r"v_proj.weight has shape \(8, 64\), expected \(32, 64\)"):
        load_model(path)


def test_tied_checkpoint_may_carry_lm_head(make_tiny_model: Callable[..., Path]) -> None:
    """Some tied checkpoints also save lm_head.weight; it is the embedding and is ignored."""
    path = make_tiny_model("Qwen3ForCausalLM")
    _rewrite_weights(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert load_model(path).model.lm_head is None


def test_kv_cache_shape_is_checked(make_tiny_model: Callable[..., Path]) -> None:
    model = load_model(make_tiny_model("LlamaForCausalLM")).model
    with pytest.raises(RuntimeError, match="bind_kv_cache"):
        model(torch.tensor([1]), torch.tensor([0]), AttentionMetadata.build([0], [1], [[0]], BLOCK_SIZE))
    bad = torch.zeros(4, BLOCK_SIZE, 4, 16)  # 4 kv heads, the model has 2
    with pytest.raises(ValueError, match="layer 0: KV caches must both be"):
        model.bind_kv_cache([(bad, bad)] * 2)
    with pytest.raises(ValueError, match="got 1 KV caches for 2 layers"):
        model.bind_kv_cache([(bad, bad)])


# ---------------------------------------------------------------- random-model writer

@pytest.mark.parametrize(("shape", "arch", "params", "head_dim", "tied"), [
    ("Llama-3.1-8B", "LlamaForCausalLM", 8_030_261_248, 128, False),
    ("Llama-3.2-1B", "LlamaForCausalLM", 1_235_814_400, 64, True),
    ("Mistral-7B", "MistralForCausalLM", 7_248_023_552, 128, False),
    ("Qwen2.5-7B", "Qwen2ForCausalLM", 7_615_616_512, 128, False),
    ("Qwen3-0.6B", "Qwen3ForCausalLM", 596_049_920, 128, True),
])
def test_catalog_shapes_match_published_models(shape: str, arch: str, params: int, head_dim: int,
                                               tied: bool) -> None:
    """Parameter counts equal the published checkpoints', which pins every dimension."""
    config = ModelConfig.from_hf(hf_config_for(None, shape))
    assert (config.architecture, config.head_dim, config.tie_word_embeddings) == (arch, head_dim, tied)
    assert sum(torch.Size(s).numel() for _, s in checkpoint_shapes(config)) == params
    assert config.sliding_windows == (None,) * config.num_hidden_layers


def test_family_flags_from_catalog() -> None:
    llama = ModelConfig.from_hf(CATALOG["Llama-3.1-8B"])
    assert llama.rope.rope_type == "llama3" and llama.rope.factor == 8.0 and not llama.qkv_bias
    qwen2 = ModelConfig.from_hf(CATALOG["Qwen2.5-7B"])
    assert qwen2.qkv_bias and not qwen2.o_proj_bias and not qwen2.qk_norm
    qwen3 = ModelConfig.from_hf(CATALOG["Qwen3-0.6B"])
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.q_size == 2048 != qwen3.hidden_size
    assert qwen3.dtype == torch.bfloat16 and qwen3.eos_token_ids == (151645,)


def test_writer_is_deterministic_and_cli_works(tmp_path: Path) -> None:
    write_random_model(tmp_path / "a", "Qwen2ForCausalLM", "tiny", "bfloat16", seed=3)
    write_random_model(tmp_path / "b", "Qwen2ForCausalLM", {}, "bfloat16", seed=3)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    main(["--shape", "tiny", "--arch", "Qwen3ForCausalLM", "--dtype", "float32", "--out",
          str(tmp_path / "cli"), "--set", "num_hidden_layers=1", "--set", "tie_word_embeddings=false"])
    config = load_config(tmp_path / "cli")
    assert (config.num_hidden_layers, config.tie_word_embeddings, config.dtype) == (1, False, torch.float32)
    assert load_model(tmp_path / "cli").model.lm_head is not None


def test_writer_rejects_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown shape 'Llama-9B'"):
        write_random_model(tmp_path, shape="Llama-9B")
    with pytest.raises(ValueError, match="shape 'tiny' needs an architecture"):
        write_random_model(tmp_path, shape="tiny")
    with pytest.raises(ValueError, match="is a Qwen3ForCausalLM, not LlamaForCausalLM"):
        write_random_model(tmp_path, "LlamaForCausalLM", "Qwen3-0.6B")
