"""A userspace WireGuard on wiretun: a sans-I/O protocol core, a device, the UAPI and a daemon."""
