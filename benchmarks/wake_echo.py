"""MOSEC with one worker that answers what it is given: ``benchmarks/wake.py``'s echo (its own file because
importing MOSEC parses the command line, ``--help`` included, and MOSEC's spawn finds the worker class by name).

    .venv/bin/python benchmarks/wake_echo.py --port PORT --address 127.0.0.1 [MOSEC's other arguments]
"""

from __future__ import annotations

from mosec import Runtime, Server, Worker


class Echo(Worker):
    def deserialize(self, data: bytes) -> bytes:
        return data

    def serialize(self, data: bytes) -> bytes:
        return data

    def forward(self, data: bytes) -> bytes:
        return data


if __name__ == "__main__":
    server = Server()
    server.register_runtime({"/echo": [Runtime(Echo, num=1, max_batch_size=1)]})
    server.run()
