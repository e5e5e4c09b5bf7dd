"""The parameter budget of a selection: absolute (parameters) or a fraction of the selectable ones.

A :class:`Budget` counts parameters of selected neurons (``NeuronMap.costs()``);
a fractional budget is a fraction of ``NeuronMap.selectable_params``. The
always-trained set and a static scheme's bias-only tensors are outside the
budget (Quélennec et al., https://arxiv.org/abs/2312.05282).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

from fedneq._validate import is_int, is_real

__all__ = ["Budget"]


@dataclass(frozen=True)
class Budget:
    """A parameter budget: absolute (``params``) or relative (``fraction``); exactly one set."""

    params: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.params is None) == (self.fraction is None):
            raise ValueError(
                f"Budget needs exactly one of params or fraction, got params={self.params!r}, "
                f"fraction={self.fraction!r}"
            )
        if self.params is not None:
            if not is_int(self.params):
                raise ValueError(f"Budget params must be an int >= 1, got {self.params!r}")
            if self.params <= 0:
                raise ValueError(f"Budget params must be >= 1, got {self.params}")
            object.__setattr__(self, "params", int(self.params))
        else:
            f = self.fraction
            if not is_real(f) or not 0.0 < f <= 1.0:
                raise ValueError(f"Budget fraction must be in (0, 1], got {f!r}")
            object.__setattr__(self, "fraction", float(f))

    def resolve(self, total: int) -> int:
        """The budget in parameters, given ``total`` selectable parameters (fractions floor)."""
        if not is_int(total) or total <= 0:
            raise ValueError(f"total selectable parameters must be an int >= 1, got {total!r}")
        if self.params is not None:
            if self.params > total:
                raise ValueError(
                    f"Budget params={self.params} exceeds the {total} selectable parameters; "
                    f"allowed: 1..{total}"
                )
            return self.params
        # Decimal-exact product, so that e.g. 0.29 * 100 gives 29, not 28.
        resolved = math.floor(Fraction(repr(self.fraction)) * total)
        if resolved <= 0:
            raise ValueError(
                f"Budget fraction={self.fraction} of {total} selectable parameters is 0 "
                f"parameters; allowed: a fraction in [1/{total}, 1]"
            )
        return resolved

    @classmethod
    def parse(cls, value: Budget | int | float | str) -> Budget:
        """Read a budget: int -> params, float in (0, 1] -> fraction, ``"5%"`` -> fraction.

        Strings also accept ``"1000"`` (params) and ``"0.3"`` (fraction).
        """
        if isinstance(value, Budget):
            return value
        if isinstance(value, str):
            text = value.strip()
            try:
                if text.endswith("%"):
                    return cls(fraction=float(Fraction(text[:-1].strip()) / 100))
                if text.lstrip("+").isdigit():
                    return cls(params=int(text))
                return cls(fraction=float(text))
            except ValueError as err:
                raise ValueError(
                    f"budget {value!r} is not an int (params), a float in (0, 1] or a "
                    f"percentage like '5%': {err}"
                ) from None
        if isinstance(value, bool):
            raise ValueError(f"budget must be an int, a float in (0, 1] or a str, got {value!r}")
        if isinstance(value, numbers.Integral):
            return cls(params=int(value))
        if isinstance(value, numbers.Real):
            if not 0.0 < float(value) <= 1.0:
                raise ValueError(
                    f"a float budget is a fraction in (0, 1], got {value!r} "
                    "(pass an int for an absolute number of parameters)"
                )
            return cls(fraction=float(value))
        raise ValueError(
            f"budget must be a Budget, an int, a float in (0, 1] or a str, got {value!r}"
        )
