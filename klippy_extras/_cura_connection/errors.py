# Errors, and their HTTP form in one place.
#
# Code outside the HTTP layer (http_server.py, front.py and the request
# handlers of api.py) raises CuraError kinds, never HTTPError; the HTTP
# layer turns any error into its reply with http_error() and error_body().
# Any thread.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import errno
import json


class CuraError(Exception):
    """A request the printer cannot carry out, said in the domain's terms
    (ERROR_STATUS gives each kind its HTTP status)."""
    def __init__(self, message):
        Exception.__init__(self, message)
        self.message = message


class NotFound(CuraError):
    """No such job, printer or file."""


class Conflict(CuraError):
    """Not possible in the current state: nothing was changed."""


class BadInput(CuraError):
    """The request or the file is malformed."""


class TooLarge(CuraError):
    """Over a configured limit (upload size, queue length...)."""


class Unsupported(CuraError):
    """A file type the printer cannot print."""


class NoSpace(CuraError):
    """Not enough free disk space: nothing was kept."""


class Forbidden(CuraError):
    """This client may not do this (monitor-only, not paired, not allowed
    yet)."""


class Untrusted(Forbidden):
    """A client outside trusted_clients: refused before anything is read,
    and its connection closed."""


class Unauthenticated(CuraError):
    """A signature that is missing a known key, wrong or replayed: the
    client must sign again with the fresh challenge (a Digest header)."""
    def __init__(self, message, challenge):
        CuraError.__init__(self, message)
        self.challenge = challenge


class Busy(CuraError):
    """Too many at once (camera viewers): try again later."""


class CameraFailed(CuraError):
    """The camera could not be reached or answered wrongly."""


class CameraTimeout(CameraFailed):
    """The camera did not answer in time."""


class StorageError(CuraError):
    """A file or folder could not be read or written (the message names
    the path and the cause): nothing was kept."""


def storage_error(e, path=None):
    """The CuraError for OSError e on path (default: the one e names):
    NoSpace for a full disk or quota, StorageError for any other cause
    (a missing folder, a read-only file system, a file where a folder
    should be...)."""
    path = path or e.filename
    where = " (%s)" % (path,) if path else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace("Disk full%s: %s" % (where, e.strerror or e))
    return StorageError("Cannot use %s: %s" % (path or "the disk",
                                                e.strerror or e))


class HTTPError(Exception):
    """An error of the HTTP layer itself (a malformed request, a method a
    path does not take...), with its status, and whether the connection
    closes after the reply."""
    def __init__(self, status, message, close=False, headers=()):
        Exception.__init__(self, message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers


# The one place where errors of the domain become HTTP statuses
ERROR_STATUS = {NotFound: 404, Conflict: 409, BadInput: 400, TooLarge: 413,
                Unsupported: 415, NoSpace: 507, StorageError: 500,
                Forbidden: 403, Unauthenticated: 401, Busy: 503,
                CameraFailed: 502, CameraTimeout: 504}


def error_status(err):
    # the status of a CuraError, subclasses included (a bare one: 500)
    for cls in type(err).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500


def http_error(err, close=False):
    """The HTTPError that answers err (an HTTPError or a CuraError)."""
    if isinstance(err, HTTPError):
        return err
    headers = ()
    if isinstance(err, Unauthenticated):
        headers = [("WWW-Authenticate", err.challenge)]
    return HTTPError(error_status(err), err.message,
                     close=close or isinstance(err, Untrusted),
                     headers=headers)


def error_body(status, message):
    """The JSON body of every error reply, in both processes."""
    return json.dumps({"message": message, "status": status}).encode()
