"""Loops: which answers run to the token limit repeating themselves, and how samples and answer counts say so."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from gemma_lora.loops import MAX_PERIOD, MIN_LOOP_TOKENS, MIN_REPEATS, looped

LIMIT = 128  # the default max_new_tokens
STOP = 1  # the stop token's id in the fake tokenizer below

# A real-looking answer, one id per word (punctuation apart): common words recur, nothing repeats back to back.
TEXT = (
    "The weather forecast for tomorrow says that the morning will be cloudy , with a chance of rain in the "
    "north , and that the afternoon will be sunny and warm in the south . In the evening the wind will turn to "
    "the west , and the temperature will fall to about ten degrees , which is cold for the time of year . "
    "Farmers in the valley should bring in the hay before the rain , and walkers in the hills should take a "
    "coat , a map and some water , because the paths will be wet and the fog may come down quickly after "
    "dark . The weekend will be dry , with sun in the south and the east , and a light wind from the north ."
).split()
VOCAB = {word: i for i, word in enumerate(dict.fromkeys(TEXT), start=10)}


def words(text):
    return [VOCAB[w] for w in text.split()]


def to_limit(prefix, ngram, limit=LIMIT):
    """`prefix` then `ngram` repeated back to back up to `limit` tokens (the last repeat cut short)."""
    tokens = list(prefix)
    while len(tokens) < limit:
        tokens += ngram
    return tokens[:limit]


def test_one_two_and_long_ngrams_repeated_to_the_limit_loop():
    prefix = words("The weather forecast for tomorrow says that")
    assert looped(to_limit(prefix, words("the")))
    assert looped(to_limit(prefix, words("the weather")))
    long = words("the weather forecast , the morning will be cloudy , with rain")
    assert len(long) == 12
    assert looped(to_limit(prefix, long))
    assert looped(to_limit([], long))  # an answer that is nothing but the loop
    assert looped(to_limit(prefix, list(range(200, 200 + MAX_PERIOD))))


def test_the_thresholds_are_the_stated_ones():
    prefix = words("The weather forecast for tomorrow says that")
    one = words("rain")
    assert looped(prefix + one * MIN_LOOP_TOKENS)
    assert not looped(prefix + one * (MIN_LOOP_TOKENS - 1))
    six = list(range(200, 206))  # long enough that MIN_REPEATS copies pass MIN_LOOP_TOKENS
    assert len(six) * MIN_REPEATS >= MIN_LOOP_TOKENS
    assert looped(prefix + six * MIN_REPEATS)
    assert not looped(prefix + six * (MIN_REPEATS - 1) + six[:-1])
    too_long = list(range(200, 200 + MAX_PERIOD + 1))
    assert not looped(to_limit(prefix, too_long, limit=len(prefix) + (MIN_REPEATS + 1) * len(too_long)))


def test_normal_text_and_random_ids_do_not_loop():
    assert len(TEXT) >= LIMIT
    assert not looped(words(" ".join(TEXT))[:LIMIT])
    rng = np.random.default_rng(0)
    assert not looped(rng.integers(2, 50, LIMIT).tolist())


def test_near_loops_whose_repeats_change_do_not_loop():
    counting = ", ".join(str(i) for i in range(1, 100))  # one id per character, as Gemma splits digits
    assert not looped([ord(c) for c in counting][:LIMIT])
    prefix = words("The weather forecast for tomorrow says that")
    days = [t for day in range(30) for t in words("the weather forecast for") + [300 + day] + words(",")]
    assert not looped((prefix + days)[:LIMIT])


def test_answers_that_ended_or_are_short_do_not_loop():
    loop = to_limit([], words("the weather"))
    assert looped(loop) and not looped(loop, ended=True)
    assert not looped([])
    assert not looped(words("rain rain rain"))


class FakeTokenizer:
    """Ids to words (VOCAB's), the stop token `STOP` as <eos>."""
    names = {i: w for w, i in VOCAB.items()}

    def id_to_token(self, token_id):
        return "<eos>" if token_id == STOP else self.names[token_id]

    def detokenize(self, batch):
        return [" ".join(self.names[i] for i in ids) for ids in batch]


def sample_of(new, stop_strings=()):
    from gemma_lora.sampling import sample_of as package_sample_of

    config = SimpleNamespace(max_new_tokens=LIMIT)
    return package_sample_of(FakeTokenizer(), "What is the weather?", new, config, [STOP], list(stop_strings))


def test_generation_marks_the_samples_that_loop():
    loop = to_limit(words("The weather forecast for tomorrow says that"), words("the weather forecast ,"))
    s = sample_of(loop)
    assert s.looped and not s.ended and s.new_tokens == LIMIT
    assert not sample_of(words(" ".join(TEXT))[:LIMIT]).looped
    ended = sample_of(loop[:-10] + [STOP])
    assert ended.stop_token == "<eos>" and not ended.looped
    cut = sample_of(loop, stop_strings=["forecast ,"])
    assert cut.stop_string == "forecast ," and not cut.looped


def test_endings_count_the_answers_that_loop():
    from gemma_lora.sampling import Sample, endings

    samples = [Sample("q", "a", None, None, LIMIT, looped=flag) for flag in (True, False, True, False)]
    samples[1].stop_token = "<eos>"
    result = endings(samples)
    assert result["looped_share"] == sum(s.looped for s in samples) / len(samples)
    assert np.isnan(endings([])["looped_share"])


def test_samples_written_before_loops_were_detected_read_back_as_not_looped():
    from gemma_lora.sampling import Sample

    old = {"instruction": "Hi", "text": "Hello", "stop_token": None, "stop_string": None, "new_tokens": 3}
    sample = Sample.from_dict(old)
    assert sample.looped is False
    looping = Sample.from_dict(dict(old, looped=True))
    assert looping.looped and Sample.from_dict(looping.to_dict()) == looping


def test_answer_records_carry_looped_share_and_old_ones_read_as_unknown():
    from gemma_lora.sampling import Sample, endings
    from gemma_lora.training.reports import answers_record, with_current_keys

    answers = {"test": endings([Sample("q", "a", None, None, LIMIT, looped=True), Sample("q", "b", "<eos>", None, 2)])}
    record = answers_record(answers)["test"]
    assert record["looped_share"] == answers["test"]["looped_share"]
    old = {"rows": 2, "stop_tokens": ["<eos>"], "model_ended_share": 0.5, "ended_share": 0.5}
    assert with_current_keys(old)["looped_share"] is None
    assert with_current_keys({"rows": 2, "eos_share": 0.5, "ended_share": 0.5})["looped_share"] is None
    assert with_current_keys(record)["looped_share"] == record["looped_share"]


@pytest.fixture
def three_samples():
    from gemma_lora.sampling import Sample

    return [
        Sample("Loop?", "the weather the weather", None, None, LIMIT, looped=True),
        Sample("Cut?", "a long answer", None, None, LIMIT),
        Sample("Ended?", "Paris.", "<eos>", None, 3),
    ]


def test_printed_and_written_samples_say_how_each_ended(three_samples, tmp_path):
    from gemma_lora.training.reports import echo_samples, write_samples

    lines = []
    echo_samples(lines.append, "after", three_samples)
    assert [line.splitlines()[-1].strip() for line in lines] == [
        f"(looped, cut at {LIMIT} tokens)", f"(cut at {LIMIT} tokens)", "(ended by <eos>)"]
    write_samples(tmp_path, three_samples, three_samples)
    written = (tmp_path / "samples.md").read_text()
    assert f"**before** (looped, cut at {LIMIT} tokens):" in written
    assert f"**after** (cut at {LIMIT} tokens):" in written and "**after** (ended by <eos>):" in written
    assert "length limit" not in written
    records = json.loads((tmp_path / "samples.json").read_text())
    assert [r["after"]["looped"] for r in records] == [True, False, False]


def test_the_run_prints_how_many_answers_loop_before_and_after():
    from gemma_lora.sampling import Sample, endings
    from gemma_lora.training.reports import answer_lines, answers_record, with_current_keys

    def answers(looping):  # four answers cut at the limit, `looping` of them loops
        return endings([Sample("q", "a", None, None, LIMIT, looped=i < looping) for i in range(4)])

    config = SimpleNamespace(max_new_tokens=LIMIT, metric=None)
    lines = answer_lines("test", answers(3), answers(1), config)
    assert lines[1] == "test answers that loop (greedy): 3/4 (75%) before → 1/4 (25%) after"
    assert answer_lines("test", None, answers(1), config)[1] == "test answers that loop (greedy): 1/4 (25%) after"
    # Resumed from a before.json written before loops were detected: its share is unknown, not 0.
    old = answers_record({"test": answers(3)}, with_samples=True)["test"]
    del old["looped_share"]
    for s in old["samples"]:
        del s["looped"]
    resumed = dict(with_current_keys(old), samples=[Sample.from_dict(s) for s in old["samples"]])
    assert answer_lines("test", resumed, answers(1), config)[1] == "test answers that loop (greedy): 1/4 (25%) after"
    assert "0/4 (0%) before" in answer_lines("test", resumed, answers(1), config)[0]
