"""The Linux backend: the only place that knows ioctls and netlink."""
