"""Packaging checks of the Slicer extension, without Slicer (tier 3 of DESIGN.md "Testing tiers").

A Slicer extension fails in ways no unit test of the engine sees: a file left out of
CMakeLists.txt is silently missing from the installed extension; a widget name the code looks up
but the .ui lacks, or a parameter bound to a widget the parameter node wrapper cannot drive, breaks
the panel only when a user opens it; a catalog entry that breaks the Extensions Index schema is
rejected; a heavy import at module load breaks Slicer's startup before the user can install
anything. These tests read the files as text (CMake, XML, JSON, PNG headers, Python syntax trees).
"""

from __future__ import annotations

import ast
import json
import re
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "M4oESegmentation"
MODULE_FILE = MODULE / "M4oESegmentation.py"
UI_FILE = MODULE / "Resources" / "UI" / "M4oESegmentation.ui"
SELF_TEST = MODULE / "Testing" / "Python" / "M4oESegmentationSelfTest.py"
LIB = MODULE / "M4oESegmentationLib"
PARAMETERS_FILE = LIB / "parameters.py"
DEPENDENCIES = LIB / "dependencies.py"
REQUIREMENTS = MODULE / "Resources" / "requirements.txt"
PINNED = ROOT / "requirements" / "pinned.txt"
ENGINE = MODULE / "m4oe"
CATALOG = ROOT / "M4oESegmentation.json"
ICON_SIZE = (128, 128)

# Extensions Index catalog entry schema v1.0.1 (Slicer/Slicer Schemas/): its required keys, and the
# type of every property it allows ("additionalProperties": false).
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_PROPERTIES = {
    "$schema": str,
    "category": str,
    "scm_url": str,
    "scm_revision": str,
    "scm_type": str,
    "build_dependencies": list,
    "build_subdirectory": str,
    "enabled": bool,
    "tier": int,
}
EXTENSION_FIELDS = (
    "HOMEPAGE",
    "CATEGORY",
    "CONTRIBUTORS",
    "DESCRIPTION",
    "ICONURL",
    "SCREENSHOTURLS",
    "DEPENDS",
)

# Files under M4oESegmentation/ that are not installed with the module: build files, and the
# self-tests CTest runs from the source tree.
NOT_SHIPPED_NAMES = {"CMakeLists.txt"}
NOT_SHIPPED_DIRS = {"Testing", "__pycache__"}

HEAVY = {"torch", "timm", "monai", "torchvision"}
# What a fresh Slicer can import before any pip install: the module file may import only these
# (and the standard library) at load time, or Slicer's startup fails to load it.
SLICER_BUNDLED = {"qt", "ctk", "vtk", "slicer", "SampleData"}
ENGINE_FORBIDDEN = {"slicer", "qt", "ctk", "m4oe_training"}

# pyproject.toml dependencies the Slicer module does not pip-install, and why.
NOT_INSTALLED_IN_SLICER = {
    "torch": "installed by the PyTorch extension (PyTorchUtils), which picks the build for the GPU",
    "numpy": "bundled with Slicer",
    "scipy": "bundled with Slicer",
    "SimpleITK": "bundled with Slicer, with Slicer's own image IO; pip must not replace it",
    "monai": "used by `m4oe evaluate` and training, not by `m4oe segment`",
    "matplotlib": "used by `m4oe segment --report` only, which the module does not request",
}


