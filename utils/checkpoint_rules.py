"""What a loaded checkpoint's fields may hold: rules, and the check of a checkpoint against examples of this run's
own fresh state (keys, types, tensor shapes), so a crafted or foreign file is one line naming its field."""
import contextlib
import math
import sys
import typing

import torch

from utils.util import UserError


def is_plain_tensor(value):
    """A dense tensor with its data (not sparse, quantized, nested or on the meta device)."""
    return (isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_quantized
            and not value.is_nested and not value.is_meta)


class Mismatch(typing.NamedTuple):
    """Where a value differs from what is expected: `expected` None for a key that should not be there, `got` None for
    one that is missing."""
    where: str
    expected: typing.Optional[str]
    got: typing.Optional[str]

    @property
    def of_structure(self):
        """A key missing or too many, or a tensor of another shape: what another kind of object saves."""
        return self.got is None or self.expected is None or "tensor of shape" in self.expected

    def __str__(self):
        if self.got is None:
            return f"{self.where}: missing"
        if self.expected is None:
            return f"{self.where}: no such key in this run's state (it holds {self.got})"
        return f"{self.where}: expected {self.expected}, got {self.got}"


class Rule:
    """What a field may hold where an example value cannot show it (a range, a choice, an optional key)."""

    def mismatch(self, value, where):
        """A Mismatch for a value this rule refuses, else None."""
        raise NotImplementedError


class Int(Rule):
    """An integer (not a bool) from `minimum` to `maximum`; counts fit in 64 bits."""

    def __init__(self, minimum=None, maximum=2**63 - 1, meaning=""):
        self.minimum, self.maximum, self.meaning = minimum, maximum, meaning

    def mismatch(self, value, where):
        if isinstance(value, int) and not isinstance(value, bool) and (
                -2**63 if self.minimum is None else self.minimum) <= value <= self.maximum:
            return None
        span = f"from {self.minimum} to {self.maximum}" if self.maximum < 2**63 - 1 else (
            f">= {self.minimum}" if self.minimum is not None else "")
        return Mismatch(where, " ".join(filter(None, ["an integer", span, self.meaning])), describe(value))


class Number(Rule):
    """A float or an int within a float's range, never NaN; `finite` also refuses infinities, `minimum` (inclusive)
    or `positive` bound it."""

    def __init__(self, minimum=None, finite=False, positive=False):
        self.minimum, self.finite, self.positive = minimum, finite, positive

    def mismatch(self, value, where):
        number = isinstance(value, float) and not math.isnan(value) or (
            isinstance(value, int) and not isinstance(value, bool) and abs(value) <= sys.float_info.max)
        if number and (math.isfinite(value) or not self.finite) and (
                self.minimum is None or value >= self.minimum) and (value > 0 or not self.positive):
            return None
        bound = " > 0" if self.positive else f" >= {self.minimum}" if self.minimum is not None else ""
        return Mismatch(where, f"a {'finite ' if self.finite else ''}number{bound}", describe(value))


class OneOf(Rule):
    """Any of `options` (Rules or examples); a refused value is reported against the options it resembles most."""

    def __init__(self, *options):
        self.options = options

    def mismatch(self, value, where):
        found = [mismatch(value, option, where) for option in self.options]
        if None in found:
            return None
        deepest = max(len(item.where) for item in found)
        near = [item for item in found if len(item.where) == deepest]
        valued = [item for item in near if item.expected is not None and item.got is not None]
        if not valued:  # a key missing or too many
            return near[0]
        return valued[0]._replace(expected=" or ".join(dict.fromkeys(item.expected for item in valued)))


class MayLack(Rule):
    """In a dict: the key may be absent; when present, its value matches `expected`."""

    def __init__(self, expected):
        self.expected = expected

    def mismatch(self, value, where):
        return mismatch(value, self.expected, where)


class ListOf(Rule):
    """A list (or tuple) of any length whose items all match `item`."""

    def __init__(self, item):
        self.item = item

    def mismatch(self, value, where):
        if not isinstance(value, (list, tuple)):
            return Mismatch(where, "a list", describe(value))
        return first(mismatch(v, self.item, f"{where}[{i}]") for i, v in enumerate(value))


class Entries(Rule):
    """A dict with some of `expected`'s keys, each value matching the expected one."""

    def __init__(self, expected):
        self.expected = expected

    def mismatch(self, value, where):
        if not isinstance(value, dict):
            return Mismatch(where, "a dict", describe(value))
        for key, item in value.items():
            if key not in self.expected:
                return Mismatch(f"{where}.{key}", None, describe(item))
            if found := mismatch(item, self.expected[key], f"{where}.{key}"):
                return found
        return None


class AtLeast(Rule):
    """A dict with every key of the example `expected`, each value matching; other keys are let through."""

    def __init__(self, expected):
        self.expected = expected

    def mismatch(self, value, where):
        if not isinstance(value, dict):
            return Mismatch(where, "a dict", describe(value))
        return _keys_mismatch(value, self.expected, where, others_allowed=True)


class Weights(Rule):
    """A state dict: names mapped to plain tensors (their shapes are the model's to check)."""

    def mismatch(self, value, where):
        if not isinstance(value, dict):
            return Mismatch(where, "names mapped to tensors", describe(value))
        for key, item in value.items():
            if not isinstance(key, str):
                return Mismatch(where, "names mapped to tensors", f"the key {describe(key)}")
            if not is_plain_tensor(item):
                return Mismatch(f"{where}.{key}", "a tensor", describe(item))
        return None


