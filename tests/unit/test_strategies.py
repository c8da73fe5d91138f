"""The defences registry (distrib_ft/preservation/): every registered defence has a row in the contract matrix
(tests/integration/test_strategies.py, which runs the loop) and a documented config section, off by default."""

import pytest

from distrib_ft.config import JobConfig
from distrib_ft.preservation import DEFENCES
from tests.integration.test_strategies import ROWS


def test_every_registered_defence_has_a_row():
    assert set(ROWS) == {d.name for d in DEFENCES}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_defence_has_a_documented_section_off_by_default(name):
    cls = next(d for d in DEFENCES if d.name == name).config_class
    assert JobConfig.model_fields[name].annotation is cls
    assert all(f.description for f in cls.model_fields.values()), cls
    assert cls().enabled is False