# ---------------------------------------------------------------------------------------- CMake


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command name lower-case, arguments) of every command in a CMake file, comments removed.

    Arguments are split on whitespace; quoted arguments keep their spaces (quotes removed).
    """
    text = "\n".join(_strip_cmake_comment(line) for line in path.read_text(encoding="utf-8").splitlines())
    commands = []
    for match in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(((?:[^()\"]|\"[^\"]*\")*)\)", text):
        args = [a if a is not None and a != "" else b for a, b in re.findall(r"\"([^\"]*)\"|(\S+)", match[2])]
        commands.append((match[1].lower(), args))
    return commands


def _strip_cmake_comment(line: str) -> str:
    in_quotes = False
    for i, char in enumerate(line):
        if char == '"':
            in_quotes = not in_quotes
        elif char == "#" and not in_quotes:
            return line[:i]
    return line


def cmake_variables(path: Path) -> dict[str, list[str]]:
    """Every ``set(NAME values...)`` of a file, with ``${VAR}`` expanded from earlier sets."""
    variables: dict[str, list[str]] = {}

    def expand(value: str) -> list[str]:
        if re.fullmatch(r"\$\{(\w+)\}", value) and value[2:-1] in variables:
            return list(variables[value[2:-1]])  # a list variable used as a whole
        return [re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m[1], [m[0]])), value)]

    for name, args in cmake_commands(path):
        if name == "set" and args:
            variables[args[0]] = [v for arg in args[1:] for v in expand(arg)]
    return variables


@pytest.fixture(scope="module")
def module_lists() -> dict[str, list[str]]:
    variables = cmake_variables(MODULE / "CMakeLists.txt")
    for key in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        assert variables.get(key), f"M4oESegmentation/CMakeLists.txt sets no {key}"
    return variables


def shipped_files() -> list[str]:
    files = []
    for path in sorted(MODULE.rglob("*")):
        relative = path.relative_to(MODULE)
        if not path.is_file() or path.name in NOT_SHIPPED_NAMES or path.suffix == ".pyc":
            continue
        if NOT_SHIPPED_DIRS & set(relative.parts) or any(part.startswith(".") for part in relative.parts):
            continue
        files.append(relative.as_posix())
    return files


def test_every_module_file_is_listed_in_cmake(module_lists):
    scripts = set(module_lists["MODULE_PYTHON_SCRIPTS"])
    resources = set(module_lists["MODULE_PYTHON_RESOURCES"])
    files = shipped_files()
    unlisted_py = [f for f in files if f.endswith(".py") and f not in scripts]
    unlisted = [f for f in files if not f.endswith(".py") and f not in resources]
    assert not unlisted_py, f"add to MODULE_PYTHON_SCRIPTS in M4oESegmentation/CMakeLists.txt: {unlisted_py}"
    assert not unlisted, f"add to MODULE_PYTHON_RESOURCES in M4oESegmentation/CMakeLists.txt: {unlisted}"


def test_every_file_listed_in_cmake_exists(module_lists):
    listed = module_lists["MODULE_PYTHON_SCRIPTS"] + module_lists["MODULE_PYTHON_RESOURCES"]
    missing = [f for f in listed if not (MODULE / f).is_file()]
    assert not missing, f"listed in M4oESegmentation/CMakeLists.txt but not in the repository: {missing}"
    duplicates = sorted({f for f in listed if listed.count(f) > 1})
    assert not duplicates, f"listed twice in M4oESegmentation/CMakeLists.txt: {duplicates}"
    misplaced = [f for f in module_lists["MODULE_PYTHON_RESOURCES"] if f.endswith(".py")]
    assert not misplaced, f"Python files belong in MODULE_PYTHON_SCRIPTS (byte-compiled): {misplaced}"


def test_module_cmake_builds_the_scripted_module_with_its_tests():
    commands = cmake_commands(MODULE / "CMakeLists.txt")
    builds = [args for name, args in commands if name == "slicermacrobuildscriptedmodule"]
    assert len(builds) == 1, "one slicerMacroBuildScriptedModule(...) call"
    args = builds[0]
    for keyword, value in (
        ("NAME", "${MODULE_NAME}"),
        ("SCRIPTS", "${MODULE_PYTHON_SCRIPTS}"),
        ("RESOURCES", "${MODULE_PYTHON_RESOURCES}"),
    ):
        assert keyword in args and args[args.index(keyword) + 1] == value, f"{keyword} {value}"
    assert "WITH_GENERIC_TESTS" in args
    assert cmake_variables(MODULE / "CMakeLists.txt")["MODULE_NAME"] == ["M4oESegmentation"]
    assert ("add_subdirectory", ["Testing"]) in commands
    assert ("slicer_add_python_unittest", ["SCRIPT", "${MODULE_NAME}.py"]) in commands
    assert ("add_subdirectory", ["Python"]) in cmake_commands(MODULE / "Testing" / "CMakeLists.txt")


def test_self_tests_registered_with_ctest_exist():
    testing = MODULE / "Testing" / "Python"
    scripts = [
        args[args.index("SCRIPT") + 1].replace("${MODULE_NAME}", "M4oESegmentation")
        for name, args in cmake_commands(testing / "CMakeLists.txt")
        if name == "slicer_add_python_unittest"
    ]
    assert scripts, "Testing/Python/CMakeLists.txt registers no self-test"
    missing = [s for s in scripts if not (testing / s).is_file()]
    assert not missing, f"self-tests registered but missing: {missing}"
    for script in scripts:
        ast.parse((testing / script).read_text(encoding="utf-8"), filename=script)


@pytest.fixture(scope="module")
def extension() -> dict[str, list[str]]:
    return cmake_variables(ROOT / "CMakeLists.txt")


def test_top_level_cmake_declares_the_extension(extension):
    commands = cmake_commands(ROOT / "CMakeLists.txt")
    assert ("project", ["M4oESegmentation"]) in commands
    empty = [
        f"EXTENSION_{f}"
        for f in EXTENSION_FIELDS
        if not " ".join(extension.get(f"EXTENSION_{f}", [])).strip()
    ]
    assert not empty, f"empty or missing in CMakeLists.txt: {empty}"
    assert extension["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert extension["EXTENSION_CATEGORY"] == ["Segmentation"]
    for expected in (
        ("find_package", ["Slicer", "REQUIRED"]),
        ("include", ["${Slicer_USE_FILE}"]),
        ("add_subdirectory", ["M4oESegmentation"]),
        ("include", ["${Slicer_EXTENSION_GENERATE_CONFIG}"]),
        ("include", ["${Slicer_EXTENSION_CPACK}"]),
    ):
        assert expected in commands, f"CMakeLists.txt lacks {expected[0]}({' '.join(expected[1])})"
    assert any(name == "cmake_minimum_required" for name, _ in commands)


def _repository_file(url: str, homepage: str) -> Path:
    """The local file a raw.githubusercontent.com URL of this repository's main branch names."""
    repo = homepage.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert url.startswith(prefix), f"{url} is not a file of {homepage} (main branch)"
    return ROOT / url.removeprefix(prefix)


