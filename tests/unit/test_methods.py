"""The methods registry (distrib_ft/methods/): every registered method has a row in the contract matrix
(tests/integration/test_methods.py, which runs the loop) and documents every key of its config."""

import pytest

from distrib_ft.methods import METHODS, build_method
from tests.integration.test_methods import ROWS


def test_every_registered_method_has_a_row():
    assert set(ROWS) == set(METHODS)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_method_config_documents_every_key(name):
    cls = METHODS[name].config_class
    assert all(f.description for f in cls.model_fields.values()), cls
    assert build_method(cls.model_validate(ROWS[name][0])).name == name
