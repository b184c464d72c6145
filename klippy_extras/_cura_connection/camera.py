# Camera: Cura's camera view, proxied from the printer's webcam.
#
# An MJPEG stream or a snapshot fetched from camera_url, in the request
# thread of Klippy's process that asked (the front hands the camera over).
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import http.client
import socket
import threading
import urllib.parse

from .api import Payload
from .errors import Busy, CameraFailed, CameraTimeout, NotFound
from .gcode_meta import image_type
from .limits import MAX_PREVIEW_SIZE, READ_CHUNK


CAMERA_TIMEOUT = 10.
MAX_CAMERA_STREAMS = 8


def parse_camera_url(url):
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError("'%s' is not an http:// URL" % (url,))
    u.port  # raises ValueError for a bad port
    return url


def camera_snapshot_url(stream_url):
    # mjpg-streamer and ustreamer (crowsnest) take ?action=snapshot
    u = urllib.parse.urlsplit(stream_url)
    query = urllib.parse.parse_qsl(u.query, keep_blank_values=True)
    if ("action", "stream") not in query:
        return None
    query = [(k, "snapshot" if (k, v) == ("action", "stream") else v)
             for k, v in query]
    return urllib.parse.urlunsplit(u._replace(
        query=urllib.parse.urlencode(query)))


class CameraProxy:
    """Relays the webcam: Cura only ever opens
    http://<printer>:8080/?action=stream, which is this server.

    Every viewer gets its own upstream connection, relayed chunk by chunk
    (nothing is buffered), and closed as soon as either side goes away."""
    def __init__(self, stream_url, snapshot_url):
        self.stream_url = stream_url
        self.snapshot_url = snapshot_url
        self.lock = threading.Lock()
        self.streams = 0

    def _open(self, url):
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port or 80,
                                          timeout=CAMERA_TIMEOUT)
        target = urllib.parse.urlunsplit(("", "", u.path or "/", u.query,
                                          ""))
        try:
            conn.request("GET", target)
            resp = conn.getresponse()
        except socket.timeout:
            conn.close()
            raise CameraTimeout("The camera at %s did not answer" % (url,))
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise CameraFailed("Cannot reach the camera at %s: %s"
                               % (url, e))
        if resp.status != 200:
            conn.close()
            raise CameraFailed("The camera at %s answered HTTP %d"
                               % (url, resp.status))
        return conn, resp

    def snapshot(self):
        if not self.snapshot_url:
            raise NotFound("No camera snapshot URL: set camera_snapshot_url")
        conn, resp = self._open(self.snapshot_url)
        try:
            data = resp.read(MAX_PREVIEW_SIZE + 1)
        except (OSError, http.client.HTTPException) as e:
            raise CameraFailed("Camera snapshot failed: %s" % (e,))
        finally:
            conn.close()
        if len(data) > MAX_PREVIEW_SIZE:
            raise CameraFailed("Camera snapshot over %d MiB"
                               % (MAX_PREVIEW_SIZE >> 20,))
        return Payload(data, resp.getheader("Content-Type")
                       or image_type(data))

    def stream(self, req):
        with self.lock:
            if self.streams >= MAX_CAMERA_STREAMS:
                raise Busy("Already %d camera viewers" % (self.streams,))
            self.streams += 1
        try:
            conn, resp = self._open(self.stream_url)
            req.close_connection = True
            try:
                req.send_response(200)
                req.send_header("Content-Type", resp.getheader(
                    "Content-Type", "multipart/x-mixed-replace"))
                req.send_header("Cache-Control", "no-store")
                req.send_header("X-Accel-Buffering", "no")  # nginx
                req.send_header("Connection", "close")
                req.end_headers()
                while True:
                    data = resp.read1(READ_CHUNK)
                    if not data:
                        break
                    req.wfile.write(data)
            except (OSError, http.client.HTTPException):
                pass   # the viewer or the camera went away
            finally:
                conn.close()
        finally:
            with self.lock:
                self.streams -= 1
        return None, None
