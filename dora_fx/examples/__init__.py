"""Small PEFT DoRA example models with random weights (:mod:`.models`) and the demo (:mod:`.demo`), for
the tests, the benchmarks and a new user's first run. The backend and its ops never import them."""

EXAMPLES = ("mlp", "llama", "gpt2")
"""The example models' names (:func:`.models.build`), here so that naming them imports no model code."""
