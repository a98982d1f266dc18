"""``wiretun-wg``: a userspace WireGuard daemon with wireguard-go's command line.

    wiretun-wg [-f|--foreground] INTERFACE
    wiretun-wg --version

It creates the TUN adapter INTERFACE, a :class:`~wiretun.wireguard.device.Device` on it and the UAPI
socket ``/var/run/wireguard/INTERFACE.sock`` that ``wg(8)`` configures it through. Without ``-f`` it
daemonizes: it starts itself again in the foreground in a new session (marked by
``WG_PROCESS_FOREGROUND=1``, as wireguard-go does) and exits 0 only once that child reports the
interface and the socket ready, so ``wg-quick`` (``WG_QUICK_USERSPACE_IMPLEMENTATION=wiretun-wg``) can
run ``wg setconf`` straight away.

``WIRETUN_KEYLOG_FILE=path`` appends every handshake's keys to ``path`` for Wireshark (see
:mod:`wiretun.wireguard.keylog`; off by default, and a warning is logged when it is on).

``LOG_LEVEL`` is ``verbose`` (or ``debug``), ``error`` (the default) or ``silent``; lines go to stdout
as wireguard-go writes them (``DEBUG: (wg0) 2006/01/02 15:04:05 message``). wiretun's log levels keep
their meaning: info is ``DEBUG`` (shown at ``verbose``), warnings are ``WARNING`` and errors ``ERROR``
(both shown at ``error`` and ``verbose``). A daemonized child keeps stdout and stderr only when
LOG_LEVEL is set and not silent.

The daemon exits 0 on SIGINT/SIGTERM, when its interface is deleted (``ip link del``, which is how
``wg-quick down`` stops userspace implementations, also in the namespace it was moved to; moving it
with ``ip link set INTERFACE netns B`` is not a deletion: the daemon follows it) and when its socket
file is deleted, and removes its socket and interface on the way out.
"""

from __future__ import annotations

import enum
import os
import platform
import select
import signal
import subprocess
import sys
import threading
import time
from typing import TextIO

from .. import log

ENV_FOREGROUND = "WG_PROCESS_FOREGROUND"  # wireguard-go's marker for the re-executed child
ENV_READY_FD = "WIRETUN_WG_READY_FD"  # where the child reports "ready" or the reason it failed
TUNNEL_TYPE = "WireGuard"
POLL_INTERVAL = 0.5  # seconds between checks that the interface and the socket still exist
READY_TIMEOUT = 60.0  # how long the daemonizing parent waits for the child

EXIT_SUCCESS = 0
EXIT_FAILURE = 1


class LogLevel(enum.IntEnum):
    SILENT = 0
    ERROR = 1
    VERBOSE = 2


def log_level_from_env(value: str | None) -> LogLevel:
    """wireguard-go's reading of LOG_LEVEL: verbose/debug, error, silent; anything else is error."""
    if value in ("verbose", "debug"):
        return LogLevel.VERBOSE
    if value == "silent":
        return LogLevel.SILENT
    return LogLevel.ERROR


class Logger:
    """Lines like wireguard-go's: ``DEBUG: (wg0) 2006/01/02 15:04:05 message`` on stdout."""

    def __init__(self, level: LogLevel, interface: str, stream: TextIO | None = None) -> None:
        self.level = level
        self.interface = interface
        self._stream = stream
        self._lock = threading.Lock()

    def _write(self, tag: str, message: str) -> None:
        stamp = time.strftime("%Y/%m/%d %H:%M:%S")
        line = f"{tag}: ({self.interface}) {stamp} {message}\n"
        with self._lock:
            stream = self._stream or sys.stdout
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass  # stdout gone (closed terminal, broken pipe): logging must not kill the daemon

    def verbose(self, message: str) -> None:
        if self.level >= LogLevel.VERBOSE:
            self._write("DEBUG", message)

    def warning(self, message: str) -> None:
        if self.level >= LogLevel.ERROR:
            self._write("WARNING", message)

    def error(self, message: str) -> None:
        if self.level >= LogLevel.ERROR:
            self._write("ERROR", message)

    def log(self, level: log.LogLevel, message: str) -> None:
        """One message of wiretun's log at its own level: info, warning or error."""
        if level == log.LogLevel.INFO:
            self.verbose(message)
        elif level == log.LogLevel.WARN:
            self.warning(message)
        else:
            self.error(message)

    def bridge(self) -> None:
        """Route wiretun's log (adapter, session, device, UAPI) to this logger."""
        if self.level == LogLevel.SILENT:
            log.set_logger(None)
            return

        def callback(level: log.LogLevel, _timestamp: int, message: str) -> None:
            self.log(level, message)

        log.set_logger(callback)


def _version_text() -> str:
    from .. import __version__

    return (
        f"wiretun-wg v{__version__}\n\n"
        f"Userspace WireGuard daemon for {sys.platform}-{platform.machine()}, built on wiretun.\n"
        "Information available at https://www.wireguard.com.\n"
    )


def _usage(prog: str) -> str:
    return f"Usage: {prog} [-f/--foreground] INTERFACE-NAME\n"


