# TEMPORARY stand-in until the Moonraker client lands.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
class MemberError(Exception):
    def __init__(self, message):
        Exception.__init__(self, message)
        self.message = message


class MoonrakerMember:
    def __init__(self, name, url, api_key=None, timeout=5.):
        self.name, self.url, self.api_key = name, url, api_key

    def close(self):
        pass
