"""Runs a script as `__main__` in a process launched by harness.py.

First it pins JAX's cross-process CPU collectives (gloo) to 127.0.0.1. By
default gloo binds to whatever address the host name resolves to, which on
many machines is a real network interface; a test must listen on loopback
only. JAX has no setting for that, so the factory it calls is wrapped (once,
here, before any backend exists). If a JAX version renames the factory this
fails loudly instead of silently listening elsewhere.
"""

import functools
import os
import runpy
import sys

from jax._src.lib import _jax

_jax.make_gloo_tcp_collectives = functools.partial(
    _jax.make_gloo_tcp_collectives, hostname="127.0.0.1")

script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script`
runpy.run_path(script, run_name="__main__")
