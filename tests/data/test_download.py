"""python -m gunn.data: its help, and a download that cannot finish (no network: only 127.0.0.1 is used)."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading

import pytest

from gunn.data.__main__ import main, parser


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once the socket is closed


@contextlib.contextmanager
def _serving(body: bytes):
    """An HTTP server on 127.0.0.1 that answers every GET with ``body`` (not a CIFAR archive)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_help_is_plain_text(capsys):
    assert "``" not in parser().format_help()
    for command in ("download", "verify"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "``" not in capsys.readouterr().out


def test_a_download_without_network_says_why_in_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/cifar-10-python.tar.gz"
    monkeypatch.setattr("torchvision.datasets.CIFAR10.url", url)
    root = tmp_path / "data" / "cifar"
    assert main(["download", "cifar10", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: could not download cifar10 from {url}: ") and "refused" in err, err
    assert not (tmp_path / "data").exists()  # the folders it made are gone again


def test_a_broken_download_into_an_existing_folder_removes_only_what_it_wrote(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    with _serving(b"not a CIFAR archive") as server:
        url = f"{server}/cifar-100-python.tar.gz"
        monkeypatch.setattr("torchvision.datasets.CIFAR100.url", url)
        assert main(["download", "cifar100", "--root", str(root)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]  # after torchvision's progress bar
    assert err.startswith(f"error: could not download cifar100 from {url}: ") and "corrupted" in err, err
    assert sorted(p.name for p in root.iterdir()) == ["keep.txt"]  # the corrupt archive was removed
