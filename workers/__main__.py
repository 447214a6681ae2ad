"""`python -m workers`: the whole `mms` command, the service's and the workers' commands
included whether or not the installed entry points name them (a source checkout run with
PYTHONPATH; `mms serve` starts its build worker so)."""

from app.cli.main import register as server_commands
from mms_client.cli import main
from workers.cli import register as worker_commands

main(server_commands, worker_commands)
