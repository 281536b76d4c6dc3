"""Finding, downloading, verifying and deleting models.

A model is a folder holding ``model.json`` (the model card) and ``model.safetensors`` (the
weights). Models come from three places:

- embedded: folders in ``m4oe/models/<name>/`` shipped with the extension (the default model,
  ``DEFAULT_MODEL``, when a build bundles it);
- registered: entries of a model registry, a JSON file listing each model's files with their URL
  and SHA-256. The registry shipped in ``m4oe/models/registry.json`` is read first, then the one
  named by the ``M4OE_MODEL_REGISTRY`` environment variable (a path or ``file://`` URL), then the
  ``registry_path`` argument;
- cached: registered models once downloaded, in ``cache_dir()/<name>/``.

Registry schema (format version 1)::

    {"format_version": 1,
     "models": [{"name": "...", "description": "...", "license": "...",
                 "modality": ["CT", "MR"], "tasks": ["..."], "size_bytes": 123 or null,
                 "files": [{"path": "model.json", "url": "https://...", "sha256": "<64 hex>"},
                           {"path": "model.safetensors", "url": "...", "sha256": "..."}]}]}

A download streams every file into a temporary folder inside the cache folder, hashing while it
streams; the folder is renamed into place only when every file matches its SHA-256, so the cache
never holds a partial or unverified model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from m4oe import __version__
from m4oe.errors import CancelledError, ModelError

EMBEDDED_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = "m4oe-phantom"
REGISTRY_ENV = "M4OE_MODEL_REGISTRY"
CACHE_ENV = "M4OE_CACHE_DIR"
REGISTRY_FORMAT_VERSION = 1
MODEL_FILES = ("model.json", "model.safetensors")
URL_SCHEMES = ("https", "http", "file")
DOWNLOAD_TIMEOUT_S = 60
# A name becomes a folder name in the cache: no separators, no "..", nothing hidden.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_ENTRY_KEYS = {"name", "description", "files", "size_bytes", "license", "modality", "tasks"}
_FILE_KEYS = {"url", "sha256", "path"}

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class RemoteFile:
    """One file of a registered model: where it goes in the model folder, its URL and SHA-256."""

    path: str
    url: str
    sha256: str


@dataclass(frozen=True)
class RegistryEntry:
    """A downloadable model as a registry describes it; ``registry`` is the file it came from."""

    name: str
    description: str
    files: tuple[RemoteFile, ...]
    size_bytes: int | None
    license: str
    modality: tuple[str, ...]
    tasks: tuple[str, ...]
    registry: Path


@dataclass(frozen=True)
class ModelEntry:
    """A model as ``m4oe models`` lists it.

    ``source`` is ``"embedded"``, ``"registered"`` (downloadable, not downloaded) or ``"cached"``
    (downloaded). ``path`` is the model folder when it is on disk, ``url`` the weights' URL when
    registered; ``size`` is in bytes (on disk, or as the registry announces it; None if unknown).
    """

    name: str
    source: str
    description: str
    downloaded: bool
    size: int | None
    path: Path | None = None
    url: str | None = None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file as 64 lowercase hex digits, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    except OSError as e:
        raise ModelError(f"cannot read file: {e.strerror or e}", path) from e
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where downloaded models live: ``$M4OE_CACHE_DIR``, else ``$XDG_CACHE_HOME/m4oe/models``,
    else ``~/.cache/m4oe/models``. The folder is not created here."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "m4oe" / "models"
    return Path.home() / ".cache" / "m4oe" / "models"


def registered_models(registry_path: str | Path | None = None) -> dict[str, RegistryEntry]:
    """Every registered model by name, from the shipped registry, ``$M4OE_MODEL_REGISTRY`` and
    ``registry_path`` in that order. A name registered twice is an error naming both files."""
    sources = [str(EMBEDDED_DIR / "registry.json")]
    if os.environ.get(REGISTRY_ENV):
        sources.append(os.environ[REGISTRY_ENV])
    if registry_path is not None:
        sources.append(str(registry_path))
    models: dict[str, RegistryEntry] = {}
    for source in sources:
        for entry in read_registry(source):
            if entry.name in models:
                raise ModelError(
                    f"model {entry.name!r} is registered twice (also in {models[entry.name].registry})",
                    entry.registry,
                )
            models[entry.name] = entry
    return models


def read_registry(path_or_url: str | Path) -> list[RegistryEntry]:
    """Read and validate one registry file (a local path or ``file://`` URL)."""
    path = _local_path(str(path_or_url))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError("model registry not found", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read model registry: {e}", path) from e
    if not isinstance(data, dict) or set(data) != {"format_version", "models"}:
        raise ModelError('a model registry must be an object with keys "format_version" and "models"', path)
    if data["format_version"] != REGISTRY_FORMAT_VERSION:
        raise ModelError(
            f"unsupported registry format_version {data['format_version']!r} "
            f"(this version reads {REGISTRY_FORMAT_VERSION})",
            path,
        )
    if not isinstance(data["models"], list):
        raise ModelError('"models" must be a list', path)
    entries = [_parse_entry(item, f"models[{i}]", path) for i, item in enumerate(data["models"])]
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ModelError(f"models listed twice: {', '.join(duplicates)}", path)
    return entries


def list_models(*, registry_path: str | Path | None = None) -> list[ModelEntry]:
    """Embedded models, then registered ones (downloaded or not), then downloaded models that no
    registry lists any more. An embedded model hides a registered one of the same name."""
    entries = [
        ModelEntry(name, "embedded", "", True, _folder_size(folder), path=folder)
        for name, folder in _model_folders(EMBEDDED_DIR).items()
    ]
    seen = {e.name for e in entries}
    cached = _model_folders(cache_dir())
    for name, reg in registered_models(registry_path).items():
        if name in seen:
            continue
        url = next(f.url for f in reg.files if f.path == "model.safetensors")
        folder = cached.get(name)
        if folder is None:
            entries.append(ModelEntry(name, "registered", reg.description, False, reg.size_bytes, url=url))
        else:
            entries.append(
                ModelEntry(name, "cached", reg.description, True, _folder_size(folder), folder, url)
            )
        seen.add(name)
    entries += [
        ModelEntry(name, "cached", "", True, _folder_size(folder), path=folder)
        for name, folder in cached.items()
        if name not in seen
    ]
    return entries


def resolve_model(name_or_path: str | Path | None = None, *, registry_path: str | Path | None = None) -> Path:
    """The folder or file to load for a model name or path.

    None means the default model. An existing folder or ``.json`` / ``.safetensors`` file is
    returned as is; otherwise the name is looked up among embedded, then downloaded models.
    """
    if name_or_path is not None:
        path = Path(name_or_path).expanduser()
        if path.exists():
            if path.is_dir() or path.suffix in (".json", ".safetensors"):
                return path
            raise ModelError("not a model: expected a folder or a .json / .safetensors file", path)
        if not _NAME_RE.match(str(name_or_path)) or path.suffix in (".json", ".safetensors"):
            raise ModelError("no such model folder or file", path)
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    models = {m.name: m for m in list_models(registry_path=registry_path)}
    model = models.get(name)
    if model is None and name_or_path is None:
        raise ModelError(
            f"the default model {DEFAULT_MODEL!r} is not bundled in this build; "
            "give a model folder or a name from `m4oe models`",
            EMBEDDED_DIR / DEFAULT_MODEL,
        )
    if model is None:
        raise ModelError(f"unknown model {name!r}; available: {_names(models)}")
    if not model.downloaded:
        raise ModelError(f"model {name!r} is not downloaded yet; run `m4oe models --download {name}`")
    assert model.path is not None
    return model.path


def download_model(
    name: str,
    *,
    force: bool = False,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    registry_path: str | Path | None = None,
) -> Path:
    """Download a registered model into the cache, verify every file's SHA-256, return its folder.

    A cached copy whose files all match the registry is kept unless ``force``. ``progress`` is
    called with (bytes done, bytes total or None) as data arrives; ``cancel`` is polled between
    chunks and stops the download when it returns True. On any failure the cache is left as it
    was. An embedded model needs no download: its folder is returned.
    """
    embedded = _model_folders(EMBEDDED_DIR)
    if name in embedded:
        return embedded[name]
    models = registered_models(registry_path)
    if name not in models:
        raise ModelError(f"unknown model {name!r}; registered models: {_names(models)}")
    entry = models[name]
    root = cache_dir()
    target = root / name
    if not force and _verified(target, entry):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.download-", dir=root))
    except OSError as e:
        raise ModelError(f"cannot create the model cache folder: {e.strerror or e}", root) from e
    try:
        done = 0
        for remote in entry.files:
            done = _fetch(remote, staging / remote.path, done, entry.size_bytes, progress, cancel)
        try:
            _replace_folder(staging, target)
        except OSError as e:
            raise ModelError(f"cannot move the downloaded model into place: {e.strerror or e}", target) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def delete_model(name: str, *, registry_path: str | Path | None = None) -> Path:
    """Delete a downloaded model from the cache and return the folder removed."""
    if name in _model_folders(EMBEDDED_DIR):
        raise ModelError(f"model {name!r} is embedded in this build and cannot be deleted")
    cached = _model_folders(cache_dir())
    if name not in cached:
        registered = registered_models(registry_path)
        if name in registered:
            raise ModelError(f"model {name!r} is not downloaded", cache_dir() / name)
        raise ModelError(f"no downloaded model {name!r}; downloaded models: {_names(cached)}")
    try:
        shutil.rmtree(cached[name])
    except OSError as e:
        raise ModelError(f"cannot delete: {e.strerror or e}", cached[name]) from e
    return cached[name]


def _fetch(
    remote: RemoteFile,
    dest: Path,
    done: int,
    total: int | None,
    progress: Progress | None,
    cancel: Callable[[], bool] | None,
) -> int:
    """Stream one URL to ``dest`` while hashing it; return the running byte count."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    request = urllib.request.Request(remote.url, headers={"User-Agent": f"m4oe/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
            while block := response.read(1 << 20):
                if cancel is not None and cancel():
                    raise CancelledError(f"download of {remote.url} cancelled")
                digest.update(block)
                out.write(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
    except urllib.error.HTTPError as e:
        raise ModelError(f"download failed: HTTP {e.code} {e.reason}", remote.url) from e
    except OSError as e:  # URLError included: no route, refused, timed out, file:// not found
        reason = getattr(e, "reason", None) or e.strerror or e
        raise ModelError(f"download failed: {reason}", remote.url) from e
    actual = digest.hexdigest()
    if actual != remote.sha256:
        raise ModelError(
            f"SHA-256 mismatch: expected {remote.sha256}, got {actual}; nothing was saved", remote.url
        )
    return done


def _replace_folder(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an old ``target`` is moved aside first and deleted only
    once the new folder is in place, so a failed rename leaves the old copy."""
    if not target.exists():
        os.replace(staging, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / target.name
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(aside, target)
        raise
    finally:
        shutil.rmtree(aside.parent, ignore_errors=True)


def _verified(folder: Path, entry: RegistryEntry) -> bool:
    """Whether ``folder`` holds every file of ``entry`` with the registered SHA-256."""
    return all((folder / f.path).is_file() and sha256_file(folder / f.path) == f.sha256 for f in entry.files)


def _model_folders(root: Path) -> dict[str, Path]:
    """Sub-folders of ``root`` that hold a complete model, by name (hidden folders skipped)."""
    if not root.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(root.iterdir())
        if _NAME_RE.match(p.name) and p.is_dir() and all((p / f).is_file() for f in MODEL_FILES)
    }


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _names(models) -> str:
    return ", ".join(sorted(models)) or "(none)"


def _local_path(value: str) -> Path:
    """A registry location: a local path or a ``file://`` URL."""
    if value.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(value).path))
    if "://" in value:
        raise ModelError("a model registry must be a local path or a file:// URL", value)
    return Path(value).expanduser()


