"""JAX's persistent compilation cache: on by default under the package's cache, so a second run loads its programs."""

import json
import os
import subprocess
import sys

from conftest import REPO

ARGS = ["--sequence-length", "64", "--limit", "12", "--validation-rows", "4", "--test-rows", "4", "--batch-size", "4",
        "--max-new-tokens", "4", "--max-steps", "1"]


def train(tmp_path, name, preset, *flags):
    """`gemma-lora train` in a fresh process whose package cache is tmp_path/cache; its summary's cache record."""
    env = dict(os.environ, GEMMA_LORA_CACHE=str(tmp_path / "cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR")  # the test suite's own shared cache, set in conftest
    result = subprocess.run(
        [sys.executable, "-m", "gemma_lora.cli", "train", "--preset", str(preset), *ARGS, *flags,
         "--output-dir", str(tmp_path / name)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((tmp_path / name / "summary.json").read_text())["compilation_cache"], result.stdout


def test_a_second_run_loads_the_programs_the_first_compiled(tmp_path, tiny_preset):
    first, out = train(tmp_path, "one", tiny_preset)
    cache = tmp_path / "cache" / "jax"
    assert first["dir"] == str(cache) and any(cache.iterdir())
    # A run may load a program it compiled itself earlier (the same program jitted twice).
    assert first["compiled"] > first["loaded"]
    assert f"compilation cache: {first['loaded']} programs loaded, {first['compiled']} compiled and stored ({cache}" in out
    second, _ = train(tmp_path, "two", tiny_preset)
    assert second["loaded"] > first["loaded"] and second["compiled"] < first["compiled"]
    off, out = train(tmp_path, "three", tiny_preset, "--compilation-cache", "off")
    assert off == {"dir": None, "loaded": 0, "compiled": 0} and "compilation cache:" not in out
