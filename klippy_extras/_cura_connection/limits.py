# Limits both processes keep: body sizes, timeouts, connections.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
MAX_JSON_BODY = 64 * 1024
MAX_MATERIAL_BODY = 4 * 1024 * 1024
MAX_PREVIEW_SIZE = 16 * 1024 * 1024
READ_CHUNK = 256 * 1024


# A client that sends nothing for this long loses its connection and thread
# (the undocumented option request_timeout shortens it for tests).
REQUEST_TIMEOUT = 60.


# Beyond this many open connections new ones get 503: a flood of idle
# connections must not grow threads without bound.
MAX_CONNECTIONS = 100


# Of those, at most this many at once may be requests the front hands to
# Klippy's side (slow ones hold theirs there): the rest stays free for the
# reads the front answers
MAX_HANDED_OVER = MAX_CONNECTIONS - 20
