"""extraDockerfileSteps that try to smuggle an instruction past the allow-list.

Each would make the engine read a ``COPY --from`` (another account's image, from the
engine's cache) or another forbidden instruction where a naive check sees only RUN steps.
The API, the grammar and both builders must refuse every one; the fragment is what the
refusal must say.
"""

STOLEN = "COPY --from=127.0.0.1:5000/00000000-0000-0000-0000-000000000000/victim:1 /secret /stolen"

SMUGGLING = {
    # The engine does not continue a line ending in an escaped backslash: the COPY is its own.
    "escaped backslash": (f"RUN echo \\\\\n{STOLEN}\nRUN cat /stolen", "line 1: ends with a backslash"),
    # Nor one whose backslash is followed by a non-breaking (or other non-tab) space.
    "backslash, no-break space": (f"RUN echo \\\u00a0\n{STOLEN}", "line 1: ends with a backslash"),
    "backslash, ideographic space": (f"RUN echo \\\u3000\n{STOLEN}", "line 1: ends with a backslash"),
    "lone backslash line": (f"RUN echo a \\\n\\\n{STOLEN}", "line 2: ends with a backslash"),
    # Line breaks to Python's splitlines that are not line breaks to Go's scanner, or the reverse.
    "line separator": (f"RUN echo hi\u2028{STOLEN}", "U+2028"),
    "paragraph separator": (f"RUN echo hi\u2029{STOLEN}", "U+2029"),
    "next line (C1)": (f"RUN echo hi\x85{STOLEN}", "U+0085"),
    "vertical tab": (f"RUN echo hi\x0b{STOLEN}", "U+000B"),
    "form feed": (f"RUN echo hi\x0c{STOLEN}", "U+000C"),
    "file separator": (f"RUN echo hi\x1c{STOLEN}", "U+001C"),
    "lone carriage return": (f"RUN echo hi\r{STOLEN}", "carriage return"),
    "NUL": (f"RUN echo hi\x00{STOLEN}", "U+0000"),
    "byte order mark": (f"\ufeff{STOLEN}", "U+FEFF"),
    "lone surrogate": ("LABEL a=\ud800", "U+D800"),
    # A parser directive, were the steps ever placed first, would change the escape character.
    "escape directive": (f"# escape=`\nRUN echo `\n{STOLEN}", "parser directives"),
    "syntax directive": ("# syntax=docker/dockerfile:1.4\nRUN echo hi", "parser directives"),
    # BuildKit's RUN flags mount another image, or reach the host's network.
    "RUN --mount": (
        "RUN --mount=type=bind,from=127.0.0.1:5000/other/victim:1,target=/v cat /v/secret",
        "RUN options (--mount",
    ),
    "RUN --network": ("RUN --network=host echo hi", "RUN options (--network"),
    # A heredoc body is more instructions to a parser that does not know heredocs.
    "heredoc": (f"RUN <<EOF\n{STOLEN}\nEOF", "heredocs"),
    # Plainly forbidden instructions, in any case and layout.
    "lower-case copy": ("copy --from=x /a /b", "COPY is not allowed"),
    "tab-indented FROM": ("RUN true\n\tFROM 127.0.0.1:5000/other/victim:1", "line 2: FROM is not allowed"),
    "ONBUILD": (f"ONBUILD {STOLEN}", "ONBUILD is not allowed"),
    "continued into COPY": (f"RUN echo \\\n\n# comment\n\\\n{STOLEN}", "line 4: ends with a backslash"),
    "dangling continuation": ("RUN echo \\", "ends with a line continuation"),
}

# Accepted texts and what the builders write for them: every rendered line is one
# instruction, printable, and cannot continue into the next.
ACCEPTED = {
    "continuation, comment and blank line": (
        "run apt-get update \\\n\n  # why\n  && echo ok",
        ['RUN ["/bin/sh", "-c", "apt-get update   && echo ok"]'],
    ),
    "backslash then tab": ("RUN echo a \\\t\n  b", ['RUN ["/bin/sh", "-c", "echo a   b"]']),
    "CRLF": ("RUN echo a\r\nENV A=1\r\n", ['RUN ["/bin/sh", "-c", "echo a"]', "ENV A=1"]),
    "exec form": ('RUN ["python3", "-c", "print(\'é\')"]', ['RUN ["python3", "-c", "print(\'\\u00e9\')"]']),
    "not JSON runs as shell": ("RUN [ -f /x ] || echo none", ['RUN ["/bin/sh", "-c", "[ -f /x ] || echo none"]']),
    "escaped backslash inside": ('RUN printf "a\\\\b"', ['RUN ["/bin/sh", "-c", "printf \\"a\\\\\\\\b\\""]']),
    "env forms": (
        'ENV A=1 B="two words" PATH=/opt/x:$PATH\nENV LEGACY some value',
        ['ENV A=1 B="two words" PATH=/opt/x:$PATH', "ENV LEGACY some value"],
    ),
    "label, arg, expose": (
        "LABEL team=ml org.example/x=1\nARG VERSION=1\nexpose 9000 53/udp",
        ["LABEL team=ml org.example/x=1", "ARG VERSION=1", "EXPOSE 9000 53/udp"],
    ),
}