def test_extension_icon_url_is_a_file_of_this_repository(extension):
    (homepage,) = extension["EXTENSION_HOMEPAGE"]
    (icon_url,) = extension["EXTENSION_ICONURL"]
    icon = _repository_file(icon_url, homepage)
    assert icon.is_file(), f"EXTENSION_ICONURL names {icon.relative_to(ROOT)}, which does not exist"


SCREENSHOT_MAX_BYTES = 400_000
"""A screenshot stays in git history forever: keep it small (tools/screenshot.py writes ~210 KB)."""


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; AssertionError when the file is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_extension_screenshots_are_small_pngs_of_this_repository(extension):
    (homepage,) = extension["EXTENSION_HOMEPAGE"]
    urls = " ".join(extension["EXTENSION_SCREENSHOTURLS"]).split()
    assert urls, "CMakeLists.txt lists no screenshot"
    for url in urls:
        path = _repository_file(url, homepage)
        assert path.is_file(), f"EXTENSION_SCREENSHOTURLS names {path.relative_to(ROOT)}: no such file"
        width, height = _png_size(path)
        assert 800 <= width <= 2000 and 400 <= height <= 1600, f"{path.name}: {width}x{height} pixels"
        size = path.stat().st_size
        assert size <= SCREENSHOT_MAX_BYTES, f"{path.name}: {size} bytes, over {SCREENSHOT_MAX_BYTES}"


def test_readme_figure_is_the_extension_screenshot_rendered_by_the_script(extension):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    figures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", readme)
    assert figures, "README.md shows no figure"
    (homepage,) = extension["EXTENSION_HOMEPAGE"]
    first_url = " ".join(extension["EXTENSION_SCREENSHOTURLS"]).split()[0]
    assert ROOT / figures[0] == _repository_file(first_url, homepage), f"README shows {figures[0]}"
    # The figure is reproducible: the README names the script that renders it, whose default output it is.
    assert "tools/screenshot.py" in readme
    script = (ROOT / "tools" / "screenshot.py").read_text(encoding="utf-8")
    assert f'"{figures[0]}"' in script, f"tools/screenshot.py does not write {figures[0]} by default"


# ---------------------------------------------------------------------------------------- catalog


