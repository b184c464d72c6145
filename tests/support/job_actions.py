"""Jobs through the module's HTTP API, as the real-Klippy tests use them: a
job by name, waiting for a job, a job action, and a console macro that
holds Klippy's G-code queue."""
import time

import httpc
from httpc import JOBS, jobs


def by_name(js):
    return {j["name"]: j for j in js}


def job(base, name):
    return by_name(jobs(base)).get(name)


def wait_job(base, name, pred, timeout=20., what=None):
    return httpc.wait_for(lambda: (lambda j: j if j and pred(j) else None)(
        job(base, name)), timeout, what or "%s" % (name,))


def action(base, uuid, what):
    return httpc.request(base, "PUT", "%s/%s/action" % (JOBS, uuid),
                         json_body={"action": what})


def hold_gcode_queue(k, seconds):
    """A console macro that holds the G-code queue (sent, not waited for)."""
    k.api.send("gcode/script", {"script": "TEST_SLEEP S=%g" % (seconds,)})
    time.sleep(0.3)
