"""One small training step per client shape, with CDG where a user puts it.

Each client runs the same step with and without CDG, from the same start,
and checks that (1) exactly the conv kernels come out different (every other
leaf of the model, batch statistics and RNG state included, bit-identical)
and (2) the jitted step is traced once over several steps.

What CDG computes inside these wrappers is checked elsewhere and not
repeated here: `optax.masked`, `optax.partition`, `optax.MultiSteps` and
`optax.inject_hyperparams` against the manual result in test_transform.py
(ComposeTest), `nnx.Optimizer` on every nnx conv kind in test_transform.py
(test_nnx_optimizer), an Equinox training run with Adam in test_equinox.py
(test_training_with_filter_value_and_grad_and_adam).
"""

from collections.abc import Callable
import dataclasses
import functools
import re
from typing import Any

import chex
from flax import nnx
from flax.training import dynamic_scale
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _extras
from _models import as_pure
from _models import LinenCNN
from _task import toy_task
import optax_cdg

eqx = _extras.require("equinox")

STEPS = 3
X, Y = toy_task(n=8)  # class = where a bright patch is: channel-varying grads


class Traces:
  """Wraps a function to count its traces: a jitted function is traced
  exactly when it is (re)compiled, and never on a cache hit."""

  def __init__(self):
    self.count = 0

  def __call__(self, fn):
    @functools.wraps(fn)
    def counted(*args, **kwargs):
      self.count += 1
      return fn(*args, **kwargs)
    return counted


@dataclasses.dataclass
class Run:
  """What a client returns: the start, the state after each step, traces."""

  initial: Any
  states: list
  traces: int


def _ce(logits):
  return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def _fill(abstract, seed=0):
  """Random arrays for the leaves of an abstract model, made by numpy: the
  initializers would compile once per shape, slower than all the steps."""
  rng = np.random.default_rng(seed)

  def one(x):
    if not isinstance(x, jax.ShapeDtypeStruct):
      return x
    if x.ndim == 1:  # biases, norm scales and statistics (variances > 0)
      return jnp.asarray(1 + 0.1 * rng.standard_normal(x.shape), x.dtype)
    fan_in = np.prod(x.shape[:-1])
    return jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(fan_in),
                       x.dtype)
  return jax.tree.map(one, abstract)


@functools.cache
def _linen_variables():
  return _fill(jax.eval_shape(LinenCNN().init, jax.random.key(0), X))


def _plain_arrays(tree):
  """Arrays to compare bitwise; typed PRNG keys by their key data."""
  def one(x):
    if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree.map(one, tree)


def _is_conv_kernel(path):
  """Conv kernels of these clients by path: Conv_0 (linen), conv (nnx and
  Equinox; Equinox names the weight `weight`)."""
  return re.search(r"(Conv_\d|conv)\W+(kernel|weight)\W*$", path) is not None


def assert_only_selected_differ(initial, plain, cdg, selected=_is_conv_kernel):
  """Leaves where `selected(path)` moved measurably differently; the rest
  bit-identical. Returns the selected paths."""
  initial, plain, cdg = map(_plain_arrays, (initial, plain, cdg))
  assert jax.tree.structure(plain) == jax.tree.structure(cdg)
  hits = []
  for (path, a), b, start in zip(jax.tree_util.tree_flatten_with_path(cdg)[0],
                                 jax.tree.leaves(plain),
                                 jax.tree.leaves(initial), strict=True):
    name = jax.tree_util.keystr(path)
    if selected(name):
      hits.append(name)
      step = np.linalg.norm((b - start).astype(np.float64))
      gap = np.linalg.norm((a - b).astype(np.float64))
      assert gap > 1e-2 * step > 0, (name, gap, step)
    else:
      np.testing.assert_array_equal(a, b, err_msg=name)
  return hits


# --- Flax linen: TrainState, jax.jit, fp16 compute with DynamicScale. -------


class ScaledState(train_state.TrainState):
  batch_stats: Any
  dynamic_scale: dynamic_scale.DynamicScale


