#!/usr/bin/env bash
# The GPU checks on a GPU machine, from a clean clone:   tests/gpu/run.sh
# Installs the GPU build if needed, shows the GPUs, runs `make test-gpu`, and exits non-zero when any
# check failed or errored, when none ran, or when any was skipped: a GPU run that skipped (no CUDA
# device visible, a CPU torch in .venv) has checked nothing and must not pass.
set -uo pipefail
cd "$(dirname "$0")/../.."

make install EXTRAS=gpu,dev || { echo "run.sh: make install EXTRAS=gpu,dev failed" >&2; exit 1; }

echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi || echo "run.sh: nvidia-smi failed (no driver or no device?)" >&2
else
  echo "run.sh: nvidia-smi not found: not a GPU machine" >&2
fi
echo "== torch"
.venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'devices', torch.cuda.device_count())"

report="$(mktemp -d)/gpu-junit.xml"
echo "== make test-gpu (junit: $report)"
make test-gpu GPU_PYTEST_ARGS="--junitxml=$report"
rc=$?

# pytest's exit code says nothing of skips; the junit report counts them.
.venv/bin/python - "$report" "$rc" <<'PY'
import sys
import xml.etree.ElementTree as ET

path, rc = sys.argv[1], int(sys.argv[2])
try:
    root = ET.parse(path).getroot()
except (OSError, ET.ParseError) as e:
    print(f"run.sh: no test report ({e}); make test-gpu exited {rc}", file=sys.stderr)
    sys.exit(rc or 1)
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"run.sh: {n['tests']} GPU checks: {passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
if n["skipped"]:
    for case in root.iter("testcase"):
        skip = case.find("skipped")
        if skip is not None:
            print(f"  skipped {case.get('classname')}.{case.get('name')}: {skip.get('message')}", file=sys.stderr)
    print("run.sh: FAIL: checks were skipped, so this run proves nothing about the GPU", file=sys.stderr)
    sys.exit(1)
if n["tests"] == 0:
    print("run.sh: FAIL: no GPU checks ran", file=sys.stderr)
    sys.exit(1)
if rc != 0 or n["failures"] or n["errors"]:
    sys.exit(rc or 1)
PY
