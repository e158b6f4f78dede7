"""A directory that holds a clone named ``lamsonfilter`` does not shadow the installed package
(issue 14, item 2).

People keep the clone next to their applications and run, from that
directory, what README.rst and ``lamsonfilter gen`` print:
``python -m pytest APP/tests``.  ``python -m`` puts the current directory
first on sys.path, where ``lamsonfilter/`` (the clone's top, no
``__init__.py``) is a namespace package.  With setuptools' default editable
install the package is found by a finder that Python asks only after its
path finder has settled for that namespace directory, and the application's
``from lamsonfilter import ...`` fails.  scripts/bootstrap.sh installs in
``editable_mode=compat`` (a path entry: the path finder then prefers the real
package found later on sys.path).  The demo's start-up from such a directory
is in tests/integration/test_demo.py.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_app_tests_pass_from_a_directory_holding_the_clone():
    here = Path(tempfile.mkdtemp(prefix="lf-clone-"))
    try:
        (here / "lamsonfilter").symlink_to(ROOT)  # the clone, next to the applications
        script = Path(sys.executable).parent / "lamsonfilter"
        gen = subprocess.run([str(script), "gen", "helpdesk"], cwd=here, capture_output=True, text=True,
                             timeout=60, check=False)
        assert gen.returncode == 0, gen.stderr
        printed = next(line.split(":", 1)[1].strip() for line in gen.stdout.splitlines() if "its tests:" in line)
        assert printed == "python -m pytest helpdesk/tests"
        argv = [sys.executable, *printed.split()[1:], "-p", "no:cacheprovider", "-q"]
        run = subprocess.run(argv, cwd=here, capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "passed" in run.stdout
        # and plain `python -c 'import lamsonfilter'` there finds the package, not the directory
        probe = subprocess.run([sys.executable, "-c", "import lamsonfilter; print(lamsonfilter.__file__)"],
                               cwd=here, capture_output=True, text=True, timeout=60, check=False)
        assert probe.returncode == 0 and probe.stdout.strip().endswith("lamsonfilter/__init__.py"), probe
    finally:
        shutil.rmtree(here)