def _linen_dynamic_scale(cdg):
  model = LinenCNN()
  variables = _linen_variables()
  tx = optax.sgd(0.1, momentum=0.9)
  if cdg:
    tx = optax_cdg.with_channel_directed(tx)
  # A float32 scale: DynamicScale()'s default 65536.0 is a Python float
  # (weakly typed), its updated scale is not, so step 2 would recompile with
  # or without CDG.
  state = ScaledState.create(
      apply_fn=model.apply, params=variables["params"], tx=tx,
      batch_stats=variables["batch_stats"],
      dynamic_scale=dynamic_scale.DynamicScale(
          scale=jnp.asarray(2.0**12, jnp.float32)))
  traces = Traces()

  @jax.jit
  @traces
  def step(state):
    def loss_fn(params):
      half = jax.tree.map(lambda a: a.astype(jnp.float16),
                          {"params": params, "batch_stats": state.batch_stats})
      logits, new = state.apply_fn(half, X.astype(jnp.float16), train=True,
                                   mutable=["batch_stats"])
      return _ce(logits.astype(jnp.float32)), new["batch_stats"]

    scale, is_finite, (_, stats), grads = state.dynamic_scale.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new = state.apply_gradients(grads=grads)
    def keep(a, b):
      return jax.tree.map(lambda x, y: jnp.where(is_finite, x, y), a, b)
    return new.replace(
        params=keep(new.params, state.params),
        opt_state=keep(new.opt_state, state.opt_state),
        batch_stats=jax.tree.map(lambda s, old: s.astype(old.dtype), stats,
                                 state.batch_stats),
        dynamic_scale=scale)

  def view(s):
    return (s.step, s.params, s.batch_stats, s.dynamic_scale)
  initial, states = view(state), []
  for _ in range(STEPS):
    state = step(state)
    states.append(view(state))
  return Run(initial, states, traces.count)


# --- Flax nnx: nnx.Optimizer(wrt=nnx.Param), BatchNorm, Dropout, nnx.jit. ---


class NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.25, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    h = self.drop(nnx.relu(self.norm(self.conv(x))))
    return self.head(jnp.mean(h, axis=(1, 2)))


@functools.cache
def _nnx_model():
  # Cloned by each run, which mutates it. "rbg" keys: threefry's dropout
  # mask alone costs 2 s of compile on CPU.
  return NNXNet(nnx.Rngs(jax.random.key(0, impl="rbg")))


def _nnx_optimizer(cdg):
  model = nnx.clone(_nnx_model())
  tx = optax.adamw(1e-2)
  if cdg:  # the exact selection, from the model
    tx = optax_cdg.with_channel_directed(
        tx, kernels=optax_cdg.nnx_conv_kernels(model))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  traces = Traces()

  @nnx.jit
  @traces
  def step(model, optimizer):
    grads = nnx.grad(lambda m: _ce(m(X)))(model)
    optimizer.update(model, grads)

  # Params, batch statistics, dropout RNG state: all must match.
  def view():
    return as_pure(nnx.state(model))
  initial, states = view(), []
  for _ in range(STEPS):
    step(model, optimizer)
    states.append(view())
  return Run(initial, states, traces.count)


# --- Equinox: filter_jit, filter_value_and_grad, Conv2d + Linear. ----------


class EqxNet(eqx.Module):
  conv: eqx.nn.Conv2d
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.conv = eqx.nn.Conv2d(1, 8, 3, padding=1, key=k1)
    self.head = eqx.nn.Linear(8, 4, key=k2)

  def __call__(self, x):
    return self.head(jnp.mean(jax.nn.relu(self.conv(x)), axis=(1, 2)))


