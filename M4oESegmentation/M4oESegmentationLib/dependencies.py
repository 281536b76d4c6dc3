"""The Python packages ``m4oe segment`` needs in Slicer, installed on first use after the user agrees.

PyTorch comes only from the PyTorch extension (``PyTorchUtils``), which picks the build that fits
the computer's GPU; pip is never asked for torch. The engine's other packages
(:data:`PYTHON_REQUIREMENTS`) are installed with ``pip_ensure`` where Slicer has it (Slicer >= 5.11,
``slicer.pydeps``; some builds name it ``slicer.packaging``), which asks the user and never replaces
:data:`PIP_SKIP_PACKAGES`; on older Slicer the module asks, then calls ``slicer.util.pip_install``.

Nothing here runs at import: the module file imports this when Slicer loads it (standard library
only), and calls :func:`ensure_torch` and :func:`ensure_packages` when the user presses Apply.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Sequence

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core and plain Python have no translations: English text

    def _(text: str) -> str:
        return text


TORCH_REQUIREMENT = ">=2.6"
"""The torch versions the engine runs with (pyproject.toml says the same): 2.6 and later, since
``torch.load(weights_only=True)`` (ImageNet ``.pth`` initialisation) can run code before 2.6."""
PYTHON_REQUIREMENTS = ("timm>=1.0,<2", "safetensors>=0.4", "slicerio>=1.1", "psutil>=5.9")
"""pip packages ``m4oe segment`` and this module need beyond what Slicer bundles (numpy, scipy,
SimpleITK) and PyTorch. Testing/test_packaging.py keeps them in step with pyproject.toml."""
PIP_SKIP_PACKAGES = ("torch", "torchvision", "SimpleITK")
"""Never replaced by pip: torch must be the build the PyTorch extension chose for this GPU, and
Slicer's SimpleITK carries Slicer's own image IO."""
REQUESTER = "M4oE Segmentation"
PIP_ENSURE_MODULES = ("slicer.pydeps", "slicer.packaging")


def missing_requirements(requirements: Sequence[str] = PYTHON_REQUIREMENTS) -> list[str]:
    """The requirement strings (``"timm>=1.0,<2"``) not satisfied by the installed packages.

    A requirement is satisfied when a distribution of that name is installed at a version the
    specifier allows (pre-releases included); markers that do not apply count as satisfied.
    """
    from packaging.requirements import Requirement

    missing = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(text)
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


def slicer_pip_ensure() -> Callable | None:
    """Slicer's ``pip_ensure`` (Slicer >= 5.11), or None on an older Slicer or outside Slicer."""
    for module_name in PIP_ENSURE_MODULES:
        try:
            pip_ensure = getattr(importlib.import_module(module_name), "pip_ensure", None)
        except ImportError:
            continue
        if pip_ensure is not None:
            return pip_ensure
    return None


def ensure_packages(confirm: bool) -> None:
    """Install the missing :data:`PYTHON_REQUIREMENTS`, never replacing Slicer's packages or torch.

    ``confirm``: ask the user first. Does nothing (and asks nothing) when all are installed.
    Raises RuntimeError when the user declines; pip's own error when the installation fails.
    """
    missing = missing_requirements()
    if not missing:
        return
    pip_ensure = slicer_pip_ensure()
    if pip_ensure is not None:
        from packaging.requirements import Requirement

        pip_ensure(
            [Requirement(text) for text in missing],
            skip_packages=list(PIP_SKIP_PACKAGES),
            prompt_install=confirm,
            requester=REQUESTER,
            # The self-tests run Slicer in testing mode and need the packages too.
            skip_in_testing=False,
        )
        return
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
