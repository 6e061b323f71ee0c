"""Float tolerances that say what float32 arithmetic guarantees, so a test passes on every CPU.

A float32 sum's rounding error is relative to the size of the terms summed,
not to the sum: an element of a gradient that is a near-cancelling sum of
larger terms can be off by many of its own ulps while it is exact to the
scale of the array. The summation order, and so the error, changes with the
CPU's instruction set (AVX2, AVX-512, AMX) and XLA's choices for it, so an
absolute tolerance near float32's epsilon passes on one machine and fails on
another.
"""

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7


def assert_close_at_scale(got, want, rtol=1e-4, scale_eps=64, err_msg=""):
    """Each element within `rtol` of its own value, or within `scale_eps` float32 epsilons of the array's scale.

    The scale is the largest magnitude in `want`: what the sums that made
    every element were of the order of. 64 epsilons is 7.6e-6 of that scale;
    the worst element of the gradient tests on the project's 2-core
    AVX-512/AMX CPU (2026-12-07) was 6.5 epsilons past its rtol.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    atol = scale_eps * FLOAT32_EPS * float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=err_msg)
