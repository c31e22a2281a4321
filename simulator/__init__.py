"""In-process, virtual-time network simulator running the daemon's own protocol code."""
