import os
import sys

# Tests import the dense reference as a sibling module.
sys.path.insert(0, os.path.dirname(__file__))

# The multi-device tests need XLA_FLAGS set before jax is imported, so they run
# in a process of their own (tests/test_multidevice.py starts it).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                  ""):
  collect_ignore = ["multidevice"]