def test_catalog_entry_follows_the_extensions_index_schema(extension):
    entry = json.loads(CATALOG.read_text(encoding="utf-8"))
    assert isinstance(entry, dict)
    assert CATALOG_REQUIRED <= set(entry), f"missing keys: {sorted(CATALOG_REQUIRED - set(entry))}"
    unknown = set(entry) - set(CATALOG_PROPERTIES)
    assert not unknown, f"the schema allows no other keys: {sorted(unknown)}"
    wrong = [k for k, v in entry.items() if type(v) is not CATALOG_PROPERTIES[k]]
    assert not wrong, f"wrong JSON type for {wrong}"
    assert re.fullmatch(
        r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
        r"slicer-extension-catalog-entry-schema-v1\.0\.1\.json#?",
        entry["$schema"],
    )
    assert entry.get("tier", 5) in (1, 3, 5)
    assert entry.get("scm_type", "git") in ("git", "local")
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))
    # The entry and the extension's CMakeLists.txt must describe the same extension.
    assert entry["category"] == "Segmentation" == " ".join(extension["EXTENSION_CATEGORY"])
    assert entry["build_dependencies"] == ["PyTorch"] == extension["EXTENSION_DEPENDS"]
    assert entry["scm_url"].removesuffix(".git") == " ".join(extension["EXTENSION_HOMEPAGE"])
    assert entry.get("build_subdirectory", ".") == "."


# ---------------------------------------------------------------------------------------- icons


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_icons_are_128px_pngs_and_the_same_picture():
    extension_icon = ROOT / "Resources" / "Icons" / "M4oESegmentation.png"
    module_icon = MODULE / "Resources" / "Icons" / "M4oESegmentation.png"
    for icon in (extension_icon, module_icon):
        assert png_size(icon) == ICON_SIZE, f"{icon.relative_to(ROOT)} must be 128x128"
    assert extension_icon.read_bytes() == module_icon.read_bytes(), "extension and module icons differ"


# ---------------------------------------------------------------------------------------- .ui


@pytest.fixture(scope="module")
def ui() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_widgets(ui: ET.Element) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ui.iter("widget")}


def test_ui_top_widget_is_a_qmrmlwidget(ui):
    top = ui.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget"
    assert ui.findtext("class") == top.get("name") == "M4oESegmentation"


def test_ui_defines_every_widget_the_code_uses(ui):
    names = set(ui_widgets(ui))
    for path in (MODULE_FILE, SELF_TEST):
        used = set(re.findall(r"\bui\.([A-Za-z_]\w*)", path.read_text(encoding="utf-8")))
        missing = sorted(used - names)
        assert not missing, f"{path.name} uses widgets the .ui does not define: {missing}"


