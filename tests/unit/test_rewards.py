"""GRPO rewards: each built-in's rule, weights, user functions from files and modules, and one-line errors."""

import dataclasses
import textwrap

import numpy as np
import pytest

from gemma_lora.errors import GemmaLoraError
from gemma_lora.loops import MIN_LOOP_TOKENS
from gemma_lora.training import rewards
from gemma_lora.training.rewards import RewardError


def columns(n, answer="42", ended=True, ids=None, **extra):
    """The columns `score` gets for n completions of one row, each value repeated unless given as a list."""
    def per(value):
        return list(value) if isinstance(value, list) else [value] * n
    base = {"answer": per(answer), "ended": per(ended), "completion_ids": ids or [[5, 6, 7]] * n,
            "place": [f"data.jsonl:{i + 1}" for i in range(n)]}
    return base | {k: per(v) for k, v in extra.items()}


def run(spec, completions, pattern=None, **cols):
    """One reward's scores on `completions` as a plain list."""
    funcs = rewards.load_rewards([spec], pattern=pattern)
    table = rewards.score(funcs, ["Q"] * len(completions), completions, columns(len(completions), **cols))
    return table[:, 0].tolist()


def write(path, source):
    path.write_text(textwrap.dedent(source))
    return path


# --- built-ins -----------------------------------------------------------------------------

def test_exact_match_ignores_outer_white_space_only():
    got = run("exact_match", [" 42\n", "42.", "4 2", "42"], answer=[" 42", "42", "42", "42 "])
    assert got == [1.0, 0.0, 0.0, 1.0]


def test_exact_match_agrees_with_the_held_out_metric():
    from types import SimpleNamespace

    from gemma_lora.training.reports import exact_match
    texts, refs = [" Paris\n", "paris", "Paris is", "\tParis"], ["Paris", "Paris", "Paris", "Paris  "]
    scores = run("exact_match", texts, answer=refs)
    for text, ref, s in zip(texts, refs, scores):
        assert exact_match([SimpleNamespace(text=text)], [SimpleNamespace(response=ref)]) == s


def test_contains_is_case_sensitive_and_strips_the_answer():
    got = run("contains", ["The capital is Paris.", "the capital is paris.", "Par is"], answer=" Paris\n")
    assert got == [1.0, 0.0, 0.0]


def test_regex_searches_anywhere_in_the_completion():
    got = run("regex", ["so the answer is \\boxed{7}.", "the answer is 7", "\\boxed{}"], pattern=r"\\boxed\{\d+\}")
    assert got == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("completion, answer, expected", [
    ("The answer is 1,234.", "1234", 1.0),
    ("3.50", "3.5", 1.0),
    ("-2", "2", 0.0),
    ("-2", "#### -2", 1.0),
    ("no number here", "5", 0.0),
    ("5", "no number", 0.0),
    ("first 7, then 8", "8", 1.0),        # the last number counts
    ("first 8, then 7", "8", 0.0),
    ("It costs $1,234,567.25 in total.", "1234567.25", 1.0),
    ("about .5 of it", "0.5", 1.0),
    ("5-3", "3", 1.0),                     # a dash between numbers is not a minus
    ("12345", "12345", 1.0),
    ("0.1 + 0.2 = 0.30000000000000004", "0.3", 1.0),  # equal within 1e-9
    ("0.3001", "0.3", 0.0),
])
def test_number_compares_the_last_numbers(completion, answer, expected):
    assert run("number", [completion], answer=answer) == [expected]


def test_last_number_parses_separators_decimals_and_signs():
    assert rewards.last_number("a 1,234 b") == 1234.0
    assert rewards.last_number("x -3.25") == -3.25
    assert rewards.last_number("version 10 then 2,000,000") == 2_000_000.0
    assert rewards.last_number("1,2345") == 2345.0  # not a thousands group: two numbers
    assert rewards.last_number("nothing") is None


