"""Every class of bad input is one line on stderr, exit status 2, and changes nothing
(the catalogue and its checks live in tests/bad_input.py, which also runs as a script)."""
import pytest

from bad_input import CASES, replay


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case):
    outcome = replay(case)
    assert outcome.met, outcome.why
