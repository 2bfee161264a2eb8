"""Claims the README makes about the installation."""

import subprocess
import sys


def test_no_package_imports_torchvision():
    """The toolkit must work where torchvision cannot be imported (PyPI's CUDA wheel beside a CPU torch)."""
    code = (
        "import sys, curvature, estimators, solvers, curvature.__main__, curvature.cli_eos\n"
        "import estimators.report, estimators.block_report, estimators.lm_problem\n"
        "bad = sorted(m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"torchvision imported by: {out.stdout.strip()}"


def test_license_file_matches_pyproject():
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert meta["license"]["text"] == "MIT"
    assert (root / "LICENSE").read_text().startswith("MIT License")