def test_ends_reads_the_ended_column():
    assert run("ends", ["a", "b", "c"], ended=[True, False, True]) == [1.0, 0.0, 1.0]


def test_no_loop_scores_a_loop_to_the_limit_zero_unless_it_ended():
    loop = [9, 10, 11] + [5, 6] * MIN_LOOP_TOKENS
    plain = list(range(10, 10 + 3 * MIN_LOOP_TOKENS))
    got = run("no_loop", ["x"] * 3, ids=[loop, loop, plain], ended=[False, True, False])
    assert got == [0.0, 1.0, 1.0]


def test_builtins_ignore_extra_columns():
    assert run("exact_match", ["42"], solution="anything", level=3) == [1.0]


# --- weights, tables -----------------------------------------------------------------------

def test_score_is_unweighted_and_weighted_total_sums_weight_times_score():
    funcs = rewards.load_rewards(["exact_match", "ends"], weights=[2.0, 0.5])
    assert [(r.name, r.weight) for r in funcs] == [("exact_match", 2.0), ("ends", 0.5)]
    table = rewards.score(funcs, ["Q"] * 3, ["42", "41", "42"], columns(3, ended=[True, True, False]))
    assert table.dtype == np.float64 and table.shape == (3, 2)
    np.testing.assert_array_equal(table, [[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_array_equal(rewards.weighted_total(funcs, table), [2.5, 0.5, 2.0])


def test_weights_default_to_one_and_rewards_are_frozen():
    funcs = rewards.load_rewards(["ends", "no_loop"])
    assert [r.weight for r in funcs] == [1.0, 1.0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        funcs[0].weight = 3.0


# --- user functions ------------------------------------------------------------------------

def test_a_function_of_a_file_gets_the_prompts_and_every_column(tmp_path, monkeypatch):
    write(tmp_path / "my_rewards.py", """
        def score(prompts, completions, solution, level, **kwargs):
            return [len(c) * lvl + (p == s) for p, c, s, lvl in zip(prompts, completions, solution, level)]
    """)
    monkeypatch.chdir(tmp_path)  # the path is relative to the current directory
    funcs = rewards.load_rewards(["my_rewards.py:score"])
    assert funcs[0].name == "my_rewards.py:score"
    table = rewards.score(funcs, ["ab", "cd"], ["x", "yyy"], columns(2, solution=["ab", "zz"], level=[10, 2]))
    assert table[:, 0].tolist() == [11.0, 6.0]


def test_a_file_alone_means_its_function_reward(tmp_path):
    path = write(tmp_path / "r.py", """
        def reward(completions, **kwargs):
            return [float(c.startswith("yes")) for c in completions]
    """)
    assert run(str(path), ["yes sir", "no"]) == [1.0, 0.0]


def test_two_files_of_the_same_name_keep_their_own_functions(tmp_path):
    for value in (1, 2):
        (tmp_path / str(value)).mkdir()
        write(tmp_path / str(value) / "rewards.py", f"""
            def reward(completions, **kwargs):
                return [{value}] * len(completions)
        """)
    funcs = rewards.load_rewards([str(tmp_path / "1" / "rewards.py"), str(tmp_path / "2" / "rewards.py")])
    assert rewards.score(funcs, ["Q"], ["c"], columns(1)).tolist() == [[1.0, 2.0]]


def test_a_function_of_a_module_on_the_path(tmp_path, monkeypatch):
    write(tmp_path / "reward_mod_for_tests.py", """
        import numpy as np

        def has_answer(completions, answer, **kwargs):
            return np.array([a in c for c, a in zip(completions, answer)])  # numpy bools are fine
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    funcs = rewards.load_rewards(["reward_mod_for_tests:has_answer"], weights=[3])
    assert (funcs[0].name, funcs[0].weight) == ("reward_mod_for_tests:has_answer", 3.0)
    table = rewards.score(funcs, ["Q", "Q"], ["it is 42", "it is 7"], columns(2))
    assert table[:, 0].tolist() == [1.0, 0.0]


def test_a_reward_cannot_change_what_the_next_one_sees(tmp_path):
    path = write(tmp_path / "greedy.py", """
        def reward(completions, answer, **kwargs):
            completions[:] = ["42"] * len(completions)
            answer[:] = ["nope"] * len(answer)
            return [0] * len(completions)
    """)
    funcs = rewards.load_rewards([str(path), "exact_match"])
    assert rewards.score(funcs, ["Q"], ["42"], columns(1))[:, 1].tolist() == [1.0]


# --- errors --------------------------------------------------------------------------------

def raises(match, fn, *args, **kwargs):
    """The RewardError that `fn` raises, checked to match and to be one line."""
    with pytest.raises(RewardError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, GemmaLoraError)
    return info.value


def test_unknown_names_list_the_built_ins_and_the_forms():
    error = raises(r"unknown reward 'exact_mach' \(did you mean exact_match\?\)", rewards.load_rewards, ["exact_mach"])
    assert "no_loop" in str(error) and "module:function" in str(error) and "file.py" in str(error)
    raises(r"unknown reward 'some/dir:fn'", rewards.load_rewards, ["some/dir:fn"])
    raises(r"no rewards given", rewards.load_rewards, [])


def test_a_module_that_cannot_be_imported():
    raises(r"no module named 'no_such_module_xyz'.*pip install.*PYTHONPATH",
           rewards.load_rewards, ["no_such_module_xyz:score"])


def test_a_module_whose_import_fails(tmp_path, monkeypatch):
    write(tmp_path / "needs_missing_dep.py", "import not_installed_dep_xyz\n")
    write(tmp_path / "raises_at_import.py", "raise RuntimeError('bad\\nsetup')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    raises(r"module needs_missing_dep imports 'not_installed_dep_xyz', which is not installed: pip install",
           rewards.load_rewards, ["needs_missing_dep:f"])
    raises(r"importing module raises_at_import raised RuntimeError: bad setup",
           rewards.load_rewards, ["raises_at_import:f"])


def test_a_missing_file_and_a_file_that_fails_at_import(tmp_path):
    raises(r"file .*nope\.py not found", rewards.load_rewards, [str(tmp_path / "nope.py")])
    write(tmp_path / "broken.py", "def reward(:\n")
    raises(r"importing file .*broken\.py raised SyntaxError", rewards.load_rewards, [str(tmp_path / "broken.py")])
    write(tmp_path / "zero.py", "x = 1 / 0\n")
    raises(r"raised ZeroDivisionError: division by zero", rewards.load_rewards, [str(tmp_path / "zero.py") + ":x"])


def test_a_missing_or_uncallable_function(tmp_path, monkeypatch):
    path = write(tmp_path / "few.py", "THRESHOLD = 3\n\ndef score(**kwargs):\n    return []\n")
    raises(r"file .*few\.py has no function 'reward' \(its functions: score\)", rewards.load_rewards, [str(path)])
    raises(r"'THRESHOLD' in file .*few\.py is a int, not a function", rewards.load_rewards, [f"{path}:THRESHOLD"])
    monkeypatch.syspath_prepend(str(tmp_path))
    raises(r"module few has no function 'other'", rewards.load_rewards, ["few:other"])


@pytest.mark.parametrize("weights, match", [
    ([1.0], r"1 reward weights for 2 rewards \(ends, no_loop\)"),
    ([1.0, float("nan")], r"reward no_loop has weight nan: give a finite number"),
    ([float("inf"), 1.0], r"reward ends has weight inf"),
    (["heavy", 1.0], r"reward ends has weight 'heavy'"),
])
def test_weights_that_do_not_fit(weights, match):
    raises(match, rewards.load_rewards, ["ends", "no_loop"], weights=weights)


def test_regex_needs_a_pattern_that_compiles():
    raises(r"reward regex needs a pattern: give reward_pattern", rewards.load_rewards, ["regex"])
    raises(r"reward_pattern '\(unclosed' is not a regular expression \(missing \), unterminated subpattern",
           rewards.load_rewards, ["regex"], pattern="(unclosed")


@pytest.mark.parametrize("name", ["exact_match", "contains", "number"])
def test_rewards_that_compare_with_answers_refuse_data_without_them(name):
    funcs = rewards.load_rewards(["ends", name])
    raises(rf"reward {name} compares completions with the rows' answers, and this data has none: "
           r"give data with an answer .*--field answer=COLUMN", rewards.require_answers, funcs, False)
    rewards.require_answers(funcs, True)


def test_rewards_without_answers_need_none():
    rewards.require_answers(rewards.load_rewards(["ends", "no_loop", "regex"], pattern="x"), False)


def test_a_row_without_an_answer_is_named_at_call_time():
    funcs = rewards.load_rewards(["exact_match"])
    raises(r"reward exact_match .* row data.jsonl:2 has none",
           rewards.score, funcs, ["Q"] * 2, ["a", "b"], columns(2, answer=["a", None]))


def score_file(tmp_path, body, n=3):
    """`score` with the reward `body` (the source of a function `reward`) on n completions."""
    path = write(tmp_path / "user.py", body)
    funcs = rewards.load_rewards([f"{path}:reward"])
    return rewards.score(funcs, ["Q"] * n, ["c"] * n, columns(n))


@pytest.mark.parametrize("body, match", [
    ("def reward(**kw):\n    raise ValueError('bad\\ninput')\n",
     r"reward .*user\.py:reward raised ValueError: bad input on the completions of row data.jsonl:1"),
    ("def reward(completions):\n    return [0] * len(completions)\n",  # no **kwargs: TypeError from the call
     r"raised TypeError: .*unexpected keyword argument"),
    ("def reward(**kw):\n    return None\n", r"returned a NoneType .* return a list of 3 numbers"),
    ("def reward(**kw):\n    return 1.0\n", r"returned a float"),
    ("def reward(**kw):\n    return 'abc'\n", r"returned a str"),
    ("def reward(**kw):\n    return [1, 2]\n", r"returned 2 values for 3 completions"),
    ("def reward(**kw):\n    return [1, None, 2]\n",
     r"returned None \(NoneType\) for completion 1 \(row data.jsonl:2\)"),
    ("def reward(**kw):\n    return [1, 2, float('nan')]\n", r"returned nan for completion 2 \(row data.jsonl:3\)"),
    ("def reward(**kw):\n    return [float('-inf'), 2, 3]\n", r"returned -inf for completion 0 \(row data.jsonl:1\)"),
    ("def reward(**kw):\n    return [1, '2', 3]\n", r"returned '2' \(str\) for completion 1"),
    ("def reward(**kw):\n    return [[1], [2], [3]]\n", r"returned \[1\] \(list\) for completion 0"),
])
def test_a_reward_that_raises_or_returns_something_else_than_n_numbers(tmp_path, body, match):
    raises(match, score_file, tmp_path, body)


def test_no_completions_calls_no_reward(tmp_path):
    table = score_file(tmp_path, "def reward(**kw):\n    raise ValueError('called')\n", n=0)
    assert table.shape == (0, 1)


def test_column_labels_are_short_and_never_collide():
    def named(*names):
        return [rewards.Reward(n, 1.0, None) for n in names]

    assert rewards.column_labels(named("exact_match", "pkg.mod:score", "/tmp/a/first.py", "b/first.py:other", "c/near.py:near")) == [
        "exact_match", "pkg.mod:score", "first", "first:other", "near"]
    assert rewards.column_labels(named("a/first.py", "b/first.py")) == ["a/first.py", "b/first.py"]
