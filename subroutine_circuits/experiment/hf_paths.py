"""Which folder is a Hugging Face checkpoint: a path check with no imports from this package, so
that the torch-free config (``experiment.config``) and the Hugging Face base-model code
(``experiment.hf``) share it without an import cycle."""

from __future__ import annotations

import os
from pathlib import Path

#: The file this library's own checkpoints (and stored base models) write last.
BASE_META_FILE = "meta.json"


def is_hf_folder(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a Hugging Face checkpoint folder (``config.json``, no ``meta.json``
    of this library's own checkpoints)."""
    if not path:
        return False
    folder = Path(path)
    return (folder / "config.json").is_file() and not (folder / BASE_META_FILE).is_file()
