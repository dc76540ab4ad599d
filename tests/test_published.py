"""Every published PConv U-Net layout: random weights saved in its project's own container and
names, converted, and run against an independent reference of that project's forward pass and
inference (tests/published_references.py): float64 to 1e-7 (jacobaustin123 1e-6), and the CLI +
`Inpainter` path in float32 within 1e-4 relative and one grey level of the project's own
composite."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_config

from pconv_jax import checkpoints, convert, evaluate, images, models, published, train
from pconv_jax.inpaint import Inpainter

torch = pytest.importorskip("torch")
import published_references as references  # noqa: E402  (imports torch)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
DEPTH7 = ((8, 16, 16, 24, 24, 24, 24), (7, 5, 5, 3, 3, 3, 3))
DEPTH8 = ((8, 16, 16, 24, 24, 24, 24, 24), (7, 5, 5, 3, 3, 3, 3, 3))
# Project -> (reference factory, widths and kernel sizes, image size, file name).
SOURCES = {
  "naoto": (references.naoto, DEPTH7, 128, "1000000.pth"),
  "mmagic": (references.mmagic, DEPTH7, 128, "pconv_stage2_places.pth"),
  "jacob": (references.jacob, DEPTH8, 256, "parameters.pt"),
  "keras": (references.keras, DEPTH8, 256, "pconv_imagenet.26-1.07.h5"),
}


def save_in_project_format(net, source: str, path) -> None:
  """As each project writes its weights."""
  if source == "naoto":  # util/io.py's save_ckpt.
    optimizer = torch.optim.Adam(net.parameters())
    torch.save(
      {"n_iter": 1000000, "model": net.state_dict(), "optimizer": optimizer.state_dict()}, path
    )
  elif source == "mmagic":  # mmcv's save_checkpoint: the inpaintor's state dict and a meta dict.
    meta = {
      "mmedit_version": "0.4.0",
      "iter": 500000,
      "config": "model = dict(type='PConvInpaintor')",
    }
    # The inpaintor also holds its perceptual loss's VGG-16, which is not part of the network.
    vgg = {"loss_percep.vgg.vgg_layers.0.weight": torch.zeros(64, 3, 3, 3)}
    torch.save({"meta": meta, "state_dict": net.state_dict() | vgg}, path)
  elif source == "jacob":  # train.py saves nn.DataParallel's state dict.
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
  else:
    references.save_keras_h5(net, path)


def make(source: str, tmp_path, seed: int = 0):
  """(weight file, reference, image size) of random weights in `source`'s format."""
  factory, (features, kernel_sizes), size, name = SOURCES[source]
  net, reference = factory(features, kernel_sizes, seed)
  path = tmp_path / name
  save_in_project_format(net, source, path)
  return path, reference, size


