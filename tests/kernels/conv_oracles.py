"""Float64 NumPy oracles of a convolution and its gradients, from the definition (NHWC, HWIO)."""

import itertools

import numpy as np


def conv_oracle(x, w, stride, pads):
  """conv(x, w) in float64, NHWC / HWIO, from the definition (a sum over the kernel's taps)."""
  (pt, pb), (pl, pr) = pads
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw = w.shape[:2]
  oh, ow = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
  return sum(
    np.einsum(
      "nhwc,co->nhwo",
      xp[:, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride],
      w[i, j],
    )
    for i, j in itertools.product(range(kh), range(kw))
  )


def conv_gradients_oracle(x, w, g, stride, pads):
  """Input and kernel gradients of sum(g * conv(x, w)) in float64,
  NHWC / HWIO, from the definition."""
  (pt, pb), (pl, pr) = pads
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw = w.shape[:2]
  oh, ow = g.shape[1:3]
  dxp, dw = np.zeros_like(xp), np.zeros_like(w)
  for i, j in itertools.product(range(kh), range(kw)):
    rows, cols = (
      slice(i, i + stride * (oh - 1) + 1, stride),
      slice(j, j + stride * (ow - 1) + 1, stride),
    )
    dw[i, j] = np.einsum("nhwc,nhwo->co", xp[:, rows, cols], g)
    dxp[:, rows, cols] += np.einsum("nhwo,co->nhwc", g, w[i, j])
  return dxp[:, pt : pt + x.shape[1], pl : pl + x.shape[2]], dw
