"""The core is typed: mypy --strict passes on the lamsonfilter package."""

import shutil
import subprocess
import sys
from pathlib import Path

from tests.rig.fixtures import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_strict_on_the_package():
    if shutil.which("mypy", path=str(Path(sys.executable).parent)) is None:
        skip_or_fail("mypy is not installed in the test environment")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "lamsonfilter/"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
