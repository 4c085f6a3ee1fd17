"""Container health check: exit 0 when the local anoscope service answers 200 on a path.

    python /usr/local/bin/anoscope-healthcheck [/readyz]

Used by the image's HEALTHCHECK and compose.yaml. Standard library only (the image carries no curl).
It talks to 127.0.0.1 on ANOSCOPE_PORT (default 8000) and bypasses any HTTP proxy set in the
environment, so a site proxy cannot make a healthy container look sick.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(path: str = "/readyz", *, port: str | None = None, timeout: float = 4.0) -> tuple[bool, str]:
    """Return (healthy, what happened) for GET http://127.0.0.1:<port><path>."""
    port = port or os.environ.get("ANOSCOPE_PORT", "8000")
    url = f"http://127.0.0.1:{port}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:  # 503 while models load
        return False, f"{url} answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url} unreachable: {exc}"
    return status == 200, f"{url} answered {status}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/readyz"
    healthy, detail = check(path)
    print(detail, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