def test_ui_custom_widgets_are_declared_and_get_the_scene(ui):
    widgets = ui_widgets(ui)
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    custom = {cls for cls in widgets.values() if cls.startswith(("ctk", "qMRML"))}
    assert custom <= declared, f"declare in <customwidgets>: {sorted(custom - declared)}"
    # MRML widgets show nothing until they get the scene: the top widget passes it on.
    connected = {
        c.findtext("receiver")
        for c in ui.iter("connection")
        if c.findtext("sender") == "M4oESegmentation"
        and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    needs_scene = {"qMRMLNodeComboBox", "qMRMLTableView", "qMRMLPlotWidget"}
    unconnected = sorted(
        name for name, cls in widgets.items() if cls in needs_scene and name not in connected
    )
    assert not unconnected, f"connect mrmlSceneChanged -> setMRMLScene for {unconnected}"


def parameter_fields() -> dict[str, ast.expr]:
    """Field name -> annotation of the @parameterNodeWrapper class (M4oESegmentationLib/parameters.py)."""
    tree = ast.parse(PARAMETERS_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {
                s.target.id: s.annotation
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            }
    raise AssertionError(f"no @parameterNodeWrapper class in {PARAMETERS_FILE.relative_to(ROOT)}")


def test_ui_parameter_bindings_are_parameters_the_wrapper_can_drive(ui):
    fields = parameter_fields()
    for widget in ui.iter("widget"):
        prop = next((p for p in widget.findall("property") if p.get("name") == "SlicerParameterName"), None)
        if prop is None:
            continue
        name, cls = prop.findtext("string"), widget.get("class")
        assert name in fields, f"{widget.get('name')} is bound to {name!r}, not a parameter"
        annotation = ast.unparse(fields[name])
        where = f"{widget.get('name')} ({cls}) is bound to {name}: {annotation}"
        if cls == "QComboBox":  # the wrapper fills the combo box from the Choice annotation
            assert re.match(r"Annotated\[str, Choice\(", annotation), (
                f"{where}; expected Annotated[str, Choice]"
            )
        elif cls == "QCheckBox":
            assert annotation == "bool", f"{where}; expected bool"
        elif cls == "QDoubleSpinBox":  # bounded, or the wrapper would open the range to +-inf
            assert re.match(r"Annotated\[float, WithinRange\(", annotation), (
                f"{where}; expected Annotated[float, WithinRange]"
            )
        elif cls == "qMRMLNodeComboBox":
            assert annotation.startswith("vtkMRML"), f"{where}; expected a MRML node class"
        else:
            pytest.fail(f"{widget.get('name')}: no binding checked for widget class {cls}")


# ---------------------------------------------------------------------------------------- imports


def top_level_imports(tree: ast.Module, package: str = "") -> set[str]:
    """Modules imported when the file is imported: module body, if/try/with blocks, not functions.

    ``package``: the file's package, to resolve relative imports (``from . import x`` in package
    ``p`` gives ``p`` and ``p.x``). ``from a import b`` gives ``a`` and ``a.b`` (``a.b`` may be a
    name, not a module: :func:`load_closure` keeps only what it finds as a file).
    """
    found: set[str] = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    module = f"{base}.{node.module}" if node.module else base
                elif node.module:
                    module = node.module
                else:
                    continue
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return found


def all_imports(tree: ast.Module) -> set[str]:
    """Every module imported anywhere in the file, function bodies included."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


LOCAL_PACKAGES = {"m4oe", "M4oESegmentationLib"}
"""Packages shipped in M4oESegmentation/ (found on sys.path because Slicer adds the module's folder)."""


def local_module_path(name: str) -> Path | None:
    """The file of a module of :data:`LOCAL_PACKAGES` (a package -> its __init__.py), or None."""
    relative = MODULE.joinpath(*name.split("."))
    for candidate in (relative.with_suffix(".py"), relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def load_closure(name: str) -> set[str]:
    """Every module that importing ``name`` loads, following the modules of :data:`LOCAL_PACKAGES`.

    Importing ``a.b.c`` runs ``a/__init__``, ``a/b/__init__`` and ``a/b/c``; each local module's
    top-level imports (relative ones resolved) are followed recursively. A dotted name that is
    not a local file (``from m4oe.hub import DEFAULT_MODEL`` gives ``m4oe.hub.DEFAULT_MODEL``) is
    dropped; other names are returned as they are.
    """
    seen: set[str] = set()
    external: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        if current.split(".")[0] not in LOCAL_PACKAGES:
            external.add(current)
            continue
        parts = current.split(".")
        for depth in range(1, len(parts) + 1):
            module = ".".join(parts[:depth])
            if module in seen:
                continue
            path = local_module_path(module)
            if path is None:
                continue
            seen.add(module)
            tree = ast.parse(path.read_text(encoding="utf-8"))
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            pending.extend(top_level_imports(tree, package))
    return seen | external


def top_level_names(path: Path) -> set[str]:
    """Names a Python file binds at its top level: classes, functions, assignments, imports."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def missing_library_imports(tree: ast.Module) -> list[str]:
    """What a file imports from M4oESegmentationLib (anywhere in it) that does not exist. The
    package's __init__.py defines no names, so what is imported from the package must be a module
    of it; what is imported from a module of it must be a name that module binds at its top level."""
    missing = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or (node.module or "").split(".")[0] != "M4oESegmentationLib":
            continue
        if node.module == "M4oESegmentationLib":
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            missing += [name for name in names if local_module_path(name) is None]
        elif (path := local_module_path(node.module)) is None:
            missing.append(node.module)
        else:
            defined = top_level_names(path)
            missing += [f"{node.module}.{alias.name}" for alias in node.names if alias.name not in defined]
    return sorted(missing)


def test_module_file_loads_in_a_fresh_slicer():
    """What M4oESegmentation.py loads when Slicer loads it, local modules followed: nothing beyond
    the standard library and what a fresh Slicer bundles, so the module loads before any install."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=MODULE_FILE.name)
    imported = top_level_imports(tree)
    missing = missing_library_imports(tree)
    assert not missing, f"M4oESegmentation.py imports from M4oESegmentationLib what does not exist: {missing}"
    loaded = set().union(*(load_closure(name) for name in imported))
    roots = {name.split(".")[0] for name in loaded} - LOCAL_PACKAGES
    heavy = sorted(roots & HEAVY)
    assert not heavy, f"M4oESegmentation.py loads {heavy} at load time; import them where they are used"
    foreign = sorted(roots - SLICER_BUNDLED - set(sys.stdlib_module_names))
    assert not foreign, (
        f"M4oESegmentation.py loads {foreign} at load time (local modules followed): Slicer loads the "
        "module before any pip install, so import them inside the functions that use them"
    )


def test_slicer_side_code_never_loads_pytorch():
    """The Slicer process never imports PyTorch: inference runs in the engine's own process."""
    files = [MODULE_FILE, *sorted(LIB.glob("*.py"))]
    problems = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=path.name)
        imports = all_imports(tree)
        if path.parent == LIB:  # relative imports of the Lib are Lib modules: checked as files
            imports |= top_level_imports(tree, "M4oESegmentationLib")
        for name in sorted(imports):
            heavy = sorted({m for m in load_closure(name) if m.split(".")[0] in HEAVY})
            if heavy:
                problems.append(f"{path.relative_to(ROOT)}: import {name} loads {heavy}")
    assert not problems, "\n".join(problems)


def test_engine_never_imports_slicer_or_training():
    problems = []
    for path in sorted(ENGINE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        bad = sorted({name for name in all_imports(tree) if name.split(".")[0] in ENGINE_FORBIDDEN})
        if bad:
            problems.append(f"{path.relative_to(ROOT)} imports {bad}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------- module layout

SLICER_CLASSES = {
    "M4oESegmentation": "ScriptedLoadableModule",
    "M4oESegmentationWidget": "ScriptedLoadableModuleWidget",
    "M4oESegmentationLogic": "ScriptedLoadableModuleLogic",
    "M4oESegmentationTest": "ScriptedLoadableModuleTest",
    "M4oESegmentationParameterNode": "@parameterNodeWrapper",
}
"""Classes looked up by name in the module file's namespace, and the base (or decorator) each needs.
Slicer finds the module class and ``<ModuleName>Widget`` there when it loads the module, and
``<ModuleName>Test`` for Reload and Test (``ScriptedLoadableModule.runTest``) and for CTest
(``slicer.testing.runUnitTest`` collects the namespace's TestCase classes); scripts and the
self-tests use ``M4oESegmentation.M4oESegmentationLogic``. Classes written in M4oESegmentationLib
count when the module file imports them under these names."""


def _class_def(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def module_namespace_class(name: str) -> tuple[Path, ast.ClassDef]:
    """The file and definition of the class that the module file's top-level ``name`` is: a class
    of the module file, or one it imports from M4oESegmentationLib at its top level."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    found = _class_def(tree, name)
    if found is not None:
        return MODULE_FILE, found
    for node in tree.body:
        if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("M4oESegmentationLib.")):
            continue
        for alias in node.names:
            if (alias.asname or alias.name) == name:
                path = local_module_path(node.module)
                assert path is not None, f"M4oESegmentation.py imports {name} from missing {node.module}"
                found = _class_def(ast.parse(path.read_text(encoding="utf-8")), alias.name)
                assert found is not None, f"{path.relative_to(ROOT)} defines no class {alias.name}"
                return path, found
    raise AssertionError(f"M4oESegmentation.py neither defines nor imports {name} at its top level")


def test_module_namespace_holds_the_classes_slicer_looks_up():
    for name, base in SLICER_CLASSES.items():
        path, node = module_namespace_class(name)
        where = f"{name} ({path.relative_to(ROOT)})"
        if base.startswith("@"):
            decorators = [ast.unparse(d) for d in node.decorator_list]
            assert base[1:] in decorators, f"{where} is not decorated with {base}: {decorators}"
        else:
            bases = [ast.unparse(b) for b in node.bases]
            assert base in bases, f"{where} does not derive from {base}: {bases}"


def library_modules_reload_order() -> list[str]:
    """``LIBRARY_MODULES`` of the module file: the order in which the Widget's onReload re-imports them."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        names = [getattr(target, "id", "") for target in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and "LIBRARY_MODULES" in names:
            return list(ast.literal_eval(node.value))
    raise AssertionError("M4oESegmentation.py defines no LIBRARY_MODULES")


def test_reload_reimports_every_library_module_after_those_it_imports():
    """Reload re-imports LIBRARY_MODULES in order, then Slicer runs the module file again: a library
    module left out keeps its old code, and one re-imported before a module it imports at its top
    level keeps the old module's functions and classes."""
    order = library_modules_reload_order()
    modules = sorted(path.stem for path in LIB.glob("*.py") if path.stem != "__init__")
    assert sorted(order) == modules, (
        f"LIBRARY_MODULES lacks {sorted(set(modules) - set(order))}, "
        f"names no file {sorted(set(order) - set(modules))}, or names one twice"
    )
    for index, name in enumerate(order):
        tree = ast.parse((LIB / f"{name}.py").read_text(encoding="utf-8"))
        imported = top_level_imports(tree, "M4oESegmentationLib")
        uses = {m.split(".")[1] for m in imported if m.startswith("M4oESegmentationLib.")} & set(modules)
        later = sorted(uses - set(order[:index]))
        assert not later, f"LIBRARY_MODULES: {name} imports {later}, which it lists after it"


# ---------------------------------------------------------------------------------------- file size

LINE_LIMIT = 600
"""DESIGN.md: "No file over about 600 lines: split by responsibility before it grows past that";
checked on the shipped module (module file, its library, the engine), the training subpackage and
the benchmarks."""
SIZE_CHECKED = (MODULE, ROOT / "training", ROOT / "benchmarks")
LINE_LIMIT_EXCEPTIONS: dict[Path, int] = {}
"""The only files allowed over ``LINE_LIMIT``, each with its own limit and the reason."""


def test_no_package_source_file_is_over_the_line_limit():
    sizes = {
        path: len(path.read_text(encoding="utf-8").splitlines())
        for folder in SIZE_CHECKED
        for path in sorted(folder.rglob("*.py"))
        if "__pycache__" not in path.parts
    }
    assert len(sizes) > 50, f"found only {len(sizes)} Python files under {[str(f) for f in SIZE_CHECKED]}"
    over = [
        f"{path.relative_to(ROOT)} ({n} lines)"
        for path, n in sizes.items()
        if n > LINE_LIMIT_EXCEPTIONS.get(path, LINE_LIMIT)
    ]
    assert not over, f"over {LINE_LIMIT} lines, split by responsibility (DESIGN.md): {', '.join(over)}"
    needless = [str(path.relative_to(ROOT)) for path in LINE_LIMIT_EXCEPTIONS if sizes[path] <= LINE_LIMIT]
    assert not needless, f"within {LINE_LIMIT} lines now, drop from LINE_LIMIT_EXCEPTIONS: {needless}"


# ---------------------------------------------------------------------------------------- requirements


def _requirement(text: str) -> tuple[str, str]:
    """(normalised name, normalised specifier) of a requirement string such as "timm>=1.0,<2"."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*?)\s*", text)
    assert match, f"not a requirement: {text!r}"
    name = re.sub(r"[-_.]+", "-", match[1]).lower()
    return name, ",".join(sorted(part.replace(" ", "") for part in match[2].split(",") if part.strip()))


def module_constant(name: str):
    """A constant of M4oESegmentationLib/dependencies.py, read without importing it."""
    tree = ast.parse(DEPENDENCIES.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{DEPENDENCIES.name} defines no {name}")


def requirement_lines(path: Path) -> list[str]:
    """The requirements of a requirements file, as ``slicer.packaging.load_requirements`` reads it."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith(("#", "-"))]


def test_slicer_requirements_follow_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = dict(_requirement(r) for r in project["dependencies"])
    everything = dict(runtime)
    for extra in project.get("optional-dependencies", {}).values():
        everything.update(_requirement(r) for r in extra)
    installed = dict(_requirement(r) for r in requirement_lines(REQUIREMENTS))
    assert installed, f"{REQUIREMENTS.relative_to(ROOT)} lists no requirement"
    differ = {n: (s, everything.get(n)) for n, s in installed.items() if everything.get(n) != s}
    assert not differ, f"{REQUIREMENTS.name} differs from pyproject.toml (module, pyproject): {differ}"
    assert runtime["torch"] == _requirement("torch" + module_constant("TORCH_REQUIREMENT"))[1]
    exempt = {_requirement(n)[0] for n in NOT_INSTALLED_IN_SLICER}
    forgotten = sorted(set(runtime) - set(installed) - exempt)
    assert not forgotten, (
        f"pyproject.toml dependencies the Slicer module neither installs nor explains: {forgotten}"
    )
    assert not {"torch", "torchvision", "simpleitk"} & set(installed), (
        "pip must never be asked for torch (the PyTorch extension's) or SimpleITK (Slicer's own)"
    )


def test_slicer_requirements_hold_the_tested_versions():
    """The versions the project is tested with (requirements/pinned.txt) satisfy requirements.txt."""
    from packaging.requirements import Requirement

    pinned = {}
    for line in requirement_lines(PINNED):
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        pinned[_requirement(requirement.name)[0]] = spec.version
    for line in requirement_lines(REQUIREMENTS):
        requirement = Requirement(line)  # a line Slicer's load_requirements could not parse fails here
        name = _requirement(requirement.name)[0]
        assert name in pinned, f"{line!r} has no tested version in {PINNED.name}"
        assert requirement.specifier.contains(pinned[name]), f"tested {name} {pinned[name]} is not {line!r}"


def test_device_packages_are_the_tested_versions():
    """tools/device/requirements.txt (what a GPU run carries) pins each package as pinned.txt does,
    so figures measured on the device come from the versions the test suite runs."""
    pinned = dict(_requirement(line) for line in requirement_lines(PINNED))
    carried = ROOT / "tools" / "device" / "requirements.txt"
    device = dict(_requirement(line) for line in requirement_lines(carried))
    assert {"simpleitk", "timm", "monai", "dask", "distributed"} <= set(device)
    for name, spec in device.items():
        assert name in pinned, f"device package {name} has no tested version in {PINNED.name}"
        assert spec == pinned[name], f"device {name}{spec} is not the tested {name}{pinned[name]}"


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def test_slicer_packages_are_handled_with_slicer_packaging():
    """Slicer's ``slicer.packaging`` reads, checks and installs the requirements file, with its
    defaults: no ``skip_packages`` (a discouraged workaround), installation skipped in testing mode."""
    text = DEPENDENCIES.read_text(encoding="utf-8")
    tree = ast.parse(text)
    assert '"slicer.packaging"' in text and "slicer.pydeps" not in text
    names = [_called_name(call) for call in _calls(tree)]
    for api in ("load_requirements", "pip_check", "pip_ensure"):
        assert api in names, f"{DEPENDENCIES.name} never calls slicer.packaging.{api}"
    (ensure,) = [call for call in _calls(tree) if _called_name(call) == "pip_ensure"]
    keywords = {k.arg for k in ensure.keywords}
    assert not keywords & {"skip_packages", "skip_in_testing"}, keywords
    assert "requester" in keywords
    assert "REQUIREMENTS_FILE" in text and '"requirements.txt"' in text


# ---------------------------------------------------------------------------------------- metadata


def _parent_assignment(tree: ast.AST, attribute: str) -> ast.expr:
    """The value assigned to ``self.parent.<attribute>`` in the module class."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr == attribute
                    and isinstance(target.value, ast.Attribute)
                    and target.value.attr == "parent"
                ):
                    return node.value
    raise AssertionError(f"M4oESegmentation.py sets no self.parent.{attribute}")


def test_module_and_extension_metadata_follow_slicer_conventions(extension):
    """Contributors as "Name (Organization)", the same in the module and the extension; a one-line
    extension description; the module category translated with Slicer's core-module context."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    contributors = _parent_assignment(tree, "contributors")
    if isinstance(contributors, ast.Name):
        (assignment,) = [
            n
            for n in tree.body
            if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == contributors.id for t in n.targets)
        ]
        contributors = assignment.value
    names = ast.literal_eval(contributors)
    assert names and all(re.fullmatch(r"[^()]+ \([^()]+\)", name) for name in names), names
    assert ", ".join(names) == " ".join(extension["EXTENSION_CONTRIBUTORS"])
    (description,) = extension["EXTENSION_DESCRIPTION"]
    assert "\n" not in description and len(description) <= 200 and description.endswith("."), description
    category = _parent_assignment(tree, "categories")
    (call,) = category.elts
    assert isinstance(call, ast.Call) and _called_name(call) == "translate"
    assert [ast.literal_eval(a) for a in call.args] == ["qSlicerAbstractCoreModule", "Segmentation"]