class _Ready:
    """The child's side of the readiness pipe (nothing when running in the foreground by hand)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        value = os.environ.pop(ENV_READY_FD, None)
        if value is not None and value.isdigit():
            self._fd = int(value)

    def _send(self, text: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, text.encode("utf-8", "replace")[:4000])
        except OSError:
            pass
        finally:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def ready(self) -> None:
        self._send("ready\n")

    def failed(self, message: str) -> None:
        self._send(f"error {message}\n")


def run_foreground(interface: str, logger: Logger) -> int:
    """Create the adapter, device and UAPI socket; serve until told to stop; clean up."""
    ready = _Ready()
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    # Installed first: a SIGTERM during start-up then means "stop once started", with full cleanup.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def fail(message: str) -> int:
        logger.error(message)
        ready.failed(message)
        return EXIT_FAILURE

    try:
        import wiretun

        from .device import Device
        from .keylog import ENV_KEYLOG_FILE
        from .uapi import UAPIServer, socket_in_use, socket_path

        path = socket_path(interface)
    except Exception as e:
        return fail(f"Cannot start: {e}")
    # Refuse before touching the interface: a second daemon must not disturb the first one's adapter.
    if socket_in_use(path):
        return fail(f"UAPI listen error: {path} is in use; is a daemon already running for {interface}?")

    logger.verbose("Starting wiretun-wg")
    try:
        adapter = wiretun.Adapter.create(interface, TUNNEL_TYPE)
    except Exception as e:
        return fail(f"Failed to create TUN device: {e}")
    device = server = None
    try:
        try:
            # WIRETUN_KEYLOG_FILE: append handshake keys for Wireshark (off unless set; see keylog.py).
            device = Device(adapter, keylog=os.environ.get(ENV_KEYLOG_FILE) or None)
        except Exception as e:
            return fail(f"Failed to create device: {e}")
        name = device.name
        logger.interface = name
        try:
            server = UAPIServer(name, device)
        except Exception as e:
            return fail(f"UAPI listen error: {e}")
        try:
            device.start()
        except Exception as e:
            return fail(f"Failed to start device: {e}")
        logger.verbose("Device started")
        logger.verbose("UAPI listener started")
        ready.ready()

        while not stop.wait(POLL_INTERVAL):
            # A deleted interface is the normal way to stop (wg-quick down): info, not an error. A move
            # to another namespace is not a deletion: the device follows the interface there.
            if device.closed.is_set():
                if device.interface_deleted:
                    logger.verbose(f"Interface {name} deleted; shutting down")
                else:
                    logger.warning("Device closed while its interface still exists; shutting down")
                break
            if not server.socket_intact:
                logger.verbose(f"UAPI socket {server.path} was deleted")
                break
        if received:
            logger.verbose(f"Received {signal.Signals(received[0]).name}")
        logger.verbose("Shutting down")
        return EXIT_SUCCESS
    finally:
        # Socket first, so wg stops finding a daemon that is going away; then the device, then the
        # adapter (which deletes the interface unless `ip link del` already did).
        for what, closer in (("UAPI server", server), ("device", device), ("adapter", adapter)):
            if closer is None:
                continue
            try:
                closer.close()
            except Exception as e:
                logger.error(f"Closing the {what} failed: {e}")
        ready.failed("exited before it was ready")  # no-op once ready was reported


def daemonize(interface: str, logger: Logger) -> int:
    """Start ``wiretun-wg`` again in the foreground in a new session; return once it is ready."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ)
    env[ENV_FOREGROUND] = "1"
    env[ENV_READY_FD] = str(write_fd)
    keep_output = os.environ.get("LOG_LEVEL", "") != "" and logger.level != LogLevel.SILENT
    devnull = subprocess.DEVNULL
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "wiretun.wireguard.daemon", interface],
            env=env,
            stdin=devnull,
            stdout=None if keep_output else devnull,
            stderr=None if keep_output else devnull,
            pass_fds=(write_fd,),
            start_new_session=True,  # setsid: no controlling terminal, not killed with our group
        )
    except OSError as e:
        os.close(read_fd)
        os.close(write_fd)
        logger.error(f"Failed to daemonize: {e}")
        return EXIT_FAILURE
    os.close(write_fd)
    report = b""
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                child.kill()
                child.wait()
                logger.error(f"Daemon did not become ready within {READY_TIMEOUT:g} s")
                return EXIT_FAILURE
            readable, _, _ = select.select([read_fd], [], [], min(left, 1.0))
            if readable:
                chunk = os.read(read_fd, 4096)
                if not chunk:
                    break
                report += chunk
    finally:
        os.close(read_fd)
    text = report.decode("utf-8", "replace")
    if text.startswith("ready"):
        return EXIT_SUCCESS
    status = child.wait()
    message = text[len("error "):].strip() if text.startswith("error ") else f"daemon exited with status {status}"
    if not keep_output:  # otherwise the child has already printed it
        logger.error(message)
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wiretun-wg`` console script."""
    args = sys.argv[1:] if argv is None else argv
    prog = os.path.basename(sys.argv[0]) if argv is None and sys.argv and sys.argv[0] else "wiretun-wg"
    if prog in ("__main__.py", "daemon.py", "-m", "-c"):
        prog = "wiretun-wg"
    if args == ["--version"]:
        sys.stdout.write(_version_text())
        return EXIT_SUCCESS
    if args in (["-h"], ["--help"]):
        sys.stdout.write(_usage(prog))
        return EXIT_SUCCESS
    foreground = False
    if len(args) == 2 and args[0] in ("-f", "--foreground"):
        foreground, interface = True, args[1]
    elif len(args) == 1:
        interface = args[0]
    else:
        sys.stderr.write(_usage(prog))
        return EXIT_FAILURE
    if not interface or interface.startswith("-"):
        sys.stderr.write(_usage(prog))
        return EXIT_FAILURE
    foreground = foreground or os.environ.get(ENV_FOREGROUND) == "1"

    logger = Logger(log_level_from_env(os.environ.get("LOG_LEVEL")), interface)
    if not foreground:
        return daemonize(interface, logger)
    logger.bridge()
    try:
        return run_foreground(interface, logger)
    finally:
        log.reset_logger()


if __name__ == "__main__":
    sys.exit(main())
