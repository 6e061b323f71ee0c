"""The functional Gemma in pure JAX: read a KerasHub model's weights (`extract`), run them (`forward`, `decode`).

The fast engine trains through it on packed rows; `decode` is the KV-cached
greedy/top-k decoder the package answers and samples with.
"""