def _equinox(cdg):
  model = _fill(eqx.filter_eval_shape(EqxNet, jax.random.key(0)))
  x = jnp.transpose(X, (0, 3, 1, 2))  # Equinox convs are channels-first
  tx = optax.adam(1e-2)
  if cdg:  # Equinox convs are found exactly, by class, as OIHW
    tx = optax.chain(optax_cdg.channel_directed(), tx)
  opt_state = tx.init(eqx.filter(model, eqx.is_array))
  traces = Traces()

  @eqx.filter_jit
  @traces
  def step(model, opt_state):
    grads = eqx.filter_value_and_grad(
        lambda m: _ce(jax.vmap(m)(x)))(model)[1]
    updates, opt_state = tx.update(grads, opt_state,
                                   eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state

  def view():
    return eqx.filter(model, eqx.is_array)
  initial, states = view(), []
  for _ in range(STEPS):
    model, opt_state = step(model, opt_state)
    states.append(view())
  return Run(initial, states, traces.count)


# --- Optax wrappers, each around or inside CDG, in a jax.jit linen step. ----


def _muon_dims(params):
  """Conv kernels orthogonalized as (H W I) x O matrices, Dense as usual."""
  return jax.tree.map(
      lambda p: {2: optax.contrib.MuonDimensionNumbers(),
                 4: optax.contrib.MuonDimensionNumbers((0, 1, 2), 3)}.get(
                     p.ndim), params)


def _label_convs(params):
  return {k: jax.tree.map(lambda _, k=k: "conv" if k.startswith("Conv")
                          else "other", v) for k, v in params.items()}


def _muon():
  # 2 Newton-Schulz steps, not 5: each one adds compile time, not coverage.
  # Optax before 0.2.6 (the floor is 0.2.5) has no dimension numbers: its
  # muon orthogonalizes 2-D leaves only and gives the conv kernels to Adam,
  # which still tests that CDG reaches exactly them.
  kw = ({"muon_weight_dimension_numbers": _muon_dims}
        if hasattr(optax.contrib, "MuonDimensionNumbers") else {})
  return optax.contrib.muon(1e-2, ns_steps=2, **kw)


def _only_conv_0(params):
  return {k: k == "Conv_0" for k in params}


@dataclasses.dataclass(frozen=True)
class Wrapped:
  """An Optax pipeline with CDG where a user would put it, the same without,
  the step after which they first move the params, and what then differs."""

  cdg: Callable[[], optax.GradientTransformation]
  plain: Callable[[], optax.GradientTransformation]
  first_step: int = 1
  selected: Callable[[str], bool] = _is_conv_kernel
  lookahead: bool = False


WRAPPED = {
    "muon": Wrapped(lambda: optax_cdg.with_channel_directed(_muon()), _muon),
    "schedule_free_adamw": Wrapped(
        lambda: optax_cdg.with_channel_directed(
            optax.contrib.schedule_free_adamw(1e-2)),
        lambda: optax.contrib.schedule_free_adamw(1e-2)),
    # CDG in the base optimizer: schedule-free averages what SGD did on it.
    "schedule_free_sgd": Wrapped(
        lambda: optax.contrib.schedule_free(
            optax_cdg.with_channel_directed(optax.sgd(0.1)), 0.1),
        lambda: optax.contrib.schedule_free(optax.sgd(0.1), 0.1)),
    # CDG in the fast optimizer; the slow weights move at the sync (step 2).
    "lookahead": Wrapped(
        lambda: optax.lookahead(
            optax_cdg.with_channel_directed(optax.sgd(0.1)), 2, 0.5),
        lambda: optax.lookahead(optax.sgd(0.1), 2, 0.5),
        selected=lambda p: p.startswith(".fast") and _is_conv_kernel(p),
        lookahead=True),
    # The mean gradient of 2 micro-batches is smoothed, on the 2nd step.
    "multi_steps": Wrapped(
        lambda: optax.MultiSteps(
            optax_cdg.with_channel_directed(optax.sgd(0.1)), 2),
        lambda: optax.MultiSteps(optax.sgd(0.1), 2), first_step=2),
    # CDG on the first conv only.
    "masked": Wrapped(
        lambda: optax.chain(optax.masked(optax_cdg.channel_directed(),
                                         _only_conv_0), optax.sgd(0.1)),
        lambda: optax.sgd(0.1),
        selected=lambda p: p.startswith("['Conv_0']['kernel']")),
    # CDG + SGD on the convs, Adam elsewhere.
    "partition": Wrapped(
        lambda: optax.partition(
            {"conv": optax_cdg.with_channel_directed(optax.sgd(0.1)),
             "other": optax.adam(1e-2)}, _label_convs),
        lambda: optax.partition({"conv": optax.sgd(0.1),
                                 "other": optax.adam(1e-2)}, _label_convs)),
    "apply_if_finite": Wrapped(
        lambda: optax.apply_if_finite(
            optax_cdg.with_channel_directed(optax.sgd(0.1)), 3),
        lambda: optax.apply_if_finite(optax.sgd(0.1), 3)),
}


def _optax_wrapper(wrapped, cdg):
  model = LinenCNN()
  variables = _linen_variables()
  tx = wrapped.cdg() if cdg else wrapped.plain()
  params = variables["params"]
  if wrapped.lookahead:
    params = optax.LookaheadParams.init_synced(params)
  opt_state = tx.init(params)
  traces = Traces()

  @jax.jit
  @traces
  def step(params, opt_state):
    fast = params.fast if wrapped.lookahead else params
    grads = jax.grad(lambda p: _ce(model.apply(
        {"params": p, "batch_stats": variables["batch_stats"]}, X)))(fast)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  initial, states = params, []
  for _ in range(STEPS):
    params, opt_state = step(params, opt_state)
    states.append(params)
  return Run(initial, states, traces.count)


CLIENTS = {
    "linen_train_state_dynamic_scale": (_linen_dynamic_scale, 1,
                                        _is_conv_kernel),
    "nnx_optimizer": (_nnx_optimizer, 1, _is_conv_kernel),
    "equinox_filter": (_equinox, 1, _is_conv_kernel),
    **{f"optax_{name}": (functools.partial(_optax_wrapper, w), w.first_step,
                         w.selected) for name, w in WRAPPED.items()},
}


@pytest.mark.parametrize("client", CLIENTS)
def test_only_conv_kernels_change_and_the_step_compiles_once(client):
  run, first_step, selected = CLIENTS[client]
  plain, cdg = run(False), run(True)
  # Up to the first step that moves the params both runs saw the same
  # gradients, so only the (selected) conv kernels can differ there.
  for t in range(first_step - 1):
    assert_only_selected_differ(plain.initial, plain.states[t], cdg.states[t],
                                selected=lambda _: False)
  assert assert_only_selected_differ(
      cdg.initial, plain.states[first_step - 1], cdg.states[first_step - 1],
      selected)
  assert (plain.traces, cdg.traces) == (1, 1)


# --- Changing injected hyperparameters without recompiling. ----------------
#
# optax.inject_hyperparams stores each hyperparameter as a strongly typed
# array (float32 for float32 params) and returns it strongly typed from every
# update. jax.jit keys its cache on each argument's dtype *and weak type*, so
# a value written as a Python float or `jnp.asarray(0.5)` (weakly typed) is a
# new signature: one more compile per new pattern of weak values. "strong"
# keeps the stored dtype and so never recompiles.


def _set_train_state(state, values, spelling):
  """A TrainState with `values` written into its hyperparams, functionally."""
  hyperparams = dict(state.opt_state.hyperparams)
  for name, value in values.items():
    hyperparams[name] = {
        "strong": lambda v, old: jnp.asarray(v, old.dtype),
        "weak_python_float": lambda v, old: v,
        "weak_asarray": lambda v, old: jnp.asarray(v),
    }[spelling](value, hyperparams[name])
  return state.replace(opt_state=state.opt_state._replace(
      hyperparams=hyperparams))


def _set_nnx(optimizer, values, spelling):
  for name, value in values.items():
    variable = optimizer.opt_state.hyperparams[name]  # an nnx.OptArray
    if spelling == "strong":
      # A Python float is written into the stored array, keeping its dtype.
      variable[...] = value
    elif spelling == "weak_asarray":
      # An array of the same dtype replaces it, weak type and all.
      variable[...] = jnp.asarray(value)
    else:  # "weak_python_float": stored as it is, as `.value =` does
      variable.set_value(value)


def _cdg_sgd():
  return optax.inject_hyperparams(optax_cdg.cdg_sgd)(learning_rate=0.1,
                                                     smoothing=0.1)


def _train_state_hyperparams():
  """(step, write(values, spelling), read hyperparams, traces)."""
  model = LinenCNN()
  variables = _linen_variables()
  box = [train_state.TrainState.create(
      apply_fn=model.apply, params=variables["params"], tx=_cdg_sgd())]
  traces = Traces()

  @jax.jit
  @traces
  def step(state):
    grads = jax.grad(lambda p: _ce(state.apply_fn(
        {"params": p, "batch_stats": variables["batch_stats"]}, X)))(
            state.params)
    return state.apply_gradients(grads=grads)

  def run():
    box[0] = step(box[0])

  def write(values, spelling):
    box[0] = _set_train_state(box[0], values, spelling)

  return run, write, lambda: box[0].opt_state.hyperparams, traces


def _nnx_hyperparams():
  model = nnx.clone(_nnx_model())
  optimizer = nnx.Optimizer(model, _cdg_sgd(), wrt=nnx.Param)
  traces = Traces()

  @nnx.jit
  @traces
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: _ce(m(X)))(model))

  def read():
    return {k: v[...] for k, v in optimizer.opt_state.hyperparams.items()}
  return (lambda: step(model, optimizer),
          functools.partial(_set_nnx, optimizer), read, traces)


