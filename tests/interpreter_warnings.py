"""Warning filters for tests that run Triton kernels under TRITON_INTERPRET=1."""

import pytest

# The interpreter evaluates masked-off lanes too (-inf - -inf, log 0), which numpy reports as warnings.
IGNORE_INTERPRETER_WARNINGS = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
                               pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
                               pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]
