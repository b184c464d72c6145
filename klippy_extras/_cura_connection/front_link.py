# Klippy's side of the front process.
#
# Starts the child with the listening socket, publishes the replies it
# answers with (a publisher thread that looks for changes: the reactor
# does no work for it), answers its calls (reservations, queueing an
# upload), takes the connections it hands over, and notices its end.
# Threads of its own; G-code commands wait for it in wait_shown().
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

from .api import JOB_REPLY_KEY, ReplyCache
from .errors import BadInput, CuraError, error_status
from .frames import FrameReader, IP_MARK, package_stamp, send_frame
from .jobs import JOB_FIELDS
from .storage import remove_stale_temp_files


# How long a G-code command waits for the front to show its change (s)
FRONT_SHOW_LIMIT = 0.5


# How often the publisher looks for a new snapshot or a change of jobs or
# loaded materials (s); a change a request made is published before its
# reply
PUBLISH_CHECK = 0.02
# A front that acknowledges nothing for this long is ended as lost (s)
FRONT_HANG_LIMIT = 15.
FRONT_START_LIMIT = 60.     # the same, for its first answer


class MarkRequest:
    """Stands for every client while /printers is published."""
    @staticmethod
    def reachable_ip():
        return IP_MARK


class FrontLink:
    """Klippy's side of the front process: starts it with the listening
    socket, keeps its replies current and takes the connections it hands
    over.  Threads: publisher (encodes what changed after each status
    snapshot, job change and request that changed something), control
    reader (acks, log lines, the child's end), handover (connections into
    server).  The reactor does nothing for it."""
    def __init__(self, server, api, settings, on_lost):
        self.server = server
        self.api = api
        self.on_lost = on_lost
        self.closing = False
        self.cond = threading.Condition()
        self.asked = self.acked = 0    # sync() rounds asked / published
        self.wake_event = threading.Event()
        self.sent = {}                 # key -> the bytes the child has
        self.list_keys = {}            # job list -> (store version, ...)
        self.materials = (None, b"")   # (materials version, list reply)
        self.send_lock = threading.Lock()
        # The child's uploads in flight, reserved in Klippy's intake (one
        # reservation of queue room and disk space for the whole module)
        self.reserved = {}             # token -> Upload
        self.tokens = iter(range(1, 1 << 62))
        ctl, child_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        hand, child_hand = socket.socketpair(socket.AF_UNIX,
                                             socket.SOCK_SEQPACKET)
        listen_fd = server.socket.fileno()
        fds = (listen_fd, child_ctl.fileno(), child_hand.fileno())
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", FRONT_BOOT, PACKAGE_PARENT,
                 str(PACKAGE_STAMP), str(os.getpid())]
                + [str(fd) for fd in fds], pass_fds=fds,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finally:
            child_ctl.close()
            child_hand.close()
        # The child accepts from now on; Klippy's copy of the listening
        # socket goes, so the port is free as soon as the child ends.
        server.socket.close()
        self.ctl, self.hand = ctl, hand
        self.send("settings", json.dumps(settings).encode())
        # (the handover thread first: the control reader joins it when the
        # child ends, which may be at once)
        self.threads = [threading.Thread(target=fn, daemon=True,
                                         name="cura_connection " + name)
                        for fn, name in ((self._take_connections,
                                          "handover"),
                                         (self._publish_loop, "publisher"),
                                         (self._read_control, "control"),
                                         (self._watch, "front watchdog"))]
        self.handover_thread = self.threads[0]
        for t in self.threads:
            t.start()
        logging.info("cura_connection: front process %d answers the polls",
                     self.proc.pid)

    # Any thread
    def send(self, key, payload=b""):
        with self.send_lock:
            send_frame(self.ctl, key, payload)

    def released(self):
        """A connection the child handed over is closed: it leaves the
        child's connection budget."""
        try:
            self.send("released")
        except OSError:
            pass

    def ask(self):
        """Ask for a publication of the state as it is now; returns the
        number to pass to shown()."""
        with self.cond:
            self.asked += 1
            self.wake_event.set()
            return self.asked

    def shown(self, asked):
        """True once the child has publication asked (or is gone)."""
        return self.acked >= asked or self.closing

    def wait_shown(self, reactor):
        """Reactor, a G-code command (it pauses: other timers run): return
        once the child shows what the command changed, so a poll after
        the console's "ok" sees it (at most FRONT_SHOW_LIMIT)."""
        asked = self.ask()
        deadline = reactor.monotonic() + FRONT_SHOW_LIMIT
        while not self.shown(asked) and reactor.monotonic() < deadline:
            reactor.pause(reactor.monotonic() + 0.002)

    def sync(self, timeout=2.):
        """Not the reactor: return once the child has what the state is
        now, so a poll after this reply shows the change it made."""
        mine = self.ask()
        with self.cond:
            self.cond.wait_for(lambda: self.shown(mine), timeout)

    # Publisher thread
    def _publish_loop(self):
        # Looks for a change every PUBLISH_CHECK (a few attribute reads):
        # the reactor does nothing for the front process
        gen, seen = 0, None
        bridge = self.api.bridge
        states = (self.api.store, self.api.loaded)
        while not self.closing:
            self.wake_event.wait(PUBLISH_CHECK)
            self.wake_event.clear()
            with self.cond:
                asked = self.asked
            now = (bridge.snapshot["seq"], asked) + tuple(
                state.version for state in states)
            if now == seen:
                continue
            seen = now
            gen += 1
            try:
                self._publish(gen, asked)
            except OSError:
                return      # the child is gone: the control reader says so
            except Exception:
                logging.exception("cura_connection: publishing replies")

    # Watchdog thread
    def _watch(self):
        # Now and then a publication asks for an acknowledgement: a child
        # that gives none for FRONT_HANG_LIMIT (stopped, or its control
        # thread stuck; the publisher may be blocked sending to it) is
        # ended, and the control reader handles it as lost: Klippy's
        # process answers.
        # (its first answer may take longer: a slow core, busy at boot,
        # starting Python at a lower priority)
        probe, probe_at = self.ask(), time.monotonic()
        limit = FRONT_START_LIMIT
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.closing, 1.)
                if self.closing:
                    return
            waited = time.monotonic() - probe_at
            if self.shown(probe):
                limit = FRONT_HANG_LIMIT
                if waited > FRONT_HANG_LIMIT / 3:
                    probe, probe_at = self.ask(), time.monotonic()
            elif waited > limit:
                logging.error("cura_connection: the front process gave no "
                              "answer for %.0f s: ending it", waited)
                try:
                    self.proc.kill()
                except OSError:
                    pass
                return

    def _publish(self, gen, asked):
        gate = self.server.gate
        gated = gate.enter()
        try:
            changed = self._changed_replies(gate.breathe)
        finally:
            if gated:
                gate.leave()
        for key, data in changed:
            self.send(key, data)
        self.send("commit", b"%d %d" % (gen, asked))

    def _changed_replies(self, pause):
        # [(key, bytes)] that differ from what the child has
        api, store = self.api, self.api.store
        out = [("printers", api.printers_reply(MarkRequest)),
               ("queued", b"%d" % (len(store.queue),)),
               ("system", json.dumps(api.get_system(None)[1]).encode()),
               ("materials", self._materials_reply())]
        listed = False
        cur = store.current
        # (the jobs on printers change times without a new store version)
        version = (store.version, cur and JOB_REPLY_KEY(cur),
                   api.jobs_basis()) + tuple(
                       JOB_REPLY_KEY(m.current)
                       for m in list(store.members.values()) if m.current)
        for name, reply in (("print_jobs", api.print_jobs_reply),
                            ("history", api.history_reply)):
            if self.list_keys.get(name) == version:
                continue
            chunks = reply(pause)
            self.list_keys[name] = version
            listed = True
            out += [("%s:%d" % (name, i), c) for i, c in enumerate(chunks)]
            out.append(("%s#" % (name,), b"%d" % (len(chunks),)))
        if listed:
            out += self._job_replies(pause)
        changed = []
        for key, data in out:
            old = self.sent.get(key)
            if old is not data and old != data:
                self.sent[key] = data
                changed.append((key, data))
        return changed

    def _materials_reply(self):
        # The material list, encoded again only once a profile was added
        version = self.api.materials.version
        if self.materials[0] != version:
            try:
                self.materials = (version, json.dumps(
                    self.api.get_materials(None)[1]).encode())
            except OSError:
                return b""     # unreadable: Klippy's side says why
        return self.materials[1]

    def _job_replies(self, pause):
        # Each listed job's own reply (the bytes its list entry was made
        # of) as "job:<uuid>", and "jobs": uuid -> [name, preview file],
        # from the lists just made
        entries = dict(self.api.history_replies.entries)
        entries.update(self.api.replies.entries)
        name, preview = JOB_FIELDS.index("name"), JOB_FIELDS.index("preview")
        index, out = {}, []
        for i, (job_uuid, (key, data)) in enumerate(entries.items()):
            if i and not i % ReplyCache.PAUSE_EVERY:
                pause()
            index[job_uuid] = [key[name], key[preview]]
            out.append(("job:" + job_uuid, data))
        for key in [k for k in self.sent if k.startswith("job:")
                    and k[4:] not in index]:
            del self.sent[key]      # (the child forgets it too)
        out.append(("jobs", json.dumps(index).encode()))
        return out

    # Control reader thread
    def _read_control(self):
        for key, payload in FrameReader(self.ctl).frames():
            if key == "ack":
                with self.cond:
                    self.acked = max(self.acked, int(payload))
                    self.cond.notify_all()
            elif key == "log":
                logging.info("cura_connection: front process: %s",
                             payload.decode("utf-8", "replace"))
            elif key == "call":
                threading.Thread(target=self._answer, args=(payload,),
                                 daemon=True).start()
            elif key == "unreserve":
                self._unreserve(int(payload))
            elif key == "received":
                self._received(*map(int, payload.split()))
        with self.cond:
            lost = not self.closing
            self.closing = True
            self.cond.notify_all()
        if lost:
            try:
                rc = self.proc.wait(5.)
            except subprocess.TimeoutExpired:
                rc = "still running"
            logging.error("cura_connection: the front process ended (%s); "
                          "answering in Klippy's process", rc)
            self._clean_up()
            self.on_lost()

    def _clean_up(self):
        # A lost child's pair ends, its reservations go and its partial
        # uploads are removed (it has been waited for: its pid is free)
        for sock in (self.ctl, self.hand):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.handover_thread.join(2.)
        for sock in (self.ctl, self.hand):
            sock.close()
        with self.cond:
            tokens = list(self.reserved)
        for token in tokens:
            self._unreserve(token)
        gcodes = self.api.intake.gcodes
        for dirname in (gcodes, os.path.join(gcodes, ".thumbs")):
            remove_stale_temp_files(dirname, self.proc.pid)

    def _reserve(self, length):
        upload = self.api.intake.begin(length, lambda: len(
            self.api.store.queue), self.api.max_queue)
        with self.cond:
            if not self.closing:
                token = next(self.tokens)
                self.reserved[token] = upload
                return {"token": token}
        self.api.intake.end(upload)
        raise CuraError("The front process ended")

    def _grow(self, token, n, filename=None):
        # The front's upload unpacks to more than it reserved
        with self.cond:
            upload = self.reserved.get(token)
        if upload is None:
            raise CuraError("No reservation %d" % (token,))
        upload.filename = filename      # (named in a 507)
        self.api.intake.check_room(upload, n)
        with self.api.intake.lock:
            upload.length += n
        return {}

    def _received(self, token, n):
        # how much of the front's upload it has read (and so written)
        with self.cond:
            upload = self.reserved.get(token)
        if upload is not None:
            with self.api.intake.lock:
                upload.received = n

    def _unreserve(self, token):
        with self.cond:
            upload = self.reserved.pop(token, None)
        if upload is not None:
            self.api.intake.end(upload)

    # A thread per call of the child (an upload to queue)
    def _answer(self, payload):
        call = json.loads(payload.decode())
        try:
            if call["op"] == "reserve":
                reply = {"status": 200, "body": self._reserve(
                    **call["args"])}
            elif call["op"] == "grow":
                reply = {"status": 200, "body": self._grow(**call["args"])}
            elif call["op"] == "add_upload":
                # the next poll shows what happened: the new job, or none
                # when it was taken back
                try:
                    reply = {"status": 200, "body": self.api.add_upload(
                        **call["args"])}
                finally:
                    self.sync()
            else:
                raise BadInput("Unknown call %s" % (call["op"],))
        except CuraError as e:
            reply = {"status": error_status(e), "message": e.message}
        except Exception:
            logging.exception("cura_connection: front process call")
            reply = {"status": 500, "message": "Internal error; see "
                     "klippy.log"}
        reply["id"] = call["id"]
        try:
            self.send("answer", json.dumps(reply).encode())
        except OSError:
            pass

    # Handover thread: connections the child passes on, unread
    def _take_connections(self):
        while True:
            try:
                msg, fds, flags, addr = socket.recv_fds(self.hand, 16, 4)
            except OSError:
                return
            if not msg and not fds:
                return
            for fd in fds:
                try:
                    sock = socket.socket(fileno=fd)
                except OSError:
                    os.close(fd)
                    continue
                try:
                    peer = sock.getpeername()
                except OSError:
                    sock.close()
                    self.released()
                    continue
                self.server.process_request(sock, peer, handed=True)

    def close(self):
        """Ends the child (its connections with it) and the threads."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.wake_event.set()
        for sock in (self.ctl, self.hand):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self.proc.wait(2.)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(2.)
        for t in self.threads:
            t.join(2.)
        for sock in (self.ctl, self.hand):
            sock.close()


# Run by FrontLink with Klippy's Python: loads the package's front
# (and what it imports: not the lifecycle, the bridge or this file)
# without Klippy, and serves.  Only if the package's files are still those
# Klippy loaded: after a git pull Klippy keeps the old code until its
# process restarts (RESTART does not re-import), and a front of the new
# code would talk to it; such a front ends at once, quietly, and Klippy's
# process answers (as for any front it lost).
FRONT_BOOT = """import os, sys
sys.path.insert(0, sys.argv[1])
from _cura_connection.frames import package_stamp
if package_stamp(os.path.join(sys.argv[1], "_cura_connection")) \\
        != sys.argv[2]:
    sys.exit(0)
from _cura_connection import front
front.main(*[int(a) for a in sys.argv[3:]])
"""
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
# the package's files as Klippy loaded them (a pull rewrites what changed)
PACKAGE_STAMP = package_stamp(os.path.dirname(os.path.realpath(__file__)))
