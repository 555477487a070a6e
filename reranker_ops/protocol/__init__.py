"""What both sides of the process boundary share, standard library only: the public API's shapes (api, openapi),
the private wire format between the gate and the score worker (envelope), a generation's configuration
(genconfig), the workers' heartbeats and a variant's manifest. Nothing here imports the supervisor's HTTP side or
MOSEC, OpenVINO or numpy."""
