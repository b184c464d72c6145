"""A webcam on loopback for the tests, shaped like ustreamer (crowsnest) or
mjpg-streamer: /?action=stream sends multipart/x-mixed-replace JPEG frames,
/?action=snapshot one JPEG.  StreamReader views a relayed stream frame by
frame."""
import http.client
import http.server
import threading
import time

BOUNDARY = "boundarydonotcross"
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]


def jpeg(rgb, size=(64, 48)):
    """A real JPEG of one colour (Qt's encoder; no GUI needed)."""
    from PyQt5.QtCore import QBuffer, QByteArray, QIODevice
    from PyQt5.QtGui import QColor, QImage
    img = QImage(size[0], size[1], QImage.Format_RGB32)
    img.fill(QColor(*rgb))
    data = QByteArray()
    buf = QBuffer(data)
    buf.open(QIODevice.WriteOnly)
    assert img.save(buf, "JPG", 95)
    return bytes(data)


class MjpegSource:
    """A webcam server on loopback: /?action=stream sends frames every
    `interval` s (after `gate` is set, for all but the first), and
    /?action=snapshot one frame.  Counts the stream connections open."""

    def __init__(self, interval=0.05, size=(64, 48)):
        self.frames = [jpeg(c, size) for c in COLORS]
        self.interval = interval
        self.gate = threading.Event()
        self.gate.set()
        self.open_streams = 0
        self.total_streams = 0
        self.lock = threading.Lock()
        source = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.endswith("action=snapshot"):
                    data = source.frames[0]
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if not self.path.endswith("action=stream"):
                    self.send_error(404)
                    return
                with source.lock:
                    source.open_streams += 1
                    source.total_streams += 1
                try:
                    self.send_response(200)
                    self.send_header("Content-Type",
                                     "multipart/x-mixed-replace;boundary="
                                     + BOUNDARY)
                    self.end_headers()
                    i = 0
                    while True:
                        frame = source.frames[i % len(source.frames)]
                        self.wfile.write(
                            b"--%s\r\nContent-Type: image/jpeg\r\n"
                            b"Content-Length: %d\r\n\r\n%s\r\n"
                            % (BOUNDARY.encode(), len(frame), frame))
                        self.wfile.flush()
                        i += 1
                        source.gate.wait()
                        time.sleep(source.interval)
                except OSError:
                    pass   # the viewer left
                finally:
                    with source.lock:
                        source.open_streams -= 1

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       daemon=True)
        self.thread.start()

    def url(self, action="stream"):
        return "http://127.0.0.1:%d/?action=%s" % (self.port, action)

    def close(self):
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


class StreamReader:
    """A viewer of the module's stream: reads multipart parts by their
    Content-Length."""

    def __init__(self, base, path="/?action=stream"):
        port = int(base.rsplit(":", 1)[1])
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()

    def frame(self):
        fp = self.resp
        line = fp.readline()
        while line.strip() == b"":
            line = fp.readline()
        assert line.strip() == b"--" + BOUNDARY.encode(), line
        headers = {}
        while True:
            line = fp.readline().strip()
            if not line:
                break
            k, v = line.decode().split(":", 1)
            headers[k.strip().lower()] = v.strip()
        return fp.read(int(headers["content-length"]))

    def close(self):
        # the response holds the socket (the connection let go of it)
        self.resp.close()
        self.conn.close()