def photos(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Two uint8 images (smooth, like photos) and their holes (a block; a corner and a stroke)."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.float64)
  pics = np.stack([np.kron(c, np.ones((size // 8, size // 8, 1))) for c in coarse])
  pics = np.clip(pics + rng.normal(0, 12, pics.shape), 0, 255).astype(np.uint8)
  holes = np.zeros((2, size, size), bool)
  holes[0, size // 4 : size // 2, size // 8 : 3 * size // 4] = True
  holes[1, size // 2 :, : size // 3] = True
  holes[1, size // 8 : size // 8 + 6, :] = True
  return pics, holes


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_float64_conversion_is_exact(source, tmp_path):
  """jacobaustin123's encoder renormalises a one-channel mask, `k*k / (count + 1e-8)`, where
  PUNet's layer computes `Cin*k*k / (Cin*count + 1e-8)`: eps weighs Cin times less. Near big holes
  (count 4 of 49) and amplified through 16 layers that moves a few outputs by up to 3.3e-7; every
  other layout agrees to 1e-7."""
  path, reference, size = make(source, tmp_path, seed=1)
  pics, holes = photos(size, seed=1)
  want, _ = reference.run(pics, holes)
  container, arrays = convert.read_weights(path)
  layout, config, variables = convert.convert_weights(arrays, container, dtype=np.float64)
  assert layout.name == source
  with jax.enable_x64(True):
    model = models.create_model(config | {"dtype": "float64"})
    valid = (~holes)[..., None].astype(np.float64)
    got = jax.jit(model.apply)(variables, pics / 127.5 - 1.0, valid)
    assert got.dtype == jnp.float64
  assert np.std(want) > 0.05  # Outputs vary: the comparison is informative.
  np.testing.assert_allclose(
    np.asarray(got), want, rtol=0, atol=1e-6 if source == "jacob" else 1e-7
  )


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_cli_conversion_inpaints_like_the_project(source, tmp_path, capsys):
  """`python -m pconv_jax.convert FILE OUT` (its `main`; test_cli_errors_are_one_line starts the
  module itself) with no other flag, then `Inpainter.from_checkpoint`."""
  path, reference, size = make(source, tmp_path)
  out = tmp_path / "checkpoint"
  assert convert.main([str(path), str(out)]) == 0
  assert f"Found the {source} layout" in capsys.readouterr().out
  pics, holes = photos(size)
  want_output, want_composite = reference.run(pics, holes)

  model, variables, meta = checkpoints.load_model(out)
  assert meta["layout"] == source and meta["source_sha256"]
  got_output = np.asarray(
    jax.jit(model.apply)(
      variables, images.to_model_range(pics), (~holes)[..., None].astype(np.float32)
    )
  )
  assert np.abs(got_output - want_output).max() <= 1e-4 * np.abs(want_output).max()

  inpainter = Inpainter.from_checkpoint(out, batch_size=len(pics))
  assert inpainter.training_size == (512 if source == "keras" else 256)
  for pic, hole, want, got in zip(pics, holes, want_composite, inpainter.inpaint_many(pics, holes)):
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    np.testing.assert_array_equal(got[~hole], pic[~hole])
    assert (got[hole] != pic[hole]).any()


def test_keras_layer_numbers_of_a_later_session_are_recognised(tmp_path):
  """Keras numbers layers per session: a model built twice saves p_conv2d_17 ... p_conv2d_32."""
  features, kernel_sizes = DEPTH8
  layers, reference = references.keras(features, kernel_sizes, seed=2, first=17)
  references.save_keras_h5(layers, tmp_path / "weights.h5")
  pics, holes = photos(256, seed=2)
  want, _ = reference.run(pics, holes)
  container, arrays = convert.read_weights(tmp_path / "weights.h5")
  assert "p_conv2d_17/img_kernel" in arrays
  _, config, variables = convert.convert_weights(arrays, container)
  got = models.create_model(config).apply(
    variables, images.to_model_range(pics), (~holes)[..., None].astype(np.float32)
  )
  assert np.abs(np.asarray(got) - want).max() <= 1e-4 * np.abs(want).max()


def test_a_forced_source_of_the_other_container_is_refused(tmp_path):
  path, _, _ = make("naoto", tmp_path)
  container, arrays = convert.read_weights(path)
  with pytest.raises(published.ConversionError, match="reads keras files, not torch"):
    convert.convert_weights(arrays, container, source="keras")
  with pytest.raises(
    published.ConversionError, match="layout of open-mmlab.*such as .'dec_1.conv.input_conv"
  ):
    convert.convert_weights(arrays, container, source="mmagic")


def test_a_mask_kernel_that_is_not_all_ones_is_refused(tmp_path):
  net, _ = references.naoto(*DEPTH7)
  state = net.state_dict()
  state["enc_3.conv.mask_conv.weight"][0, 0, 0, 0] = 0.5
  with pytest.raises(
    published.ConversionError, match="enc_3.conv.mask_conv.weight is not all ones"
  ):
    convert.convert_weights(published.clean(state), "torch")


def test_cli_errors_are_one_line(tmp_path):
  (tmp_path / "notes.txt").write_text("not weights")
  for args, message in [
    ([str(tmp_path / "missing.pth"), str(tmp_path / "out")], "no such file"),
    (
      [str(tmp_path / "notes.txt"), str(tmp_path / "out")],
      "cannot be read as a PyTorch state dict",
    ),
    (["fetch", "keras-imagenet"], "on Google Drive"),
  ]:
    result = subprocess.run(
      [sys.executable, "-m", "pconv_jax.convert", *args], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_fetch_verifies_the_published_hash_prefix_and_converts_once(tmp_path, monkeypatch):
  monkeypatch.setenv("PCONV_JAX_CACHE", str(tmp_path / "cache"))
  path, _, _ = make("mmagic", tmp_path)
  url = path.as_uri()
  with pytest.raises(published.ConversionError, match="checksum mismatch"):
    convert.fetch("mmagic-places", url=url)  # Not the file whose SHA-256 starts 1ffed0e8.
  with pytest.raises(published.ConversionError, match="cannot reach it, download .* --url file:"):
    convert.fetch("mmagic-places", url=(tmp_path / "absent.pth").as_uri())
  with pytest.raises(published.ConversionError, match="at least the first 8"):
    convert.fetch("mmagic-places", url=url, sha256="1ffe")
  assert not list((tmp_path / "cache").rglob("*.pth*"))
  digest = convert.weights.file_digests(path)["sha256"]
  layout, saved = convert.fetch("mmagic-places", url=url, sha256=digest[:12])
  assert layout.name == "mmagic" and saved == tmp_path / "cache" / "models" / "mmagic-places" / "0"
  _, _, meta = checkpoints.load_model(saved.parent)
  assert meta["published_model"] == "mmagic-places" and meta["source_sha256"] == digest
  assert meta["source"] == url
  # Fetched before: the checkpoint is returned, nothing is downloaded.
  assert convert.fetch("mmagic-places") == (layout, saved)


def test_finetune_stage_from_a_converted_checkpoint(tmp_path):
  config = tiny_config.get_config()
  net, _ = references.mmagic(config.model.features, (7, 5, 5))
  save_in_project_format(net, "mmagic", tmp_path / "tiny.pth")
  layout, _ = convert.convert_file(tmp_path / "tiny.pth", tmp_path / "converted")
  config.stages.update(initial_steps=3, finetune_steps=2)
  config.stages.finetune_from = str(tmp_path / "converted")
  with pytest.raises(train.ConfigError) as info:
    train.train_and_evaluate(config, tmp_path / "refused")
  message = str(info.value)
  for flag in (
    "--config.model.output_activation=linear",
    "--config.model.conv_bias=without_bn",
    "--config.model.channel_order=BGR",
  ):
    assert flag in message
  config.model.update(layout.variant)
  state = train.train_and_evaluate(config, tmp_path / "stage2")
  assert int(state.step) == 5
  _, variables, meta = checkpoints.load_model(tmp_path / "stage2" / "checkpoints")
  assert meta["stage"] == "finetune" and meta["model"]["channel_order"] == "BGR"
  assert np.isfinite(jax.tree.leaves(variables)[0]).all()


def test_evaluation_of_a_converted_checkpoint_names_its_source(tmp_path):
  config = tiny_config.get_config()
  net, _ = references.mmagic(config.model.features, (7, 5, 5))
  save_in_project_format(net, "mmagic", tmp_path / "tiny.pth")
  convert.convert_file(tmp_path / "tiny.pth", tmp_path / "converted")
  config.eval.update(num_images=None, masks_per_bin=2, batch_size=8, baselines=("mean_fill",))
  config.eval.inception = False
  results = evaluate.evaluate(config, tmp_path / "eval", checkpoint=tmp_path / "converted")
  assert {row["method"] for row in results["rows"]} == {evaluate.MODEL_METHOD, "mean_fill"}
  assert any("open-mmlab/mmagic (mmediting)'s (" in note for note in results["notes"])
