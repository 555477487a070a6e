"""The models the tests and the benchmarks build for themselves, outside the product: a random BERT
cross-encoder of any shape (``synthetic``: the tests' tiny one, and one with DiTy's exact shape for speed and
memory), and a small one trained here on a task with a real ranking signal (``trained``: the one precision and
tokenization are judged on)."""
