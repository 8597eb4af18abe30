"""How a Windows program splits its command line, for tests that check cmd.exe quoting."""

from __future__ import annotations


def windows_argv(command: str) -> list[str]:
    """Split a command line as a Windows program does (CommandLineToArgvW / the MSVC runtime)."""
    args, current, in_quotes, i, started = [], [], False, 0, False
    while i < len(command):
        ch = command[i]
        if ch == "\\":
            n = len(command) - i - len(command[i:].lstrip("\\"))
            if i + n < len(command) and command[i + n] == '"':
                current.append("\\" * (n // 2))
                if n % 2:
                    current.append('"')
                    i += n + 1
                else:
                    i += n  # the quote toggles below
                started = True
                continue
            current.append("\\" * n)
            i += n
            started = True
            continue
        if ch == '"':
            in_quotes = not in_quotes
            started = True
        elif ch in " \t" and not in_quotes:
            if started:
                args.append("".join(current))
                current, started = [], False
        else:
            current.append(ch)
            started = True
        i += 1
    if started:
        args.append("".join(current))
    return args
