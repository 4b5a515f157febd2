"""Long runs: checkpoint and restore, compile once, steady memory, no
mutation."""

import copy
import functools
import gc
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from _models import LINEN_MIXED_INPUT
from _models import LinenCNN
from _models import LinenMixed
from _task import toy_task
import optax_cdg


def _batch(step):
  """A different, deterministic batch of 16 images at every step."""
  return toy_task(seed=step, n=16)


@functools.cache
def _setup():
  """A CNN, CDG with a schedule chained with SGD + momentum, and a step.

  Shared by the tests below: the jitted step must be traced once in all.
  """
  model = LinenCNN()
  variables = jax.jit(model.init)(jax.random.key(0), _batch(0)[0])
  tx = optax.chain(
      optax_cdg.channel_directed(
          optax.linear_schedule(1e-4, 1e-2, transition_steps=1000)),
      optax.sgd(optax.cosine_decay_schedule(0.1, 1000), momentum=0.9))
  traces = []

  def step(params, stats, opt_state, x, y):
    traces.append(None)  # runs once per trace, not per call

    def loss_fn(params):
      logits, new = model.apply({"params": params, "batch_stats": stats}, x,
                                train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return loss.mean(), new["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  state = dict(params=variables["params"], stats=variables["batch_stats"],
               opt_state=tx.init(variables["params"]))
  return jax.jit(step), state, traces


def _run(step, state, start, stop):
  params, stats, opt_state = state["params"], state["stats"], state["opt_state"]
  for i in range(start, stop):
    params, stats, opt_state, _ = step(params, stats, opt_state, *_batch(i))
  return dict(params=params, stats=stats, opt_state=opt_state)


def _bits(tree):
  return jax.tree.map(lambda a: (np.asarray(a).dtype, np.asarray(a).tobytes()),
                      tree)


def test_checkpoint_mid_training_continues_bit_identically(tmp_path):
  step, init, traces = _setup()
  straight = _run(step, init, 0, 30)

  half = _run(step, init, 0, 15)
  assert int(half["opt_state"][0].count) == 15
  path = os.path.join(tmp_path, "step15")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, half)
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, half)
  del half
  gc.collect()

  restored = checkpointer.restore(path, abstract)
  # The same tree (NamedTuple states included), the same bits.
  assert jax.tree.structure(restored) == jax.tree.structure(abstract)
  assert isinstance(restored["opt_state"][0],
                    optax_cdg.ChannelDirectedState)
  resumed = _run(step, restored, 15, 30)
  assert _bits(resumed) == _bits(straight)
  assert int(resumed["opt_state"][0].count) == 30
  assert len(traces) == 1  # the restored state did not force a recompile


def _rss_bytes():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                    reason="needs /proc to read the resident set size")
def test_thousand_jitted_steps_compile_once_and_hold_memory():
  step, state, traces = _setup()
  x, y = _batch(0)
  params, stats, opt_state = state["params"], state["stats"], state[
      "opt_state"]
  live, rss, compiles = {}, {}, []

  def on_event(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    for i in range(1, 1000):
      params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
      if i + 1 in (100, 1000):
        loss.block_until_ready()
        gc.collect()
        live[i + 1] = len(jax.live_arrays())
        rss[i + 1] = _rss_bytes()
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  # The schedules' values are traced, not baked in: one trace, and no
  # compilation at all after the first step.
  assert len(traces) == 1
  assert not compiles, compiles
  assert int(opt_state[0].count) == 1000
  assert np.isfinite(float(loss))
  # Nothing accumulates: the same number of live device buffers, and the
  # process grows by less than a quarter of what keeping each step's new
  # parameters, statistics and optimizer state would cost (about 10 MB; a
  # quiet run grows by about 0.2 MiB).
  kept = 900 * sum(a.nbytes for a in jax.tree.leaves((params, stats,
                                                       opt_state)))
  assert live[1000] == live[100], live
  assert rss[1000] - rss[100] < kept / 4, (rss, kept)


def test_nothing_the_user_passed_is_mutated():
  rng = np.random.default_rng(0)
  params = jax.eval_shape(LinenMixed().init, jax.random.key(0),
                          LINEN_MIXED_INPUT)["params"]
  numpy_params = jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype), params)
  grads = jax.tree.map(lambda a: a * 0.5, numpy_params)  # numpy arrays
  jax_grads = jax.tree.map(jnp.asarray, grads)

  class Schedule:
    """A schedule with attributes, as user code might write one."""

    def __init__(self):
      self.values = [1e-3, 2e-3]

    def __call__(self, count):
      return jnp.where(count < 2, self.values[0], self.values[1])

  schedule = Schedule()
  spec = {name: None for name in params}  # a prefix: None leaves alone
  spec.update({
      "conv1d": {"kernel": optax_cdg.KernelSpec(-1, 0), "bias": None},
      "ConvTranspose_0": {"kernel": -2, "bias": False},
      "Scan_ScanBlock_0": {"conv": {"kernel": optax_cdg.KernelSpec(-1, 1),
                                    "bias": None}}})
  selection = optax_cdg.linen_conv_kernels(LinenMixed(), LINEN_MIXED_INPUT)
  snapshot = copy.deepcopy(
      (numpy_params, grads, schedule.values, spec, selection.recorded))

  # Eagerly (numpy arrays reach jnp directly) on two leaves, jitted on all.
  small = ("conv1d", "Conv_0")
  for kernels, direction, jit, names in ((None, "output", False, small),
                                         (spec, "spatial", True, params),
                                         (selection, "output", True, params)):
    tx = optax.chain(
        optax_cdg.channel_directed(schedule, kernels=kernels,
                                   direction=direction),
        optax.sgd(0.1, momentum=0.9))
    update = jax.jit(tx.update) if jit else tx.update
    p = {k: numpy_params[k] for k in names}
    state = tx.init(p)
    for g in (grads, jax_grads, grads):
      g = {k: g[k] for k in names}
      out, state = update(g, state, p)
      assert jax.tree.structure(out) == jax.tree.structure(g)
  lsgd = optax_cdg.laplacian_smoothing(0.5)
  jax.jit(lsgd.update)(grads, lsgd.init(numpy_params))

  chex.assert_trees_all_equal(
      (numpy_params, grads, schedule.values),
      (snapshot[0], snapshot[1], snapshot[2]))
  assert spec == snapshot[3] and selection.recorded == snapshot[4]
  # jax arrays are immutable, but must not have been donated either.
  assert not any(a.is_deleted() for a in jax.tree.leaves(jax_grads))
