"""
goma-pt: Goma Gateway's passThrough entry point (TCP and UDP port
forwarding) as a Twisted service and twistd plugin.
"""

__version__ = "0.1.0"
