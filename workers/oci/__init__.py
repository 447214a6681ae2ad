"""Daemonless image assembly: reproducible layers, image configs and the registry protocol.

Used by the ``oci`` builder (``workers/builders/oci.py``), which builds an image the way
Jib, ko and ``crane append`` do: new layers are written directly as files and pushed over
the OCI Distribution API on top of a base image that is never pulled whole.
"""
