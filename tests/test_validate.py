"""Tests of lymphnode.core.validate: messages name the parameter, the value and the range."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lymphnode.core.errors import CacheError, ConfigError
from lymphnode.core.validate import choice, integer, keys, number


def test_integer_accepts_integers_in_range_as_int() -> None:
    assert integer("n", np.int64(3), minimum=0) == 3 and type(integer("n", np.int64(3))) is int
    assert integer("q", 100, 1, 100) == 100


@pytest.mark.parametrize(
    ("value", "kwargs", "match"),
    [
        (True, {"minimum": 0}, r"^n must be an integer >= 0, got True$"),
        (2.0, {}, r"^n must be an integer, got 2\.0$"),
        ("3", {"minimum": 1}, r"^n must be an integer >= 1, got '3'$"),
        (-1, {"minimum": 0}, r"^n must be an integer >= 0, got -1$"),
        (101, {"minimum": 1, "maximum": 100}, r"^n must be an integer in 1\.\.100, got 101$"),
        (9, {"maximum": 8}, r"^n must be an integer <= 8, got 9$"),
        (100, {"minimum": 512, "unit": "px", "where": "synth: "}, r"^synth: n must .* >= 512 px"),
    ],
)
def test_integer_refuses_naming_parameter_value_and_range(value, kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        integer("n", value, **kwargs)


def test_validators_raise_the_error_class_given() -> None:
    with pytest.raises(CacheError, match=r"patch_size must be an integer >= 1, got 0"):
        integer("patch_size", 0, minimum=1, error=CacheError)


def test_number_checks_finiteness_bounds_and_strict_minimum() -> None:
    assert number("mpp", 1) == 1.0 and isinstance(number("mpp", 1), float)
    with pytest.raises(ConfigError, match=r"^mpp must be a finite number > 0 µm/px, got 0$"):
        number("mpp", 0, 0, strict_minimum=True, unit="µm/px")
    with pytest.raises(ConfigError, match=r"must be a finite number in 0\.05\.\.5, got nan"):
        number("mpp", float("nan"), 0.05, 5)
    with pytest.raises(ConfigError, match=r"^f must be a finite number in \(0, 1\], got 1\.5$"):
        number("f", 1.5, 0, 1, strict_minimum=True)
    with pytest.raises(ConfigError, match=r"got False"):
        number("f", False)


def test_number_with_finite_false_lets_nan_and_in_bound_infinity_through() -> None:
    assert math.isnan(number("w", float("nan"), 0, finite=False))
    assert number("w", float("inf"), 0, finite=False) == math.inf
    with pytest.raises(ConfigError, match=r"^w must be a number >= 0, got -inf$"):
        number("w", float("-inf"), 0, finite=False)
    with pytest.raises(ConfigError, match=r"^w must be a number <= 1, got inf$"):
        number("w", float("inf"), maximum=1, finite=False)
    with pytest.raises(ConfigError, match=r"^w must be a finite number >= 0, got inf$"):
        number("w", float("inf"), 0)


def test_choice_lists_the_allowed_values() -> None:
    assert choice("codec", "raw", ("raw", "jpeg")) == "raw"
    assert choice("flag", True, (True, False)) is True
    with pytest.raises(ConfigError, match=r"^codec must be one of \['raw', 'jpeg'\], got 'png'$"):
        choice("codec", "png", ("raw", "jpeg"))
    with pytest.raises(ConfigError, match=r"got True"):
        choice("level", True, (0, 1))


def test_keys_returns_a_dict_and_names_unknown_and_allowed_keys() -> None:
    assert keys("sampling", {"n": 1}, ("n", "seed")) == {"n": 1}
    with pytest.raises(
        ConfigError,
        match=r"^sampling has unknown key\(s\) \['typo'\]; allowed keys: \['n', 'seed'\]$",
    ):
        keys("sampling", {"n": 1, "typo": 2}, ("n", "seed"))
    with pytest.raises(
        CacheError, match=r"^x: s must be a mapping with keys among \['n'\], got 3$"
    ):
        keys("s", 3, ("n",), where="x: ", error=CacheError)
