"""The tiny checkpoints load with transformers, have the features each architecture must exercise, and the HF
reference helpers agree with each other."""

from __future__ import annotations

import json

import pytest

from tests.checkpoints import EOS, IM_END, IM_START, hf_greedy, hf_logprobs, hf_model

MULTIBYTE = ["héllo wörld", "日本語のテキスト", "🙂🚀"]


def test_tokenizer(tiny_tokenizer, tiny_tokenizer_dir):
    tok = tiny_tokenizer
    assert len(tok) == 512
    assert tok.eos_token == EOS and tok.eos_token_id == 0
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert {IM_START, IM_END} <= set(tok.all_special_tokens) | set(tok.get_vocab())
    for text in MULTIBYTE + ["The capital of France is Paris."]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # Multi-byte characters span several tokens, some of which decode alone to half a character.
    ids = tok.encode("日本語", add_special_tokens=False)
    assert len(ids) > 3 and any("\ufffd" in tok.decode([i]) for i in ids)
    assert "chat_template" in json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())


def test_chat_template(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tiny_tokenizer.convert_tokens_to_ids(IM_START)) == 3
    assert ids.count(tiny_tokenizer.convert_tokens_to_ids(IM_END)) == 2


def test_arch_features(tiny_model_dir, tiny_tokenizer):
    from safetensors import safe_open

    raw = json.loads((tiny_model_dir / "config.json").read_text())
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    model = hf_model(tiny_model_dir)
    cfg = model.config
    arch = cfg.model_type
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 64, 4, 2)
    assert cfg.vocab_size >= len(tiny_tokenizer)
    assert raw["eos_token_id"] == gen["eos_token_id"] == tiny_tokenizer.eos_token_id
    assert raw["pad_token_id"] == gen["pad_token_id"] == tiny_tokenizer.pad_token_id
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    attn = model.model.layers[0].self_attn

    assert raw["tie_word_embeddings"] == (arch == "llama")
    assert ("lm_head.weight" in keys) == (arch != "llama")  # tied: only the embedding is stored
    if arch == "llama":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        rope = raw["rope_parameters"]  # transformers 5 writes rope_scaling as rope_parameters
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
        assert rope["original_max_position_embeddings"] == 256
    if arch == "qwen2":
        assert attn.q_proj.bias is not None and "model.layers.0.self_attn.k_proj.bias" in keys
        assert cfg.vocab_size > len(tiny_tokenizer)  # padded vocab: ids that nothing decodes
    else:
        assert attn.q_proj.bias is None
    if arch == "qwen3":
        assert raw["head_dim"] == 32 != raw["hidden_size"] // raw["num_attention_heads"]
        assert attn.q_proj.out_features == 4 * 32 and attn.k_proj.out_features == 2 * 32
        assert "model.layers.0.self_attn.q_norm.weight" in keys
    if arch == "mistral":
        assert raw["sliding_window"] is None


def test_greedy_is_varied_and_consistent(tiny_model_dir, tiny_tokenizer):
    prompts = [tiny_tokenizer.encode(p) for p in ["The capital of France is", "Hello, how are", MULTIBYTE[1]]]
    outs = hf_greedy(tiny_model_dir, prompts, 8)
    for prompt, out in zip(prompts, outs):
        assert len(out) == 8
        assert len(set(out)) >= 4, out  # not one token repeated forever
        # Greedy tokens are the argmax of the reference logprobs, position by position.
        lp = hf_logprobs(tiny_model_dir, prompt + out)
        assert lp.shape == (len(prompt) + 8, hf_model(tiny_model_dir).config.vocab_size)
        assert lp[len(prompt) - 1 : -1].argmax(-1).tolist() == out
    assert len({tuple(o) for o in outs}) == len(outs)


def test_ignore_eos(tiny_llama_dir):
    prompt = [5, 6, 7]
    first = hf_greedy(tiny_llama_dir, [prompt], 4)[0]
    gen = hf_model(tiny_llama_dir).generation_config
    old, gen.eos_token_id = gen.eos_token_id, first[1]
    try:
        assert hf_greedy(tiny_llama_dir, [prompt], 4) == [first]  # eos generated, not suppressed, not stopping
        assert hf_greedy(tiny_llama_dir, [prompt], 4, ignore_eos=False) == [first[: first.index(first[1]) + 1]]
    finally:
        gen.eos_token_id = old


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_build_is_deterministic(tiny_checkpoint, tmp_path, arch, tiny_tokenizer_dir):
    from safetensors.torch import load_file

    from tests.checkpoints import build_tiny_checkpoint

    again = build_tiny_checkpoint(arch, tmp_path / arch, tiny_tokenizer_dir)
    a, b = load_file(tiny_checkpoint(arch) / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
