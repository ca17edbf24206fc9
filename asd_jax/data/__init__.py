"""Prompt datasets: build them from a prompts file (`python -m asd_jax.data.build`), read them with
`PromptDataset`, and draw training batches with the stateless `batch_indices`."""

from asd_jax.data.prompts import DatasetError
from asd_jax.data.prompts import PromptDataset
from asd_jax.data.prompts import WAN_NEGATIVE_PROMPT
from asd_jax.data.prompts import batch_indices
from asd_jax.data.prompts import epoch_permutation
from asd_jax.data.prompts import open_dataset

__all__ = ["DatasetError", "PromptDataset", "WAN_NEGATIVE_PROMPT", "batch_indices",
           "epoch_permutation", "open_dataset"]
