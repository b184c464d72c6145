import errno



class CuraError(Exception):
    """A request the printer cannot carry out, said in the domain's terms.
    Code outside the HTTP chapter raises these (never HTTPError); the HTTP
    layer turns each kind into a status in one place (ERROR_STATUS)."""
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
    def __init__(self, status, message, close=False, headers=()):
        Exception.__init__(self, message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers


# The one place where errors of the domain become HTTP statuses
ERROR_STATUS = {NotFound: 404, Conflict: 409, BadInput: 400, TooLarge: 413,
                Unsupported: 415, NoSpace: 507, StorageError: 500}


def error_status(err):
    # the status of a CuraError, subclasses included (a bare one: 500)
    for cls in type(err).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500
