"""OpenSSH's sftp-server behind a pipe that trickles its replies once the client closes a file.

sshd runs this as its SFTP subsystem (``python3 -m tests.servers.sftp_trickle``, or the file
itself). Requests pass to the real sftp-server unchanged; its replies pass unchanged too,
until an SSH_FXP_CLOSE request went by: from then on every reply byte goes out on its own,
``DELAY`` seconds apart. sshd sends each as a channel data message of one byte, so no wait
of the client's for data is ever long, and the CLOSE reply takes minutes to arrive.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
SSH_FXP_CLOSE = 4
DELAY = 0.5


def main() -> None:
    child = subprocess.Popen([SFTP_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    closing = threading.Event()

    def requests() -> None:
        buf = b""
        while chunk := os.read(0, 65536):
            child.stdin.write(chunk)
            child.stdin.flush()
            buf += chunk
            while len(buf) >= 5:  # uint32 length, then the type
                length, kind = struct.unpack_from(">IB", buf)
                if len(buf) < 4 + length:
                    break
                if kind == SSH_FXP_CLOSE:
                    closing.set()
                buf = buf[4 + length :]
        child.stdin.close()

    threading.Thread(target=requests, daemon=True).start()
    while chunk := os.read(child.stdout.fileno(), 65536):
        if not closing.is_set():
            os.write(1, chunk)
            continue
        for i in range(len(chunk)):
            os.write(1, chunk[i : i + 1])
            time.sleep(DELAY)
    sys.exit(child.wait())


if __name__ == "__main__":
    main()
