"""The reward functions of GRPO: built-in checks and the user's own, scored on sampled completions.

A reward is a function called as TRL calls its reward functions, once per
batch of completions, with keyword arguments only:

    fn(prompts=[str] * n, completions=[str] * n, answer=[...], ended=[...],
       completion_ids=[...], place=[...], **other_columns) -> n numbers

`prompts` repeats each prompt once per completion sampled for it. The columns
are one value per completion: `answer` (the row's reference, or None),
`ended` (the stop token, end of turn or a stop string ended it within the
token limit), `completion_ids` (generated token ids, stop token left out),
`place` (where the row was read, "data.jsonl:13") and every other column of
the data row. A function takes what it needs and `**kwargs` for the rest.

The config names rewards as strings (`load_rewards`):

    exact_match, contains, regex, number, ends, no_loop   the built-ins below, each 1.0 or 0.0
    my_pkg.rewards:score                                  a function of an importable module
    path/to/file.py:score  or  path/to/file.py            a function of a file (`reward` by default)

`score` calls each one and checks what came back (n finite numbers), so a
broken reward stops the run with one line naming the reward and the row
instead of training on NaN advantages. Every mistake raises `RewardError`.
"""

import difflib
import importlib
import importlib.util
import itertools
import math
import numbers
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemma_lora.errors import ConfigError
from gemma_lora.loops import looped


class RewardError(ConfigError):
    """A reward cannot be loaded, or returned something other than one finite number per completion."""


@dataclass(frozen=True)
class Reward:
    """One reward: `name` as the config wrote it, `weight` in the total, `fn` called as in the module docstring."""

    name: str
    weight: float
    fn: object

    @property
    def label(self):
        """The name in rollouts.csv's columns and the plot: a file's stem, and its function unless `reward` or the stem."""
        source, colon, attr = self.name.rpartition(":")
        if not colon:
            source, attr = self.name, "reward"
        if not source.endswith(".py"):
            return self.name
        stem = Path(source).stem
        return stem if attr in ("reward", stem) else f"{stem}:{attr}"


def column_labels(rewards):
    """Each reward's `label`, or its full name where two labels would be the same."""
    labels = [r.label for r in rewards]
    return [label if labels.count(label) == 1 else r.name for label, r in zip(labels, rewards)]


# --- the built-ins -------------------------------------------------------------------------

def exact_match(completions, answer, place, **_):
    """1.0 where the completion equals the row's answer, white space at both ends ignored.

    The held-out metric `reports.exact_match` with the same rule, so the reward
    optimises what the run reports.
    """
    return [float(c.strip() == a.strip()) for c, a in zip(completions, _answers("exact_match", answer, place))]


def contains(completions, answer, place, **_):
    """1.0 where the row's answer, white space at both ends ignored, appears in the completion (case-sensitive)."""
    return [float(a.strip() in c) for c, a in zip(completions, _answers("contains", answer, place))]


def _regex(pattern):
    compiled = re.compile(pattern)  # once, at load time: a bad pattern fails before any sampling

    def regex(completions, **_):
        """1.0 where `re.search(reward_pattern, completion)` finds a match anywhere in the completion."""
        return [float(compiled.search(c) is not None) for c in completions]

    return regex


# A thousands-grouped integer (1,234,567) or plain digits, an optional decimal part, an optional
# minus. The look-behind keeps "5-3" from reading as minus three and ".5" in "1.5" from being 5.
_NUMBER = re.compile(r"(?<![\d.])-?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")


