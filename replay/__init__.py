"""replay: read, play and verify guarita recordings."""

from bastion.logs import capture_warnings as _capture_warnings

_capture_warnings()  # warnings go to the log (bastion/logs.py), not stderr
