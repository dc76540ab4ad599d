"""pconv_jax: Partial Convolution image inpainting (Liu et al., ECCV 2018) in JAX/Flax."""
