"""Whether a generated answer loops: one stretch of tokens repeated back to back until the token limit.

The rule: an answer *loops* when it did not end (neither the model's stop
token nor a stop string ended it, so it ran to `max_new_tokens`) and its last
tokens are one n-gram of 1 to `MAX_PERIOD` tokens repeated back to back, the
repeats covering at least `MIN_REPEATS` times the n-gram's length and at
least `MIN_LOOP_TOKENS` tokens. The last repeat may be cut short by the token
limit ("the weather forecast, the weather forecast, the weather").

It works on token ids (what the decoder has), so "the same" means the same
tokens. A near-loop whose repeats differ somewhere each time (counting
"1, 2, 3, …", a numbered list) does not loop by this rule.
"""

# Up to a sentence of about 25 words: 3 repeats of it still fit in the default
# 128 new tokens. Longer periods cannot show 3 repeats there.
MAX_PERIOD = 32
# Two back-to-back copies happen in ordinary text ("very, very"); a third, with
# nothing else after it up to the limit, is a model stuck in a loop.
MIN_REPEATS = 3
# Short repeats in ordinary text ("ha ha ha", "000,000", "!!!") stay below it:
# a 1-token loop needs 16 copies, a 2-token one 8, a 4-token one 4.
MIN_LOOP_TOKENS = 16


def looped(new_tokens, ended=False):
    """Whether an answer loops, by the rule in this module's docstring.

    Args:
        new_tokens: sequence of int, the answer's generated token ids (without
            the stop token).
        ended: bool, default False; True when the model's stop token or a stop
            string ended the answer. An answer that ended does not loop, however
            repetitive.

    Returns:
        bool.
    """
    if ended:
        return False
    tokens = list(new_tokens)
    return any(_periodic_tail(tokens, period) >= max(MIN_REPEATS * period, MIN_LOOP_TOKENS)
               for period in range(1, MAX_PERIOD + 1))


def _periodic_tail(tokens, period):
    """Length of the longest suffix of `tokens` in which each token equals the one `period` before it."""
    n = len(tokens)
    if n <= period:
        return 0
    run = 0
    while run < n - period and tokens[n - 1 - run] == tokens[n - 1 - run - period]:
        run += 1
    return run + period
