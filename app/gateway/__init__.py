"""The scoring gateway (`mms gateway`): the one way in to a web service's replicas.

It checks the caller's key against the service's digests, drops ``Authorization``, and
forwards the request to a ready replica of the service's traffic generation over pooled
keep-alive connections (docs/design/web-services.md §2):

- ``route_table``: what the database says of a service (digests, generation, ready
  replicas), cached for MMS_GATEWAY_CACHE_SECONDS;
- ``forwarder``: a small HTTP/1.1 client that treats every replica's reply as hostile;
- ``app``: the ASGI application that ties them together.
"""
