"""Entry point for `ray submit CLUSTER.yaml cluster/submit_train.py JOB.yaml [key=value ...]`.

`ray submit` (Ray's cluster launcher, https://docs.ray.io/en/latest/cluster/cli.html#ray-submit) copies this
script to the head's home and runs ``python ~/submit_train.py ARGS`` there over SSH, in a login shell after
``source ~/.bashrc``. The script re-runs itself in the project's venv there (``DISTRIB_FT_HOME``, default
``~/distrib-ft``, built by scripts/setup.sh in the cluster YAML's setup_commands), then runs ``distrib-ft train``
against the running cluster (``--address auto``, or ``RAY_ADDRESS`` when set) from that folder: a relative JOB.yaml
is read there. It exits with the CLI's exit code.

``ray submit`` itself exits 1 whenever the remote command fails, whatever its code, so the last line printed here
is ``distrib-ft exit code: N`` (0 done, 1 failed, 2 bad input, 3 out of the forgetting budget, 130 interrupted),
right after the CLI's ``Verdict: OUTPUT_DIR/verdict.json``: a wrapper recovers the code from the output.
"""

import os
import sys

ROOT = os.path.expanduser(os.environ.get("DISTRIB_FT_HOME", "~/distrib-ft"))
VENV_PY = os.path.join(ROOT, ".venv", "bin", "python")
EXIT_LINE = "distrib-ft exit code: {}"  # cluster/README.md shows a wrapper that parses it

if __name__ == "__main__":
    if os.path.exists(VENV_PY) and os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")):
        os.execv(VENV_PY, [VENV_PY, os.path.abspath(__file__), *sys.argv[1:]])
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    from launcher.cli import main

    try:
        code = main(["train", *sys.argv[1:], "--address", "auto"])
    except SystemExit as e:  # argparse's usage errors (exit 2)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stderr.flush()
    print(EXIT_LINE.format(code), flush=True)
    sys.exit(code)
