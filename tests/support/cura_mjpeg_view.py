"""Show an MJPEG stream with Cura 4.13's own camera widget, headless.

    python cura_mjpeg_view.py URL FRAMES TIMEOUT

Cura's Monitor tab shows the printer camera with
cura/PrinterOutput/NetworkMJPGImage.py, a QQuickPaintedItem that cuts JPEG
frames out of the byte stream.  It needs a QGuiApplication, which cannot
share a process with the QCoreApplication of cura_client: hence this
separate script.  Prints one JSON line: the decoded frames' sizes and the
centre pixel of each.
"""
import json
import sys
import time

from PyQt5.QtGui import QGuiApplication


def main():
    url, frames, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    app = QGuiApplication([sys.argv[0], "-platform", "offscreen"])
    import cura_client
    cura_client.load()   # Cura's import path, with this application
    from PyQt5.QtCore import QCoreApplication, QEventLoop, QUrl
    from cura.PrinterOutput.NetworkMJPGImage import NetworkMJPGImage

    seen = []

    class Viewer(NetworkMJPGImage):
        # update() is what the widget calls after each decoded frame
        def update(self, *args):
            img = self._image
            if not img.isNull():
                c = img.pixelColor(img.width() // 2, img.height() // 2)
                seen.append([img.width(), img.height(),
                             [c.red(), c.green(), c.blue()]])
            return NetworkMJPGImage.update(self, *args)

    view = Viewer()
    view.setSourceURL(QUrl(url))
    view.start()
    deadline = time.monotonic() + timeout
    while len(seen) < frames and time.monotonic() < deadline:
        QCoreApplication.processEvents(QEventLoop.AllEvents, 50)
        time.sleep(0.01)
    view.stop()
    QCoreApplication.processEvents(QEventLoop.AllEvents, 50)
    print(json.dumps({"frames": seen}))
    del app


if __name__ == "__main__":
    main()