def _parse_entry(item: object, where: str, registry: Path) -> RegistryEntry:
    """Validate one registry entry; errors name the registry file and the entry."""

    def fail(problem: str):
        raise ModelError(f"{where}: {problem}", registry)

    if not isinstance(item, dict):
        fail("must be an object")
    if isinstance(item.get("name"), str):
        where = f"{where} ({item['name']})"
    if set(item) - _ENTRY_KEYS:
        fail(f"unknown keys {sorted(set(item) - _ENTRY_KEYS)}")
    if _ENTRY_KEYS - set(item):
        fail(f"missing keys {sorted(_ENTRY_KEYS - set(item))}")
    if not isinstance(item["name"], str) or not _NAME_RE.match(item["name"]):
        fail(f"name must be letters, digits, '.', '_' or '-' (at most 100), got {item['name']!r}")
    for key in ("description", "license"):
        if not isinstance(item[key], str):
            fail(f"{key} must be a string, got {item[key]!r}")
    for key in ("modality", "tasks"):
        if not isinstance(item[key], list) or not all(isinstance(v, str) for v in item[key]):
            fail(f"{key} must be a list of strings, got {item[key]!r}")
    size = item["size_bytes"]
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        fail(f"size_bytes must be a non-negative integer or null, got {size!r}")
    if not isinstance(item["files"], list) or not item["files"]:
        fail("files must be a non-empty list")
    files = tuple(_parse_file(f, f"{where}: files[{i}]", registry) for i, f in enumerate(item["files"]))
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        fail(f"file paths listed twice in {paths}")
    missing = [f for f in MODEL_FILES if f not in paths]
    if missing:
        fail(f"files must include {', '.join(missing)}")
    return RegistryEntry(
        name=item["name"],
        description=item["description"],
        files=files,
        size_bytes=size,
        license=item["license"],
        modality=tuple(item["modality"]),
        tasks=tuple(item["tasks"]),
        registry=registry,
    )


def _parse_file(item: object, where: str, registry: Path) -> RemoteFile:
    def fail(problem: str):
        raise ModelError(f"{where}: {problem}", registry)

    if not isinstance(item, dict) or set(item) != _FILE_KEYS:
        fail(f"must be an object with exactly the keys {sorted(_FILE_KEYS)}")
    url, sha, path = item["url"], item["sha256"], item["path"]
    if not isinstance(url, str) or urllib.parse.urlparse(url).scheme not in URL_SCHEMES:
        fail(f"url must be an {', '.join(URL_SCHEMES)} URL, got {url!r}")
    if not isinstance(sha, str) or not _SHA256_RE.match(sha.lower()):
        fail(f"sha256 must be 64 hex digits, got {sha!r}")
    parts = PurePosixPath(path).parts if isinstance(path, str) else ()
    if not parts or PurePosixPath(path).is_absolute() or ".." in parts or "\\" in path or ":" in path:
        fail(f"path must be a relative path inside the model folder, got {path!r}")
    return RemoteFile(path=path, url=url, sha256=sha.lower())
