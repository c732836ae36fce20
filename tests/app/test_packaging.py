"""The built wheel holds what an installed ``slide-train`` needs: every config, the demo assets and the license."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_wheel_ships_configs_assets_and_license(tmp_path):
    # Built from a copy, so that the build's scratch files (build/, *.egg-info) stay out of the checkout.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT / "lightning_slide", src / "lightning_slide", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = src / "lightning_slide"
    wanted = {
        f"lightning_slide/{p.relative_to(package)}"
        for p in [*package.glob("conf/**/*.yaml"), *package.glob("app/assets/**/*")]
        if p.is_file()
    }
    assert wanted and wanted <= names, sorted(wanted - names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    for extra in ("tensorboard", "wandb", "mlflow", "peft", "test"):
        assert f"Provides-Extra: {extra}" in metadata
