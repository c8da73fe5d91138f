"""Fixes from the review of ``distrib-ft retrain`` (issue 12): each checked where it could fail, without training.

Reuses the fixtures of tests/unit/test_retrain_rounds.py (a template job, a pipeline file, adapters added to a real
registry). Checked: a second holder of the registry's lock says who holds it on stderr while it waits.
"""

import pytest

from distrib_ft.registry import LockTimeout, Registry
from tests.unit.test_retrain_rounds import cache, setup  # noqa: F401  (cache is a fixture)


def test_waiting_for_the_registry_lock_says_who_holds_it(tmp_path, cache, capsys):  # noqa: F811
    from distrib_ft.retrain.config import load_pipeline

    cfg = load_pipeline(setup(tmp_path, rounds=1))
    with Registry(cfg.registry).lock("retrain other.yaml"):
        capsys.readouterr()
        with pytest.raises(LockTimeout):
            with Registry(cfg.registry, wait=0.3).lock("promote v0001"):
                pass
        err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"waiting for {cfg.registry}'s lock, held by pid ")
    assert "(retrain other.yaml); up to 0 s" in err[0] and " since 20" in err[0]
    with Registry(cfg.registry, wait=0.3).lock("free"):  # a free lock: nothing said
        pass
    assert capsys.readouterr().err == ""
