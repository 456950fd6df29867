"""scikit-learn conventions for the package's estimators, with its own errors.

Parameters are checked by scikit-learn's ``_parameter_constraints`` machinery when ``fit``
starts; its ``InvalidParameterError`` becomes an :class:`~dflashdeconv.errors.InputError`
with the same message, and ``check_is_fitted`` raises the package's ``NotFittedError``.
"""

from __future__ import annotations

from numbers import Integral, Real

from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions
from sklearn.utils.validation import check_is_fitted

from ..errors import InputError, NotFittedError
from .params import Parameter


def constraints(parameter: Parameter) -> list:
    """scikit-learn constraints of one spec entry."""
    closed = "neither" if parameter.open_minimum else "left"
    kind = parameter.kind
    if kind == "int":
        return [Interval(Integral, parameter.minimum, None, closed="left")]
    if kind == "float":
        return [Interval(Real, parameter.minimum, None, closed=closed)]
    if kind == "choice":
        return [StrOptions(set(parameter.choices))]
    if kind == "auto_or_float":
        return [StrOptions({"auto"}), Interval(Real, parameter.minimum, None, closed=closed)]
    if kind == "optional_float":
        return [Interval(Real, parameter.minimum, None, closed=closed), None]
    if kind == "bool":
        return ["boolean"]
    if kind == "seed":
        return [Interval(Integral, 0, None, closed="left")]
    if kind == "jobs":
        return [Interval(Integral, 1, None, closed="left"),
                Interval(Integral, None, -1, closed="right"), None]
    raise ValueError(f"unknown parameter kind {kind!r}")


def validate_params(estimator) -> dict:
    """The estimator's parameters, checked against its ``_parameter_constraints``."""
    try:
        estimator._validate_params()
    except InvalidParameterError as error:
        raise InputError(str(error)) from None
    return estimator.get_params()


def check_fitted(estimator, attribute: str) -> None:
    """Raise :class:`NotFittedError` unless ``fit`` has set ``attribute``."""
    try:
        check_is_fitted(estimator, attribute)
    except SklearnNotFittedError:
        name = type(estimator).__name__
        raise NotFittedError(f"this {name} instance is not fitted; call fit() first") from None
