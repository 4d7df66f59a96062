"""A live feed over HTTP, beside the TCP/UDP/RTSP ones of test_streamer_live.py: FFmpeg serves
MPEG-TS on 127.0.0.1 (``-listen 1``), the streamer's real ``run`` loop reads the ``http://`` URL
and produces windows, keeps producing them after the server is killed and started again, and
counts an HTTP error answer (404) as a failed connect that it retries without falling over.

Every wait is "until it happened, or a generous deadline": nothing depends on how fast the
machine is, only on the feed eventually flowing."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import zmq

import streamer.service as streamer_service
from reliev3r.config import free_port
from streamer.live import is_live, live_name, open_options
from streamer_media import encode, panning_frames
from tests.helpers_live import LIVE, Labeler, Server, kill_restart_and_check, needs_ffmpeg, pump_until


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    # Keyframe every 5 frames, as for the other live feeds: a reconnecting reader finds one soon.
    return encode(tmp_path_factory.mktemp("http") / "pan.mp4", panning_frames(40, 160, 120, step=3), gop=5)


def test_http_url_is_a_live_source_with_timeouts():
    url = "http://127.0.0.1:8080/stream"
    assert is_live(url) and is_live("https://cam.local/live.ts")
    opts, fmt = open_options(url, 1.5)
    assert opts == {"rw_timeout": "1500000", "timeout": "1500000"} and fmt is None
    assert ":" not in live_name(url) and live_name(url) != live_name("http://127.0.0.1:8081/stream")


@needs_ffmpeg
def test_mpegts_over_http_server_killed_and_restarted(stream_cfg, stage, clip):
    port = free_port()
    url = f"http://127.0.0.1:{port}/stream"
    server = Server(["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip),
                     "-c", "copy", "-f", "mpegts", "-listen", "1", url])
    kill_restart_and_check(stream_cfg, stage, url, server)


class _NotFound(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_error(404, "no such stream")

    def log_message(self, *args):
        pass


def test_http_404_is_a_failed_connect_that_is_retried(tmp_path, stream_cfg, stage):
    """An HTTP server that answers 404: each attempt is counted as connect_failed, reconnects
    back off, and an archive source beside it keeps flowing."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/stream"
    archive = encode(tmp_path / "a.mp4", panning_frames(30, 96, 64))
    ctx = zmq.Context()
    cfg = stream_cfg([url, archive], streamer={**LIVE, "height": 32, "width": 48, "loop": False})
    streamer = stage(streamer_service.run, cfg, "streamer")
    labeler = Labeler(ctx, cfg)
    name = live_name(url)
    try:
        failed = lambda: streamer.metric("reliev3r_decode_errors_total", {"source": name, "reason": "connect_failed"})
        assert pump_until(labeler, lambda: failed() >= 2 and len(labeler.windows) >= 5)
        assert streamer.metric("reliev3r_stream_reconnects_total", {"source": name}) >= 1
        assert all(m.meta["source"] != name for _, m in labeler.windows)
        assert streamer.metric("reliev3r_stream_connected", {"source": name}) == 0
        assert streamer.thread.is_alive()
    finally:
        streamer.stop()
        labeler.sock.close(linger=0)
        ctx.destroy(linger=0)
        server.shutdown()
        server.server_close()
