"""Small Flax models shared by the tests."""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp


class LinenCNN(nn.Module):
  """Conv + BatchNorm + Dense, the common case."""

  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.Conv(16, (3, 3), strides=2)(x)
    x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class _ScanBlock(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Conv(16, (3,), name="conv")(x)), None


class LinenMixed(nn.Module):
  """Every kind of kernel, with a DenseGeneral shaped exactly like a Conv.

  Input: (batch, length, 8).
  """

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(16, (4,), name="conv1d")(x)                    # (4, 8, 16)
    g = nn.DenseGeneral((8, 16), name="proj")(x[..., :4])     # (4, 8, 16)
    d = nn.DenseGeneral((2, 8))(h)                            # (16, 2, 8)
    a = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(h)
    e = nn.Einsum((16, 2, 8), "bli,ijk->bljk")(h)
    grouped = nn.Conv(16, (3,), feature_group_count=4)(h)     # (3, 4, 16)
    depthwise = nn.Conv(16, (3,), feature_group_count=16)(h)  # (3, 1, 16)
    up_t = nn.ConvTranspose(4, (3,), transpose_kernel=True)(h)  # (3, 4, 16)
    up = nn.ConvTranspose(4, (3,))(h)                         # (3, 16, 4)
    local = nn.ConvLocal(4, (3,))(h)                          # (L, 48, 4)
    stacked, _ = nn.scan(_ScanBlock, variable_axes={"params": 0},
                         split_rngs={"params": True}, length=3)()(h, None)
    vol = nn.Conv(2, (2, 2, 2))(h[:, :, None, :4, None].repeat(2, 2))
    return (jnp.sum(g) + jnp.sum(d) + jnp.sum(a) + jnp.sum(e)
            + jnp.sum(grouped) + jnp.sum(depthwise) + jnp.sum(up_t)
            + jnp.sum(up) + jnp.sum(local) + jnp.sum(stacked) + jnp.sum(vol))


LINEN_MIXED_INPUT = jax.ShapeDtypeStruct((1, 8, 8), jnp.float32)

# Path -> (output axis, stacked axes) of every conv kernel of LinenMixed.
LINEN_MIXED_CONVS = {
    ("conv1d", "kernel"): (-1, 0),
    ("Conv_0", "kernel"): (-1, 0),
    ("Conv_1", "kernel"): (-1, 0),
    ("ConvTranspose_0", "kernel"): (-2, 0),
    ("ConvTranspose_1", "kernel"): (-1, 0),
    ("ConvLocal_0", "kernel"): (-1, 0),
    ("Scan_ScanBlock_0", "conv", "kernel"): (-1, 1),
    ("Conv_2", "kernel"): (-1, 0),
}


class NNXMixed(nnx.Module):
  """An nnx model with convs, stacked convs, attention and general dense."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=4, rngs=rngs)
    self.up_t = nnx.ConvTranspose(8, 4, (2, 2), transpose_kernel=True,
                                  rngs=rngs)
    self.up = nnx.ConvTranspose(4, 8, (2, 2), rngs=rngs)
    self.proj = nnx.LinearGeneral(3, (3, 8), rngs=rngs)  # (3, 3, 8), as conv
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8,
                                       qkv_features=8, decode=False,
                                       rngs=rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)

    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_stack(rngs):
      return nnx.Conv(8, 8, (3, 3), rngs=rngs)

    self.stack = make_stack(rngs)

  def __call__(self, x):
    h = nnx.relu(self.conv(x))
    h = nnx.relu(self.grouped(h))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(layer, carry):
      return nnx.relu(layer(carry))

    h = run(self.stack, h)
    h = self.up(self.up_t(h))
    b, hh, ww, c = h.shape
    seq = h.reshape(b, hh * ww, c)
    seq = self.attn(seq)
    extra = jnp.sum(self.proj(x[:, 0, 0, :]))
    return self.head(jnp.mean(seq, axis=1)) + extra


NNX_MIXED_CONVS = {
    ("conv", "kernel"): (-1, 0),
    ("grouped", "kernel"): (-1, 0),
    ("up_t", "kernel"): (-2, 0),
    ("up", "kernel"): (-1, 0),
    ("stack", "kernel"): (-1, 1),
}


def as_pure(state):
  """`nnx.as_pure(state)`: the state's Variables replaced by their values.

  flax < 0.12.7 has no `nnx.as_pure`; the same map serves there.
  """
  if hasattr(nnx, "as_pure"):
    return nnx.as_pure(state)
  return jax.tree.map(lambda v: v.get_value(), state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))
