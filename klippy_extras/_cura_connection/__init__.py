# cura_connection's parts, loaded by klippy_extras/cura_connection.py
# (the file Klippy loads for [cura_connection]).  README.md maps them.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
