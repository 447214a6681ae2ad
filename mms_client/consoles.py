"""The client's two consoles: results on stdout, progress and messages on stderr (so a
command's stdout holds its result alone). Shared by the CLI and the SDK's progress bars."""

from __future__ import annotations

from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
