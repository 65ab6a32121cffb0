"""A server that cannot start leaves nothing behind: in-process, through fedsock.server.run_server."""

from __future__ import annotations

import socket

import pytest
import torch

from fedsock.config import ServerConfig
from fedsock.console import UsageError
from fedsock.prepare import load_initial_model
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


def test_an_empty_initial_model_says_what_is_wrong_with_it(tmp_path):
    """torch.load's EOFError has no text: the line must not end in "EOFError: " with nothing after it."""

    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(UsageError) as caught:
        load_initial_model(str(tmp_path / "model.pt"), {"w": torch.zeros(2)})
    assert str(caught.value).endswith("EOFError: the file ends before the model does"), caught.value
