"""Test matrix for the automodel-kit workspace.

Sessions (packages are discovered from packages/*, so a new package needs no edit here):
- tests-<package>(transformers)          the package's own tests against each transformers factor
- integration(python, transformers)      all packages composed, tests/integration (also on Python 3.12)
- contracts(transformers)                every private transformers object we patch still matches
                                         (not run by default: `minors` covers it on every minor)
- minors                                 contracts + an exactness smoke on EVERY published 5.x minor;
                                         writes docs/transformers-support.md
- isolation-<package>                    the package's wheel installed ALONE in a fresh venv, its tests run
- zoo                                    every causal-LM architecture x package -> docs/support-matrix.md
- sync-shared                            copy am-kernels' _patch.py/_contract.py into every package (not default)
- build                                  wheels and sdists of every package into dist/
- lint                                   ruff

Run everything with `uv run nox`; one session with `uv run nox -s "tests-am-kernels(transformers='5.3')"`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nox
from packaging.version import InvalidVersion, Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the workspace dev group runs on 3.11+ in CI
    import tomli as tomllib

ROOT = Path(__file__).parent
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())

# The transformers factors: the oldest supported minor, the 5.5 rename of the flash flags, the minor
# before the newest installable one (so a regression the newest release hides is still caught), and the
# newest 5.x release (whatever the index can install today). "previous" is read when its session runs.
SUPPORTED = "transformers>=5.3,<6"
TRANSFORMERS = {
    "5.3": "transformers==5.3.0",
    "5.5": "transformers>=5.5,<5.6",
    "previous": None,
    "latest": SUPPORTED,
}
OLDEST_MINOR = (5, 3)
# Python factors of the integration session: the machine's interpreter for every transformers factor,
# and the next CPython on the newest transformers.
INTEGRATION_FACTORS = [("3.11", t) for t in TRANSFORMERS] + [("3.12", "latest")]
PACKAGE_NAMES = re.compile(r"\bam[-_](attention|packing|precision|pipelining|kernels)\b")
# Extras that need CUDA builds; everything else (liger, test) installs on CPU.
GPU_EXTRAS = {"te", "flash-attn"}

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = True


def _index_url() -> str:
    for var in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"):
        if os.environ.get(var):
            return os.environ[var].rstrip("/")
    return "https://pypi.org/simple"


@functools.cache
def published_minors() -> dict[str, str]:
    """Latest final, non-yanked patch of every transformers 5.x minor from 5.3, read from the index now.

    Uses the index's JSON simple API (PEP 691/700), so a release published today is in the list
    without an edit here. Read once per nox run (the `previous` factor and `minors` share it).
    """
    request = urllib.request.Request(
        f"{_index_url()}/transformers/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        files = json.load(response)["files"]
    latest: dict[tuple[int, int], Version] = {}
    for file in files:
        if file.get("yanked"):
            continue
        match = re.match(r"transformers-([^-]+?)(?:\.tar\.gz|-py)", file["filename"])
        try:
            version = Version(match.group(1)) if match else None
        except InvalidVersion:
            continue
        if (
            version is None
            or version.is_prerelease
            or version.major != 5
            or version.release[:2] < OLDEST_MINOR
        ):
            continue
        minor = version.release[:2]
        latest[minor] = max(latest.get(minor, version), version)
    return {f"{m[0]}.{m[1]}": str(latest[m]) for m in sorted(latest)}


@functools.cache
def installable_latest() -> Version:
    """The transformers release `latest` resolves to from this index today (uv's own resolution).

    A minor can be published before its dependencies reach the index (5.25.0 needed a kernels release the
    index did not hold), so "the minor before the newest" is counted from what installs, not what is listed.
    """
    resolved = subprocess.run(
        ["uv", "pip", "compile", "-", "--python-version", "3.11", "--no-header", "--no-annotate", "-q"],
        input=SUPPORTED, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    pins = re.findall(r"^transformers==(\S+)$", resolved, flags=re.MULTILINE)
    if len(pins) != 1:
        raise RuntimeError(f"uv resolved no single transformers pin for {SUPPORTED!r}: {resolved!r}")
    return Version(pins[0])


def _requirement(transformers: str) -> str:
    if transformers == "previous":
        newest = installable_latest().release[:2]
        older = [v for v in published_minors().values() if Version(v).release[:2] < newest]
        if not older:
            raise RuntimeError(f"the index lists no transformers 5.x minor before {newest}")
        return f"transformers=={older[-1]}"
    return TRANSFORMERS[transformers]


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
    session.install(*args, _requirement(transformers), _locked_torch(), "pytest", "hypothesis")
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
        session.install("--find-links", str(wheels), requirement, SUPPORTED, _locked_torch())
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
@nox.parametrize(
    "python,transformers", INTEGRATION_FACTORS, ids=[f"py{p}-{t}" for p, t in INTEGRATION_FACTORS]
)
def integration(session: nox.Session, transformers: str) -> None:
    """All packages composed on tiny models (tests/integration)."""
    _install_workspace(session, PACKAGES, transformers)
    # tests/gpu is collected too: on a CPU machine every GPU test must skip cleanly, not error.
    session.run("pytest", "tests/integration", "tests/gpu", "-q", *session.posargs)


# Not in the default run: `minors` runs tests/contracts on every published minor, these factors included.
@nox.session(default=False)
@nox.parametrize("transformers", list(TRANSFORMERS))
def contracts(session: nox.Session, transformers: str) -> None:
    """Every private transformers object a package patches still has the contract we rely on."""
    _install_workspace(session, PACKAGES, transformers)
    session.run("pytest", "tests/contracts", "-q", *session.posargs)


def _failed_packages(junit: Path) -> tuple[set[str], int]:
    """Packages named by the failing tests of a junit report (all five when a failure names none, or when
    pytest wrote no report)."""
    if not junit.is_file():
        return set(SUPPORT_COLUMNS), 0
    failed: set[str] = set()
    root = ET.parse(junit).getroot()
    cases = list(root.iter("testcase"))
    for case in cases:
        problems = [c for c in case if c.tag in ("failure", "error")]
        for problem in problems:
            # Smoke tests are named test_am_<package>; contract failures say "(relied on by am-x, am-y)".
            text = f"{case.get('name', '')} {problem.get('message', '')} {problem.text or ''}"
            names = {f"am-{n}" for n in PACKAGE_NAMES.findall(text.replace("test_am_", "am_"))}
            failed |= names or set(SUPPORT_COLUMNS)
    return failed, len(cases)


SUPPORT_COLUMNS = ("am-attention", "am-packing", "am-precision", "am-pipelining", "am-kernels")
SUPPORT_TABLE = ROOT / "docs" / "transformers-support.md"


MINOR_WORKERS = 2  # one per core: each minor's pytest runs single-threaded


def _run_minors(python: Path, versions: list[str], reports: Path) -> None:
    """Swap transformers to each version in the venv of `python` and run the minor suite; logs to `reports`."""
    uv = shutil.which("uv") or "uv"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for version in versions:
        install = subprocess.run(
            [uv, "pip", "install", "-q", "--python", str(python), f"transformers=={version}"],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if install.returncode != 0:
            # e.g. a release whose own dependency the index does not hold yet: nobody can install it from
            # here, so there is nothing to test; the table says so instead of the session failing
            reason = [line for line in install.stderr.splitlines() if line.strip()][-2:]
            (reports / f"minor-{version}.uninstallable").write_text(" ".join(x.strip() for x in reason))
            continue
        with (reports / f"minor-{version}.log").open("w") as log:
            subprocess.run(
                [str(python), "-m", "pytest", "tests/contracts", "tests/minors", "-q", "-p", "no:cacheprovider",
                 f"--junitxml={reports / f'minor-{version}.xml'}"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False,
            )  # fmt: skip


@nox.session
def minors(session: nox.Session) -> None:
    """Contracts and an exactness smoke on every published transformers 5.x minor (latest patch of each).

    MINOR_WORKERS venvs (the session's and one more), transformers swapped per minor, run side by side.
    Writes the minor x package table to docs/transformers-support.md and fails when any cell fails.
    """
    minors_found = published_minors()
    versions = list(minors_found.values())
    session.log("transformers minors on the index: " + ", ".join(versions))
    args: list[str] = []
    for package in PACKAGES:
        args += _editable(package)
    requirements = [*args, f"transformers=={versions[0]}", _locked_torch(), "pytest", "hypothesis"]
    session.install(*requirements)
    tmp = Path(session.create_tmp()).resolve()
    reports = tmp / "reports"
    shutil.rmtree(reports, ignore_errors=True)
    reports.mkdir()
    pythons = [Path(session.virtualenv.location) / "bin" / "python"]
    for worker in range(1, MINOR_WORKERS):
        venv = tmp / f"worker-{worker}"
        session.run(
            "uv", "venv", "-q", "--allow-existing", "--python", str(pythons[0]), str(venv), external=True
        )
        pythons.append(venv / "bin" / "python")
        session.run("uv", "pip", "install", "-q", "--python", str(pythons[-1]), *requirements, external=True)
    with ThreadPoolExecutor(len(pythons)) as pool:
        chains = [
            pool.submit(_run_minors, py, versions[i :: len(pythons)], reports) for i, py in enumerate(pythons)
        ]
        for chain in chains:
            chain.result()
    rows: list[tuple[str, str, set[str], int]] = []
    uninstallable: dict[str, str] = {}
    for minor, version in minors_found.items():
        marker = reports / f"minor-{version}.uninstallable"
        if marker.is_file():
            uninstallable[minor] = marker.read_text()
            session.warn(
                f"transformers {version} cannot be installed from this index: {uninstallable[minor]}"
            )
            continue
        failed, count = _failed_packages(reports / f"minor-{version}.xml")
        rows.append((minor, version, failed, count))
        session.log(f"transformers {version}: {count} tests, failing packages: {sorted(failed) or 'none'}")
        if failed:
            session.log((reports / f"minor-{version}.log").read_text()[-6000:])
    _write_support_table(rows, uninstallable)
    broken = [f"{version} ({', '.join(sorted(failed))})" for _, version, failed, _ in rows if failed]
    if broken:
        session.error("transformers minors with failing packages: " + "; ".join(broken))


def _write_support_table(rows: list[tuple[str, str, set[str], int]], uninstallable: dict[str, str]) -> None:
    lines = [
        "# transformers support",
        "",
        "Written by `uv run nox -s minors`: for every published transformers 5.x minor (its latest patch, read",
        "from the package index when the session runs), `tests/contracts` (every private object a package",
        "patches or relies on) and `tests/minors` (one exactness smoke per package on tiny Llama and Qwen3:",
        "packed == per-document, TE-injected == plain, 2 stages == unsplit, Liger patch/undo, fp32-kept cast).",
        "A cell fails when a test naming that package fails. The per-package test matrix runs on 5.3, 5.5,",
        "the minor before the newest and the newest (`noxfile.py`).",
        "",
        "| minor | tested | tests | " + " | ".join(SUPPORT_COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(SUPPORT_COLUMNS),
    ]
    for minor, version, failed, count in rows:
        cells = ["fail" if package in failed else "pass" for package in SUPPORT_COLUMNS]
        lines.append(f"| {minor} | {version} | {count} | " + " | ".join(cells) + " |")
    if uninstallable:
        lines += ["", "Published but not installable from the index this ran against (not tested):", ""]
        lines += [f"- {minor}: {reason}" for minor, reason in uninstallable.items()]
    SUPPORT_TABLE.parent.mkdir(exist_ok=True)
    SUPPORT_TABLE.write_text("\n".join(lines) + "\n")


# In the default run: a silently wrong or crashing cell on the newest transformers fails CI (~80 s of sweep
# on 2 cores for ~200 architectures, plus the install).
@nox.session
def zoo(session: nox.Session) -> None:
    """Every causal-LM architecture of the newest transformers x package: exact / refused / wrong / crash."""
    _install_workspace(session, PACKAGES, "latest")
    session.run("pytest", "tests/zoo", "-q")
    jobs = str(os.cpu_count() or 1)
    session.run(
        "python", "-m", "tests.zoo", "--jobs", jobs, "--timeout", "600", "--out", "docs/support-matrix.md"
    )


SHARED_MODULES = ("_patch.py", "_contract.py")
SHARED_REFERENCE = "am-kernels"


@nox.session(name="sync-shared", venv_backend="none", default=False)
def sync_shared(session: nox.Session) -> None:
    """Copy the protocol core (am-kernels' _patch.py, _contract.py) into every package that has a copy."""
    source = ROOT / "packages" / SHARED_REFERENCE / "src" / SHARED_REFERENCE.replace("-", "_")
    for name in SHARED_MODULES:
        reference = (source / name).read_bytes()
        for copy in sorted((ROOT / "packages").glob(f"*/src/*/{name}")):
            if copy.read_bytes() != reference:
                copy.write_bytes(reference)
                session.log(f"updated {copy.relative_to(ROOT)}")


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
