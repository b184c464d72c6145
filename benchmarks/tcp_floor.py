"""The floor of any HTTP upload on this machine: a bare TCP receiver.

Run as a child process by bench.py: accepts one connection, receives SIZE
bytes with recv_into (1 MiB buffer), writes them to PATH with os.write,
fsyncs, answers "ok".  No HTTP, no multipart parsing: what is left is the
loopback TCP copy plus the page-cache write and the fsync that any receiver
has to pay, whatever its language.
"""
import os
import socket
import sys


def main():
    size, path = int(sys.argv[1]), sys.argv[2]
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    conn, _ = ls.accept()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    left = size
    while left:
        n = conn.recv_into(view[:min(len(buf), left)])
        if not n:
            break
        os.write(fd, view[:n])
        left -= n
    os.fsync(fd)
    os.close(fd)
    conn.sendall(b"ok")
    conn.close()


if __name__ == "__main__":
    main()
