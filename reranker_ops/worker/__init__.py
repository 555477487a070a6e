"""What runs in MOSEC's processes: its main process (app), the score worker (score) and the scoring path
(engine: tokenize, plan micro-batches, run OpenVINO). Imports MOSEC, OpenVINO, tokenizers and numpy, and from
this package only ``protocol``: nothing of the supervisor's."""
