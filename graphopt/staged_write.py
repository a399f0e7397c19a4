"""Writing files all or nothing: into a private folder beside the target, then renamed over it.

``with staged_write(path) as temporary: ...`` gives a path of the same name inside a new folder next to
``path``. The block writes (and checks) the file there — and any companion the writer adds beside it, such
as ONNX's external ``<name>.data`` — and only when the block succeeds are they renamed over the target
(``os.replace``: atomic on one file system; the companion first, the main file last). When the block raises
(a failed check, ``KeyboardInterrupt``), the folder is removed and nothing at the target changes; a parent
folder created for the target is removed again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from graphopt.errors import ExportError
from graphopt.uninterrupted import uninterrupted


@contextlib.contextmanager
def staged_write(path: Path) -> Iterator[Path]:
    """See the module docstring."""
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as err:
        _remove_empty(created)
        raise ExportError(f"cannot write {path}: {err.strerror or err} (choose a folder you can write to)") from err
    try:
        yield folder / path.name
        with uninterrupted():  # the renames go together: a Ctrl-C lands before or after them
            companions = sorted(p for p in folder.iterdir() if p.name != path.name)
            for produced in companions:
                os.replace(produced, path.parent / produced.name)
            stale = path.parent / f"{path.name}.data"
            if stale.exists() and not (folder / stale.name).exists() and all(p.name != stale.name for p in companions):
                stale.unlink()  # a companion of the file being replaced, which the new file does not use
            os.replace(folder / path.name, path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        _remove_empty(created)
        raise
    shutil.rmtree(folder, ignore_errors=True)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first
        with contextlib.suppress(OSError):
            folder.rmdir()
