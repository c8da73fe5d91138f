"""Entry point for `ray submit CLUSTER.yaml cluster/submit_train.py JOB.yaml [key=value ...]`.

`ray submit` runs a Python script on the head node with the head's default Python; this one re-runs
itself in the project's venv there (built by scripts/setup.sh in setup_commands), then runs
`distrib-ft train` against the running cluster (--address auto) and exits with the CLI's exit code.
"""

import os
import sys

ROOT = os.path.expanduser(os.environ.get("DISTRIB_FT_HOME", "~/distrib-ft"))
VENV_PY = os.path.join(ROOT, ".venv", "bin", "python")

if __name__ == "__main__":
    if os.path.exists(VENV_PY) and os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")):
        os.execv(VENV_PY, [VENV_PY, os.path.abspath(__file__), *sys.argv[1:]])
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    from launcher.cli import main

    sys.exit(main(["train", *sys.argv[1:], "--address", "auto"]))
