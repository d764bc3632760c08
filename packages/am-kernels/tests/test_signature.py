import functools

import pytest

from am_kernels import assert_same_signature


def f(x, y=1, *, z=2):
    return x + y + z


def test_equal_signatures_pass_and_wraps_counts_as_equal():
    def g(x, y=1, *, z=2):
        return 0

    assert_same_signature(f, g)

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    assert_same_signature(f, wrapper)


@pytest.mark.parametrize(
    "other",
    [lambda x, y=2, *, z=2: 0, lambda x, y=1: 0, lambda x, y=1, *, z=2, w=3: 0, lambda *args, **kwargs: 0],
)
def test_different_signatures_raise_assertion_error_naming_both(other):
    with pytest.raises(AssertionError) as info:
        assert_same_signature(f, other)
    message = str(info.value)
    assert "(x, y=1, *, z=2)" in message and "<lambda>" in message


def test_unreadable_signature_is_a_type_error():
    with pytest.raises(TypeError, match="cannot read the signature"):
        assert_same_signature(f, 42)
