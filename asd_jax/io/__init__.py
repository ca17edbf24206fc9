"""Checkpoint file IO that streams tensor by tensor: safetensors, torch pickles, staged Orbax saves."""