HYPERPARAM_CLIENTS = {"train_state": _train_state_hyperparams,
                      "nnx_optimizer": _nnx_hyperparams}


@pytest.mark.parametrize("client", HYPERPARAM_CLIENTS)
def test_changing_hyperparams_compiles_once_when_the_dtype_is_kept(client):
  run, write, read, traces = HYPERPARAM_CLIENTS[client]()

  def check(values):
    for name, value in values.items():
      got = read()[name]  # after a step: float32, strongly typed again
      assert (got.dtype, got.weak_type) == (jnp.float32, False), got
      np.testing.assert_allclose(got, value, rtol=1e-7)

  run()
  for values in ({"smoothing": 0.5}, {"learning_rate": 0.05},
                 {"smoothing": 0.2, "learning_rate": 0.02}):
    write(values, "strong")
    run()
    run()
    check(values)
  assert traces.count == 1
  # The contrast: a weakly typed smoothing compiles the step once more, for
  # either spelling (both make the same signature), and not on every write.
  for spelling, value in (("weak_python_float", 0.3), ("weak_asarray", 0.4)):
    write({"smoothing": value}, spelling)
    run()
    check({"smoothing": value})
  assert traces.count == 2


# --- Optax's generic check: inject_hyperparams changes no number. -----------
#
# Optax's contrib tests wrap every optimizer in `optax.inject_hyperparams` and
# compare its updates and states with the plain optimizer's at rtol 1e-5. With
# CDG inside, the injected smoothing is a traced scalar and the plain one a
# number; both take one path, so they agree bit for bit in the CDG part.


