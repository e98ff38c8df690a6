"""A wheel works on its own: built from the checkout, installed into a fresh directory, and run from elsewhere with
the checkout off sys.path, `kvgate --help` answers, the shape presets (package data) resolve and the default
settings file is there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
from pathlib import Path

target = Path(sys.argv[1]).resolve()
assert not any(Path(p or ".").resolve() == Path(sys.argv[2]) for p in sys.path), sys.path

from kvgate.cli import main
from engine.presets import preset_file, preset_names, read_preset

try:
    main(["--help"], prog_name="kvgate")
except SystemExit as e:
    assert e.code == 0, e.code
assert {"qwen3-0.6b", "llama-3.1-8b"} <= set(preset_names()), f"shape presets in the wheel: {preset_names()}"
path = preset_file("qwen3-0.6b")
assert path is not None and target in path.resolve().parents, path
assert read_preset(path)["architectures"] == ["Qwen3ForCausalLM"]

import kvgate
from engine.config import EngineConfig
defaults = Path(kvgate.__file__).with_name("default.toml")
assert target in defaults.resolve().parents and defaults.is_file(), f"no {defaults} in the wheel"
assert EngineConfig.from_toml(defaults) == EngineConfig()
print("wheel ok")
"""


@pytest.mark.slow
def test_the_wheel_runs_outside_the_checkout(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # a copy of the tree, so the build's own files (build/, *.egg-info) never land in the shared checkout
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(wheels)],
                   check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("kvgate-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, cwd=tmp_path)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    # -S: the venv's site-packages hold the editable install's path hook to the checkout; put back only its
    # dependencies (torch, click, ...) after the wheel
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    code = f"import sys; sys.path.append({deps!r}); sys.argv[1:] = {[str(target), str(ROOT)]!r}\n" + CHECK
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "wheel ok" in out.stdout, out.stdout + out.stderr
