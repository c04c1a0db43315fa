"""Hardware and model catalogs: lookups, published shapes, HF config loading."""
from __future__ import annotations

import dataclasses
import json

import pytest

from simulator.hardware import HARDWARE, HardwareSpec, get_hardware
from simulator.model_spec import MODELS, ModelSpec, get_model


@pytest.mark.parametrize("alias, name", [
    ("h100", "H100-SXM"), ("H100-SXM", "H100-SXM"), ("a100", "A100-80GB-SXM"), ("A100-80GB", "A100-80GB-SXM"),
    ("h200", "H200"), ("B200", "B200"), ("l40s", "L40S"),
    ("h100_measured", "H100-measured"), ("H100-Measured", "H100-measured"),
])
def test_hardware_lookup_is_case_insensitive_with_aliases(alias: str, name: str) -> None:
    assert get_hardware(alias).name == name


def test_unknown_hardware_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown hardware 'tpu-v5'.*H100-SXM.*L40S"):
        get_hardware("tpu-v5")


def test_h100_measured_carries_the_measured_rates() -> None:
    hw = get_hardware("h100_measured")
    assert hw.achievable_bandwidth == pytest.approx(3.02e12)
    assert hw.achievable_flops() == pytest.approx(788e12)
    nominal = get_hardware("h100")
    # The data-sheet entry with default efficiencies lands close to what we measured.
    assert nominal.achievable_flops() == pytest.approx(hw.achievable_flops(), rel=0.01)
    assert nominal.achievable_bandwidth == pytest.approx(hw.achievable_bandwidth, rel=0.01)


def test_hardware_entries_are_consistent() -> None:
    for hw in HARDWARE.values():
        assert hw.peak_flops_fp8 >= hw.peak_flops_bf16
        assert hw.interconnect == ("pcie" if hw.name == "L40S" else "nvlink")
    assert get_hardware("a100").peak_flops_fp8 == get_hardware("a100").peak_flops_bf16  # no FP8 tensor cores
    with pytest.raises(ValueError, match="flops_efficiency"):
        dataclasses.replace(get_hardware("h100"), flops_efficiency=1.5)
    with pytest.raises(ValueError, match="interconnect"):
        HardwareSpec("x", 1.0, 1.0, 1.0, 1, "infiniband", 1.0, 0.0)


def test_qwen3_0_6b_matches_its_config() -> None:
    m = get_model("Qwen/Qwen3-0.6B")
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == (1024, 28, 16, 8, 128)
    assert (m.intermediate_size, m.vocab_size, m.tie_word_embeddings, m.qk_norm) == (3072, 151936, True, True)
    assert m.q_dim == 2048 != m.hidden_size  # head_dim independent of hidden / heads


@pytest.mark.parametrize("name, billions", [
    ("Llama-3.2-1B", 1.236), ("Llama-3.1-8B", 8.030), ("Llama-3.1-70B", 70.554), ("Llama-2-70B", 68.977),
    ("Qwen3-0.6B", 0.596), ("Qwen3-8B", 8.191), ("Qwen3-32B", 32.762), ("Qwen2.5-7B", 7.616),
    ("Mistral-7B-v0.1", 7.242), ("Mixtral-8x7B", 46.703), ("BLOOM-176B", 176.247),
])
def test_parameter_counts_match_published_sizes(name: str, billions: float) -> None:
    m = get_model(name)
    assert m.num_params / 1e9 == pytest.approx(billions, rel=2e-3)
    assert m.weight_bytes == 2 * m.num_params


@pytest.mark.parametrize("alias, name", [
    ("llama-3.1-8b", "Llama-3.1-8B"), ("meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B"),
    ("meta-llama/Meta-Llama-3.1-70B", "Llama-3.1-70B"), ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B"),
    ("mistralai/Mistral-7B-Instruct-v0.1", "Mistral-7B-v0.1"), ("MIXTRAL-8X7B", "Mixtral-8x7B"),
    ("llama2-70b", "Llama-2-70B"), ("bloom", "BLOOM-176B"),
])
def test_model_lookup_aliases(alias: str, name: str) -> None:
    assert get_model(alias).name == name


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'gpt-5'.*Llama-3.1-8B.*Qwen3-0.6B"):
        get_model("gpt-5")


def test_model_spec_validation() -> None:
    with pytest.raises(ValueError, match="num_heads 32 is not a multiple of num_kv_heads 5"):
        dataclasses.replace(get_model("llama-3.1-8b"), num_kv_heads=5)
    with pytest.raises(ValueError, match="quantization"):
        dataclasses.replace(get_model("llama-3.1-8b"), quantization="int3")
    with pytest.raises(ValueError, match="without num_experts"):
        dataclasses.replace(get_model("llama-3.1-8b"), num_experts_per_tok=2)


# Published config.json files (fields the loader reads plus a few it ignores).
HF_CONFIGS = {
    "Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
        "max_position_embeddings": 40960, "torch_dtype": "bfloat16", "attention_bias": False,
        "rope_theta": 1000000, "rms_norm_eps": 1e-06,
    },
    "Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False,
        "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "attention_bias": False,
        "rope_scaling": {"factor": 8.0, "rope_type": "llama3"},
    },
    "Qwen2.5-7B": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
        "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
    },
    "Mistral-7B-v0.1": {  # no head_dim field: hidden / heads
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
        "max_position_embeddings": 32768, "torch_dtype": "bfloat16", "sliding_window": 4096,
    },
    "Mixtral-8x7B": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
        "max_position_embeddings": 32768, "torch_dtype": "bfloat16", "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_from_hf_config_reproduces_the_catalog(name: str, tmp_path) -> None:
    model_dir = tmp_path / name
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(HF_CONFIGS[name]))
    assert ModelSpec.from_hf_config(model_dir) == MODELS[name]  # directory -> its config.json, name from dir
    assert ModelSpec.from_hf_config(model_dir / "config.json", name="x") == dataclasses.replace(MODELS[name], name="x")


def test_from_hf_config_reads_fp8_quantization_and_rejects_incomplete_configs() -> None:
    cfg = dict(HF_CONFIGS["Llama-3.1-8B"], quantization_config={"quant_method": "fp8"},
               _name_or_path="org/Llama-3.1-8B-FP8")
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.name == "Llama-3.1-8B-FP8" and spec.quantization == "fp8"
    assert spec.weight_bytes == MODELS["Llama-3.1-8B"].weight_bytes // 2
    with pytest.raises(ValueError, match="lacks \\['num_hidden_layers'\\]"):
        ModelSpec.from_hf_config({k: v for k, v in cfg.items() if k != "num_hidden_layers"})