def _cdg_sgd_factory(learning_rate, smoothing):
  return optax_cdg.cdg_sgd(learning_rate, momentum=0.9, smoothing=smoothing)


def _schedule_free_factory(learning_rate, smoothing):
  return optax.contrib.schedule_free(
      optax_cdg.cdg_sgd(learning_rate, smoothing=smoothing), learning_rate)


@pytest.mark.parametrize("factory", [_cdg_sgd_factory, _schedule_free_factory,
                                     optax_cdg.channel_directed])
def test_inject_hyperparams_matches_the_plain_optimizer(factory):
  hparams = {"smoothing": 0.1}
  if factory is not optax_cdg.channel_directed:
    hparams["learning_rate"] = 0.1
  plain = factory(**hparams)
  injected = optax.inject_hyperparams(factory)(**hparams)
  rng = np.random.default_rng(0)
  params = {"conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 16)),
                                           jnp.float32),
                     "bias": jnp.zeros(16)}}
  grads = jax.tree.map(lambda p: jnp.cos(3 * p) + 0.1, params)
  states = jax.jit(plain.init)(params), jax.jit(injected.init)(params)
  for _ in range(3):
    (u_plain, s_plain), (u_injected, s_injected) = (
        jax.jit(tx.update)(grads, s, params)
        for tx, s in zip((plain, injected), states, strict=True))
    chex.assert_trees_all_close(u_injected, u_plain, rtol=1e-5)
    if factory is optax_cdg.channel_directed:
      chex.assert_trees_all_equal(u_injected, u_plain)
    states = s_plain, s_injected
    params = optax.apply_updates(params, u_plain)
