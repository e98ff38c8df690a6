"""Engine settings as command-line options, derived from EngineConfig's fields so the two never drift."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing

import click

from engine.config import EngineConfig
from engine.presets import preset_names

_HIDDEN = {"in_process"}
# flags renamed where a command's own option would clash (a request's --seed vs the engine's)
_FLAGS = {"seed": "engine-seed"}


def engine_options(command):
    """Add --model, --config and one option per EngineConfig field to a Click command; the command receives
    them gathered as `engine_config` (an EngineConfig)."""
    hints = typing.get_type_hints(EngineConfig)
    for field in reversed(dataclasses.fields(EngineConfig)):
        if field.name in _HIDDEN or field.name == "model":
            continue
        hint = hints[field.name]
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        name = _FLAGS.get(field.name, field.name.replace("_", "-"))
        flag = "--" + name
        if base is bool:
            decl = f"{flag}/--no-{name}"
            command = click.option(decl, field.name, default=None, help=f"default: {field.default}")(command)
        else:
            command = click.option(flag, field.name, type=base, default=None,
                                   help=f"default: {field.default}")(command)
    command = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                           help="a TOML file of settings: [engine], and [server] for serve (each with its default: "
                                "kvgate/default.toml); options given here win")(command)
    command = click.option("--model", "-m", default=None,
                           help="local HF directory, .gguf file, cached hub id, or a shape preset "
                                f"({', '.join(preset_names())}, or a .toml file of that form; with --load-format "
                                "dummy) (default: the embedded SmolLM2-135M-Instruct)")(command)
    return _gather(command)


def _gather(command):
    names = [f.name for f in dataclasses.fields(EngineConfig) if f.name not in _HIDDEN]
    wants_path = "config_path" in inspect.signature(command).parameters  # for a command's own [table]

    def wrapper(*args, config_path=None, **kwargs):
        values = {n: kwargs.pop(n, None) for n in names}
        given = {n: v for n, v in values.items() if v is not None}  # options left out keep the preset's value
        try:
            config = EngineConfig.from_toml(config_path, **given) if config_path else EngineConfig(**given)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
        if wants_path:
            kwargs["config_path"] = config_path
        return command(*args, engine_config=config, **kwargs)

    return functools.wraps(command)(wrapper)  # keeps the options Click attached to the function
