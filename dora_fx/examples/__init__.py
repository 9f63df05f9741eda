"""Small PEFT DoRA example models with random weights (:mod:`.models`) and the demo (:mod:`.demo`), for
the tests, the benchmarks and a new user's first run. The backend and its ops never import them."""
