"""The value types of parameter-file keys: each parses one value's text, says what it expected when the text
does not fit, and resolves paths against the parameter file's folder.  :data:`anna.params.KEY_TABLE` gives
every key one of them.
"""

import dataclasses
import math
import os
import re

_INT32_MAX = 2**31 - 1


class _Problem(Exception):
    """A value that does not fit its key's type; the message says what was expected."""


# --------------------------------------------------------------------------------------------- value types


def _split_list(text):
    items = [item.strip() for item in text.split(",")]
    if any(item == "" for item in items):
        raise _Problem("empty item in comma-separated list")
    return items


_INT_PATTERN = re.compile(r"[+-]?[0-9]+")
_FLOAT_PATTERN = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _parse_int(text):
    if not _INT_PATTERN.fullmatch(text) or len(text) > 30:
        raise _Problem("not an integer")
    return int(text)


def _parse_float(text):
    if not _FLOAT_PATTERN.fullmatch(text) or len(text) > 60:
        raise _Problem("not a number")
    value = float(text)
    if not math.isfinite(value):
        raise _Problem("number too large")
    return value


def _resolve_path(text, base_dir):
    """Absolute, normalised path; relative ones are taken relative to ``base_dir``."""
    expanded = os.path.expanduser(text)
    return os.path.normpath(os.path.join(base_dir, expanded))


@dataclasses.dataclass(frozen=True)
class Int:
    """An integer in [minimum, maximum]; counts use minimum=1."""

    minimum: int = 1
    maximum: int = _INT32_MAX

    @property
    def description(self):
        if self.minimum == 1 and self.maximum == _INT32_MAX:
            return "a positive integer"
        return f"an integer from {self.minimum} to {self.maximum}"

    def parse(self, text, base_dir):
        try:
            value = _parse_int(text)
        except _Problem:
            raise _Problem(f"expected {self.description}") from None
        if not self.minimum <= value <= self.maximum:
            if self.minimum == 1 and value <= 0:
                raise _Problem("must be a positive integer (a count)")
            raise _Problem(f"must be {self.description}")
        return value


@dataclasses.dataclass(frozen=True)
class Float:
    """A finite float, optionally bounded below (``above``: strictly greater; ``at_least``: greater or equal)
    and above (``below``: strictly smaller)."""

    above: float = None
    at_least: float = None
    below: float = None

    @property
    def description(self):
        if self.above is not None:
            text = f"a number > {self.above:g}"
        elif self.at_least is not None:
            text = f"a number >= {self.at_least:g}"
        else:
            text = "a number"
        return text if self.below is None else f"{text} and < {self.below:g}"

    def parse(self, text, base_dir):
        try:
            value = _parse_float(text)
        except _Problem as problem:
            raise _Problem(f"expected {self.description} ({problem})") from None
        if (self.above is not None and not value > self.above) or \
                (self.at_least is not None and not value >= self.at_least) or \
                (self.below is not None and not value < self.below):
            raise _Problem(f"must be {self.description}")
        return value


@dataclasses.dataclass(frozen=True)
class Probability:
    """A probability in (0, 1] (dropout keep probabilities)."""

    description = "a probability in (0, 1]"

    def parse(self, text, base_dir):
        try:
            value = _parse_float(text)
        except _Problem:
            raise _Problem(f"expected {self.description}") from None
        if not 0.0 < value <= 1.0:
            raise _Problem("probability must be in (0, 1]")
        return value


@dataclasses.dataclass(frozen=True)
class Flag:
    """YES/NO (also TRUE/FALSE), any case."""

    description = "YES or NO"

    def parse(self, text, base_dir):
        word = text.upper()
        if word in ("YES", "TRUE"):
            return True
        if word in ("NO", "FALSE"):
            return False
        raise _Problem("expected YES or NO (or TRUE/FALSE)")


