"""Test matrix for the automodel-kit workspace.

Sessions (packages are discovered from packages/*, so a new package needs no edit here):
- tests-<package>(transformers)  the package's own tests against each transformers factor
- integration(transformers)      all packages composed, tests/integration
- contracts(transformers)        every private transformers object we patch still matches
- isolation-<package>            the package's wheel installed ALONE in a fresh venv, its tests run
- build                          wheels and sdists of every package into dist/
- lint                           ruff

Run everything with `uv run nox`; one session with `uv run nox -s "tests-am-kernels(transformers='5.3')"`.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import nox

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the workspace dev group runs on 3.11+ in CI
    import tomli as tomllib

ROOT = Path(__file__).parent
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())

# The transformers factors: the oldest supported minor, the 5.5 rename of the flash flags,
# and the newest 5.x release (whatever PyPI has today).
TRANSFORMERS = {
    "5.3": "transformers==5.3.0",
    "5.5": "transformers>=5.5,<5.6",
    "latest": "transformers>=5.3,<6",
}
# Extras that need CUDA builds; everything else (liger, test) installs on CPU.
GPU_EXTRAS = {"te", "flash-attn"}

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = True


def _pyproject(package: str) -> dict:
    return tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())


def _locked_torch() -> str:
    """The torch version in uv.lock, so every session tests what the lock resolves."""
    lock = (ROOT / "uv.lock").read_text()
    versions = re.findall(r'\[\[package\]\]\nname = "torch"\nversion = "([^"]+)"', lock)
    if not versions:
        raise RuntimeError("uv.lock has no torch entry; run `uv lock`")
    return f"torch=={max(versions, key=lambda v: tuple(int(x) for x in v.split('.')[:3]))}"


def _cpu_extras(package: str) -> list[str]:
    extras = _pyproject(package)["project"].get("optional-dependencies", {})
    return sorted(e for e in extras if e not in GPU_EXTRAS)


def _siblings(package: str) -> list[str]:
    """Workspace packages that `package` depends on (am-cli depends on the five)."""
    deps = _pyproject(package)["project"].get("dependencies", [])
    names = {re.split(r"[ <>=!~;\[]", d, maxsplit=1)[0] for d in deps}
    return sorted(names & set(PACKAGES))


def _editable(package: str) -> list[str]:
    extras = ",".join(_cpu_extras(package))
    spec = f"packages/{package}[{extras}]" if extras else f"packages/{package}"
    return ["-e", spec]


def _install_workspace(session: nox.Session, packages: list[str], transformers: str) -> None:
    args: list[str] = []
    for package in packages:
        args += _editable(package)
    session.install(*args, TRANSFORMERS[transformers], _locked_torch(), "pytest", "hypothesis")
    session.run(
        "python",
        "-c",
        "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)",
    )


def _make_tests_session(package: str) -> None:
    @nox.session(name=f"tests-{package}")
    @nox.parametrize("transformers", list(TRANSFORMERS))
    def tests(session: nox.Session, transformers: str) -> None:
        _install_workspace(session, [*_siblings(package), package], transformers)
        session.run("pytest", f"packages/{package}/tests", "-q", *session.posargs)

    tests.__doc__ = f"{package}'s own tests against one transformers factor."


def _make_isolation_session(package: str) -> None:
    @nox.session(name=f"isolation-{package}")
    def isolation(session: nox.Session) -> None:
        tmp = Path(session.create_tmp()).resolve()
        wheels = tmp / "wheels"
        shutil.rmtree(wheels, ignore_errors=True)
        # am-cli is the one package that depends on its siblings: their wheels come along.
        for name in [*_siblings(package), package]:
            session.run("uv", "build", "--package", name, "--wheel", "--out-dir", str(wheels), external=True)
        extras = ",".join(_cpu_extras(package))
        wheel = next(wheels.glob(f"{package.replace('-', '_')}-*.whl"))
        requirement = f"{package}[{extras}] @ {wheel.as_uri()}" if extras else str(wheel)
        session.install("--find-links", str(wheels), requirement, TRANSFORMERS["latest"], _locked_torch())
        # Run the tests from a copy, far from the source tree, so only the installed wheel is importable.
        work = tmp / "run"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(ROOT / "packages" / package / "tests", work / "tests")
        for name in ("pyproject.toml", "README.md"):  # pytest config, and the README example test
            shutil.copy(ROOT / "packages" / package / name, work / name)
        module = package.replace("-", "_")
        with session.chdir(work):
            session.run(
                "python",
                "-c",
                f"import {module}, sys; p = {module}.__file__; print('{module} from', p); "
                "sys.exit(0 if 'site-packages' in p else 'not installed from the wheel')",
            )
            session.run("python", "-m", "pytest", "tests", "-q", *session.posargs)

    isolation.__doc__ = f"{package} installed alone from its wheel into a fresh venv; its tests run there."


for _package in PACKAGES:
    _make_tests_session(_package)
    _make_isolation_session(_package)


@nox.session
@nox.parametrize("transformers", list(TRANSFORMERS))
def integration(session: nox.Session, transformers: str) -> None:
    """All packages composed on tiny models (tests/integration)."""
    _install_workspace(session, PACKAGES, transformers)
    # tests/gpu is collected too: on a CPU machine every GPU test must skip cleanly, not error.
    session.run("pytest", "tests/integration", "tests/gpu", "-q", *session.posargs)


@nox.session
@nox.parametrize("transformers", list(TRANSFORMERS))
def contracts(session: nox.Session, transformers: str) -> None:
    """Every private transformers object a package patches still has the contract we rely on."""
    _install_workspace(session, PACKAGES, transformers)
    session.run("pytest", "tests/contracts", "-q", *session.posargs)


@nox.session(venv_backend="none")
def build(session: nox.Session) -> None:
    """Wheels and sdists of every package into dist/."""
    shutil.rmtree(ROOT / "dist", ignore_errors=True)
    session.run("uv", "build", "--all-packages", "--out-dir", "dist", external=True)
    built = sorted(p.name for p in (ROOT / "dist").iterdir())
    session.log("built: " + ", ".join(built))
    for package in PACKAGES:
        stem = package.replace("-", "_")
        for kind in (".whl", ".tar.gz"):
            if not any(n.startswith(stem + "-") and n.endswith(kind) for n in built):
                session.error(f"no {kind} built for {package}")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check over the whole workspace."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
