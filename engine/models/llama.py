"""The Llama family, our own code: Llama 2/3/3.1, Mistral, SmolLM2, and Qwen2 (qkv bias) / Qwen3 (q/k norm),
which differ from Llama only in those two details. Tokens are flat ([T, hidden]), attention is paged."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.attention import Attention
from engine.layers.attention_backends.base import AttentionMetadata
from engine.layers.linear import Linear, PackedLinear, linear
from engine.layers.norm import RMSNorm
from engine.layers.ops import Ops
from engine.layers.rotary import RotaryEmbedding


class DecoderAttention(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, qk_norm: bool, ops: Ops) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        attention_bias = bool(getattr(cfg, "attention_bias", False))  # Llama's switch for all four projections
        self.qkv_proj = PackedLinear(cfg.hidden_size, self.sizes, bias=qkv_bias or attention_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=attention_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops) if qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, meta: AttentionMetadata):
        qkv = self.qkv_proj(x).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(qkv, rope, self.q_norm, self.k_norm, meta))


class MLP(nn.Module):
    def __init__(self, cfg, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        bias = getattr(cfg, "mlp_bias", False)
        self.gate_up_proj = PackedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_and_mul(x, self.ops.silu_and_mul))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, qk_norm: bool, ops: Ops) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(cfg, qkv_bias, qk_norm, ops)
        self.mlp = MLP(cfg, ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, rope, x, residual, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False
    # checkpoint name fragment -> (our fused parameter fragment, shard index)
    packed = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg, max_position: int, ops: Ops) -> None:
        """ops: the elementwise ops the runner chose (eager or compiled), used by every layer."""
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, self.qkv_bias, self.qk_norm, ops) for _ in range(cfg.num_hidden_layers)
        )
        first = self.layers[0].self_attn
        self.rotary = RotaryEmbedding(cfg, first.head_dim, max_position)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x, residual = layer(rope, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return linear(hidden, self.embed_tokens.weight)  # tied: the embedding is the head

    def load_weights(self, weights) -> None:
        """Copy (name, tensor) pairs from a checkpoint into our (partly fused) parameters."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            target, shard = name, None
            for part, (fused, index) in self.packed.items():
                if f".{part}." in name:
                    target, shard = name.replace(part, fused), index
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if shard is None:
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
                param.data.copy_(tensor)
            else:
                owner = self.get_submodule(target.rsplit(".", 1)[0])
                owner.load_shard(param, tensor, shard)
            loaded.add(f"{target}#{shard}")
        missing = [n for n in params if not any(k.startswith(n + "#") for k in loaded)]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
