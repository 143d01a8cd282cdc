"""A command-line setting as one row: its name, kind, default, help and its own rule.

The rows are declared by their owners — the common training settings in cmsf_tf.config, a method's own in
its registry entry (cmsf_tf.methods), a protocol's in its module (cmsf_tf.eval.protocols) — and everything
else is made from them: absl flags, the frozen config dataclasses, the checks of single values, the run
identity. NumPy- and TensorFlow-free: a command line checks every value before TensorFlow loads.
"""

import dataclasses
import math

from cmsf_tf.errors import UserError


@dataclasses.dataclass(frozen=True)
class Setting:
    """One command-line setting. `kind`: string, integer, float, bool or list (absl's DEFINE_<kind>).
    `minimum` (integers): the smallest value allowed; `choices` (strings): the values allowed;
    `rule` (numbers): (words, predicate) — the value must satisfy predicate, else "--name <words> (got v)";
    `identity`: part of what makes a run the run it is (resuming it with another value is refused);
    `convert` (lists): name, values -> the config's value (checked), e.g. `integers(1)`."""

    name: str
    kind: str
    default: object
    help: str
    minimum: object = None
    choices: tuple = ()
    identity: bool = False
    rule: tuple = None
    convert: object = None

    def check(self, value):
        """Raises UserError when `value` breaks this setting's own rule."""
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{self.name} must be a finite number (got {value})")
        if self.choices and value not in self.choices:
            raise UserError(f"unknown --{self.name} {value!r}; choose one of: {', '.join(self.choices)}")
        if self.minimum is not None and value < self.minimum:
            rule = "must not be negative" if self.minimum == 0 else f"must be at least {self.minimum}"
            raise UserError(f"--{self.name} {rule} (got {value})")
        if self.rule is not None and not self.rule[1](value):
            raise UserError(f"--{self.name} {self.rule[0]} (got {value})")

    def define(self, flag_values):
        """Defines this setting's absl flag in `flag_values` (once)."""
        from absl import flags

        if self.name not in flag_values:
            getattr(flags, f"DEFINE_{self.kind}")(self.name, self.default, self.help, flag_values=flag_values)


# The rules the rows use, each with the words the user reads.
POSITIVE = ("must be positive", lambda v: v > 0)
NOT_NEGATIVE = ("must not be negative", lambda v: v >= 0)
FRACTION = ("must be in (0, 1]", lambda v: 0 < v <= 1)  # an area fraction, a probability threshold
PROBABILITY = ("must be in [0, 1]", lambda v: 0 <= v <= 1)
BELOW_ONE = ("must be in [0, 1)", lambda v: 0 <= v < 1)
OPEN_UNIT = ("must be in (0, 1)", lambda v: 0 < v < 1)


def integers(minimum, allow_empty=False):
    """`convert` of a list of integers, each at least `minimum`."""
    def convert(name, values):
        try:
            out = tuple(int(v) for v in values)
        except ValueError:
            raise UserError(f"--{name} must be a comma-separated list of integers (got {','.join(values)})") from None
        if not out and allow_empty:
            return ()
        if not out or min(out) < minimum:
            raise UserError(f"--{name} values must be at least {minimum} (got {','.join(values)})")
        return out
    return convert


def numbers(name, values):
    """`convert` of a list of numbers."""
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise UserError(f"--{name} must be a list of numbers (got {','.join(values)})") from None
