"""Control frames between Klippy's side and the front: they round-trip, and
a frame cut short ends the stream."""
import threading

from _cura_connection.frames import FRAME, FrameReader, send_frame


def test_control_frames_round_trip_and_stop_at_a_cut():
    import socket
    a, b = socket.socketpair()
    sent = [("printers", b"[1]"), ("commit", b"1 0"), ("empty", b""),
            ("big", b"x" * 300000)]
    writer = threading.Thread(target=lambda: [send_frame(a, k, v)
                                              for k, v in sent])
    writer.start()
    reader = FrameReader(b)
    frames = reader.frames()
    got = [next(frames) for _ in sent]
    writer.join()
    assert got == sent
    assert not reader.pending()
    send_frame(a, "more", b"1")
    assert reader.pending() and next(frames) == ("more", b"1")
    a.close()
    assert list(frames) == []
    b.close()
    # a frame cut short (the other process died) ends the stream
    c, d = socket.socketpair()
    c.sendall(FRAME.pack(100, 4) + b"half" + b"z" * 10)
    c.close()
    assert list(FrameReader(d).frames()) == []
    d.close()