@dataclasses.dataclass(frozen=True)
class Range:
    """Two numbers 'low, high' with low <= high; ``positive`` for signal-to-noise ranges."""

    positive: bool = False

    @property
    def description(self):
        return "two positive numbers 'low, high'" if self.positive else "two numbers 'low, high'"

    def parse(self, text, base_dir):
        try:
            items = _split_list(text)
            if len(items) != 2:
                raise _Problem(f"{len(items)} values")
            low, high = (_parse_float(item) for item in items)
        except _Problem as problem:
            raise _Problem(f"expected {self.description} ({problem})") from None
        if self.positive and (low <= 0 or high <= 0):
            raise _Problem("signal-to-noise must be positive")
        if low > high:
            raise _Problem("range given high-to-low; write the low value first")
        return (low, high)


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """ANNA's convolution shape '1, width, 1, kernels' (the 1s are the unused height/channel axes)."""

    description = "four integers '1, width, 1, kernels'"

    def parse(self, text, base_dir):
        try:
            items = _split_list(text)
            if len(items) != 4:
                raise _Problem(f"{len(items)} values")
            one_a, width, one_b, kernels = (_parse_int(item) for item in items)
        except _Problem as problem:
            raise _Problem(f"expected {self.description} ({problem})") from None
        if one_a != 1 or one_b != 1:
            raise _Problem("the first and third numbers must be 1 (spectra are 1-D)")
        if not 1 <= width <= _INT32_MAX or not 1 <= kernels <= _INT32_MAX:
            raise _Problem("kernel width and number of kernels must be positive integers")
        return (1, width, 1, kernels)


@dataclasses.dataclass(frozen=True)
class NameList:
    """Comma-separated, distinct names (output parameter names become CSV column headers)."""

    description = "comma-separated names"

    def parse(self, text, base_dir):
        names = _split_list(text)
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise _Problem(f"names must be distinct; repeated: {', '.join(repeated)}")
        return tuple(names)


@dataclasses.dataclass(frozen=True)
class FloatList:
    """Comma-separated finite numbers."""

    description = "comma-separated numbers"

    def parse(self, text, base_dir):
        values = []
        for position, item in enumerate(_split_list(text), start=1):
            try:
                values.append(_parse_float(item))
            except _Problem as problem:
                raise _Problem(f"expected {self.description}; item {position} {item!r}: {problem}") from None
        return tuple(values)


@dataclasses.dataclass(frozen=True)
class Choice:
    """One word out of a fixed set, any case; stored upper case."""

    options: tuple

    @property
    def description(self):
        return "one of " + ", ".join(self.options)

    def parse(self, text, base_dir):
        word = text.upper()
        if word not in self.options:
            raise _Problem(f"expected {self.description}")
        return word


@dataclasses.dataclass(frozen=True)
class FilesystemPath:
    """An input file (or, for ``folder=True``, a folder); stored as an absolute path."""

    folder: bool = False

    @property
    def description(self):
        return "a folder path" if self.folder else "a file path"

    def parse(self, text, base_dir):
        return _resolve_path(text, base_dir)


@dataclasses.dataclass(frozen=True)
class FilePattern:
    """A glob, or a text file listing one input per line; stored absolute (see :func:`expand_infer_files`)."""

    description = "a glob pattern or a list file"

    def parse(self, text, base_dir):
        return _resolve_path(text, base_dir)


@dataclasses.dataclass(frozen=True)
class CountList:
    """Comma-separated positive integers (layer widths)."""

    description = "comma-separated positive integers"

    def parse(self, text, base_dir):
        values = []
        for position, item in enumerate(_split_list(text), start=1):
            try:
                value = _parse_int(item)
            except _Problem:
                raise _Problem(f"expected {self.description}; item {position} {item!r} is not an integer") from None
            if not 1 <= value <= _INT32_MAX:
                raise _Problem(f"expected {self.description}; item {position} {item!r} is not positive")
            values.append(value)
        return tuple(values)


_CONV_LAYER_PATTERN = re.compile(r"(?P<kernels>[0-9]+)x(?P<width>[0-9]+)(s(?P<stride>[0-9]+))?(p(?P<pool>[0-9]+))?"
                                 r"(?P<dropout>d)?")


@dataclasses.dataclass(frozen=True)
class ConvLayerList:
    """Convolutions in order, comma-separated, each ``KxW`` (K kernels W pixels wide) with optional suffixes
    ``sS`` (stride S), ``pP`` (max-pooling over P pixels after it) and ``d`` (dropout after it), e.g.
    ``4x8, 16x8p4`` (StarNet) or ``8x5d, 16x5d, 32x5p2``.  Parsed to a tuple of dicts (model.ConvLayer)."""

    description = "convolutions 'KxW[sS][pP][d], ...' (K kernels of W pixels; stride S; pool P; d = dropout)"

    def parse(self, text, base_dir):
        layers = []
        for position, item in enumerate(_split_list(text), start=1):
            match = _CONV_LAYER_PATTERN.fullmatch(item.replace(" ", "").lower())
            if not match or len(item) > 60:
                raise _Problem(f"item {position} {item!r}: expected KxW[sS][pP][d], e.g. 16x8 or 16x8p4")
            numbers = {key: int(match.group(key) or 1) for key in ("kernels", "width", "stride", "pool")}
            bad = [key for key, value in numbers.items() if not 1 <= value <= _INT32_MAX]
            if bad:
                raise _Problem(f"item {position} {item!r}: {' and '.join(bad)} must be positive")
            layers.append({**numbers, "dropout": bool(match.group("dropout"))})
        return tuple(layers)


