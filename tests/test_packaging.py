"""Packaging: the README's "Use" snippet runs as pasted, and environment.yml agrees with
pyproject.toml, which is the single source of the Python dependencies.

PyYAML is not a dependency, so the small environment file is read by a minimal parser that
understands what a conda environment file holds: top-level keys, and lists of strings nested
at most one level (the pip section). When PyYAML happens to be installed, the parser is checked
against it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, which requires-python still allows
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = ROOT / "environment.yml"
PYPROJECT = ROOT / "pyproject.toml"
README = ROOT / "README.md"

needs_env_file = pytest.mark.skipif(not ENV_FILE.exists(), reason="environment.yml does not exist yet")


def readme_use_snippet(text: str) -> str:
    """The first ```python block after the README's "## Use" heading."""
    section = text.split("\n## Use\n", 1)
    assert len(section) == 2, "README.md has no '## Use' section"
    m = re.search(r"^```python\n(.*?)^```", section[1], re.S | re.M)
    assert m, "README.md's '## Use' section has no ```python block"
    return m.group(1)


def _interpreter_broken() -> bool:
    """Triton < 3.7's interpreter turns 1-element arrays into loop bounds with int(), which NumPy
    refuses on this machine: every kernel with a runtime loop bound fails there, vmoe's or not."""
    import numpy
    import triton

    try:
        int(numpy.zeros(1))
    except TypeError:
        return Version(triton.__version__).release < (3, 7)
    return False


@pytest.mark.skipif(_interpreter_broken(), reason="Triton < 3.7's interpreter with this NumPy")
def test_readme_use_snippet_runs_on_cpu():
    """Pasted into a fresh interpreter on a machine without a GPU, the snippet runs, and on vmoe's
    kernels (in Triton's interpreter), not on the reference fallback."""
    code = readme_use_snippet(README.read_text())
    check = ("\nfrom vmoe.ops.utils.device import interpreting\n"
             "assert interpreting(), 'the snippet did not select the Triton interpreter'\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even where a GPU is present
    proc = subprocess.run([sys.executable, "-c", code + check], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"README's Use snippet failed:\n{proc.stdout}\n{proc.stderr}"


def test_readme_snippet_reader():
    text = "# x\n## Usage\n```python\nno\n```\n## Use\ntext\n```bash\nno\n```\n```python\nyes = 1\n```\n"
    assert readme_use_snippet(text) == "yes = 1\n"


def parse_env_yml(text: str) -> dict:
    """{key: scalar or list}; a list item that is itself ``name:`` followed by a nested list
    becomes ``{name: [...]}``."""
    data: dict = {}
    key = None
    nested = None
    for raw in text.splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if indent == 0:
            key, _, value = body.partition(":")
            data[key] = value.strip() if value.strip() else []
            nested = None
            continue
        if not body.startswith("- "):
            raise ValueError(f"unsupported line in environment.yml: {raw!r}")
        item = body[2:].strip()
        if nested is not None and indent > nested[0]:
            nested[1].append(item)
        elif item.endswith(":"):
            sub: list = []
            data[key].append({item[:-1]: sub})
            nested = (indent, sub)
        else:
            data[key].append(item)
            nested = None
    return data


@pytest.fixture(scope="module")
def env() -> dict:
    return parse_env_yml(ENV_FILE.read_text())


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def _conda_deps(env):
    return [d for d in env["dependencies"] if isinstance(d, str)]


def _pip_section(env):
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml must have exactly one pip: section"
    return sections[0]


def _conda_name(spec: str) -> str:
    return re.split(r"[=<>!~ \[]", spec, maxsplit=1)[0].strip()


@needs_env_file
def test_parser_matches_pyyaml():
    yaml = pytest.importorskip("yaml")
    assert parse_env_yml(ENV_FILE.read_text()) == yaml.safe_load(ENV_FILE.read_text())


def test_parser_on_a_known_file():
    text = "name: x\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.11  # pinned\n  - pip\n" \
           "  - pip:\n      - -e .[dev]\n"
    assert parse_env_yml(text) == {"name": "x", "channels": ["conda-forge"],
                                   "dependencies": ["python=3.11", "pip", {"pip": ["-e .[dev]"]}]}


@needs_env_file
def test_has_python_and_pip(env):
    names = [_conda_name(d) for d in _conda_deps(env)]
    assert "python" in names, "environment.yml must pin python"
    assert "pip" in names, "environment.yml must install pip (its pip: section needs it)"


@needs_env_file
def test_pip_installs_project_with_dev_extra(env):
    entries = [re.sub(r"\s+", " ", e.replace("'", "").replace('"', "")).strip()
               for e in _pip_section(env)]
    ok = {"-e .[dev]", ".[dev]", "--editable .[dev]", "-e ./[dev]", "./[dev]"}
    assert any(e in ok for e in entries), \
        f"the pip section must install '-e .[dev]', got {entries}"


def _min_version(conda_spec: str) -> Version:
    """The lowest Python a conda match spec admits: 'python=3.11' -> 3.11, 'python>=3.10' -> 3.10."""
    rest = conda_spec[len("python"):].strip()
    m = re.match(r"^(==|=|>=|>|~=)?\s*(\d+(?:\.\d+)*)(?:\.\*)?(?:,.*)?$", rest)
    assert m, f"cannot read the python spec {conda_spec!r} (expected e.g. python=3.11 or python>=3.10)"
    op, version = m.groups()
    if op == ">":
        raise AssertionError(f"use >= in {conda_spec!r}: a strict lower bound has no least version")
    return Version(version)


@needs_env_file
def test_python_satisfies_requires_python(env, project):
    (spec,) = [d for d in _conda_deps(env) if _conda_name(d) == "python"]
    requires = SpecifierSet(project["requires-python"])
    lowest = _min_version(spec)
    assert lowest in requires, (f"environment.yml allows python {lowest} ({spec!r}) but pyproject "
                                f"requires-python is {requires}")


def test_min_version_reader():
    assert _min_version("python=3.11") == Version("3.11")
    assert _min_version("python>=3.10") == Version("3.10")
    assert _min_version("python==3.12.*") == Version("3.12")
    assert Version("3.9") not in SpecifierSet(">=3.10")


@needs_env_file
def test_extra_packages_are_project_dependencies(env, project):
    declared = {canonicalize_name(Requirement(r).name)
                for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    conda_extra = [_conda_name(d) for d in _conda_deps(env) if _conda_name(d) not in ("python", "pip")]
    pip_extra = [e for e in _pip_section(env) if not e.lstrip().startswith(("-e", "--editable", "."))]
    names = {canonicalize_name(n) for n in conda_extra} | {
        canonicalize_name(Requirement(e).name) for e in pip_extra}
    # conda packages whose pip distribution has another name.
    aliases = {"pytorch": "torch"}
    names = {aliases.get(n, n) for n in names}
    missing = sorted(names - declared)
    assert not missing, (f"environment.yml lists {missing}, which pyproject.toml does not declare "
                         f"(dependencies or the dev extra); pyproject.toml is the single source")
