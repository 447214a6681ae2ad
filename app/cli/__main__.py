"""`python -m app.cli`: the `mms` command with the service's own commands, whether or not the
installed entry points name them (a source checkout run with PYTHONPATH). The build worker's
commands come with `python -m workers`."""

from app.cli.main import register
from mms_client.cli import main

main(register)