@dataclasses.dataclass(frozen=True)
class FlagOrAuto:
    """YES, NO (also TRUE/FALSE) or AUTO, any case; stored as "YES", "NO" or "AUTO"."""

    description = "AUTO, YES or NO"

    def parse(self, text, base_dir):
        word = text.upper()
        if word == "AUTO":
            return "AUTO"
        if word in ("YES", "TRUE"):
            return "YES"
        if word in ("NO", "FALSE"):
            return "NO"
        raise _Problem("expected AUTO, YES or NO (or TRUE/FALSE)")


@dataclasses.dataclass(frozen=True)
class CountOrAuto:
    """AUTO (any case) or a positive integer; stored as "AUTO" or the int."""

    description = "AUTO or a positive integer"

    def parse(self, text, base_dir):
        if text.upper() == "AUTO":
            return "AUTO"
        try:
            value = _parse_int(text)
        except _Problem:
            raise _Problem(f"expected {self.description}") from None
        if not 1 <= value <= _INT32_MAX:
            raise _Problem(f"must be {self.description}")
        return value


@dataclasses.dataclass(frozen=True)
class Fraction:
    """A number strictly between 0 and 1 (factors that shrink something)."""

    description = "a number between 0 and 1 (exclusive)"

    def parse(self, text, base_dir):
        try:
            value = _parse_float(text)
        except _Problem:
            raise _Problem(f"expected {self.description}") from None
        if not 0.0 < value < 1.0:
            raise _Problem(f"must be {self.description}")
        return value


@dataclasses.dataclass(frozen=True)
class Text:
    """One piece of text matching ``pattern`` (a name, a URL), kept as written."""

    pattern: str = r".+"
    description: str = "text"

    def parse(self, text, base_dir):
        if not re.fullmatch(self.pattern, text) or len(text) > 1000:
            raise _Problem(f"expected {self.description}")
        return text


# --------------------------------------------------------------------------------------------- search space


class _Problems(_Problem):
    """Several problems in one value, each (message, the part of the value it is about): a search space reports
    every bad entry at once."""

    def __init__(self, entries):
        super().__init__("; ".join(message for message, _ in entries))
        self.entries = tuple(entries)


