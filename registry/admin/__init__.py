"""The admin side of the registry: HTTP endpoint, dashboard pages, JSON views, grading.

It sees the running daemon only through ``view.DaemonView``, which the server
builds and passes in: nothing here imports ``registry.server``.
``core/`` (grading, access, slots) and ``pages`` are pure (values in, values out).
"""
