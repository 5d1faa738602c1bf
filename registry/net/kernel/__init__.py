"""The listeners' socket filter (bans and the silent drop, in the kernel): one
interface (banfilter.py), two ways (ebpf.py, classic.py), one vocabulary (bpf.py)."""
