"""The `mms` command-line client and the Python client it uses (`mms_client.api.ServiceClient`).

It speaks to the service over its REST API only and imports nothing of the service (`app`,
`workers`, `scoring_server`): installed alone (`pip install mms`, no extras) it brings httpx,
typer, rich and stamina, not the server's dependencies. The server's commands join the same
`mms` command through the `mms.commands` entry points (see `mms_client.cli`).
"""
