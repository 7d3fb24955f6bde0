"""Container health check: exit 0 when mt-serve on this container answers 200 on /health/ready, else 1."""

import os
import sys
import urllib.error
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('MT_PORT', '8000')}/health/ready"
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as error:
    print(f"{url}: {error}", file=sys.stderr)
    sys.exit(1)
