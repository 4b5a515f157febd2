"""Channel-directed gradients for Optax.

Replace the gradient of every conv kernel by its gradient in a Sobolev or
re-weighted L2 metric along the output-channel axis, before any optimizer
sees it (Lao et al., arXiv 2008.10766).
"""

from optax_cdg._alias import cdg_adamw
from optax_cdg._alias import cdg_sgd
from optax_cdg._alias import with_channel_directed
from optax_cdg._apply import metric_gradient
from optax_cdg._diagnostics import channel_spectrum
from optax_cdg._gains import DEFAULT_SCALE
from optax_cdg._gains import DEFAULT_SMOOTHING
from optax_cdg._gains import spectral_gain
from optax_cdg._lsgd import laplacian_smoothing
from optax_cdg._selection import conv_kernels
from optax_cdg._selection import KernelSpec
from optax_cdg._selection import linen_conv_kernels
from optax_cdg._selection import nnx_conv_kernels
from optax_cdg._selection import NoKernelsSelectedWarning
from optax_cdg._transform import channel_directed
from optax_cdg._transform import ChannelDirectedState

__version__ = "0.3.0"

__all__ = (
    "ChannelDirectedState",
    "DEFAULT_SCALE",
    "DEFAULT_SMOOTHING",
    "KernelSpec",
    "NoKernelsSelectedWarning",
    "cdg_adamw",
    "cdg_sgd",
    "channel_directed",
    "channel_spectrum",
    "conv_kernels",
    "laplacian_smoothing",
    "linen_conv_kernels",
    "metric_gradient",
    "nnx_conv_kernels",
    "spectral_gain",
    "with_channel_directed",
)
