"""Tiny random checkpoints (and a tiny tokenizer) for every supported architecture, built offline.

They are saved exactly like real ones (safetensors + config.json + generation_config.json + tokenizer files)
so that the engine's real loading code reads them. `hf_greedy` / `hf_logprobs` give the Hugging Face reference
that the engine must match token for token.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch and transformers are imported inside functions: conftest imports this module for every test session.
ARCHS = ("llama", "qwen2", "qwen3", "mistral")

EOS, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, PAD]  # ids 0..3
TOKENIZER_VOCAB = 512
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a small model that wanted to learn how to speak. It read books about the sea,
the mountains, the city and the stars, and every night it wrote down what it had learned in a little notebook.
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus two is four.
Hello, how are you today? I am fine, thank you, and you? We are going to the market to buy bread and cheese.
The weather is nice and the sun is shining; the children are playing in the park near the river.
def main(): print("hello world") # numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and symbols + - * / = ( ) [ ] { }
"""
# Multi-byte text, kept rare so that these characters stay split over several byte tokens.
_MULTIBYTE = "héllo wörld café naïve 日本語のテキスト 🙂🚀 über straße"


def build_tiny_tokenizer(out_dir: Path) -> Path:
    """A byte-level BPE trained in memory (well under a second), saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 3 + [_MULTIBYTE], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=None,
        chat_template=CHATML_TEMPLATE,
        model_max_length=1024,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_jinja_files=False: keep chat_template inside tokenizer_config.json (transformers 5 otherwise writes
    # chat_template.jinja), readable by any transformers version.
    fast.save_pretrained(out_dir, save_jinja_files=False)
    return out_dir


def _model_config(arch: str, vocab_size: int):
    """The config of one tiny model: 2 layers, hidden 64, 4 heads over 2 KV heads (GQA), fp32."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        # Large init so that random logits are peaked enough for greedy output not to collapse to one token.
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        dtype="float32",
    )
    if arch == "llama":
        # Llama 3.x: tied embeddings (as in Llama 3.2 1B/3B, SmolLM2) and llama3 rope scaling.
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
        return tf.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters=rope)
    if arch == "qwen2":
        # qkv bias is always on in Qwen2 (no flag); untied; vocab padded past the tokenizer like real Qwen.
        return tf.Qwen2Config(**common, tie_word_embeddings=False,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if arch == "qwen3":
        # Explicit head_dim (32) != hidden_size / heads (16); q/k RMSNorm is built in.
        return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if arch == "mistral":
        return tf.MistralConfig(**common, tie_word_embeddings=False, sliding_window=None,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def model_vocab_size(arch: str) -> int:
    # qwen2's embedding has rows past the tokenizer (ids nothing decodes), as Qwen2.5's 151936 vs 151665.
    return 576 if arch == "qwen2" else TOKENIZER_VOCAB


def build_tiny_checkpoint(arch: str, out_dir: Path, tokenizer_dir: Path | None = None) -> Path:
    """Build a random tiny `arch` model and save it with its tokenizer in `out_dir`. Deterministic."""
    import torch
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = build_tiny_tokenizer(out_dir / "_tokenizer")
    config = _model_config(arch, model_vocab_size(arch))
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = tf.GenerationConfig(
        bos_token_id=None, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy(f, out_dir / f.name)
    if tokenizer_dir == out_dir / "_tokenizer":
        shutil.rmtree(tokenizer_dir)
    return out_dir


# ---- Hugging Face reference ------------------------------------------------------------------------------

_HF_MODELS: dict = {}  # resolved model dir -> loaded HF model


@contextlib.contextmanager
def _hf_inference():
    # Tiny models: one intra-op thread is ~10x faster than several on a shared CPU (no spin-wait contention).
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(n)


def hf_model(model_dir):
    """The HF model of a checkpoint dir, loaded once per process."""
    key = str(Path(model_dir).resolve())
    if key not in _HF_MODELS:
        import torch
        import transformers as tf

        tf.utils.logging.disable_progress_bar()
        _HF_MODELS[key] = tf.AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
    return _HF_MODELS[key]


def hf_greedy(model_dir, prompts_token_ids: list[list[int]], max_new_tokens: int,
              ignore_eos: bool = True) -> list[list[int]]:
    """Greedy tokens of HF `generate(do_sample=False)`, one prompt at a time (no padding).

    ignore_eos=True means what it means in the engine: eos may be generated but does not stop the sequence
    (it is not suppressed either, unlike with min_new_tokens); generation always runs max_new_tokens.
    """
    import torch

    model = hf_model(model_dir)
    gen = model.generation_config
    eos = None if ignore_eos else gen.eos_token_id
    out = []
    with _hf_inference():
        for ids in prompts_token_ids:
            inp = torch.tensor([ids], dtype=torch.long)
            seq = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=gen.pad_token_id)
            out.append(seq[0, len(ids):].tolist())
    return out


def hf_logprobs(model_dir, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the HF logits at every position: [len(token_ids), vocab_size], fp32."""
    import torch

    model = hf_model(model_dir)
    with _hf_inference():
        logits = model(torch.tensor([token_ids], dtype=torch.long)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)
