"""Shape presets (engine/model_presets/*.toml): the shapes docs/workloads.md lists, resolved into a config and
tokenizer directory for random weights only, and an engine running on one whose vocabulary is larger than its
tokenizer's."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import LLM, InvalidRequestError, SamplingParams
from engine.model_source import ModelNotFoundError, read_model_config, resolve_model
from engine.presets import PRESETS_DIR, preset_names, read_preset

pytestmark = pytest.mark.usefixtures("deadline")

SHAPES = {
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                       max_position_embeddings=40960, torch_dtype="bfloat16"),
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                         max_position_embeddings=131072, torch_dtype="bfloat16",
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "zephyr-7b": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0,
                      max_position_embeddings=32768, sliding_window=4096, torch_dtype="bfloat16"),
}
# The real models' counts (Qwen3-0.6B: 0.6B, 0.44B without the embedding; Llama-3.1-8B: 8.03B; Mistral-7B: 7.24B)
PARAMETERS = {"qwen3-0.6b": 596_049_920, "llama-3.1-8b": 8_030_261_248, "zephyr-7b": 7_241_732_096}

TINY_PRESET = """\
[model]
architectures = ["Qwen3ForCausalLM"]
model_type = "qwen3"
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
head_dim = 32
vocab_size = 1000  # the tiny tokenizer knows 512 ids
max_position_embeddings = 512
eos_token_id = 0
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVGATE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_preset_holds_the_benchmark_shape(name):
    assert name in preset_names()
    table = read_preset(PRESETS_DIR / f"{name}.toml")
    assert {k: table[k] for k in SHAPES[name]} == SHAPES[name]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_preset_resolves_with_dummy_weights_only(name, cache, tiny_tokenizer_dir):
    for load_format in ("auto", "safetensors"):
        with pytest.raises(ModelNotFoundError, match="no weights.*--load-format dummy"):
            resolve_model(name, load_format, str(tiny_tokenizer_dir))
    model_dir = resolve_model(name, "dummy", str(tiny_tokenizer_dir))
    assert model_dir.parent == cache / "models"
    assert resolve_model(name, "dummy", str(tiny_tokenizer_dir)) == model_dir  # built once
    assert json.loads((model_dir / "config.json").read_text()) == read_preset(PRESETS_DIR / f"{name}.toml")
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in model_dir.iterdir()}
    config = read_model_config(model_dir)
    assert config.dtype == torch.bfloat16
    if name == "llama-3.1-8b":  # transformers 5 reads the legacy rope fields into rope_parameters
        assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0
    if name == "zephyr-7b":  # no sliding-window attention yet: the engine stays inside the window
        from engine.core import model_max_len

        assert model_max_len(config, None) == 4096
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


def test_edited_preset_gets_a_new_directory(tmp_path, cache, tiny_tokenizer_dir):
    preset = tmp_path / "tiny.toml"
    preset.write_text(TINY_PRESET)
    first = resolve_model(str(preset), "dummy", str(tiny_tokenizer_dir))
    preset.write_text(TINY_PRESET.replace("num_hidden_layers = 2", "num_hidden_layers = 3"))
    second = resolve_model(str(preset), "dummy", str(tiny_tokenizer_dir))
    assert second != first and read_model_config(second).num_hidden_layers == 3


def test_bad_presets_and_tokenizers_are_named(tmp_path, cache, tiny_tokenizer_dir):
    preset = tmp_path / "bad.toml"
    preset.write_text(TINY_PRESET.replace('model_type = "qwen3"\n', ""))
    with pytest.raises(ValueError, match="'model_type'"):
        resolve_model(str(preset), "dummy", str(tiny_tokenizer_dir))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no tokenizer files"):
        resolve_model("qwen3-0.6b", "dummy", str(empty))
    with pytest.raises(ModelNotFoundError, match="tokenizer 'no/such-tokenizer'"):
        resolve_model("qwen3-0.6b", "dummy", "no/such-tokenizer")


def test_local_directory_wins_over_a_preset_of_its_name(tmp_path, monkeypatch, tiny_qwen3_dir):
    shutil.copytree(tiny_qwen3_dir, tmp_path / "qwen3-0.6b")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("qwen3-0.6b") == (tmp_path / "qwen3-0.6b").resolve()


def test_engine_on_a_preset_larger_than_its_tokenizer(tmp_path, cache, tiny_tokenizer_dir, tiny_tokenizer):
    preset = tmp_path / "tiny.toml"
    preset.write_text(TINY_PRESET)
    with LLM(str(preset), load_format="dummy", tokenizer=str(tiny_tokenizer_dir), in_process=True,
             num_kv_blocks=64) as llm:
        assert llm.info.vocab_size == 1000
        # prompt ids up to the model's vocabulary are accepted, past it refused
        [out] = llm.generate([[999, 5, 600]], SamplingParams(temperature=1.0, seed=0, max_tokens=40,
                                                              ignore_eos=True), use_tqdm=False)
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            llm.generate([[1000]], use_tqdm=False)
        [chat] = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=4), use_tqdm=False)
        [ids_only] = llm.generate([[7, 8, 9]], SamplingParams(max_tokens=5, ignore_eos=True, detokenize=False),
                                  use_tqdm=False)
    ids = out.outputs[0].token_ids
    assert len(ids) == 40 and any(t >= 512 for t in ids)  # ids the tokenizer does not know...
    assert out.outputs[0].text == tiny_tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")  # ...are ""
    assert chat.prompt.endswith("<|im_start|>assistant\n") and chat.outputs[0].token_ids
    assert ids_only.outputs[0].text == "" and len(ids_only.outputs[0].token_ids) == 5


@pytest.mark.slow
def test_preset_takes_the_default_models_tokenizer():
    """No tokenizer named: the embedded default's (converted once into ~/.cache/kvgate), length limit raised."""
    from transformers import AutoTokenizer

    model_dir = resolve_model("qwen3-0.6b", "dummy")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == 49152 and tokenizer.model_max_length == 40960
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode([151935], skip_special_tokens=True) == ""
