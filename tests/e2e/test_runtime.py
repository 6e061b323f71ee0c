"""Runtime: backend and memory fraction before Keras, a clear error when too late."""

import os
import subprocess
import sys

from conftest import REPO


def run_python(code, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "XLA_PYTHON_CLIENT_MEM_FRACTION")}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=REPO, timeout=120)


def test_configure_runtime_sets_backend_and_memory_fraction_before_keras():
    result = run_python(
        "import os, gemma_lora; gemma_lora.configure_runtime(memory_fraction=0.5, seed=3);"
        "import keras; print(keras.config.backend(), os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])"
    )
    assert result.returncode == 0, result.stderr[-1000:]
    assert result.stdout.split()[-2:] == ["jax", "0.50"]


def test_importing_the_package_does_not_import_keras():
    result = run_python("import sys, gemma_lora; print('keras' in sys.modules)")
    assert result.stdout.strip().endswith("False"), result.stderr[-1000:]


def test_keras_already_on_another_backend_is_a_clear_error():
    result = run_python(
        "import keras, gemma_lora\n"
        "try:\n    gemma_lora.configure_runtime()\n"
        "except gemma_lora.RuntimeSetupError as e:\n    print('ERROR', e)",
        KERAS_BACKEND="numpy",
    )
    assert "ERROR Keras was already imported with the 'numpy' backend" in result.stdout, result.stderr[-1000:]
    assert "before importing keras" in result.stdout


def test_compilation_cache_is_switched_on(tmp_path):
    result = run_python(
        f"import gemma_lora; gemma_lora.configure_runtime(compilation_cache_dir={str(tmp_path)!r});"
        "import jax; print(jax.config.jax_compilation_cache_dir)"
    )
    assert result.stdout.strip().endswith(str(tmp_path)), result.stderr[-1000:]