_ENTRY_PATTERN = re.compile(r"(?P<key>[^=()]*?)\s*=\s*(?P<kind>[A-Za-z]+)\s*\((?P<args>.*)\)", re.DOTALL)
_SEARCH_KINDS = ("float", "log", "int", "choice")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """anna-tune's TUNE_SPACE: ``KEY=kind(arguments)`` entries separated by ``;``, one per searched key::

        LEARN_RATE1=log(1e-5, 3e-3); FC1_OUTDIM=int(64, 512, log); KEEP_PROB1=float(0.6, 1.0);
        CONV_LAYERS=choice(4x8, 16x8 | 8x16, 32x8); BATCH_SIZE1=choice(64 | 100 | 256)

    ``float(low, high)`` and ``int(low, high)`` take a third argument ``log`` (sample the logarithm evenly) or a
    step; ``log(low, high)`` is ``float(low, high, log)``; ``choice`` lists values separated by ``|``, each
    written as it would be after ``KEY:``.  Bounds and choices are checked by the searched key's own type, so a
    value the key refuses is refused here.  ``searchable(name)`` (given by :data:`anna.params.KEY_TABLE`) returns
    the key's canonical name and type, or raises :class:`_Problem` saying why the key cannot be searched.

    Parsed to a tuple of dicts (key, kind "float"/"int"/"choice", low, high, log, step, choices, entry); every
    bad entry is reported (:class:`_Problems`), not only the first.
    """

    searchable: object = None
    description = "entries 'KEY=kind(...)' separated by ';' (kinds: float, log, int, choice)"

    def parse(self, text, base_dir):
        dimensions, problems, seen = [], [], {}
        entries = [entry.strip() for entry in text.split(";")]
        for number, entry in enumerate(entries, start=1):
            if not entry:
                continue
            try:
                dimension = self._entry(entry, base_dir)
            except _Problem as problem:
                problems.append((f"entry {number}: {problem}", entry))
                continue
            if dimension["key"] in seen:
                problems.append((f"entry {number}: {dimension['key']} is searched already by entry "
                                 f"{seen[dimension['key']]}", entry))
                continue
            seen[dimension["key"]] = number
            dimensions.append(dimension)
        if problems:
            raise _Problems(problems)
        if not dimensions:
            raise _Problem(f"expected {self.description}; no entry given")
        return tuple(dimensions)

    def _entry(self, entry, base_dir):
        match = _ENTRY_PATTERN.fullmatch(entry)
        if not match or not match.group("key"):
            raise _Problem("expected KEY=kind(...), e.g. LEARN_RATE1=log(1e-5, 3e-3)")
        key, value_type = self.searchable(match.group("key"))
        kind = match.group("kind").lower()
        if kind not in _SEARCH_KINDS:
            raise _Problem(f"{key}: unknown kind {match.group('kind')!r}; expected float, log, int or choice")
        args = match.group("args")
        dimension = {"key": key, "kind": "float" if kind == "log" else kind, "low": None, "high": None,
                     "log": kind == "log", "step": None, "choices": None, "entry": entry}
        if kind == "choice":
            options = [option.strip() for option in args.split("|")]
            if any(option == "" for option in options):
                raise _Problem(f"{key}: empty choice (choices are separated by '|')")
            for option in options:
                try:
                    value_type.parse(option, base_dir)
                except _Problem as problem:
                    raise _Problem(f"{key}: choice {option!r}: {problem}") from None
            dimension["choices"] = tuple(options)
            return dimension
        numeric = {"int": (Int,), "float": (Float, Probability, Fraction), "log": (Float, Probability, Fraction)}
        if not isinstance(value_type, numeric[kind]):
            takes = "int(...) or choice(...)" if isinstance(value_type, Int) else \
                "float(...), log(...) or choice(...)" if isinstance(value_type, numeric["float"]) else "choice(...)"
            raise _Problem(f"{key}: {kind}(...) does not fit this key ({value_type.description}); use {takes}")
        parts = [part.strip() for part in args.split(",")]
        if len(parts) not in ((2,) if kind == "log" else (2, 3)):
            raise _Problem(f"{key}: {kind}(...) takes low, high" + ("" if kind == "log" else " and optionally "
                                                                     "'log' or a step"))
        bounds = []
        for name, part in zip(("low", "high"), parts):
            try:
                bounds.append(value_type.parse(part, base_dir))
            except _Problem as problem:
                raise _Problem(f"{key}: {name} bound {part!r}: {problem}") from None
        low, high = bounds
        if not low < high:
            raise _Problem(f"{key}: low bound {parts[0]} is not below high bound {parts[1]}")
        if len(parts) == 3:
            if parts[2].lower() == "log":
                dimension["log"] = True
            else:
                try:
                    step = _parse_int(parts[2]) if kind == "int" else _parse_float(parts[2])
                except _Problem:
                    raise _Problem(f"{key}: third argument {parts[2]!r}: expected 'log' or a step") from None
                if not 0 < step <= high - low:
                    raise _Problem(f"{key}: step {parts[2]} must be above 0 and at most high - low")
                dimension["step"] = step
        if dimension["log"] and low <= 0:
            raise _Problem(f"{key}: a log range needs a low bound above 0")
        dimension["low"], dimension["high"] = low, high
        return dimension
_SCHEDULER_ADDRESS = re.compile(r"(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")
_LOCAL_CLUSTER = re.compile(r"local:([0-9]{1,4})", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class SchedulerAddress:
    """Where anna-infer's work runs: ``tcp://host:port`` (or ``tls://``) of a running Dask scheduler, or
    ``local:N`` (a local cluster of N worker processes, 1 to 1024); stored as given (``local`` lower case)."""

    description = "tcp://host:port or local:N"

    def parse(self, text, base_dir):
        local = _LOCAL_CLUSTER.fullmatch(text)
        if local:
            workers = int(local.group(1))
            if not 1 <= workers <= 1024:
                raise _Problem("local:N needs 1 to 1024 workers")
            return f"local:{workers}"
        address = _SCHEDULER_ADDRESS.fullmatch(text)
        if not address or not 0 < int(address.group(3)) < 65536:
            raise _Problem(f"expected {self.description}")
        return text
