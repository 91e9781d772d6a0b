"""Run a command with its stderr on a pseudo-terminal, as a user at a terminal sees it."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios


def run_with_terminal_stderr(argv: list[str], **kwargs) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `argv`, stderr on a 120-column pseudo-terminal; kwargs go to subprocess.run."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=slave, **kwargs)
    finally:
        os.close(slave)
    err = b""
    try:
        while chunk := os.read(master, 1 << 16):
            err += chunk
    except OSError:  # the terminal's other side is closed: all is read
        pass
    os.close(master)
    return p.returncode, p.stdout.decode(), err.decode(errors="replace")
