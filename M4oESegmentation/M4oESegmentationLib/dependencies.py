"""The Python packages ``m4oe segment`` needs in Slicer, installed on first use after the user agrees.

PyTorch comes only from the PyTorch extension (``PyTorchUtils``), which picks the build that fits
the computer's GPU; pip is never asked for torch, and :func:`ensure_torch` runs first so that pip
finds the torch that timm needs already satisfied. The engine's other packages are listed in
:data:`REQUIREMENTS_FILE` (``Resources/requirements.txt``) and handled with Slicer's
``slicer.packaging`` (Slicer >= 5.11): ``load_requirements`` reads the file, ``pip_check`` tells
what is missing and ``pip_ensure`` asks the user and installs it. On an older Slicer, which has no
``slicer.packaging``, the same file is read and checked here with ``packaging`` (bundled with
Slicer), and the module asks, then calls ``slicer.util.pip_install``.

Nothing here runs at import: the module file imports this when Slicer loads it (standard library
only), and calls :func:`ensure_torch` and :func:`ensure_packages` when the user presses Apply.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core and plain Python have no translations: English text

    def _(text: str) -> str:
        return text


TORCH_REQUIREMENT = ">=2.6"
"""The torch versions the engine runs with (pyproject.toml says the same): 2.6 and later, since
``torch.load(weights_only=True)`` (ImageNet ``.pth`` initialisation) can run code before 2.6."""
REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
"""pip requirements of ``m4oe segment`` and this module beyond what Slicer bundles (numpy, scipy,
SimpleITK) and PyTorch. Testing/test_packaging.py keeps them in step with pyproject.toml."""
REQUESTER = "M4oE Segmentation"


def slicer_packaging():
    """Slicer's ``slicer.packaging`` module (Slicer >= 5.11), or None on an older Slicer or outside it."""
    try:
        return importlib.import_module("slicer.packaging")
    except ImportError:
        return None


def requirements(path: str | Path | None = None) -> list:
    """The requirements of a requirements file (default :data:`REQUIREMENTS_FILE`), as
    ``packaging.requirements.Requirement`` objects.

    Read with ``slicer.packaging.load_requirements`` where Slicer has it, else by the same rules:
    one requirement a line; blank lines, ``#`` comments and pip options (``-r``, ``--index-url``)
    skipped. Raises OSError when the file cannot be read, ``InvalidRequirement`` for a bad line.
    """
    path = REQUIREMENTS_FILE if path is None else path
    packaging = slicer_packaging()
    if packaging is not None:
        return packaging.load_requirements(path)
    from packaging.requirements import Requirement

    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith(("#", "-"))]


def missing_requirements(wanted=None) -> list[str]:
    """The requirements (strings such as ``"timm<2,>=1.0"``) the installed packages do not satisfy.

    ``wanted``: requirement strings or objects; default :func:`requirements`. Checked with
    ``slicer.packaging.pip_check`` where Slicer has it; otherwise a requirement is satisfied when a
    distribution of that name is installed at a version its specifier allows (pre-releases
    included), and one whose marker does not apply counts as satisfied.
    """
    from packaging.requirements import Requirement

    wanted = [Requirement(str(r)) for r in (requirements() if wanted is None else wanted)]
    packaging = slicer_packaging()
    if packaging is not None:
        return [str(r) for r in wanted if not packaging.pip_check(r)]
    missing = []
    for requirement in wanted:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(str(requirement))
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(str(requirement))
    return missing


def torch_version_problem(installed: str | None, requirement: str = TORCH_REQUIREMENT) -> str | None:
    """Why an installed torch version (``"2.4.1+cu121"``, None = not installed) will not do, or None."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if installed is None:
        return _("PyTorch is not installed.")
    try:
        version = Version(installed)
    except InvalidVersion:
        return _("PyTorch reports an unreadable version {version!r}.").format(version=installed)
    if not SpecifierSet(requirement).contains(version, prereleases=True):
        return _(
            "PyTorch {version} is installed; M4oE Segmentation needs torch{required}. "
            "Use the PyTorch Utils module to install a matching version."
        ).format(version=installed, required=requirement)
    return None


def ensure_torch(confirm: bool) -> None:
    """Install PyTorch through the PyTorch extension if missing; check the version if present.

    ``confirm``: ask the user before installing. Raises RuntimeError when the PyTorch extension is
    missing, the user declines, or the installed torch is older than :data:`TORCH_REQUIREMENT`.
    """
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError(
            _("M4oE Segmentation needs the PyTorch extension: install it from the Extensions Manager.")
        ) from None
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if not torch_logic.torchInstalled():
        torch = torch_logic.installTorch(askConfirmation=confirm, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise RuntimeError(_("PyTorch is needed for M4oE Segmentation and was not installed."))
        return
    problem = torch_version_problem(importlib.metadata.version("torch"))
    if problem:
        raise RuntimeError(problem)


def ensure_packages(confirm: bool) -> None:
    """Install the packages of :data:`REQUIREMENTS_FILE` that are missing.

    ``confirm``: ask the user first. Does nothing (and asks nothing) when all are installed. With
    ``slicer.packaging``, ``pip_ensure`` asks and installs (and offers a restart when a package
    already imported was updated). Raises RuntimeError when the user declines, or when packages are
    still missing afterwards (``pip_ensure`` installs nothing while Slicer runs in testing mode);
    pip's own error when the installation fails.
    """
    missing = missing_requirements()
    if not missing:
        return
    packaging = slicer_packaging()
    if packaging is not None:
        packaging.pip_ensure(requirements(), prompt_install=confirm, requester=REQUESTER)
    else:
        import slicer

        if confirm and not slicer.util.confirmOkCancelDisplay(
            _(
                "M4oE Segmentation needs these Python packages: {packages}. Install them now? "
                "This needs a network connection and may take a few minutes."
            ).format(packages=", ".join(missing)),
            _("Install Python packages"),
        ):
            raise RuntimeError(_("The Python packages M4oE Segmentation needs were not installed."))
        slicer.util.pip_install(missing)
    still_missing = missing_requirements()
    if still_missing:
        raise RuntimeError(
            _("These Python packages M4oE Segmentation needs are not installed: {packages}.").format(
                packages=", ".join(still_missing)
            )
        )
