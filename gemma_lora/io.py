"""Atomic file writing: a reader never sees a half-written output.

Every output goes to a temporary name in the destination directory, then
`os.replace` moves it into place (atomic on POSIX within one filesystem).
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from gemma_lora.errors import GemmaLoraError, OutputError


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yield a temporary path beside `path`; rename it to `path` on success.

    On any exception the temporary file is removed and nothing appears at
    `path`. `suffix` keeps a required file ending (e.g. ".lora.h5").

    Raises:
        OutputError: the directory cannot be written (permissions, full disk).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
        os.close(fd)
    except OSError as e:
        raise OutputError(f"Cannot write {path}: {e.strerror}. Choose a writable --output-dir.") from None
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); outputs get the usual
        # permissions, as open() would have given them.
        if Path(tmp).exists():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"Cannot write {path}: {e.strerror}. Free disk space or choose another --output-dir.") from None
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a new staging directory beside `path`; rename it to `path` on success.

    For outputs that are whole directories (presets, exports). `path` must
    not exist, or be an empty directory; callers check that first, with their
    own message. On any exception the staging directory is removed and
    nothing appears at `path`.

    Raises:
        OutputError: the directory cannot be written (permissions, full disk).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    except OSError as e:
        raise OutputError(f"Cannot write {path}: {e.strerror}. Choose a writable output directory.") from None
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        os.replace(staging, path)
    except OSError as e:
        raise OutputError(f"Cannot write {path}: {e.strerror}. Free disk space or choose another directory.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def prepare_output_dir(path):
    """Create `path` (which must be missing or empty) and check it is writable.

    Raises:
        OutputError: it is a file, is not empty, or cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"Output path {path} is a file. Give a directory with --output-dir.")
    if path.is_dir() and any(path.iterdir()):
        raise OutputError(
            f"Output directory {path} is not empty. Give a new or empty --output-dir so no run is overwritten."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OutputError(
            f"Output directory {path} is not writable ({e.strerror}). Choose a writable --output-dir."
        ) from None
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(tmp):
    with contextlib.suppress(OSError):
        os.remove(tmp)


def read_json(path, error=GemmaLoraError, fix="Restore it from a copy, or delete it to start again."):
    """Read a JSON file the package wrote (adapter.json, config.json, summary.json, ...).

    Raises:
        `error` (a GemmaLoraError type) naming the file when it is unreadable
        or not JSON, with `fix`: one line for the CLI, not a traceback.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} is missing. {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e).split(": line")[0] if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise error(f"{path} is unreadable ({reason}{where}). {fix}") from None
