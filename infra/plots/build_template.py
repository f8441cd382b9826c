"""Build infra/plots/offline.html: DVC's plot page with vega, vega-lite and vega-embed inside it.

`dvc plots show` writes a page that loads these three libraries from a CDN (cdn.jsdelivr.net):
offline it is a blank page. .dvc/config points DVC at this template instead
(`plots.html_template`), which holds the libraries inline, so the page draws its charts with no
request leaving the machine (tests/test_first_steps.py checks it in headless Chromium).

The versions are pinned here; the tarballs come from the npm registry (`npm pack`) and must
match the registry's sha512 integrity recorded below. The output is committed: run this only
to change a version (`make plots-template`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "offline.html"
# package: (version, file in the tarball, npm's dist.integrity). vega-embed's UMD build reads the
# globals `vega` and `vegaLite`, so the order matters.
PACKAGES = {
    "vega": ("5.33.1", "package/build/vega.min.js",
             "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw=="),
    "vega-lite": ("5.23.0", "package/build/vega-lite.min.js",
                  "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA=="),
    "vega-embed": ("6.29.0", "package/build/vega-embed.min.js",
                   "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q=="),
}
# DVC's own page (dvc_render.html.PAGE_HTML) with the scripts inline instead of its `{scripts}`
# placeholder: a template without `{scripts}` gets none of DVC's CDN tags.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Built by infra/plots/build_template.py from the npm registry: {names}.
{licenses}
    -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def fetch(name: str, version: str, member: str, integrity: str, into: Path) -> tuple[str, str]:
    """(the library's code, its license text) from the npm tarball, checked against `integrity`."""
    subprocess.run(["npm", "pack", f"{name}@{version}", "--silent", "--pack-destination", str(into)],
                   check=True, stdout=subprocess.DEVNULL)
    tarball = into / f"{name}-{version}.tgz"
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if digest != integrity:
        sys.exit(f"{tarball.name}: integrity {digest} is not the pinned {integrity}")
    with tarfile.open(tarball) as tar:
        code = tar.extractfile(member).read().decode()
        names = tar.getnames()
        license_text = tar.extractfile("package/LICENSE").read().decode() if "package/LICENSE" in names else \
            f"{json.loads(tar.extractfile('package/package.json').read())['license']} (package.json; " \
            "Copyright (c) 2015, University of Washington Interactive Data Lab)"
    if "</script" in code.lower() or "{plot_divs}" in code:
        sys.exit(f"{name}: its code cannot sit inside a <script> tag of a DVC template")
    return code, license_text


def main() -> None:
    scripts, licenses = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, member, integrity) in PACKAGES.items():
            code, license_text = fetch(name, version, member, integrity, Path(tmp))
            scripts.append(f"    <script>/* {name}@{version} */\n{code}\n    </script>")
            licenses.append(f"{name}@{version}:\n{license_text.replace('--', '- -').strip()}")
    names = ", ".join(f"{n}@{v[0]}" for n, v in PACKAGES.items())
    OUT.write_text(PAGE.format(names=names, licenses="\n\n".join(licenses), scripts="\n".join(scripts)))
    print(f"{OUT}: {OUT.stat().st_size:,} bytes ({names})")


if __name__ == "__main__":
    main()
