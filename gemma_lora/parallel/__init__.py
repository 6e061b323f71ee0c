"""Several devices and processes: a job's processes (`hosts`, jax.distributed) and layouts (`distribute`)."""
