"""PUNet: shapes, hole independence, the Conv baseline,
the frozen-encoder switch and input errors."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from pconv_jax import models


def init_shapes(model, size, batch=1):
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  masks = jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32)
  variables = jax.eval_shape(lambda i, m: model.init(jax.random.key(0), i, m), images, masks)
  output = jax.eval_shape(model.apply, variables, images, masks)
  return variables, output


def small_inputs(size=32, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  masks = np.ones((batch, size, size, 1), np.float32)
  masks[:, 5:20, 8:25] = 0
  masks[1, 20:30, 2:10] = 0
  return jnp.asarray(images), jnp.asarray(masks)


@pytest.mark.parametrize("depth,size", [(7, 256), (8, 512)])
def test_paper_networks_output_shapes(depth, size):
  variables, output = init_shapes(models.PUNet(depth=depth), size, batch=2)
  assert output.shape == (2, size, size, 3) and output.dtype == jnp.float32
  params = variables["params"]
  assert sorted(params) == ["decoder", "encoder"]
  assert sorted(params["encoder"]) == sorted(f"block_{i}" for i in range(1, depth + 1))
  assert params["encoder"]["block_1"]["conv"]["kernel"].shape == (7, 7, 3, 64)
  assert params["encoder"][f"block_{depth}"]["conv"]["kernel"].shape == (3, 3, 512, 512)
  assert params["decoder"]["block_1"]["conv"]["kernel"].shape == (3, 3, 64 + 3, 3)
  assert params["decoder"]["block_1"]["conv"]["bias"].shape == (3,)
  assert "bias" not in params["encoder"]["block_2"]["conv"]
  # BatchNorm everywhere but the first encoder and the last decoder block.
  assert (
    "block_1" not in variables["batch_stats"]["encoder"]
    and "block_1" not in variables["batch_stats"]["decoder"]
  )
  assert (
    len(variables["batch_stats"]["encoder"])
    == len(variables["batch_stats"]["decoder"])
    == depth - 1
  )


def test_paper_network_parameter_count():
  variables, _ = init_shapes(models.PUNet(), 256)
  # Convolution weights of the summary's network (no biases but the last layer's 3), plus BN
  # scale/bias.
  convs = (
    [(7, 3, 64), (5, 64, 128), (5, 128, 256), (3, 256, 512)]
    + [(3, 512, 512)] * 3
    + [(3, 1024, 512)] * 3
    + [(3, 768, 256), (3, 384, 128), (3, 192, 64), (3, 67, 3)]
  )
  bn_channels = [128, 256, 512, 512, 512, 512] + [512, 512, 512, 256, 128, 64]
  want = sum(k * k * cin * cout for k, cin, cout in convs) + 3 + 2 * sum(bn_channels)
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == want


def test_forward_is_finite_in_range_and_ignores_pixels_under_holes():
  model = models.PUNet(depth=4, features=(8, 16, 16, 16))
  images, masks = small_inputs()
  variables = model.init(jax.random.key(1), images, masks)
  noisy = images + (1 - masks) * jnp.asarray(
    np.random.default_rng(5).normal(size=images.shape) * 10, jnp.float32
  )

  for train in (False, True):
    apply = jax.jit(
      functools.partial(model.apply, train=train, mutable=["batch_stats"] if train else False)
    )
    out, out_noisy = apply(variables, images, masks), apply(variables, noisy, masks)
    if train:
      (out, stats), (out_noisy, stats_noisy) = out, out_noisy
      jax.tree.map(np.testing.assert_array_equal, stats, stats_noisy)
    assert out.shape == images.shape
    assert np.all(np.isfinite(out)) and np.all(np.abs(out) <= 1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_noisy))


def test_one_and_three_channel_masks_agree():
  model = models.PUNet(depth=3, features=(8, 8, 8))
  images, masks = small_inputs(size=16)
  variables = model.init(jax.random.key(2), images, masks)
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(
    apply(variables, images, masks),
    apply(variables, images, jnp.repeat(masks, 3, axis=-1)),
    rtol=1e-6,
    atol=1e-6,
  )


def test_conv_baseline_fills_holes_and_has_same_variables():
  conv = models.PUNet(depth=3, features=(8, 8, 8), partial=False)
  pconv = models.PUNet(depth=3, features=(8, 8, 8))
  images, masks = small_inputs(size=16)
  variables = conv.init(jax.random.key(3), images, masks)
  shapes = lambda v: jax.tree.map(jnp.shape, v)  # noqa: E731
  assert shapes(variables) == shapes(pconv.init(jax.random.key(3), images, masks))
  filled = images * masks  # Holes are set to 0 (mid-grey): values under them do not matter.
  np.testing.assert_array_equal(
    conv.apply(variables, images, masks), conv.apply(variables, filled, masks)
  )
  assert not np.allclose(
    conv.apply(variables, images, masks), pconv.apply(variables, images, masks)
  )


def test_frozen_encoder_bn_updates_only_decoder_statistics():
  model = models.PUNet(depth=3, features=(8, 8, 8), freeze_encoder_bn=True)
  images, masks = small_inputs(size=16)
  variables = model.init(jax.random.key(4), images, masks)
  _, updates = model.apply(variables, images, masks, train=True, mutable=["batch_stats"])
  old, new = variables["batch_stats"], updates["batch_stats"]
  jax.tree.map(np.testing.assert_array_equal, old["encoder"], new["encoder"])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), old["decoder"], new["decoder"])
  assert all(jax.tree.leaves(changed))


def test_bfloat16_forward_is_finite():
  model = models.PUNet(depth=3, features=(8, 8, 8), dtype=jnp.bfloat16)
  images, masks = small_inputs(size=16)
  masks = masks.at[0].set(0)  # An all-hole image.
  variables = model.init(jax.random.key(5), images, masks)
  out = jax.jit(model.apply)(variables, images, masks)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32


def test_bfloat16_keeps_the_mask_path_in_float32():
  """Every division and clamp of a bfloat16 network (the renormalisation ratio and the mask update;
  the activations have none) is computed in float32."""
  model = models.PUNet(depth=3, features=(8, 8, 8), dtype=jnp.bfloat16)
  images, masks = small_inputs(size=16)
  variables = model.init(jax.random.key(5), images, masks)
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images, masks, train=True, mutable=True))(
    variables
  )

  def equations(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      for sub in jax.core.jaxprs_in_params(eqn.params):
        yield from equations(sub)

  found = [e for e in equations(jaxpr.jaxpr) if e.primitive.name in ("div", "clamp")]
  assert len(found) >= 2 * 6  # A ratio and a mask update in each of the 6 layers.
  assert {str(v.aval.dtype) for e in found for v in e.outvars} == {"float32"}
  assert any(e.outvars[0].aval.dtype == jnp.bfloat16 for e in equations(jaxpr.jaxpr))


@pytest.mark.parametrize(
  "image_shape,mask_shape,match",
  [
    ((1, 300, 200, 3), (1, 300, 200, 1), "multiples of 128 .* got 300x200.* pad it to 384x256"),
    ((1, 256, 256, 3), (1, 256, 128, 1), "masks must be NHWC"),
    ((1, 256, 256, 3), (1, 256, 256, 2), "1 or 3 channels"),
    ((256, 256, 3), (256, 256, 1), "images must be NHWC"),
  ],
)
def test_bad_inputs_are_explained(image_shape, mask_shape, match):
  model = models.PUNet()
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(image_shape), jnp.zeros(mask_shape))
    )


def test_create_model_from_config_dict():
  model = models.create_model(
    {"depth": 8, "features": None, "kernel_sizes": None, "partial": False, "dtype": "bfloat16"}
  )
  assert (
    model.depth == 8
    and not model.partial
    and model.dtype == jnp.bfloat16
    and model.size_multiple == 256
  )


def test_variants_keep_the_paper_network_by_default_and_change_its_variables():
  image, mask = jnp.zeros((1, 16, 16, 3)), jnp.ones((1, 16, 16, 1))

  def variables(**variant):
    model = models.PUNet(depth=2, features=(4, 8), kernel_sizes=(3, 3), **variant)
    return flax.traverse_util.flatten_dict(
      jax.eval_shape(model.init, jax.random.key(0), image, mask)
    )

  paper = variables()
  # The config's defaults are PUNet's: a checkpoint without variant fields is the paper's network.
  assert models.architecture({"depth": 7}) == models.architecture(default.get_config().model)
  biases = {p[:-1] for p in paper if p[-1] == "bias" and p[-2] == "conv"}
  assert biases == {("params", "decoder", "block_1", "conv")}
  keras = variables(conv_bias="all", head=True, hole_bias=True)
  assert ("params", "head", "kernel") in keras and (
    "params",
    "encoder",
    "block_1",
    "conv",
    "bias",
  ) in keras
  jacob = variables(conv_bias="without_bn", first_bn=True)
  assert ("batch_stats", "encoder", "block_1", "bn", "mean") in jacob
  assert ("params", "encoder", "block_1", "conv", "bias") not in jacob
  with pytest.raises(ValueError, match="channel_order must be one of"):
    variables(channel_order="RBG")
