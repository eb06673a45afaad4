"""Packaging: one version, registry metadata that leaves torch to the host, assets found through
importlib.resources, and host entries that use the memoguard shipped with them. CPU only, no host."""
import json
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import memoguard
from memoguard import _version
from memoguard.errors import MemoGuardError
from memoguard.resources import asset_path

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = (ROOT / "memoguard" / "__init__.py").resolve()
OLD = "0.0.1"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    return re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1).lower()


def test_one_version():
    """pyproject's static version (ComfyUI-Manager reads only that) is memoguard/_version.py's, the package's."""
    project = _pyproject()["project"]
    assert "version" not in project.get("dynamic", [])
    assert project["version"] == _version.__version__ == memoguard.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", memoguard.__version__)  # the registry wants X.Y.Z


def test_wheel_metadata_has_that_version(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "memoguard", src / "memoguard", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("memoguard-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"memoguard-{memoguard.__version__}.dist-info/METADATA").decode()
        names = archive.namelist()
    assert f"\nVersion: {memoguard.__version__}\n" in metadata
    unconditional = [line.split(":", 1)[1] for line in metadata.splitlines()
                     if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert unconditional and "torch" not in {_name(r) for r in unconditional}
    assert "memoguard/assets/tiny-sd/model_index.json" in names and "memoguard/_bootstrap.py" in names


def test_dependencies_leave_torch_to_the_host():
    """The registry and ComfyUI-Manager install [project] dependencies into the host: never torch."""
    project = _pyproject()["project"]
    assert "torch" not in {_name(r) for r in project["dependencies"]}
    assert {"numpy", "safetensors", "pillow"} <= {_name(r) for r in project["dependencies"]}
    assert "torch" in {_name(r) for r in project["optional-dependencies"]["torch"]}
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    listed = [_name(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert "torch" not in listed


def test_asset_path():
    index = asset_path("tiny-sd", "model_index.json")
    assert index.is_file() and index.resolve() == SHIPPED.parent / "assets" / "tiny-sd" / "model_index.json"
    assert asset_path("tiny-sd").is_dir()
    with pytest.raises(MemoGuardError, match="no-such-asset.json"):
        asset_path("tiny-sd", "no-such-asset.json")


def test_modules_use_asset_path():
    from memoguard.standalone.checkpoints import BPE_TOKENIZER, CONFIGS
    from memoguard.standalone.diffusers_model import BUNDLED_MODEL
    assert BUNDLED_MODEL == asset_path("tiny-sd") and (BUNDLED_MODEL / "model_index.json").is_file()
    assert CONFIGS == asset_path("configs") and (CONFIGS / "sd1" / "model_index.json").is_file()
    assert BPE_TOKENIZER == asset_path("tiny-sd", "tokenizer") and BPE_TOKENIZER.is_dir()


# The host entries, each in a fresh interpreter where an older memoguard comes first on sys.path.
COMFYUI = """
    import logging
    logging.basicConfig(level=logging.WARNING)
    sys.modules["comfy_api"] = None  # outside ComfyUI: the entry only bootstraps the core
    spec = importlib.util.spec_from_file_location("memoguard_pack", {init!r}, submodule_search_locations=[{root!r}])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["memoguard_pack"] = pack
    spec.loader.exec_module(pack)
    assert pack.WEB_DIRECTORY == "./js"
"""
WEBUI = """
    sys.path.insert(0, {extension!r})
    import memoguard_a1111
"""


@pytest.fixture()
def old_memoguard(tmp_path) -> Path:
    (tmp_path / "memoguard").mkdir()
    (tmp_path / "memoguard" / "__init__.py").write_text(f'__version__ = "{OLD}"\n')
    return tmp_path


def _host_import(entry: str, old: Path, imported_before: bool) -> tuple:
    code = textwrap.dedent("""
        import importlib.util, json, sys
        sys.path.insert(0, {old!r})
    """) + ("import memoguard\n" if imported_before else "") + textwrap.dedent(entry) + textwrap.dedent("""
        import memoguard
        print(json.dumps({{"file": memoguard.__file__, "version": memoguard.__version__}}))
    """)
    code = code.format(old=str(old), init=str(ROOT / "__init__.py"), root=str(ROOT),
                       extension=str(ROOT / "a1111_extension"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=old, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


@pytest.mark.parametrize("entry", [COMFYUI, WEBUI], ids=["comfyui", "webui"])
def test_entry_uses_its_shipped_memoguard(entry, old_memoguard):
    used, stderr = _host_import(entry, old_memoguard, imported_before=False)
    assert Path(used["file"]).resolve() == SHIPPED and used["version"] == memoguard.__version__
    assert "imported before" not in stderr  # nothing to warn about


@pytest.mark.parametrize("entry", [COMFYUI, WEBUI], ids=["comfyui", "webui"])
def test_entry_names_an_older_memoguard_imported_before(entry, old_memoguard):
    used, stderr = _host_import(entry, old_memoguard, imported_before=True)
    assert used["version"] == OLD  # kept: replacing a module others hold would split the package in two
    old_init = str((old_memoguard / "memoguard" / "__init__.py").resolve())
    for named in (OLD, memoguard.__version__, old_init, str(SHIPPED)):
        assert named in stderr


def test_the_method_and_the_host_contract_import_neither_the_standalone_path_nor_the_cli():
    code = ("import sys, memoguard, memoguard.hosts, memoguard.measure, memoguard.report; "
            "print(sorted(m for m in sys.modules if m.startswith(('memoguard.standalone', 'memoguard.cli', "
            "'diffusers', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    code = "import sys, memoguard.standalone.diffusers_model; print([m for m in sys.modules if 'memoguard.cli' in m])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _registry_files() -> list:
    """What the ComfyUI registry packs: the git-tracked files minus .comfyignore's entries (folders end in /)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    ignored = [line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    return [f for f in tracked if not any(f.startswith(p) if p.endswith("/") else f == p for p in ignored)]


def test_registry_package_holds_what_comfyui_users_need_and_nothing_else():
    files = _registry_files()
    for needed in ("__init__.py", "nodes/nodes_monitor.py", "js/memoguard.js", "memoguard/hosts.py",
                   "memoguard/assets/calibration.json", "memoguard/assets/tiny-sd/unet/config.json",
                   "example_workflows/memoguard_detect.json", "README.md", "LICENSE", "pyproject.toml",
                   "requirements.txt", "docs/icon.png"):
        assert needed in files, needed
    for left_out in ("tests/", "benchmarks/", "notes/", "a1111_extension/", ".ci/"):
        assert not any(f.startswith(left_out) for f in files), left_out
    # beyond the bundled model and its calibration (about 18 MB), code and templates only
    assert sum((ROOT / f).stat().st_size for f in files if not f.startswith("memoguard/assets/")) < 2 << 20


def test_registry_icon_is_the_shipped_square_image():
    from PIL import Image
    icon = _pyproject()["tool"]["comfy"]["Icon"]
    assert icon.endswith("/docs/icon.png") and icon.startswith(_pyproject()["project"]["urls"]["Repository"].replace(
        "https://github.com/", "https://raw.githubusercontent.com/"))
    with Image.open(ROOT / "docs" / "icon.png") as image:
        assert image.size[0] == image.size[1] <= 400
