"""`python -m asd_jax.sample`'s other paths, value for value: a video longer than the KV cache
(--cache_frames / --sink_frames roll the window), --ffe_variant=spread and explicit timestep
lists; the saved latents equal `asd_jax.sampling.generate` called directly with the same seed and
the schedules written out here.

Slow: each run compiles the sampler and the streaming VAE decode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax import sample
from asd_jax.sampling import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  pytest.importorskip("sentencepiece")
  import tiny_parts  # pylint: disable=g-import-not-at-top
  return tiny_parts.model_dir(tmp_path_factory.mktemp("parts"))


PROMPT = "a red cat runs over the lazy fox"
# The 4-step schedule warped with shift 5: t -> 5 t / (1 + 4 t) on t = 1, 0.75, 0.5, 0.25.
WARPED = (1000.0, 937.5, 2500.0 / 3.0, 625.0)


@pytest.mark.parametrize("flags,first,later,cache", [
    # 9 latent frames (3 chunks) through a 6-frame cache keeping 3 sink frames; spread steps.
    (["--ffe_variant=spread", "--steps=2", "--cache_frames=6", "--sink_frames=3"],
     WARPED, (1000.0, WARPED[2]), (6, 3)),
    # explicit lists, on the whole-video cache.
    (["--first_chunk_timesteps=1000,900,500", "--later_chunk_timesteps=950,400"],
     (1000.0, 900.0, 500.0), (950.0, 400.0), (None, 0)),
])
def test_cli_latents_equal_generate_with_the_same_seed(model_dir, tmp_path, flags, first, later,
                                                       cache):
  out = tmp_path / "v.mp4"
  args = sample.parser().parse_args([f"--model_dir={model_dir}", f"--prompt={PROMPT}",
                                     "--num_frames=33", "--height=32", "--width=48",
                                     "--dtype=float32", "--seed=7", f"--output={out}",
                                     "--save_latents", "--quiet", *flags])
  sample.run(args)
  got = np.load(out.with_suffix(".latents.npy"))
  assert got.shape == (9, 4, 6, 4)

  models = sample.load_models(sample.resolve_parts(args), "float32")
  context, _ = models.encoder([PROMPT])
  noise, renoise = sample.video_noise(jax.random.fold_in(jax.random.key(7), 0), (1,) + got.shape)
  want = generate(models.dit, models.dit_params, jnp.asarray(context), noise,
                  first_chunk_timesteps=first, later_chunk_timesteps=later, chunk_frames=3,
                  rng=renoise, cache_frames=cache[0], sink_frames=cache[1])
  np.testing.assert_allclose(got, np.asarray(want)[0], atol=1e-5, rtol=0)
  # The paths matter: the whole-video cache (or the prefix schedule) gives other latents.
  other = generate(models.dit, models.dit_params, jnp.asarray(context), noise,
                   first_chunk_timesteps=WARPED, later_chunk_timesteps=(1000.0,), chunk_frames=3,
                   rng=renoise)
  assert float(np.max(np.abs(got - np.asarray(other)[0]))) > 1e-3
