"""A server that cannot start leaves nothing behind: in-process, through fedsock.server.run_server."""

from __future__ import annotations

import socket

import pytest

from fedsock.config import ServerConfig
from fedsock.console import UsageError
from fedsock.server import run_server


def test_a_port_in_use_fails_before_the_output_folder_is_made(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ServerConfig(model="logreg", server_port=port, output_dir=str(tmp_path / "run"))
        with pytest.raises(UsageError, match=rf"port {port} on 127\.0\.0\.1 is already in use"):
            run_server(config, None)
    assert not (tmp_path / "run").exists()  # not a folder holding only config.json