def last_number(text):
    """The last number written in `text` as a float ("1,234" -> 1234.0, "-3.5" -> -3.5), or None when it has none."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def number(completions, answer, place, **_):
    """1.0 where the last number of the completion equals the last number of the row's answer.

    Compared as floats within 1e-9 (relative or absolute), so "3.50" matches
    "3.5" and "1,234" matches "1234"; 0.0 when either has no number.
    """
    scores = []
    for c, a in zip(completions, _answers("number", answer, place)):
        got, want = last_number(c), last_number(a)
        scores.append(float(got is not None and want is not None
                            and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)))
    return scores


def ends(ended, **_):
    """1.0 where the completion ended (stop token, end of turn or stop string) within the token limit."""
    return [float(bool(e)) for e in ended]


def no_loop(completion_ids, ended, **_):
    """1.0 unless the completion loops by `gemma_lora.loops.looped` (a repeated stretch running to the limit)."""
    return [float(not looped(ids, ended=bool(e))) for ids, e in zip(completion_ids, ended)]


BUILTINS = {"exact_match": exact_match, "contains": contains, "regex": _regex, "number": number,
            "ends": ends, "no_loop": no_loop}
_NEEDS_ANSWER = (exact_match, contains, number)
_FORMS = ("a built-in (" + ", ".join(BUILTINS) + "), 'my_pkg.module:function', "
          "'path/to/file.py:function' or 'path/to/file.py' (its function `reward`)")


def _answers(name, answers, places):
    """The answers as strings; a row without one is a data problem `require_answers` could not see ahead."""
    for a, p in zip(answers, places):
        if a is None:
            raise RewardError(f"reward {name} compares completions with the rows' answers, and row {p} has none: "
                              f"give every row an answer, or use other rewards.")
    return [str(a) for a in answers]


# --- loading -------------------------------------------------------------------------------

def load_rewards(specs, weights=None, pattern=None):
    """The rewards the config names, each checked to load and be callable.

    Args:
        specs: list of str, each a built-in name, "module.path:function",
            "path/to/file.py:function" or "path/to/file.py" (its function
            `reward`); a path is relative to the current directory.
        weights: None (each 1.0) or a list of finite floats, one per spec.
        pattern: str or None; the regular expression of the "regex" built-in.

    Returns:
        list of `Reward`, in the order of `specs`.

    Raises:
        RewardError: no specs, an unknown name, a module or file that cannot be
            imported, a missing or uncallable function, weights that do not fit,
            or a "regex" reward without a pattern that compiles.
    """
    specs = list(specs)
    if not specs:
        raise RewardError(f"no rewards given: name at least one, {_FORMS}.")
    weights = [1.0] * len(specs) if weights is None else list(weights)
    if len(weights) != len(specs):
        raise RewardError(f"{len(weights)} reward weights for {len(specs)} rewards ({', '.join(specs)}): "
                          f"give one weight per reward, or none for 1.0 each.")
    return [Reward(spec, _weight(spec, w), _function(spec, pattern)) for spec, w in zip(specs, weights)]


def _weight(spec, weight):
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value):
        raise RewardError(f"reward {spec} has weight {weight!r}: give a finite number.")
    return value


def _function(spec, pattern):
    if spec == "regex":
        if pattern is None:
            raise RewardError("reward regex needs a pattern: give reward_pattern, a Python regular expression "
                              "that the good completions contain.")
        try:
            return _regex(pattern)
        except re.error as e:
            raise RewardError(f"reward_pattern {pattern!r} is not a regular expression ({e}): fix it.") from None
    if spec in BUILTINS:
        return BUILTINS[spec]
    source, colon, attr = spec.rpartition(":")
    if not colon:
        source, attr = spec, "reward"
    if source.endswith(".py"):
        module, where = _import_file(spec, source), f"file {source}"
    elif colon and source and attr and "/" not in source and "\\" not in source:
        module, where = _import_module(spec, source), f"module {source}"
    else:
        close = difflib.get_close_matches(spec, BUILTINS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise RewardError(f"unknown reward {spec!r}{hint}: give {_FORMS}.")
    if not hasattr(module, attr):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardError(f"reward {spec}: {where} has no function {attr!r} (its functions: "
                          f"{', '.join(names) or 'none'}): name one of them after the colon.")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardError(f"reward {spec}: {attr!r} in {where} is a {type(fn).__name__}, not a function: "
                          f"name a function.")
    return fn


def _import_module(spec, name):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise RewardError(f"reward {spec}: no module named {name!r} can be imported: pip install the package "
                              f"that has it, or add its folder to PYTHONPATH.") from None
        raise RewardError(f"reward {spec}: module {name} imports {e.name!r}, which is not installed: "
                          f"pip install it.") from None
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is one line, not a traceback
        raise RewardError(f"reward {spec}: importing module {name} raised {_one_line(e)}: fix the module.") from None


_FILE_MODULES = itertools.count()


def _import_file(spec, source):
    path = Path(source).expanduser()
    if not path.is_file():
        raise RewardError(f"reward {spec}: file {source} not found (looked for {path.resolve()}, relative paths "
                          f"start at the current directory): give the path of a .py file.")
    # A name of its own for each load: two reward files both called rewards.py must not replace each other.
    name = f"gemma_lora_reward_{next(_FILE_MODULES)}_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling in the file look their module up there
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - as in _import_module
        del sys.modules[name]
        raise RewardError(f"reward {spec}: importing file {source} raised {_one_line(e)}: fix the file.") from None
    return module


def require_answers(funcs, has_answer):
    """Refuse, before any sampling, rewards that compare with answers when the data has none.

    Args:
        funcs: list of `Reward` from `load_rewards`.
        has_answer: bool, whether the data's rows carry an answer.

    Raises:
        RewardError: naming the first reward that needs an answer, when `has_answer` is false.
    """
    if has_answer:
        return
    for reward in funcs:
        if reward.fn in _NEEDS_ANSWER:
            raise RewardError(f"reward {reward.name} compares completions with the rows' answers, and this data "
                              f"has none: give data with an answer (prompt + completion, or a column mapped onto "
                              f"'answer' with --field answer=COLUMN), or use other rewards.")


# --- scoring -------------------------------------------------------------------------------

def score(funcs, prompts, completions, columns):
    """Each reward on each completion, unweighted.

    Args:
        funcs: list of `Reward`.
        prompts, completions: lists of str, one per completion.
        columns: dict of str to list, one value per completion; with at least
            "answer", "ended", "completion_ids" and "place".

    Returns:
        np.ndarray of float64, shape (len(completions), len(funcs)).

    Raises:
        RewardError: a reward raised, or did not return one finite number per completion.
    """
    n = len(completions)
    bad = {k: len(v) for k, v in {"prompts": prompts, **columns}.items() if len(v) != n}
    if bad:
        raise ValueError(f"score: {n} completions but lengths {bad}")  # a caller's bug, not the user's
    table = np.zeros((n, len(funcs)), dtype=np.float64)
    if n == 0:
        return table
    places = columns["place"]
    for j, reward in enumerate(funcs):
        # Copies, so a reward that edits its lists in place cannot change what the next one sees.
        kwargs = {k: list(v) for k, v in columns.items()}
        try:
            got = reward.fn(prompts=list(prompts), completions=list(completions), **kwargs)
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's function: one line naming it and the row
            raise RewardError(f"reward {reward.name} raised {_one_line(e)} on the completions of row {places[0]} "
                              f"(a call on {n} completions from there): fix the reward function.") from None
        table[:, j] = _checked(reward.name, got, places)
    return table


def _checked(name, got, places):
    n = len(places)
    try:
        size = None if isinstance(got, (str, bytes, dict)) else len(got)
    except TypeError:
        size = None
    if size is None:
        raise RewardError(f"reward {name} returned a {type(got).__name__} for the completions of row {places[0]}: "
                          f"return a list of {n} numbers, one per completion.")
    if size != n:
        raise RewardError(f"reward {name} returned {size} values for {n} completions (from row {places[0]}): "
                          f"return one number per completion.")
    values = []
    for i, v in enumerate(got):
        if isinstance(v, (bool, np.bool_)):
            v = float(v)
        if not isinstance(v, numbers.Real):
            raise RewardError(f"reward {name} returned {v!r} ({type(v).__name__}) for completion {i} "
                              f"(row {places[i]}): return a number for every completion.")
        if not math.isfinite(v):
            raise RewardError(f"reward {name} returned {v} for completion {i} (row {places[i]}): "
                              f"return a finite number for every completion.")
        values.append(float(v))
    return values


def weighted_total(funcs, table):
    """Each completion's total reward: the sum over rewards of weight x score.

    Args:
        funcs: list of `Reward`.
        table: array of shape (n, len(funcs)), from `score`.

    Returns:
        np.ndarray of float64, shape (n,).
    """
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != len(funcs):
        raise ValueError(f"weighted_total: table of shape {table.shape} for {len(funcs)} rewards")
    return table @ np.array([r.weight for r in funcs], dtype=np.float64)


def _one_line(exc):
    """'TypeError: text' with the text's white space (newlines too) collapsed and its length capped."""
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
