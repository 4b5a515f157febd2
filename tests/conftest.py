import os

# The dense float64 references solve many small systems: one BLAS thread is
# several times faster than contending with XLA's threads for the cores.
# (Set before numpy is first imported; pytest itself does not import it.)
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

# The multi-device tests need XLA_FLAGS set before jax is imported, so they run
# in a process of their own (tests/test_multidevice.py starts it).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                  ""):
  collect_ignore = ["multidevice"]
