"""The wheel as a user installs it: built offline from a copy of the sources, then opened."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import bray

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "bray", "handlers", "archiver", "bridge", "ts_config"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[zipfile.ZipFile, str]:
    """Build with this interpreter's setuptools, no network, no build isolation."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:  # a copy: the build writes build/ and *.egg-info next to the sources
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-v",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path), done.stdout + done.stderr


def test_wheel_holds_every_subpackage_the_config_files_and_py_typed(wheel: tuple[zipfile.ZipFile, str]) -> None:
    names = set(wheel[0].namelist())
    for package in ("bray", "bray/store", "bray/handlers", "bray/handlers/engines", "bray/archiver", "bray/bridge",
                    "bray/ts_config", "bray/torchserve"):
        assert f"{package}/__init__.py" in names, package
    for data in ("bray/py.typed", "bray/ts_config/config.properties", "bray/ts_config/log4j2.xml",
                 "bray/ts_config/prometheus.yml", "bray/ts_config/grafana_dashboard.json",
                 "bray/archiver/__main__.py"):
        assert data in names, data
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)


def test_wheel_metadata_license_version_urls_and_entry_point(wheel: tuple[zipfile.ZipFile, str]) -> None:
    zf, build_log = wheel
    info = f"bray_serve-{bray.__version__}.dist-info"
    meta = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
    assert meta["Version"] == bray.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert not [c for c in meta.get_all("Classifier", []) if c.startswith("License ::")]
    assert meta.get_all("Project-URL") and "Typing :: Typed" in meta.get_all("Classifier")
    license_text = zf.read(f"{info}/licenses/LICENSE").decode()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert license_text == (ROOT / "LICENSE").read_text()
    entry_points = configparser.ConfigParser()
    entry_points.read_string(zf.read(f"{info}/entry_points.txt").decode())
    assert entry_points["console_scripts"]["bray-archive"] == "bray.archiver.cli:main"
    # The TOML-table license of old printed this on every build (an error after 2027-02-18).
    assert "project.license` as a TOML table is deprecated" not in build_log


# Features of Python 3.11 the code relies on, with where they appear (asyncio.timeout in
# the proxy client, tomllib in the tests): the declared floor must admit none older.
_NEEDS_311 = ("asyncio.timeout(", "import tomllib", "asyncio.TaskGroup", "except*")


def test_the_declared_python_floor_runs_the_code() -> None:
    """``requires-python`` promised 3.10 while the node proxy's client needs 3.11's asyncio.timeout."""
    import tomllib

    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    uses = sorted({f"{path.relative_to(ROOT)}: {needle}"
                   for top in ("bray", "handlers", "archiver", "bridge", "ts_config", "tests", "scripts")
                   for path in (ROOT / top).rglob("*.py") if path != Path(__file__).resolve()
                   for needle in _NEEDS_311 if needle in path.read_text()})
    if uses:
        assert floor == ">=3.11", f"requires-python is {floor!r} but the code needs 3.11: {uses[:5]}"
    assert sys.version_info >= (3, 11)
