"""A built wheel, installed in a fresh venv, runs from a directory outside the repo."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and a venv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: the build backend (hatchling, a test dependency) is already here; no network.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                    str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("cnnexp-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The new venv sees this environment's dependencies (torch etc. are large), but
    # its own site-packages comes first, so cnnexp is imported from the wheel.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the cnnexp seen through _deps.pth must not count as already installed.
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                   check=True, capture_output=True)
    return venv, wheel


def test_wheel_ships_the_configs(installed_wheel):
    import zipfile

    _, wheel = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("config.yaml", "model/tutorial_cnn.yaml", "optim/sgd.yaml", "data/cifar10.yaml",
                   "trainer/default.yaml", "hydra/launcher/slurm.yaml"):
        assert f"cnnexp/conf/{config}" in names
    assert "hydra_plugins/cnnexp_slurm_launcher/slurm_launcher.py" in names  # the class hydra/launcher=slurm names


def test_installed_wheel_runs_outside_the_repo(installed_wheel, tmp_path):
    venv, _ = installed_wheel
    python = venv / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import cnnexp; print(cnnexp.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert str(venv) in where  # the wheel's copy, not the source tree
    result = subprocess.run([str(python), "-m", "cnnexp", "data=synthetic", "data.n_train=200", "data.n_test=100",
                             "trainer.max_epochs=1"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "plots" / "test_acc.png").is_file()
    script = subprocess.run([str(venv / "bin" / "cnnexp"), "--cfg", "job"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert script.returncode == 0 and "max_epochs: 50" in script.stdout


def test_installed_wheel_ships_the_sweeper_plugin(installed_wheel, tmp_path):
    import zipfile

    venv, wheel = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert "hydra_plugins/cnnexp_optuna_sweeper/config.py" in names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package, shared with Hydra's own plugins
    info = subprocess.run([str(venv / "bin" / "python"), "-m", "cnnexp", "--info", "plugins"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "CnnexpOptunaSweeper" in info.stdout, info.stderr
