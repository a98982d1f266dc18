"""The ``wiretun`` command: ``wiretun example [--seconds N]`` and friends."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"example": "wiretun.example"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(
            "usage: wiretun {example} [options]\n\n"
            "  example   Wintun's example.c on wiretun (adapter Demo, 10.6.7.7/24, ICMP echo)",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    status: int = importlib.import_module(commands[argv[0]]).main(argv[1:])
    return status


if __name__ == "__main__":
    sys.exit(main())
