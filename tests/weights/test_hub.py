"""Named downloads: cache hits, checksum checks, resume, offline errors (local HTTP server only)."""

import hashlib
import os
import http.server
import threading
from functools import partial

import pytest

from teal_cli.weights import hub
from teal_cli.errors import DownloadError


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    payload = bytes(range(256)) * 4096  # 1 MiB
    (root / "w.bin").write_bytes(payload)
    handler = partial(_RangeHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", payload
    httpd.shutdown()


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        rng = self.headers.get("Range")
        if not rng:
            return super().do_GET()
        start = int(rng.split("=")[1].rstrip("-"))
        data = open(self.translate_path(self.path), "rb").read()[start:]
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_download_verify_cache_and_resume(server, monkeypatch):
    url, payload = server
    monkeypatch.delenv("TEAL_OFFLINE")
    digest = hashlib.sha256(payload).hexdigest()
    f = hub.HubFile(url + "/w.bin", digest, "test")
    part = hub.cached_path(f).with_name("w.bin.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(payload[:1000])  # an interrupted earlier download
    seen = []
    path = hub.fetch(f, progress=lambda done, total: seen.append((done, total)))
    assert path.read_bytes() == payload and not part.exists()
    assert seen[-1] == (len(payload), len(payload)) and seen[0][0] > 1000
    monkeypatch.setenv("TEAL_OFFLINE", "1")
    assert hub.fetch(f) == path  # cached: no network needed


def test_bad_checksum_is_not_kept(server, monkeypatch):
    url, _ = server
    monkeypatch.delenv("TEAL_OFFLINE")
    f = hub.HubFile(url + "/w.bin", "0" * 64, "test")
    with pytest.raises(DownloadError, match="expected 0000"):
        hub.fetch(f)
    assert not hub.cached_path(f).exists()


def test_offline_error_names_url_and_destination():
    f = hub.HubFile("https://example.invalid/x/model.ckpt", "", "vqgan-x")
    with pytest.raises(DownloadError) as exc:
        hub.fetch(f)
    message = str(exc.value)
    assert "https://example.invalid/x/model.ckpt" in message and str(hub.cached_path(f)) in message


def test_corrupted_cached_file_detected(tmp_path):
    f = hub.HubFile("https://example.invalid/a.bin", hashlib.sha256(b"good").hexdigest(), "t")
    path = hub.cached_path(f)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"evil")
    with pytest.raises(DownloadError, match="sha256 is"):
        hub.fetch(f)


def test_a_verified_file_is_not_hashed_again(monkeypatch):
    """The digest goes to teal's one hash cache (digests.json), not a marker beside the file:
    a later process (here: the in-process memo cleared) only stats the file."""
    from teal_cli.weights import digests

    payload = os.urandom((1 << 20) + 17)  # the cache keeps files of 1 MiB and more
    f = hub.HubFile("https://example.invalid/big.bin", hashlib.sha256(payload).hexdigest(), "t")
    path = hub.cached_path(f)
    path.parent.mkdir(parents=True)
    path.write_bytes(payload)
    assert hub.fetch(f) == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["big.bin"]
    monkeypatch.setattr(digests, "_DIGESTS", {})
    monkeypatch.setattr(digests, "sha256sum", lambda p: pytest.fail(f"{p} hashed again"))
    assert hub.fetch(f) == path
