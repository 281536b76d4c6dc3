"""Model hub: registry validation, verified downloads into the cache, resolving and deleting.

Downloads use ``file://`` URLs to files made in the test's temporary folder; nothing touches the
network. ``EMBEDDED_DIR`` is pointed at a temporary folder so the tests do not depend on which
models a build bundles.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from m4oe import hub
from m4oe.errors import CancelledError, ModelError

NAME = "tiny-test"
SHIPPED_REGISTRY = hub.EMBEDDED_DIR / "registry.json"


def write_registry(path: Path, models: list[dict]) -> Path:
    path.write_text(json.dumps({"format_version": 1, "models": models}), encoding="utf-8")
    return path


def registry_entry(source: Path, name: str = NAME, **overrides) -> dict:
    """A registry entry for the model folder ``source``, with its files' real SHA-256."""
    files = [
        {
            "path": f,
            "url": (source / f).as_uri(),
            "sha256": hashlib.sha256((source / f).read_bytes()).hexdigest(),
        }
        for f in hub.MODEL_FILES
    ]
    entry = {
        "name": name,
        "description": "two small files standing in for a model",
        "files": files,
        "size_bytes": sum((source / f).stat().st_size for f in hub.MODEL_FILES),
        "license": "CC0-1.0",
        "modality": ["CT", "MR"],
        "tasks": ["organs"],
    }
    entry.update(overrides)
    return entry


@pytest.fixture
def source(tmp_path) -> Path:
    """A model folder to download from: a small card and 1.5 MiB of 'weights' (two read chunks)."""
    folder = tmp_path / "server" / NAME
    folder.mkdir(parents=True)
    (folder / "model.json").write_text('{"format_version": 1}', encoding="utf-8")
    (folder / "model.safetensors").write_bytes(os.urandom(3 << 19))
    return folder


@pytest.fixture
def env(tmp_path, monkeypatch, source):
    """Cache, registry and embedded folders in tmp_path; returns (cache folder, registry file)."""
    embedded = tmp_path / "embedded"
    embedded.mkdir()
    write_registry(embedded / "registry.json", [])
    monkeypatch.setattr(hub, "EMBEDDED_DIR", embedded)
    cache = tmp_path / "cache"
    registry = write_registry(tmp_path / "registry.json", [registry_entry(source)])
    monkeypatch.setenv("M4OE_CACHE_DIR", str(cache))
    monkeypatch.setenv("M4OE_MODEL_REGISTRY", str(registry))
    return cache, registry


def make_embedded(name: str) -> Path:
    folder = hub.EMBEDDED_DIR / name
    folder.mkdir()
    for f in hub.MODEL_FILES:
        (folder / f).write_bytes(b"{}")
    return folder


