"""A live demo in the browser: `python -m asd_jax.demo` (see `asd_jax/demo/__main__.py`).

`engine` generates (the causal chunk sampler streaming each chunk to the streaming VAE decode or the
toy world's rendering), `server` serves the page in `static/` and pushes the frames over a WebSocket.
"""