class Equal(Rule):
    """Exactly the plain value `expected` (the same type too, so 1 is not True)."""

    def __init__(self, expected):
        self.expected = expected

    def mismatch(self, value, where):
        return None if same(value, self.expected) else Mismatch(where, describe(self.expected, 60),
                                                                 describe(value, 60))


def same(a, b):
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and not isinstance(a, (torch.Tensor, dict)) and a == b


class Anything(Rule):
    """A value this run does not read."""

    def mismatch(self, value, where):
        return None


ANYTHING = Anything()
UNREAD = MayLack(ANYTHING)


def mismatch(value, expected, where):
    """The first difference of `value` from `expected` as a Mismatch, or None. `expected` is a Rule or an example,
    usually a value of this run's own fresh state: dicts need the same keys, lists the same length, tensors the same
    shape and dtype, ints and floats the example's type (an int passes for a float) and no sign change from a
    non-negative example; a finite float stays finite; anything else (strings, None) must be equal."""
    if isinstance(expected, Rule):
        return expected.mismatch(value, where)
    if isinstance(expected, torch.Tensor):
        fits = is_plain_tensor(value) and value.shape == expected.shape and value.dtype == expected.dtype
        return None if fits else Mismatch(where, describe(expected), describe(value))
    if isinstance(expected, dict):
        if not isinstance(value, dict):
            return Mismatch(where, "a dict", describe(value))
        return _keys_mismatch(value, expected, where)
    if isinstance(expected, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(expected):
            return Mismatch(where, f"a list of {len(expected)}", describe(value))
        return first(mismatch(v, e, f"{where}[{i}]") for i, (v, e) in enumerate(zip(value, expected)))
    if isinstance(expected, bool):
        return None if isinstance(value, bool) else Mismatch(where, "True or False", describe(value))
    if isinstance(expected, int):
        return Int(0 if expected >= 0 else None).mismatch(value, where)
    if isinstance(expected, float):
        return Number(0 if expected >= 0 else None, finite=math.isfinite(expected)).mismatch(value, where)
    return Equal(expected).mismatch(value, where)


def _keys_mismatch(value, expected, where, others_allowed=False):
    for key, item in expected.items():
        if key not in value:
            if not isinstance(item, MayLack):
                return Mismatch(f"{where}.{key}" if where else key, "a value", None)
        elif found := mismatch(value[key], item, f"{where}.{key}" if where else key):
            return found
    others = [key for key in value if key not in expected]
    if others and not others_allowed:
        return Mismatch(f"{where}.{others[0]}", None, describe(value[others[0]]))
    return None


def first(mismatches):
    return next(filter(None, mismatches), None)


def describe(value, width=40):
    """A short account of a value for an error line."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{'an' if dtype.startswith('int') else 'a'} {dtype} tensor of shape {list(value.shape)}"
    if isinstance(value, dict):
        return f"a dict of {len(value)}"
    text = repr(value)
    if isinstance(value, (list, tuple)) and len(text) > width:
        return f"a list of {len(value)}"
    return text if len(text) <= width else text[:width - 3] + "..."


def check_checkpoint(checkpoint, fields, hints=None):
    """Refuse a loaded checkpoint whose fields do not match `fields` ({key: example or Rule}) with one line naming
    the file and the field, and for a difference of structure the hint `hints` has for that field. Keys that
    `fields` does not name are not read, so they are let through."""
    found = _keys_mismatch(checkpoint, fields, "", others_allowed=True)
    if found:
        hint = (hints or {}).get(found.where.split(".")[0], "") if found.of_structure else ""
        raise UserError(f"checkpoint {checkpoint['path']!r}: {found}{hint}")


@contextlib.contextmanager
def restoring(checkpoint, field):
    """Turn a failure to restore a checked field into one line naming the checkpoint and the field."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # the checks above should leave nothing here; whatever does is still the file's fault
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"checkpoint {checkpoint['path']!r}: {field}: cannot be restored "
                        f"({type(e).__name__}: {detail})") from None


def stepped_state(optimizer):
    """The state `optimizer` holds after a step, by a copy of it stepping zero gradients on stand-ins of its
    parameters (on the meta device, so nothing is allocated, else on the CPU): per parameter index, the keys,
    shapes and dtypes a saved state must have. None for an optimizer that cannot step this way."""
    for device in ("meta", "cpu"):
        try:
            return _dry_step(optimizer, device)
        except Exception:  # an optimizer that needs a closure, sparse gradients or real values; try the next
            continue
    return None


DEVICE_SPECIFIC = {"foreach": False, "fused": None, "capturable": False, "differentiable": False}


def _dry_step(optimizer, device):
    groups = []
    for group in optimizer.param_groups:
        params = [torch.zeros_like(p, device=device).requires_grad_() for p in group["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        neutral = {k: v for k, v in DEVICE_SPECIFIC.items() if k in group}
        groups.append({**group, **neutral, "params": params})
    dry = type(optimizer).__new__(type(optimizer))
    torch.optim.Optimizer.__init__(dry, groups, optimizer.defaults)
    dry.step()
    return dry.state_dict()["state"]