def test_shipped_registry_is_valid_and_empty():
    assert hub.read_registry(SHIPPED_REGISTRY) == []


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("M4OE_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("M4OE_CACHE_DIR")
    assert hub.cache_dir() == tmp_path / "xdg" / "m4oe" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub.cache_dir() == Path.home() / ".cache" / "m4oe" / "models"


def test_sha256_file_matches_hashlib(source):
    weights = source / "model.safetensors"
    assert hub.sha256_file(weights, chunk=4096) == hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.raises(ModelError, match=r"missing\.bin: cannot read file"):
        hub.sha256_file(source / "missing.bin")


def test_registered_model_is_listed_not_downloaded(env, source):
    (entry,) = hub.list_models()
    assert (entry.name, entry.source, entry.downloaded, entry.path) == (NAME, "registered", False, None)
    assert entry.url == (source / "model.safetensors").as_uri()
    assert entry.size == sum((source / f).stat().st_size for f in hub.MODEL_FILES)


def test_download_verifies_and_caches(env, source):
    cache, _ = env
    calls = []
    folder = hub.download_model(NAME, progress=lambda done, total: calls.append((done, total)))
    assert folder == cache / NAME
    for f in hub.MODEL_FILES:
        assert (folder / f).read_bytes() == (source / f).read_bytes()
    total = sum((source / f).stat().st_size for f in hub.MODEL_FILES)
    assert len(calls) >= 3 and calls[-1] == (total, total)
    assert [p.name for p in cache.iterdir()] == [NAME]
    (entry,) = hub.list_models()
    assert (entry.source, entry.downloaded, entry.path, entry.size) == ("cached", True, folder, total)
    assert hub.resolve_model(NAME) == folder


def test_downloaded_model_stays_listed_when_unregistered(env, tmp_path, monkeypatch):
    folder = hub.download_model(NAME)
    monkeypatch.setenv("M4OE_MODEL_REGISTRY", str(write_registry(tmp_path / "empty.json", [])))
    (entry,) = hub.list_models()
    assert (entry.name, entry.source, entry.path, entry.url) == (NAME, "cached", folder, None)
    assert hub.resolve_model(NAME) == folder


def test_cached_model_is_not_fetched_again_unless_forced(env, source):
    cache, _ = env
    folder = hub.download_model(NAME)
    original = (folder / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(b"changed on the server")
    assert hub.download_model(NAME) == folder
    assert (folder / "model.safetensors").read_bytes() == original
    with pytest.raises(ModelError, match="SHA-256 mismatch") as err:
        hub.download_model(NAME, force=True)
    assert hashlib.sha256(original).hexdigest() in str(err.value)
    assert hashlib.sha256(b"changed on the server").hexdigest() in str(err.value)
    # The failed forced download leaves the verified copy and no temporary folder.
    assert (folder / "model.safetensors").read_bytes() == original
    assert [p.name for p in cache.iterdir()] == [NAME]


def test_corrupted_cache_is_downloaded_again(env, source):
    folder = hub.download_model(NAME)
    (folder / "model.safetensors").write_bytes(b"bit rot")
    hub.download_model(NAME)
    assert (folder / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


def test_wrong_sha256_leaves_nothing_in_cache(env, source, tmp_path, monkeypatch):
    cache, _ = env
    entry = registry_entry(source)
    expected = "0" * 64
    actual = entry["files"][1]["sha256"]
    entry["files"][1]["sha256"] = expected
    monkeypatch.setenv("M4OE_MODEL_REGISTRY", str(write_registry(tmp_path / "bad.json", [entry])))
    with pytest.raises(ModelError) as err:
        hub.download_model(NAME)
    message = str(err.value)
    assert message.startswith((source / "model.safetensors").as_uri())
    assert f"expected {expected}, got {actual}" in message
    assert list(cache.iterdir()) == []
    assert not hub.list_models()[0].downloaded


def test_failed_and_cancelled_downloads_leave_nothing(env, source):
    cache, _ = env
    with pytest.raises(CancelledError, match="cancelled"):
        hub.download_model(NAME, cancel=lambda: True)
    assert list(cache.iterdir()) == []
    (source / "model.json").unlink()
    with pytest.raises(ModelError, match=r"model\.json: download failed"):
        hub.download_model(NAME)
    assert list(cache.iterdir()) == []


def test_download_over_http(env, source, tmp_path, monkeypatch):
    """The same code path as https: a local server on 127.0.0.1 serves the model folder."""
    cache, _ = env

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(source)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        entry = registry_entry(source)
        for f in entry["files"]:
            f["url"] = f"{base}/{f['path']}"
        monkeypatch.setenv("M4OE_MODEL_REGISTRY", str(write_registry(tmp_path / "http.json", [entry])))
        folder = hub.download_model(NAME)
        assert (folder / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
        hub.delete_model(NAME)
        entry["files"][0]["url"] = f"{base}/absent.json"
        write_registry(tmp_path / "http.json", [entry])
        with pytest.raises(ModelError, match=r"absent\.json: download failed: HTTP 404"):
            hub.download_model(NAME)
        assert list(cache.iterdir()) == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_registry_given_as_file_url_or_argument(env, source, tmp_path, monkeypatch):
    _, registry = env
    monkeypatch.setenv("M4OE_MODEL_REGISTRY", registry.as_uri())
    assert [m.name for m in hub.list_models()] == [NAME]
    monkeypatch.delenv("M4OE_MODEL_REGISTRY")
    assert hub.list_models() == []
    extra = write_registry(tmp_path / "extra.json", [registry_entry(source, name="other")])
    assert [m.name for m in hub.list_models(registry_path=extra)] == ["other"]
    assert hub.download_model("other", registry_path=extra) == hub.cache_dir() / "other"


def test_resolve_model(env, source, tmp_path):
    with pytest.raises(ModelError, match="not downloaded yet; run `m4oe models --download tiny-test`"):
        hub.resolve_model(NAME)
    with pytest.raises(ModelError, match=r"unknown model 'nope'; available: tiny-test$"):
        hub.resolve_model("nope")
    with pytest.raises(ModelError, match="default model 'm4oe-phantom' is not bundled in this build"):
        hub.resolve_model(None)
    default = make_embedded(hub.DEFAULT_MODEL)
    assert hub.resolve_model(None) == default
    assert hub.resolve_model(hub.DEFAULT_MODEL) == default
    assert hub.resolve_model(str(source)) == source
    assert hub.resolve_model(source / "model.json") == source / "model.json"
    with pytest.raises(ModelError, match="no such model folder or file"):
        hub.resolve_model(str(tmp_path / "missing"))
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model", encoding="utf-8")
    with pytest.raises(ModelError, match=r"notes\.txt: not a model"):
        hub.resolve_model(notes)


def test_delete_model(env):
    cache, _ = env
    with pytest.raises(ModelError, match="'tiny-test' is not downloaded"):
        hub.delete_model(NAME)
    folder = hub.download_model(NAME)
    assert hub.delete_model(NAME) == folder
    assert not folder.exists() and list(cache.iterdir()) == []
    assert hub.list_models()[0].source == "registered"
    make_embedded("bundled")
    with pytest.raises(ModelError, match="'bundled' is embedded in this build and cannot be deleted"):
        hub.delete_model("bundled")
    with pytest.raises(ModelError, match=r"no downloaded model '\.\./x'"):
        hub.delete_model("../x")


def test_embedded_model_is_listed_first_and_needs_no_download(env):
    folder = make_embedded("bundled")
    entries = hub.list_models()
    assert [(m.name, m.source, m.downloaded) for m in entries] == [
        ("bundled", "embedded", True),
        (NAME, "registered", False),
    ]
    assert hub.download_model("bundled") == folder
    with pytest.raises(ModelError, match="unknown model 'nope'; registered models: tiny-test"):
        hub.download_model("nope")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda e: e.update(mirror="x"), r"models\[0\] \(tiny-test\): unknown keys \['mirror'\]"),
        (lambda e: e.pop("license"), r"models\[0\] \(tiny-test\): missing keys \['license'\]"),
        (lambda e: e.update(name="../up"), "name must be letters"),
        (lambda e: e.update(modality="CT"), "modality must be a list of strings"),
        (lambda e: e.update(size_bytes=-1), "size_bytes must be a non-negative integer"),
        (lambda e: e["files"].pop(0), "files must include model.json"),
        (lambda e: e["files"][0].update(sha256="abc"), r"files\[0\]: sha256 must be 64 hex digits"),
        (lambda e: e["files"][0].update(path="../model.json"), "path must be a relative path"),
        (lambda e: e["files"][0].update(url="ftp://host/model.json"), "url must be an https, http, file URL"),
        (lambda e: e["files"][0].pop("url"), r"files\[0\]: must be an object with exactly the keys"),
    ],
)
def test_bad_registry_entry_names_the_file(env, source, tmp_path, monkeypatch, change, problem):
    entry = registry_entry(source)
    change(entry)
    bad = write_registry(tmp_path / "bad.json", [entry])
    monkeypatch.setenv("M4OE_MODEL_REGISTRY", str(bad))
    with pytest.raises(ModelError, match=problem) as err:
        hub.list_models()
    assert str(err.value).startswith(f"{bad}: ")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "cannot read model registry"),
        ('{"models": []}', 'keys "format_version" and "models"'),
        ('{"format_version": 2, "models": []}', "unsupported registry format_version 2"),
        ('{"format_version": 1, "models": {}}', '"models" must be a list'),
    ],
)
def test_malformed_registry_names_the_file(tmp_path, text, problem):
    bad = tmp_path / "bad.json"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(ModelError, match=problem) as err:
        hub.read_registry(bad)
    assert str(err.value).startswith(f"{bad}: ")


def test_registry_location_errors(env, source, tmp_path, monkeypatch):
    monkeypatch.setenv("M4OE_MODEL_REGISTRY", str(tmp_path / "absent.json"))
    with pytest.raises(ModelError, match=r"absent\.json: model registry not found"):
        hub.list_models()
    monkeypatch.setenv("M4OE_MODEL_REGISTRY", "https://example.org/registry.json")
    with pytest.raises(ModelError, match="must be a local path or a file:// URL"):
        hub.list_models()
    _, registry = env
    monkeypatch.setenv("M4OE_MODEL_REGISTRY", str(registry))
    twice = write_registry(tmp_path / "twice.json", [registry_entry(source)])
    with pytest.raises(
        ModelError, match=re.escape(f"twice.json: model 'tiny-test' is registered twice (also in {registry})")
    ):
        hub.list_models(registry_path=twice)
